"""Nothing said is lost when transcription fails, when one spooled utterance is corrupt, when the
model cannot load, or when the state directory fills up.

Real parts throughout: the tiny.en model (behind a backend that fails on purpose, a subclass of the
real local backend), the real spool on disk, a real small file system (tmpfs) that really fills up,
and the real SQLite outbox.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridge.audio.files import decode_file
from bridge.config import AsrOptions, Config, ConversationOptions, LocationOptions
from bridge.core.pcm import SAMPLE_RATE
from bridge.core.records import Conversation
from bridge.outbox.store import Outbox
from bridge.speech import spool
from bridge.speech.asr.backend import WindowResult
from bridge.speech.asr.local import LocalBackend, load_model
from bridge.speech.asr.worker import AsrWorker
from bridge.speech.pipeline import SpeechPipeline

pytestmark = pytest.mark.asr

DATA = Path(__file__).resolve().parent / "data"
TIMEOUT = 120.0
CHUNK = 320
"""20 ms writes, like a device driver."""
DEVICE = "AA:BB:CC:DD:EE:12"
# Words tiny.en reliably gets from each clip.
JFK = ("americans", "country")
BLOCK_BOOKS = ("block", "printed")
TYPOGRAPHY = ("typography", "passing")


def clip(name: str) -> np.ndarray:
    return decode_file(DATA / name)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.int16)


def feed(pipeline: SpeechPipeline, audio: np.ndarray) -> None:
    for i in range(0, len(audio), CHUNK):
        pipeline.write(audio[i:i + CHUNK])


def text_of(conv: Conversation) -> str:
    return " ".join(s.text for s in conv.segments).lower()


def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT, poll: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:.0f} s")
        time.sleep(poll)
    return value


class Collector:
    def __init__(self) -> None:
        self.items: list[Conversation] = []
        self.cond = threading.Condition()

    def __call__(self, conv: Conversation) -> None:
        with self.cond:
            self.items.append(conv)
            self.cond.notify_all()

    def wait_for(self, n: int) -> list[Conversation]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.items) >= n, TIMEOUT), self.items
            return list(self.items)


class FailingFirst(LocalBackend):
    """The real local backend, failing its first ``failures`` windows as an engine out of memory
    would."""

    def __init__(self, options: AsrOptions, model: Any, failures: int) -> None:
        super().__init__(options, model)
        self.failures = failures
        self.calls = 0

    def transcribe(self, audios: Sequence[np.ndarray]) -> WindowResult:
        self.calls += 1
        if self.calls <= self.failures:
            raise MemoryError("cannot allocate 120 MB for the encoder")
        return super().transcribe(audios)


@pytest.fixture(scope="module")
def model() -> Any:
    return load_model(AsrOptions())


def config(storage: Path, gap: float = 60.0) -> Config:
    c = Config()
    return replace(c, conversation=replace(ConversationOptions(), gap_seconds=gap),
                   storage=replace(c.storage, dir=str(storage)))


def spooled_pcm(pipeline: SpeechPipeline) -> list[Path]:
    return sorted(pipeline.dir.glob("*/u*.pcm"))


def test_failed_transcriptions_keep_the_audio_and_post_every_word_once_it_works(
        tmp_path: Path, model: Any) -> None:
    cfg = config(tmp_path)
    backend = FailingFirst(cfg.asr, model, failures=3)
    worker = AsrWorker(cfg.asr, backend=backend)
    worker.start()
    got = Collector()
    try:
        pipeline = SpeechPipeline(DEVICE, cfg, worker, got)
        feed(pipeline, np.concatenate([silence(1.0), clip("jfk.flac"), silence(4.0)]))
        # The first window fails: its audio is still on disk and status says what is going on.
        health = wait_until(lambda: (h := worker.health()).failing_since and h)
        assert spooled_pcm(pipeline), "the audio of a failed window was deleted"
        problem = health.problem()
        assert problem is not None
        assert "transcription failing since" in problem and "MemoryError" in problem, problem
        assert "waiting, retrying in" in problem, problem
        feed(pipeline, np.concatenate([clip("ljspeech/LJ001-0006.wav"), silence(1.0)]))
        pipeline.close()
        (conv,) = got.wait_for(1)
    finally:
        worker.stop()
    text = text_of(conv)
    assert all(w in text for w in JFK + TYPOGRAPHY), text
    assert text.count("americans") == 1, text
    assert backend.calls > 3 and worker.health().failing_since is None
    assert worker.health().problem() is None
    assert not spooled_pcm(pipeline)  # deleted only once transcribed


def test_an_utterance_that_never_transcribes_is_quarantined_and_the_rest_posted(
        tmp_path: Path, model: Any, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(tmp_path)
    worker = AsrWorker(cfg.asr, backend=LocalBackend(cfg.asr, model))  # started below
    got = Collector()
    pipeline = SpeechPipeline(DEVICE, cfg, worker, got)
    # Three sentences with short pauses: one conversation, windows of several utterances.
    feed(pipeline, np.concatenate([silence(1.0), clip("jfk.flac"), silence(1.0),
                                   clip("ljspeech/LJ001-0004.wav"), silence(1.0),
                                   clip("ljspeech/LJ001-0006.wav"), silence(1.0)]))
    pipeline.close()
    # The spool file of the last utterance goes bad (a bad sector: reading it raises OSError).
    bad = spooled_pcm(pipeline)[-1]
    bad.unlink()
    bad.mkdir()
    caplog.set_level(logging.INFO)
    worker.start()
    try:
        (conv,) = got.wait_for(1)
    finally:
        worker.stop()
    text = text_of(conv)
    assert all(w in text for w in JFK + BLOCK_BOOKS), text
    assert not any(w in text for w in TYPOGRAPHY), text
    assert all(s.text.strip() for s in conv.segments)
    # Kept, not deleted: the audio (here the unreadable entry) and a note of what went wrong.
    kept = pipeline.quarantine_dir / bad.parent.name / bad.name
    assert kept.exists() and not bad.exists()
    note = json.loads((kept.parent / f"{bad.stem}.error.json").read_text())
    assert note["attempts"] == cfg.asr.max_attempts and "IsADirectoryError" in note["error"]
    assert note["client_session_id"] == conv.client_session_id
    assert pipeline.quarantined == 1 and worker.health().given_up == 1
    assert any(str(kept) in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    # A restart still counts it (status reads the folder).
    assert SpeechPipeline(DEVICE, cfg, worker, got).quarantined == 1


def test_a_model_that_cannot_load_stops_run_at_start_with_what_to_do(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.bin").write_bytes(b"not a model")  # a download cut short
    (model_dir / "config.json").write_text("{}")
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'[[devices]]\nkind = "omi"\naddress = "{DEVICE}"\n'
                           f'[api]\napi_key = "omi_dev_x"\n[asr]\nmodel = "{model_dir}"\n'
                           f'[storage]\ndir = "{tmp_path / "state"}"\n')
    config_file.chmod(0o600)
    env = {"PATH": "/usr/bin:/bin", "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus",
           "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "bridge", "run", "--config", str(config_file)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 78, run.stderr  # EX_CONFIG: systemd does not restart in a loop
    assert f"cannot load ASR model '{model_dir}'" in run.stderr, run.stderr
    assert "[asr] model" in run.stderr and "tiny.en" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


# ---------------------------------------------------------------- full disk

SMALL_DISK = "4m"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs: a state directory that really fills up (CI runs as root)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK},mode=0755", "tmpfs", str(mnt)],
                   check=True, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte; returns the file to delete to give them back."""
    ballast = disk / "ballast"
    with open(ballast, "ab", buffering=0) as f:
        try:
            while True:
                f.write(bytes(64 * 1024))
        except OSError:
            pass
    assert shutil.disk_usage(disk).free < 64 * 1024
    return ballast


