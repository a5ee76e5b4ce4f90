"""Remote ASR: the bridge as a client of a real Wyoming server (wyoming-faster-whisper on the
bundled tiny.en, started here on 127.0.0.1), and of servers that fail the ways a network server
can. The audio of a window that failed stays on disk until a server has transcribed it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omi_bridge_sim.wyoming import FakeWyomingServer, WyomingServer, free_port

from bridge.app.daemon import Daemon
from bridge.app.systemd import Notifier
from bridge.audio.files import decode_file
from bridge.config import AsrOptions, Config, ConversationOptions, load_config, parse_config
from bridge.core.pcm import SAMPLE_RATE
from bridge.core.records import Conversation
from bridge.speech.asr.backend import AsrError, AsrUnavailable
from bridge.speech.asr.worker import AsrWorker, load_model
from bridge.speech.asr.wyoming import WyomingBackend
from bridge.speech.pipeline import SpeechPipeline

pytestmark = pytest.mark.asr

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
CORPUS = ("jfk.flac", "monologue.wav", "ljspeech/LJ001-0002.wav", "ljspeech/LJ001-0004.wav",
          "ljspeech/LJ001-0006.wav", "ljspeech/LJ001-0008.wav", "ljspeech/LJ001-0013.wav")
TIMEOUT = 180.0
"""Bound on any wait for transcription (a slow, shared CI core)."""
CHUNK = 320
"""20 ms writes, like a device driver."""
ANCHOR = datetime(2026, 1, 31, 9, 30, tzinfo=UTC)
WER_SLACK = 0.01
"""The server decodes with faster-whisper's defaults where the local backend sets its own
(docs/reference/wyoming.md §6); on this corpus both come out the same."""


# ---------------------------------------------------------------------------------- helpers


def wait_until(cond: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def clip(name: str) -> np.ndarray:
    return decode_file(DATA / name)


def reference(name: str) -> str:
    manifest = json.loads((DATA / "manifest.json").read_text())
    return str(next(c["reference"] for c in manifest["clips"] if c["file"] == name))


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.int16)


def normalise(text: str) -> str:
    import jiwer

    tr = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),  # type: ignore[no-untyped-call]
                        jiwer.Strip()])
    return str(tr(text.replace("-", " ")))


def wer(ref: str, hyp: str) -> float:
    import jiwer

    return float(jiwer.wer(normalise(ref), normalise(hyp)))


def wyoming(uri: str, **kw: Any) -> AsrOptions:
    return replace(AsrOptions(), backend="wyoming", uri=uri, **kw)


def config(tmp: Path, asr: AsrOptions) -> Config:
    c = Config()
    return replace(c, asr=asr, conversation=replace(ConversationOptions()),
                   storage=replace(c.storage, dir=str(tmp)))


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


def feed(pipeline: SpeechPipeline, audio: np.ndarray) -> None:
    for i in range(0, len(audio), CHUNK):
        pipeline.write(audio[i:i + CHUNK])


def text_of(conv: Conversation) -> str:
    return " ".join(s.text for s in conv.segments)


def spooled_seconds(pipeline: SpeechPipeline) -> float:
    return sum(p.stat().st_size for p in pipeline.dir.rglob("*.pcm")) / 2 / SAMPLE_RATE


def started(worker: AsrWorker) -> AsrWorker:
    worker.retry_max_seconds = 0.5  # a test's outage is short; the daemon's back-off tops at 15 s
    worker.start()
    return worker


@pytest.fixture(scope="module")
def model() -> Any:
    return load_model(AsrOptions())


@pytest.fixture
def server(tmp_path: Path) -> Iterator[WyomingServer]:
    with WyomingServer(tmp_path) as srv:
        yield srv


# ---------------------------------------------------------------------------------- a real server


def test_the_corpus_through_a_wyoming_server_comes_out_as_well_as_local(
        tmp_path: Path, model: Any, server: WyomingServer) -> None:
    refs = " ".join(reference(n) for n in CORPUS)
    results: dict[str, Conversation] = {}
    for name, asr, kw in (("local", AsrOptions(), {"model": model}),
                          ("wyoming", wyoming(server.uri), {})):
        worker = started(AsrWorker(asr, **kw))
        got = Collector()
        pipeline = SpeechPipeline("AA:BB:CC:DD:EE:71", config(tmp_path / name, asr), worker, got,
                                  anchor=ANCHOR)
        try:
            for clip_name in CORPUS:  # one stream, 1.5 s between clips: one conversation
                feed(pipeline, np.concatenate([silence(1.5), clip(clip_name)]))
            feed(pipeline, silence(1.0))
            pipeline.close()
            (results[name],) = got.wait_for(1)
            if name == "wyoming":
                status = worker.backend.status() if worker.backend else {}
        finally:
            worker.stop()
    local, remote = (wer(refs, text_of(results[k])) for k in ("local", "wyoming"))
    print(f"corpus WER: local {local:.4f}, wyoming {remote:.4f}")
    assert remote <= local + WER_SLACK, (local, remote, text_of(results["wyoming"]))
    # Times are the bridge's own utterance bounds: as many segments as local, in order, inside
    # the conversation, never zero-length.
    conv = results["wyoming"]
    assert list(conv.segments) == sorted(conv.segments, key=lambda s: s.start)
    span = (conv.finished_at - conv.started_at).total_seconds()
    assert all(0 <= s.start < s.end <= span + 0.01 for s in conv.segments)
    assert "ask not what your country" in normalise(conv.segments[0].text)
    # What `status` shows: which server and model transcribe, and how fast it answers.
    assert status["server"] == server.uri and status["program"] == "faster-whisper"
    assert status["model"].endswith("model") and status["languages"] > 0
    assert status["errors"] == 0 and status["windows"] >= 2 and 0 < status["rtt_seconds"] < 60


def test_transcribe_command_with_a_wyoming_server_never_loads_a_model(
        tmp_path: Path, server: WyomingServer) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[asr]\nbackend = "wyoming"\nuri = "{server.uri}"\n\n'
                   f'[storage]\ndir = "{tmp_path / "state"}"\n')
    # `omi-bridge transcribe` in a fresh interpreter, which then says what it imported.
    code = ("import sys; from bridge.cli import main; rc = main(sys.argv[1:]); "
            "print('LOADED', sorted(m for m in ('faster_whisper', 'ctranslate2') if m in sys.modules)); "
            "sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code, "transcribe", "--json", "--config", str(cfg),
                          str(DATA / "jfk.flac")], cwd=ROOT, capture_output=True, text=True,
                         timeout=TIMEOUT, check=False)
    assert run.returncode == 0, run.stderr
    body, loaded = run.stdout.rsplit("LOADED", 1)
    (request,) = json.loads(body)
    words = normalise(" ".join(s["text"] for s in request["transcript_segments"]))
    assert "so my fellow americans ask not what your country can do for you" in words
    assert loaded.strip() == "[]"  # neither faster_whisper nor ctranslate2 was imported


def test_transcribe_command_names_an_unreachable_server(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    uri = f"tcp://127.0.0.1:{free_port()}"
    cfg.write_text(f'[asr]\nbackend = "wyoming"\nuri = "{uri}"\n\n[storage]\ndir = "{tmp_path}"\n')
    run = subprocess.run([sys.executable, "-m", "bridge", "transcribe", "--config", str(cfg),
                          str(DATA / "jfk.flac")], cwd=ROOT, capture_output=True, text=True,
                         timeout=TIMEOUT, check=False)
    assert run.returncode == 1
    assert f"cannot reach the Wyoming server at {uri}" in run.stderr
    assert "[asr] uri" in run.stderr  # the hint names the key to check


def test_server_down_at_start_speech_waits_on_disk_until_it_answers(tmp_path: Path) -> None:
    srv = WyomingServer(tmp_path)  # its port, nothing listening yet
    asr = wyoming(srv.uri)
    worker = started(AsrWorker(asr))  # starts anyway: capture must not wait for a server
    got = Collector()
    pipeline = SpeechPipeline("AA:BB:CC:DD:EE:72", config(tmp_path, asr), worker, got, anchor=ANCHOR)
    try:
        speech = clip("jfk.flac")
        feed(pipeline, np.concatenate([silence(1.0), speech, silence(4.0)]))
        pipeline.close()
        wait_until(lambda: worker.errors >= 3, "retries against the absent server")
        health = worker.health()
        assert health.retrying and health.alive and worker.healthy()  # no watchdog restart for it
        assert "cannot reach the Wyoming server" in (health.last_error or "")
        assert not got.items
        # Every utterance the VAD found waits on disk, none was handed on empty.
        assert spooled_seconds(pipeline) == pytest.approx(pipeline.backlog_seconds(), abs=0.1)
        assert pipeline.backlog_seconds() > 0.7 * len(speech) / SAMPLE_RATE
        srv.start()
        try:
            (conv,) = got.wait_for(1)
        finally:
            srv.kill()
        assert "ask not what your country" in normalise(text_of(conv))
        assert "for your country" in normalise(text_of(conv))
        assert spooled_seconds(pipeline) == 0 and not worker.health().retrying
    finally:
        worker.stop()


def test_server_killed_mid_stream_and_restarted_loses_nothing(tmp_path: Path) -> None:
    srv = WyomingServer(tmp_path).start()
    asr = wyoming(srv.uri)
    worker = started(AsrWorker(asr))
    got = Collector()
    pipeline = SpeechPipeline("AA:BB:CC:DD:EE:73", config(tmp_path, asr), worker, got, anchor=ANCHOR)
    pause = silence(Config().asr.flush_pause_seconds + 1.0)
    try:
        feed(pipeline, np.concatenate([silence(0.5), clip("ljspeech/LJ001-0004.wav"), pause]))
        wait_until(lambda: worker.windows_done >= 1, "the first window")
        srv.kill()
        feed(pipeline, np.concatenate([clip("ljspeech/LJ001-0006.wav"), pause]))
        wait_until(lambda: worker.errors >= 1, "a failed window")
        assert spooled_seconds(pipeline) > 0
        srv.start()
        feed(pipeline, np.concatenate([clip("ljspeech/LJ001-0013.wav"), silence(1.0)]))
        pipeline.close()
        (conv,) = got.wait_for(1)
    finally:
        worker.stop()
        srv.kill()
    words = normalise(text_of(conv))
    for phrase in ("block books", "typography", "ugly"):  # before, during and after the outage
        assert phrase in words, words
    assert spooled_seconds(pipeline) == 0


# ---------------------------------------------------------------------------------- bad servers


def test_garbage_hang_ups_errors_and_silence_are_clear_errors(tmp_path: Path) -> None:
    audio = [clip("ljspeech/LJ001-0004.wav")]
    with FakeWyomingServer(["garbage", "junk", "close", "error", "silent"]) as fake:
        backend = WyomingBackend(wyoming(fake.uri, timeout_seconds=1.0))
        backend.start()
        assert "fake" in backend.describe() and "fake-model" in backend.describe()
        expected = [(AsrUnavailable, "closed the connection before answering"),
                    (AsrError, "something that is not a Wyoming event"),
                    (AsrUnavailable, "closed the connection before answering"),
                    (AsrError, "answered: error 'model exploded'"),
                    (AsrUnavailable, "did not answer within 1 s")]
        for cls, text in expected:
            with pytest.raises(AsrError) as caught:
                backend.transcribe(audio)
            assert type(caught.value) is cls and text in caught.value.message
            assert fake.uri in caught.value.message and "[asr] uri" in caught.value.hint
        segments, language = backend.transcribe(audio)  # the sixth request is answered
        assert segments == [[segments[0][0]]] and segments[0][0].text == fake.text
        assert language == "en"
        status = backend.status()
        assert status["errors"] == 5 and status["windows"] == 1
        assert fake.audio_bytes >= 6 * 2 * len(audio[0])  # every try sent the whole window


def test_a_window_the_server_garbles_is_retried_and_its_audio_kept(tmp_path: Path) -> None:
    with FakeWyomingServer(["garbage", "close", "junk"], text="the block books") as fake:
        asr = wyoming(fake.uri)
        worker = started(AsrWorker(asr))
        got = Collector()
        pipeline = SpeechPipeline("AA:BB:CC:DD:EE:74", config(tmp_path, asr), worker, got,
                                  anchor=ANCHOR)
        try:
            feed(pipeline, np.concatenate([silence(0.5), clip("ljspeech/LJ001-0004.wav"), silence(1.0)]))
            pipeline.close()
            (conv,) = got.wait_for(1)
        finally:
            worker.stop()
    assert text_of(conv) == "the block books"
    assert fake.requests == 4 and worker.errors == 3 and worker.windows_done == 1


def test_fallback_local_transcribes_while_the_server_is_away(tmp_path: Path, model: Any) -> None:
    asr = wyoming(f"tcp://127.0.0.1:{free_port()}", fallback="local")
    worker = started(AsrWorker(asr, model=model))
    got = Collector()
    pipeline = SpeechPipeline("AA:BB:CC:DD:EE:75", config(tmp_path, asr), worker, got, anchor=ANCHOR)
    try:
        feed(pipeline, np.concatenate([silence(0.5), clip("jfk.flac"), silence(1.0)]))
        pipeline.close()
        (conv,) = got.wait_for(1)
    finally:
        worker.stop()
    assert "ask not what your country" in normalise(text_of(conv))
    assert worker.backend is not None and worker.backend.status()["fallback_windows"] >= 1


def test_a_wyoming_uri_that_is_not_one_is_a_config_error_naming_the_key() -> None:
    for bad in ("asr.lan:10300", "http://asr.lan:10300", "tcp://asr.lan"):
        _, problems = parse_config({"asr": {"backend": "wyoming", "uri": bad}})
        assert problems == [f'[asr] uri must look like "tcp://host:10300" (or "unix:///path"), not {bad!r}']
    _, problems = parse_config({"asr": {"backend": "wyoming", "uri": "tcp://asr.lan:10300"}})
    assert problems == []


async def test_status_names_the_server_its_model_and_round_trip(
        tmp_path: Path, fake_bluez: Any, server: WyomingServer) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[asr]\nbackend = "wyoming"\nuri = "{server.uri}"\n\n'
                   f'[storage]\ndir = "{tmp_path / "state"}"\n')
    daemon = Daemon(load_config(str(cfg)), notifier=Notifier({}))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        deadline = time.monotonic() + TIMEOUT
        while not daemon.ready:  # the daemon's own readiness, polled with a bound
            assert time.monotonic() < deadline and not task.done(), "daemon did not get ready"
            await asyncio.sleep(0.05)
        run = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "bridge", "status", "--config", str(cfg)],
            cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)
    assert run.returncode == 0, run.stderr
    line = next(x for x in run.stdout.splitlines() if server.uri in x)
    assert "faster-whisper" in line and "model " in line and "round trip" in line, run.stdout
    assert "0 errors" in line
    print(run.stdout)
