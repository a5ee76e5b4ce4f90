"""A crash in the middle of a sentence leaves no trace in what Omi receives.

Each "run" is a pipeline with its own worker that is abandoned without closing anything, which
leaves on disk exactly what a SIGKILL leaves (every frame is handed to the kernel as it is
written). The next run recovers with ``resume=True`` and hears the rest of the stream, the time
the daemon was down later, as a pendant that paused while no one was subscribed would send it.
"""

from __future__ import annotations

import json
import random
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from bench.common import wer
from bridge.audio.files import decode_file
from bridge.config import AsrOptions, Config
from bridge.core.pcm import SAMPLE_RATE
from bridge.core.records import Conversation
from bridge.speech.asr.worker import AsrWorker, load_model
from bridge.speech.pipeline import SpeechPipeline

pytestmark = pytest.mark.asr

DATA = Path(__file__).resolve().parent / "data"
DEVICE = "AA:BB:CC:DD:EE:18"
TIMEOUT = 300.0
GAP_SECONDS = 8.0
"""Longer than every pause in the monologue, so the whole clip is one conversation."""
DOWN_SECONDS = 4.0
"""How long each crashed daemon stays down before its restart hears audio again."""
KILLS = 5
CHUNK = 320


def monologue() -> tuple[np.ndarray, str]:
    manifest = json.loads((DATA / "manifest.json").read_text())
    clip = next(c for c in manifest["clips"] if c["file"] == "monologue.wav")
    return decode_file(DATA / clip["file"]), clip["reference"]


def config(storage: Path) -> Config:
    c = Config()
    return replace(c, storage=replace(c.storage, dir=str(storage)),
                   conversation=replace(c.conversation, gap_seconds=GAP_SECONDS))


def feed(pipeline: SpeechPipeline, audio: np.ndarray) -> None:
    for i in range(0, len(audio), CHUNK):
        pipeline.write(audio[i:i + CHUNK])