def spool_state_readable(pipeline: SpeechPipeline) -> None:
    for path in pipeline.dir.glob("*/*.json"):
        assert spool.read_json(path) is not None, f"{path} is corrupt"


def test_a_full_disk_pauses_capture_says_where_and_resumes_by_itself(
        small_disk: Path, model: Any, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(small_disk)
    worker = AsrWorker(cfg.asr, model=model)
    worker.start()
    got = Collector()
    caplog.set_level(logging.INFO)
    try:
        pipeline = SpeechPipeline(DEVICE, cfg, worker, got)
        feed(pipeline, np.concatenate([silence(1.0), clip("jfk.flac"), silence(4.0)]))
        assert worker.wait_idle(TIMEOUT)
        ballast = fill(small_disk)
        feed(pipeline, np.concatenate([clip("ljspeech/LJ001-0004.wav"), silence(1.0)]))
        pause = pipeline.disk.paused
        assert pause is not None and pause.path == str(pipeline.dir) and pause.free_bytes < 64 * 1024
        assert "capture paused since" in pause.describe() and "free" in pause.describe()
        assert any(str(pipeline.dir) in r.getMessage() and "free" in r.getMessage()
                   and r.levelno == logging.ERROR for r in caplog.records)
        spool_state_readable(pipeline)
        feed(pipeline, silence(2.0))  # still full: still paused, nothing breaks
        assert pipeline.disk.paused is not None
        ballast.unlink()
        feed(pipeline, silence(1.5))  # looked at once a second of audio
        assert pipeline.disk.paused is None and pipeline.disk.pauses == 1
        assert any("capture resumes" in r.getMessage() for r in caplog.records)
        feed(pipeline, np.concatenate([clip("ljspeech/LJ001-0006.wav"), silence(1.0)]))
        pipeline.close()
        (conv,) = got.wait_for(1)
    finally:
        worker.stop()
    text = text_of(conv)
    assert all(w in text for w in JFK + TYPOGRAPHY), text  # before and after the pause


def test_the_outbox_on_a_full_disk_loses_no_conversation(
        tmp_path: Path, small_disk: Path, model: Any) -> None:
    cfg = config(tmp_path / "state")
    outbox = Outbox.open(small_disk)  # only the database is on the small disk
    worker = AsrWorker(cfg.asr, model=model)
    worker.start()
    enqueued: list[str] = []

    def enqueue(conv: Conversation) -> None:
        outbox.enqueue(conv, LocationOptions(), time.time())
        enqueued.append(conv.client_session_id)

    try:
        first = SpeechPipeline("AA:BB:CC:DD:EE:01", cfg, worker, enqueue)
        feed(first, np.concatenate([silence(1.0), clip("ljspeech/LJ001-0006.wav"), silence(1.0)]))
        first.close()
        wait_until(lambda: len(enqueued) == 1)
        ballast = fill(small_disk)
        second = SpeechPipeline("AA:BB:CC:DD:EE:02", cfg, worker, enqueue)
        feed(second, np.concatenate([silence(1.0), clip("jfk.flac"), silence(1.0)]))
        second.close()
        wait_until(lambda: second.unqueued == 1)  # the outbox refused it: it waits on disk
        assert any(second.dir.iterdir())
        assert [i.client_session_id for i in outbox.items()] == enqueued  # the first is intact
        ballast.unlink()
        wait_until(lambda: len(enqueued) == 2)  # offered again by itself
        assert second.unqueued == 0 and not any(second.dir.iterdir())
    finally:
        worker.stop()
    ids = [i.client_session_id for i in outbox.items()]
    assert sorted(ids) == sorted(enqueued)
    assert outbox._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    outbox.close()
