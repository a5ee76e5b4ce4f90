"""`omi-bridge transcribe`: a file in, the exact request bodies the sender will post out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import wave
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from bridge.audio.files import decode_file as decode
from bridge.core.pcm import SAMPLE_RATE

pytestmark = pytest.mark.asr

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "sim" / "omi_bridge_sim" / "assets" / "demo_speech.flac"
STEREO = ROOT / "tests" / "data" / "stereo_diarization.wav"
"""Two speakers at once, one per channel (tests/data/NOTICE.md)."""
TIMEOUT = 300.0


def transcribe(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\ndir = "{tmp_path / "state"}"\n')
    return subprocess.run([sys.executable, "-m", "bridge", "transcribe", "--config", str(config), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def test_json_prints_one_valid_request_body_per_conversation(tmp_path: Path) -> None:
    audio = tmp_path / "memo.flac"
    shutil.copy(DEMO, audio)
    files = [str(audio), str(STEREO)]
    run = transcribe(tmp_path, *files, "--json")
    assert run.returncode == 0, run.stderr
    bodies = json.loads(run.stdout)
    assert len(bodies) == len(files)
    memo = bodies[0]
    text = " ".join(s["text"] for s in memo["transcript_segments"]).lower()
    assert "milk" in text and "thursday" in text
    started = datetime.fromisoformat(memo["started_at"])
    finished = datetime.fromisoformat(memo["finished_at"])
    assert started.tzinfo is not None and finished > started
    assert memo["source"] == "external_integration" and memo["language"] == "en"
    assert memo["client_session_id"].startswith("omi-bridge:file:")
    for body in bodies:
        segs = body["transcript_segments"]
        assert 1 <= len(segs) <= 500
        assert [s["start"] for s in segs] == sorted(s["start"] for s in segs)
        for s in segs:
            assert s["text"].strip() and 0 <= s["start"] < s["end"]
    # Two speakers at once: Whisper's words vary (temperature fallback), but some come out.
    assert any(s["text"].strip() for s in bodies[1]["transcript_segments"])

    # The same recording imported again (another name, another start) is the same conversation.
    again = tmp_path / "copy.flac"
    shutil.copy(DEMO, again)
    run2 = transcribe(tmp_path, str(again), "--json", "--started-at", "2026-01-31T09:30:00+01:00",
                      "--source", "omi")
    assert run2.returncode == 0, run2.stderr
    (body2,) = json.loads(run2.stdout)
    assert body2["client_session_id"] == memo["client_session_id"]
    assert body2["source"] == "omi"
    offset = datetime.fromisoformat(memo["started_at"]) - datetime.fromisoformat(memo["finished_at"])
    assert datetime.fromisoformat(body2["started_at"]) - datetime.fromisoformat(body2["finished_at"]) \
        == offset
    assert datetime.fromisoformat(body2["started_at"]) > datetime.fromisoformat("2026-01-31T08:30:00+00:00")


def test_a_stereo_file_is_mixed_down_so_neither_channel_is_lost(tmp_path: Path) -> None:
    mono = decode(DEMO)[: SAMPLE_RATE * 3]
    for channel in (0, 1):
        stereo = np.zeros((len(mono), 2), dtype=np.int16)
        stereo[:, channel] = mono
        path = tmp_path / f"ch{channel}.wav"
        with wave.open(str(path), "wb") as w:
            w.setnchannels(2)
            w.setsampwidth(2)
            w.setframerate(SAMPLE_RATE)
            w.writeframes(stereo.tobytes())
        got = decode(path).astype(float)
        assert len(got) == len(mono)
        corr = np.corrcoef(got, mono.astype(float))[0, 1]
        assert corr > 0.99, f"channel {channel} did not come through (correlation {corr:.2f})"


def test_plain_text_is_a_readable_transcript_and_bad_files_are_named(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not audio")
    run = transcribe(tmp_path, str(bogus))
    assert run.returncode == 1
    assert "notes.txt" in run.stderr and "Traceback" not in run.stderr

    run = transcribe(tmp_path, str(DEMO))
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Conversation 1:")
    assert "milk" in run.stdout.lower()


def test_send_delivers_once_even_when_the_file_is_imported_twice(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from omi_bridge_sim.omi_api import ApiKey, OmiApiSim

    monkeypatch.delenv("OMI_API_KEY", raising=False)
    key = "omi_dev_TRANSCRIBE"
    with OmiApiSim({key: ApiKey()}) as sim:
        config = tmp_path / "config.toml"
        config.write_text(f'[api]\nbase_url = "{sim.url}"\napi_key = "{key}"\n\n'
                          f'[storage]\ndir = "{tmp_path / "state"}"\n')
        for _ in range(2):
            run = subprocess.run([sys.executable, "-m", "bridge", "transcribe", "--config", str(config),
                                  str(DEMO), "--send"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=TIMEOUT, check=False)
            assert run.returncode == 0, run.stdout + run.stderr
        (stored,) = sim.conversations()
        assert "milk" in stored.transcript.lower()
        assert stored.body["source"] == "external_integration"
