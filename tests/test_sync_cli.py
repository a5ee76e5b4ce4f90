"""``omi-bridge sync`` as a user runs it: its own process, real bleak against the fake bluetoothd
and a simulated pendant holding speech it stored while away; the real tiny.en model."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from omi_bridge_sim.omi import FrameEncoder, OmiModel
from omi_bridge_sim.omi_storage import PendantStorage

from bridge.app.state import DaemonLock
from bridge.audio.files import decode_file
from bridge.cli import main
from bridge.core.pcm import SAMPLE_RATE
from bridge.outbox.store import Outbox

ADDRESS = "C0:FF:EE:00:00:05"
TIMEOUT = 120.0
"""Model load, connect, sync and transcription of an 11 s clip (normally ~10 s)."""
SPOKEN_AT = 1_780_000_000.0
"""When the wearer spoke, away from the Pi."""
FAST_RATE = 400_000.0
"""Transfer rate: 12× a CV1's ~32 kB/s (omi-storage.md §8), so the sync takes a second."""
CORPUS = Path(__file__).resolve().parent / "data"


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[storage]\ndir = "{tmp_path / "state"}"\n'
                    "[link]\nreconnect_min_seconds = 0.1\nscan_timeout_seconds = 5.0\n"
                    f'[[devices]]\nkind = "omi"\naddress = "{ADDRESS}"\nname = "pendant"\n'
                    f'[[devices]]\nkind = "omi"\naddress = "C0:FF:EE:00:00:06"\nname = "spare"\n')
    return path


@pytest.mark.asr
async def test_sync_fetches_transcribes_and_queues_what_the_pendant_stored(fake_bluez, tmp_path):
    storage = PendantStorage(rate_bytes_per_second=FAST_RATE)
    frames = storage.record_clip(decode_file(CORPUS / "jfk.flac"), SPOKEN_AT, FrameEncoder(21))
    storage.recording = False  # only the clip, not the microphone before the connect
    stored = storage.stored_bytes
    model = OmiModel(audio=np.zeros(SAMPLE_RATE, np.int16), after_clip="silence",
                     firmware="3.0.20", address=ADDRESS, storage=storage)
    await fake_bluez.add_device(model)
    config = write_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("OMI_BRIDGE_CONFIG", "RUNTIME_DIRECTORY")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "sync", "pendant", "--json", "--config", str(config),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 0, err.decode()
    summary = json.loads(out)
    assert summary["device"] == "pendant"
    assert summary["bytes"] == stored
    assert summary["audio_seconds"] == pytest.approx(frames * 0.02, abs=0.1)
    assert summary["conversations"] == 1
    assert 0 < summary["seconds"] < TIMEOUT
    # The progress line a user watches: bytes, audio minutes, rate.
    progress = err.decode()
    assert f"pendant: {stored / 1000:.0f} kB of {stored / 1000:.0f} kB (100%)" in progress
    assert "min of audio" in progress and "kB/s" in progress
    # Freed on the pendant, and queued for Omi at the time it was spoken.
    assert storage.unread == 0
    outbox = Outbox.open(tmp_path / "state")
    try:
        items = outbox.items()
    finally:
        outbox.close()
    assert len(items) == 1
    body = json.loads(items[0].body)
    started = datetime.fromisoformat(body["started_at"]).timestamp()
    assert started == pytest.approx(SPOKEN_AT, abs=2.0)
    text = " ".join(s["text"] for s in body["transcript_segments"]).lower()
    assert "country" in text

    # Again: nothing left on the pendant, nothing queued twice; the text summary says so.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "sync", "--config", str(config), ADDRESS.lower(),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 0, err.decode()
    assert "pendant: fetched 0 B" in out.decode()
    assert "0 offline conversations queued in the outbox" in out.decode()


def test_an_unknown_pendant_is_named_with_the_paired_ones(tmp_path, capsys) -> None:
    config = write_config(tmp_path)
    assert main(["sync", "necklace", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"no paired device 'necklace' in {config}" in err
    assert "paired pendants: pendant, spare" in err
    assert main(["sync", "--config", str(config)]) == 1
    assert "say which one" in capsys.readouterr().err


def test_sync_refuses_while_the_daemon_runs(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    config = write_config(tmp_path)
    lock = DaemonLock(tmp_path / "state")
    lock.acquire()
    try:
        assert main(["sync", "pendant", "--config", str(config)]) == 1
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert "the daemon is running and holds pendant" in err
    assert f"pid {os.getpid()}" in err and "sudo systemctl stop omi-bridge" in err
