"""A kill -9 in the middle of a conversation loses nothing: the restart finishes it, once.

The victim is a real process (this file run as a script) feeding a real pipeline and worker; it
is SIGKILLed right after it reports that speech sits in the spool, in the middle of a sentence.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from bridge.audio.files import decode_file as decode
from bridge.config import AsrOptions, Config
from bridge.core.pcm import SAMPLE_RATE
from bridge.core.records import Conversation
from bridge.speech.asr.worker import AsrWorker, load_model
from bridge.speech.pipeline import SpeechPipeline

pytestmark = pytest.mark.asr

CORPUS = Path(__file__).resolve().parent / "data"
"""Speech clips with reference transcripts, in the repo (tests/data/NOTICE.md)."""
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120.0
DEVICE = "AA:BB:CC:DD:EE:09"
ANCHOR = datetime(2026, 1, 31, 9, 30, tzinfo=UTC)
CLIP_A = "ljspeech/LJ001-0004.wav"  # "produced the block books, which were the immediate ..."
CLIP_B = "ljspeech/LJ001-0013.wav"  # "than in the same operations with ugly ones."
CLIP_C = "ljspeech/LJ001-0006.wav"  # "And it is worth mention in passing that, as an example ..."
C_FRACTION = 0.6
"""Share of clip C fed before the kill: the process dies mid-sentence."""


def make_config(storage: str) -> Config:
    c = Config()
    # A 1 s flush pause lets A be transcribed before B starts, while B (followed by less
    # pause) still waits in the spool when the process dies.
    return replace(c, asr=replace(c.asr, flush_pause_seconds=1.0), storage=replace(c.storage, dir=storage))


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.int16)


def feed(pipeline: SpeechPipeline, audio: np.ndarray) -> None:
    for i in range(0, len(audio), 320):
        pipeline.write(audio[i:i + 320])


def victim(storage: str) -> None:
    """Runs in the child: A is transcribed, B is spooled whole, C is spooled in part; then wait."""
    config = make_config(storage)
    worker = AsrWorker(config.asr)
    worker.start()
    pipeline = SpeechPipeline(DEVICE, config, worker, lambda conv: print("EMITTED", flush=True),
                              anchor=ANCHOR)
    feed(pipeline, np.concatenate([silence(1.0), decode(CORPUS / CLIP_A), silence(2.0)]))
    assert worker.wait_idle(TIMEOUT) and pipeline.backlog_seconds() == 0
    print("TRANSCRIBED", flush=True)
    c = decode(CORPUS / CLIP_C)
    feed(pipeline, np.concatenate([decode(CORPUS / CLIP_B), silence(0.8), c[: int(len(c) * C_FRACTION)]]))
    assert pipeline.backlog_seconds() > 0
    print("SPOOLED", flush=True)
    threading.Event().wait()


@pytest.fixture(scope="session")
def model():  # type: ignore[no-untyped-def]
    return load_model(AsrOptions())


def test_kill_9_mid_conversation_then_restart_yields_the_whole_conversation_once(
        tmp_path: Path, model) -> None:
    child = subprocess.Popen([sys.executable, __file__, str(tmp_path)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    try:
        assert child.stdout is not None
        spooled = threading.Event()

        def watch() -> None:
            assert child.stdout is not None
            for line in iter(child.stdout.readline, ""):
                lines.append(line.strip())
                if line.strip() == "SPOOLED":
                    spooled.set()
        reader = threading.Thread(target=watch, daemon=True)
        reader.start()
        assert spooled.wait(TIMEOUT), f"the child never spooled speech: {lines}"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(TIMEOUT)
    assert child.returncode == -signal.SIGKILL
    assert "EMITTED" not in lines

    device_dir = next((tmp_path / "spool").iterdir())
    (state_dir,) = [p for p in device_dir.iterdir() if p.is_dir()]
    state = json.loads((state_dir / "conversation.json").read_text())
    assert any("block" in seg[0].lower() for seg in state["segments"]), "A's text was persisted"
    assert list(state_dir.glob("*.pcm")), "B and part of C wait as audio"

    config = make_config(str(tmp_path))
    worker = AsrWorker(config.asr, model=model)
    worker.start()
    got: list[Conversation] = []
    done = threading.Event()

    def collect(conv: Conversation) -> None:
        got.append(conv)
        done.set()

    try:
        restarted = SpeechPipeline(DEVICE, config, worker, collect)
        assert restarted.recover() == 1
        assert done.wait(TIMEOUT)
        assert worker.wait_idle(TIMEOUT)
        assert restarted.recover() == 0  # nothing left to hand on a second time
    finally:
        worker.stop()
    (conv,) = got
    text = " ".join(s.text for s in conv.segments).lower()
    assert "block books" in text  # transcribed before the kill
    assert "ugly" in text  # spooled, transcribed after the restart
    assert "worth" in text  # the sentence cut by the kill
    # A's first word at 1.0 s, minus the 0.2 s pre-pad.
    assert abs((conv.started_at - ANCHOR).total_seconds() - 0.8) < 0.3
    assert conv.client_session_id == state["client_session_id"]
    # finished_at is the last audio heard before the kill, not the restart time.
    assert conv.finished_at < ANCHOR + timedelta(seconds=30)
    assert list(conv.segments) == sorted(conv.segments, key=lambda s: s.start)
    assert not [p for p in device_dir.iterdir() if p.is_dir()], "no state left behind"


if __name__ == "__main__":
    victim(sys.argv[1])
