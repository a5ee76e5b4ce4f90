"""Live audio timelines in, conversations out, with the real tiny.en model."""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from bridge.audio.files import decode_file as decode
from bridge.config import AsrOptions, Config, ConversationOptions
from bridge.core.pcm import SAMPLE_RATE
from bridge.core.records import Conversation
from bridge.speech.asr.worker import AsrWorker, load_model
from bridge.speech.pipeline import SpeechPipeline

pytestmark = pytest.mark.asr

CORPUS = Path(__file__).resolve().parent / "data"
"""Speech clips with reference transcripts, in the repo (tests/data/NOTICE.md)."""
TIMEOUT = 120.0
"""Generous bound on waiting for the worker (a slow shared CI core)."""
CHUNK = 320
"""20 ms writes, like a device driver."""
ANCHOR = datetime(2026, 1, 31, 9, 30, tzinfo=UTC)
WER_FACTOR = 1.2
WER_SLACK = 0.03


def clip(name: str) -> np.ndarray:
    return decode(CORPUS / name)


def reference(name: str) -> str:
    manifest = json.loads((CORPUS / "manifest.json").read_text())
    return next(c["reference"] for c in manifest["clips"] if c["file"] == name)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.int16)


def normalise(text: str) -> str:
    import jiwer

    tr = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                        jiwer.Strip()])
    return tr(text.replace("-", " "))


def wer(ref: str, hyp: str) -> float:
    import jiwer

    return jiwer.wer(normalise(ref), normalise(hyp))


@pytest.fixture(scope="session")
def model():  # type: ignore[no-untyped-def]
    return load_model(AsrOptions())


@pytest.fixture()
def worker(model):  # type: ignore[no-untyped-def]
    w = AsrWorker(AsrOptions(), model=model)
    w.start()
    yield w
    w.stop()


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


def config(tmp_path: Path, **conversation: float) -> Config:
    c = Config()
    return replace(c, conversation=replace(ConversationOptions(), **conversation),
                   storage=replace(c.storage, dir=str(tmp_path)))


def feed(pipeline: SpeechPipeline, audio: np.ndarray) -> None:
    for i in range(0, len(audio), CHUNK):
        pipeline.write(audio[i:i + CHUNK])


def text_of(conv: Conversation) -> str:
    return " ".join(s.text for s in conv.segments)


def check_contract(conv: Conversation) -> None:
    assert conv.started_at.tzinfo is not None and conv.finished_at > conv.started_at
    assert list(conv.segments) == sorted(conv.segments, key=lambda s: s.start)
    for s in conv.segments:
        assert s.text.strip() and 0 <= s.start < s.end
    assert 0 < len(conv.client_session_id) <= 200


def test_corpus_comes_out_as_well_as_whole_file_whisper(tmp_path: Path, model, worker) -> None:
    names = ["jfk.flac", "monologue.wav", "ljspeech/LJ001-0002.wav", "ljspeech/LJ001-0004.wav",
             "ljspeech/LJ001-0006.wav", "ljspeech/LJ001-0008.wav", "ljspeech/LJ001-0013.wav"]
    refs = " ".join(reference(n) for n in names)
    baseline_text = []
    for name in names:
        audio = clip(name).astype(np.float32) / 32768.0
        segments, _ = model.transcribe(audio, language="en", beam_size=1, vad_filter=True)
        baseline_text += [s.text for s in segments]
    baseline = wer(refs, " ".join(baseline_text))

    got = Collector()
    pipeline = SpeechPipeline("AA:BB:CC:DD:EE:01", config(tmp_path), worker, got,
                              anchor=ANCHOR)
    for name in names:  # one stream, 1.5 s between clips: one conversation
        feed(pipeline, np.concatenate([silence(1.5), clip(name)]))
    feed(pipeline, silence(1.0))
    pipeline.close()
    (conv,) = got.wait_for(1)
    check_contract(conv)
    ours = wer(refs, text_of(conv))
    print(f"WER pipeline {ours:.3f} vs whole-file {baseline:.3f}")
    assert ours <= baseline * WER_FACTOR + WER_SLACK, (ours, baseline, text_of(conv))


