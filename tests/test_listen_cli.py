"""``omi-bridge listen`` as a user runs it: a separate process against the simulator process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import pytest
from omi_bridge_sim.control import SimControlClient

from bridge.core.pcm import SAMPLE_RATE

ADDRESS = "C0:FF:EE:00:00:07"
TIMEOUT = 60.0
"""Upper bound for the simulator start and for listen (a 5 s recording plus connects)."""

LISTEN_SECONDS = 5.0
FRAME = 320  # codec 21: 20 ms


@pytest.fixture
def simulator():
    """``python -m omi_bridge_sim`` with one Omi: 2 % loss, duplicates and a link drop at 2.5 s."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "omi_bridge_sim", "--omi", ADDRESS, "--loss", "0.02",
         "--duplicate", "0.02", "--seed", "4", "--link-drop-at", "2.5", "--after-clip", "loop"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the ready line (blocking read with the process as timer)
        assert line, proc.stderr.read()
        yield json.loads(line)
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)


def test_listen_records_the_timeline_to_a_wav_and_reports_link_stats(simulator, tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text("[link]\nreconnect_min_seconds = 0.1\n")
    wav = tmp_path / "out.wav"
    env = {**os.environ, **simulator["env"]}
    env.pop("OMI_BRIDGE_CONFIG", None)
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "listen", ADDRESS, "--seconds", str(LISTEN_SECONDS),
         "--wav", str(wav), "--json", "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["codec"] == 21
    assert stats["seconds"] == pytest.approx(LISTEN_SECONDS, abs=FRAME / SAMPLE_RATE)
    assert stats["reconnects"] == 1  # the link dropped at 2.5 s and came back
    assert (stats["battery"], stats["firmware"]) == (87, "3.0.9")
    assert stats["frames"] > 150 and stats["packets"] >= stats["frames"]
    with wave.open(str(wav)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, SAMPLE_RATE)
        assert abs(w.getnframes() - LISTEN_SECONDS * SAMPLE_RATE) <= FRAME

    async def sim_stats():
        async with SimControlClient(simulator["bus"]) as sim:
            return await sim.stats(ADDRESS)

    model = asyncio.run(sim_stats())["model"]
    # What the bridge counted is what the pendant did (a loss or duplicate in flight when the
    # recording ended may be missing from the bridge's side, never invented).
    assert 0 < stats["lost_frames"] <= model["frames_lost_in_air"]
    assert stats["duplicates"] <= model["duplicates"]
    assert stats["frames"] <= model["frames_sent"]


def test_listen_without_a_device_says_what_to_do(simulator, tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text("[link]\nscan_timeout_seconds = 1.0\n")
    env = {**os.environ, **simulator["env"]}
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "listen", "AA:BB:CC:DD:EE:FF", "--seconds", "1",
         "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 1
    assert "AA:BB:CC:DD:EE:FF was not seen" in result.stderr
    assert "omi-bridge scan" in result.stderr


def test_scan_json_lists_the_pendant(simulator, tmp_path: Path):
    env = {**os.environ, **simulator["env"]}
    env.pop("OMI_BRIDGE_CONFIG", None)
    config = tmp_path / "config.toml"
    config.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "scan", "--timeout", "1", "--json", "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert [(d["address"], d["kind"], d["name"]) for d in found] == [(ADDRESS, "omi", "Omi")]
    assert isinstance(found[0]["rssi"], int)


def test_frame_listen_names_its_pcm_format_and_a_silent_frame_is_not_called_unreachable():
    from datetime import UTC, datetime

    from bridge.cli.listen import _no_audio_error, audio_format
    from bridge.config import Config, DeviceConfig
    from bridge.core.stats import LinkStats

    frame = DeviceConfig("frame", "AA:BB:CC:DD:EE:01")
    assert audio_format(frame, Config(), None) == "pcm 16-bit 8 kHz (Frame)"
    # Frame has no codec byte: a Frame that connected but sent nothing was reported as "could not
    # connect", sending the user to check range and pairing instead of the glasses.
    stats = LinkStats(connected_since=datetime.now(UTC))
    assert "connected but sent no audio" in str(_no_audio_error(frame, stats, connected=True))
    assert "could not connect" in str(_no_audio_error(frame, LinkStats(), connected=False))