def speech_points(audio: np.ndarray, count: int, seed: int) -> list[int]:
    """Sorted sample positions inside loud speech (mid-word), spread over the clip."""
    frame = SAMPLE_RATE // 50
    levels = np.sqrt(np.mean(audio[: len(audio) // frame * frame].reshape(-1, frame).astype(np.float64) ** 2,
                             axis=1))
    loud = np.flatnonzero(levels > np.percentile(levels, 70))
    rng = random.Random(seed)
    points: list[int] = []
    for k in range(count):  # one per equal share of the clip, so no two cuts fall together
        lo, hi = len(levels) * k // count, len(levels) * (k + 1) // count
        here = [int(i) for i in loud if lo + 25 <= i < hi - 25]
        points.append(rng.choice(here) * frame)
    return points


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return load_model(AsrOptions())


def run_once(model, cfg: Config, audio: np.ndarray, anchor: datetime) -> list[Conversation]:  # type: ignore[no-untyped-def]
    out: list[Conversation] = []
    worker = AsrWorker(cfg.asr, model=model)
    worker.start()
    try:
        pipeline = SpeechPipeline(DEVICE, cfg, worker, out.append, anchor=anchor)
        feed(pipeline, np.concatenate([audio, np.zeros(int((GAP_SECONDS + 1) * SAMPLE_RATE), np.int16)]))
        assert worker.wait_idle(TIMEOUT)
    finally:
        worker.stop()
    return out


def test_kills_mid_sentence_give_the_conversation_and_words_of_a_run_without_kills(
        tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    audio, reference = monologue()
    start = datetime.now(UTC)
    baseline = run_once(model, config(tmp_path / "baseline"), audio, start)
    assert len(baseline) == 1

    cfg = config(tmp_path / "killed")
    cuts = [0, *speech_points(audio, KILLS, seed=18), len(audio)]
    delivered: list[Conversation] = []
    ids: set[str] = set()
    anchor = start
    for k in range(len(cuts) - 1):
        worker = AsrWorker(cfg.asr, model=model)
        worker.start()
        pipeline = SpeechPipeline(DEVICE, cfg, worker, delivered.append, anchor=anchor)
        pipeline.recover(resume=True)
        part = audio[cuts[k]:cuts[k + 1]]
        last = k == len(cuts) - 2
        feed(pipeline, np.concatenate([part, np.zeros(int((GAP_SECONDS + 1) * SAMPLE_RATE), np.int16)])
             if last else part)
        if not last:
            assert pipeline.in_conversation, f"run {k} was not continuing the conversation"
            ids |= {json.loads(p.read_text())["client_session_id"]
                    for p in pipeline.dir.glob("*/conversation.json")}
        assert worker.wait_idle(TIMEOUT)
        worker.stop()  # the run dies here: nothing is closed or flushed
        anchor += timedelta(seconds=len(part) / SAMPLE_RATE + DOWN_SECONDS)

    assert len(delivered) == len(baseline) == 1, [c.client_session_id for c in delivered]
    conv = delivered[0]
    assert ids == {conv.client_session_id}, "every run saw the one conversation"
    text = " ".join(s.text for s in conv.segments)
    base_text = " ".join(s.text for s in baseline[0].segments)
    assert wer(reference, text) <= wer(reference, base_text) + 0.01, (text, base_text)
    starts = [s.start for s in conv.segments]
    assert starts == sorted(starts) and all(s.end > s.start for s in conv.segments)
    # The time the daemon was down is a gap in the segment times, not a shift of what follows:
    # the last words end where the audio says, plus the downtime.
    down = KILLS * DOWN_SECONDS
    assert abs(conv.segments[-1].end - (baseline[0].segments[-1].end + down)) < 1.5
    assert abs((conv.finished_at - conv.started_at).total_seconds()
               - (baseline[0].finished_at - baseline[0].started_at).total_seconds() - down) < 1.5
    assert not any(pipeline.dir.iterdir()), "nothing is left on disk once it is delivered"


def test_a_restart_after_the_gap_closes_the_old_conversation_and_starts_a_new_one(
        tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    audio, _ = monologue()
    cfg = config(tmp_path)
    first = audio[: 10 * SAMPLE_RATE]
    worker = AsrWorker(cfg.asr, model=model)
    worker.start()
    anchor = datetime.now(UTC) - timedelta(seconds=GAP_SECONDS + 30)
    old = SpeechPipeline(DEVICE, cfg, worker, lambda c: None, anchor=anchor)
    feed(old, first)
    assert worker.wait_idle(TIMEOUT)
    worker.stop()

    delivered: list[Conversation] = []
    worker = AsrWorker(cfg.asr, model=model)
    worker.start()
    try:
        pipeline = SpeechPipeline(DEVICE, cfg, worker, delivered.append)
        assert pipeline.recover(resume=True) == 1
        assert not pipeline.in_conversation
        assert worker.wait_idle(TIMEOUT)
    finally:
        worker.stop()
    assert len(delivered) == 1 and anchor <= delivered[0].started_at < anchor + timedelta(seconds=2)


def test_an_interrupted_conversation_closes_by_wall_clock_when_no_audio_comes(
        tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    audio, _ = monologue()
    cfg = replace(config(tmp_path), conversation=replace(Config().conversation, gap_seconds=3.0))
    worker = AsrWorker(cfg.asr, model=model)
    worker.start()
    old = SpeechPipeline(DEVICE, cfg, worker, lambda c: None,
                         anchor=datetime.now(UTC) - timedelta(seconds=6))
    feed(old, audio[: 6 * SAMPLE_RATE])
    assert worker.wait_idle(TIMEOUT)
    worker.stop()

    arrived = threading.Event()
    delivered: list[Conversation] = []

    def on_conversation(conv: Conversation) -> None:
        delivered.append(conv)
        arrived.set()

    worker = AsrWorker(cfg.asr, model=model)
    worker.start()
    try:
        pipeline = SpeechPipeline(DEVICE, cfg, worker, on_conversation)
        pipeline.recover(resume=True)
        assert not delivered, "kept open while its gap has not passed"
        assert arrived.wait(TIMEOUT), "the pendant never came back, yet the conversation closes"
    finally:
        worker.stop()
    assert len(delivered) == 1 and delivered[0].segments


def test_audio_waiting_for_the_vad_when_the_process_dies_is_kept(
        tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    """The VAD takes audio in batches of 128 ms; a kill between batches must not lose the part of
    the word that waited for the next one."""
    audio, _ = monologue()
    cfg = config(tmp_path)
    cut = speech_points(audio, 1, seed=4)[0] + 1000  # mid-word, and not on a batch boundary
    worker = AsrWorker(cfg.asr, model=model)
    worker.start()
    try:
        old = SpeechPipeline(DEVICE, cfg, worker, lambda c: None,
                             anchor=datetime.now(UTC) - timedelta(seconds=cut / SAMPLE_RATE))
        feed(old, audio[:cut])
        assert old.in_conversation
        # The run dies here. The next one finds the utterance the kill cut.
        SpeechPipeline(DEVICE, cfg, worker, lambda c: None).recover(resume=True)
    finally:
        worker.stop()
    (pcm,) = [p for p in tmp_path.glob("spool/*/*/u*.pcm")
              if json.loads(p.with_suffix(".json").read_text())["samples"] is None]
    kept = np.fromfile(pcm, dtype=np.int16)
    assert np.array_equal(kept[-4000:], audio[cut - 4000:cut]), "the audio up to the kill is on disk"
    assert not list(tmp_path.glob("spool/*/*/*.tail"))