def test_silence_longer_than_the_gap_splits_conversations(tmp_path: Path, worker) -> None:
    got = Collector()
    pipeline = SpeechPipeline("AA:BB:CC:DD:EE:02", config(tmp_path, gap_seconds=5.0), worker, got,
                              anchor=ANCHOR)
    a, b = clip("ljspeech/LJ001-0004.wav"), clip("ljspeech/LJ001-0013.wav")
    feed(pipeline, np.concatenate([silence(1.0), a, silence(8.0), b, silence(1.0)]))
    first = got.wait_for(1)  # closed by the gap while the stream goes on
    assert len(first) == 1 and pipeline.in_conversation
    # What `omi-bridge status` shows as "conversation open since": the second one, not the first.
    assert pipeline.conversation_started_at is not None
    assert pipeline.conversation_started_at - first[0].finished_at > timedelta(seconds=7)
    pipeline.close()
    one, two = got.wait_for(2)
    for conv in (one, two):
        check_contract(conv)
    assert "block books" in normalise(text_of(one))
    assert "ugly" in normalise(text_of(two))
    assert one.client_session_id != two.client_session_id
    assert two.started_at - one.finished_at > timedelta(seconds=7)


def test_timings_land_where_the_words_are(tmp_path: Path, worker) -> None:
    got = Collector()
    offset = 7.3
    speech = clip("jfk.flac")
    pipeline = SpeechPipeline("AA:BB:CC:DD:EE:03", config(tmp_path), worker, got, anchor=ANCHOR)
    feed(pipeline, np.concatenate([silence(offset), speech, silence(2.0)]))
    pipeline.close()
    (conv,) = got.wait_for(1)
    check_contract(conv)
    # Where the words are, from the clip's energy (20 ms frames above -40 dBFS).
    frames = speech[: len(speech) // 320 * 320].astype(float).reshape(-1, 320)
    loud = np.nonzero(np.sqrt((frames ** 2).mean(axis=1)) > 300)[0]
    onset = ANCHOR + timedelta(seconds=offset + loud[0] * 0.02)
    first = conv.started_at + timedelta(seconds=conv.segments[0].start)
    assert abs((first - onset).total_seconds()) <= 0.5
    # "ask what you can do for your country" is the clip's last phrase, ending ≈ 10.4 s in.
    last = conv.started_at + timedelta(seconds=conv.segments[-1].end)
    assert "country" in conv.segments[-1].text.lower()
    assert abs((last - (ANCHOR + timedelta(seconds=offset + 10.4))).total_seconds()) <= 0.5
    assert abs((conv.started_at - (onset - timedelta(seconds=0.2))).total_seconds()) <= 0.5


def test_one_worker_serves_two_devices_talking_at_once(tmp_path: Path, worker) -> None:
    got_a, got_b = Collector(), Collector()
    cfg = config(tmp_path)
    a = SpeechPipeline("AA:BB:CC:DD:EE:0A", cfg, worker, got_a, anchor=ANCHOR)
    b = SpeechPipeline("AA:BB:CC:DD:EE:0B", cfg, worker, got_b, anchor=ANCHOR)
    audio_a = np.concatenate([silence(0.5), clip("ljspeech/LJ001-0004.wav"), silence(1.0)])
    audio_b = np.concatenate([silence(0.5), clip("ljspeech/LJ001-0006.wav"), silence(1.0)])
    n = max(len(audio_a), len(audio_b))
    audio_a = np.pad(audio_a, (0, n - len(audio_a)))
    audio_b = np.pad(audio_b, (0, n - len(audio_b)))
    for i in range(0, n, CHUNK):  # interleaved, as two BLE links would deliver
        a.write(audio_a[i:i + CHUNK])
        b.write(audio_b[i:i + CHUNK])
    a.close()
    b.close()
    (conv_a,), (conv_b,) = got_a.wait_for(1), got_b.wait_for(1)
    assert "block books" in normalise(text_of(conv_a))
    assert "typography" in normalise(text_of(conv_b))
    assert conv_a.client_session_id != conv_b.client_session_id
    assert a.backlog_seconds() == 0 and b.backlog_seconds() == 0
    assert worker.healthy()


def test_when_asr_falls_behind_speech_waits_on_disk_and_is_reported(tmp_path: Path, model) -> None:
    got = Collector()
    worker = AsrWorker(AsrOptions(), model=model)  # not started yet: ASR "falls behind"
    pipeline = SpeechPipeline("AA:BB:CC:DD:EE:04", config(tmp_path), worker, got, anchor=ANCHOR)
    speech = clip("monologue.wav")
    feed(pipeline, np.concatenate([silence(1.0), speech, silence(4.0)]))
    backlog = pipeline.backlog_seconds()
    assert 0.8 * len(speech) / SAMPLE_RATE < backlog <= len(speech) / SAMPLE_RATE + 5
    assert worker.backlog_seconds() > 0
    on_disk = sum(p.stat().st_size for p in pipeline.dir.rglob("*.pcm")) / 2 / SAMPLE_RATE
    assert on_disk == pytest.approx(backlog, abs=0.1)
    worker.start()
    try:
        assert worker.wait_idle(TIMEOUT)
        assert pipeline.backlog_seconds() == 0
        assert not list(pipeline.dir.rglob("*.pcm")), "transcribed audio is deleted"
        pipeline.close()
        (conv,) = got.wait_for(1)
    finally:
        worker.stop()
    assert "github" in normalise(text_of(conv))


def test_a_conversation_reaching_max_seconds_is_closed_and_the_next_one_continues(
        tmp_path: Path, worker) -> None:
    got = Collector()
    pipeline = SpeechPipeline("AA:BB:CC:DD:EE:05", config(tmp_path, max_seconds=5.0), worker, got,
                              anchor=ANCHOR)
    feed(pipeline, np.concatenate([silence(0.5), clip("jfk.flac"), silence(1.0)]))
    pipeline.close()
    got.wait_for(2)
    assert worker.wait_idle(TIMEOUT)
    convs = sorted(got.items, key=lambda c: c.started_at)
    for a, b in itertools.pairwise(convs):
        check_contract(a)
        assert a.finished_at <= b.started_at
        # Closed at the first utterance starting past max_seconds: at most one utterance over.
        assert (a.finished_at - a.started_at).total_seconds() <= 5.0 + Config().vad.max_utterance_seconds
    words = normalise(" ".join(text_of(c) for c in convs))
    assert "fellow americans" in words and "your country" in words


def test_while_the_worker_is_behind_paused_speech_is_packed_into_fewer_calls(tmp_path: Path, model) -> None:
    got = Collector()
    worker = AsrWorker(AsrOptions(), model=model)  # not started yet: a worker busy with others
    pipeline = SpeechPipeline("AA:BB:CC:DD:EE:06", config(tmp_path), worker, got, anchor=ANCHOR)
    pause = silence(Config().asr.flush_pause_seconds + 1.0)
    for name in ("ljspeech/LJ001-0004.wav", "ljspeech/LJ001-0013.wav", "ljspeech/LJ001-0006.wav"):
        feed(pipeline, np.concatenate([clip(name), pause]))
    # The first window went to the queue at its pause; the other two utterances, each followed
    # by a pause as long, wait for the queue to drain and then go in one call.
    worker.start()
    try:
        assert worker.wait_idle(TIMEOUT)
        assert worker.windows_done == 2
        assert pipeline.backlog_seconds() == 0
        pipeline.close()
        (conv,) = got.wait_for(1)
    finally:
        worker.stop()
    words = normalise(text_of(conv))
    assert "block books" in words and "ugly" in words and "passing" in words


def test_two_pendants_hearing_the_same_speech_both_get_its_words(tmp_path: Path, model) -> None:
    """Two pendants in one room, their windows waiting together: each is transcribed in a call of
    its own. In one shared call Whisper heard the sentence twice and dropped it as a repetition
    loop, and both conversations came out empty."""
    got = Collector()
    worker = AsrWorker(AsrOptions(), model=model)  # not started yet: both windows queue
    one = SpeechPipeline("AA:BB:CC:DD:EE:07", config(tmp_path), worker, got, anchor=ANCHOR)
    two = SpeechPipeline("AA:BB:CC:DD:EE:08", config(tmp_path), worker, got, anchor=ANCHOR)
    for pipeline in (one, two):
        feed(pipeline, np.concatenate([silence(0.5), clip("jfk.flac"), silence(1.0)]))
        pipeline.close()
    worker.start()
    try:
        assert worker.wait_idle(TIMEOUT)
        convs = got.wait_for(2)
    finally:
        worker.stop()
    words = {c.device: normalise(text_of(c)) for c in convs}
    for device in ("AA:BB:CC:DD:EE:07", "AA:BB:CC:DD:EE:08"):
        assert "fellow americans" in words[device], words
