"""The speech path as a live device sees it (issue 3's goals), next to whole-file faster-whisper.

A simulated live stream built from the corpus (tests/data): lead-in, conversation A (three
clips, 1.5–2 s apart), room noise longer than the conversation gap, conversation B (the monologue
and two clips), then room noise again until B's gap has passed. It is written in 20 ms chunks,
paced at ``--speed`` × real time, into the real ``SpeechPipeline`` with the real shared
``AsrWorker`` (the configured model, tiny.en int8).

Rows:
- ASR CPU-s per s of speech: process CPU during Whisper calls / seconds of speech, next to
  ``WhisperModel.transcribe(whole stream, vad_filter=True)`` (goal ≤ 1.1 ×), and the call counts.
- end of conversation → ready (goal ≤ 1 s) and end of speech → segment ready (median, p95), in
  wall seconds: honest at ``--speed 1`` (at higher speeds Whisper's share is not scaled).
- VAD (+ endpointing + spool) CPU per stream and idle CPU (a connected device hearing nothing:
  link-gap zeros and quiet room noise), % of one core at real time (goal idle ≤ 1 %).
- Peak RSS after the live run (goal ≤ 450 MB); corpus WER next to whole-file (goal ≤ 1.2 ×).

    python -m bench.speech_live [--speed 1] [--gap 10] [--idle-seconds 600]

The functions (``build_stream``, ``measure_live``, ``measure_whole_file``, ``measure_vad_cpu``,
``measure_idle_cpu``) are for the bench suite to call.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bridge.audio.files import decode_file as decode
from bridge.config import Config
from bridge.core.pcm import SAMPLE_RATE
from bridge.core.records import Conversation, Segment
from bridge.speech.asr.worker import AsrWorker, load_model
from bridge.speech.pipeline import SpeechPipeline

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data"
CHUNK = 320
"""20 ms writes, like the Omi driver (one 20 ms CELT frame per write)."""
LOUD_RMS = 300
"""int16 RMS of a 20 ms frame counted as speech when locating a clip's last word (≈ −40 dBFS)."""
NOISE_RMS = 10
"""Noise floor of the simulated room (≈ −70 dBFS): a live mic is never digitally silent."""
CONV_A = ["jfk.flac", "ljspeech/LJ001-0004.wav", "ljspeech/LJ001-0008.wav"]
CONV_B = ["monologue.wav", "ljspeech/LJ001-0006.wav", "ljspeech/LJ001-0013.wav"]
DRAIN_TIMEOUT = 600.0
WARMUP_SECONDS = 2.0
"""A first Whisper call is slower (allocations); one short call before measuring."""


@dataclass
class Clip:
    name: str
    offset: float
    """Seconds into the stream."""
    speech_end: float
    """Stream seconds of the clip's last loud frame."""
    reference: str


@dataclass
class Stream:
    pcm: np.ndarray
    clips: list[Clip]

    @property
    def reference(self) -> str:
        return " ".join(c.reference for c in self.clips)

    @property
    def speech_seconds(self) -> float:
        return sum(c.speech_end - c.offset for c in self.clips)


def _references() -> dict[str, str]:
    manifest = json.loads((CORPUS / "manifest.json").read_text())
    return {c["file"]: c["reference"] for c in manifest["clips"] if "reference" in c}


def build_stream(gap_seconds: float = 10.0, seed: int = 3) -> Stream:
    """Two conversations separated by more than ``gap_seconds`` of room noise."""
    refs = _references()
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    clips: list[Clip] = []
    pos = 0

    def room(seconds: float) -> None:
        nonlocal pos
        n = int(seconds * SAMPLE_RATE)
        parts.append(rng.normal(0, NOISE_RMS, n).astype(np.int16))
        pos += n

    def say(name: str) -> None:
        nonlocal pos
        pcm = decode(CORPUS / name)
        frames = pcm[: len(pcm) // 320 * 320].astype(float).reshape(-1, 320)
        loud = np.nonzero(np.sqrt((frames ** 2).mean(axis=1)) > LOUD_RMS)[0]
        end = (loud[-1] + 1) * 320 if len(loud) else len(pcm)
        clips.append(Clip(name, pos / SAMPLE_RATE, (pos + end) / SAMPLE_RATE, refs[name]))
        parts.append(pcm)
        pos += len(pcm)

    room(2.0)
    for i, name in enumerate(CONV_A):
        if i:
            room(1.5 + 0.25 * i)
        say(name)
    room(gap_seconds + 15.0)
    for i, name in enumerate(CONV_B):
        if i:
            room(1.5 + 0.25 * i)
        say(name)
    room(gap_seconds + 2.0)  # B too is closed by the gap, as live conversations are
    return Stream(np.concatenate(parts), clips)


def _wer(reference: str, hypothesis: str) -> float:
    import jiwer

    norm = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                          jiwer.Strip()])
    return float(jiwer.wer(norm(reference.replace("-", " ")), norm(hypothesis.replace("-", " "))))


def warm_up(model: Any) -> None:
    rng = np.random.default_rng(0)
    list(model.transcribe(rng.normal(0, 0.01, int(WARMUP_SECONDS * SAMPLE_RATE)).astype(np.float32),
                          language="en", beam_size=1)[0])


def measure_whole_file(model: Any, stream: Stream, config: Config) -> dict[str, float]:
    """faster-whisper on the whole stream with its own VAD filter: the batch baseline."""
    audio = stream.pcm.astype(np.float32) / 32768.0
    cpu0, wall0 = time.process_time(), time.monotonic()
    segments, _ = model.transcribe(audio, language="en", beam_size=config.asr.beam_size, vad_filter=True)
    text = " ".join(s.text for s in segments)
    return {"cpu": time.process_time() - cpu0, "wall": time.monotonic() - wall0,
            "wer": _wer(stream.reference, text)}


@dataclass
class LiveResult:
    asr_cpu: float
    speech_seconds: float
    conversations: list[Conversation]
    calls: int = 0
    conversation_ready: list[float] = field(default_factory=list)
    segment_ready: list[float] = field(default_factory=list)
    wer: float = 0.0
    peak_rss_mb: float = 0.0
    backlog_max: float = 0.0


def measure_live(model: Any, stream: Stream, config: Config, speed: float = 1.0) -> LiveResult:
    """Feed ``stream`` paced at ``speed`` × real time through a pipeline and the shared worker."""
    worker = AsrWorker(config.asr, model=model)
    worker.start()
    lock = threading.Lock()
    conversations: list[tuple[float, Conversation]] = []
    seg_events: list[tuple[float, float]] = []  # (wall, stream seconds of a segment's end)
    anchor = datetime(2026, 1, 31, 9, 0, tzinfo=UTC)

    def on_segments(_sid: str, started: datetime, segs: list[Segment]) -> None:
        now = time.monotonic()
        base = (started - anchor).total_seconds()
        with lock:
            seg_events.extend((now, base + s.end) for s in segs)

    def on_conversation(conv: Conversation) -> None:
        with lock:
            conversations.append((time.monotonic(), conv))

    backlog_max = 0.0
    closes: list[float] = []  # wall time each conversation closed (gap elapsed, or end of stream)
    with tempfile.TemporaryDirectory(prefix="bench-speech-") as tmp:
        pipeline = SpeechPipeline("BE:NC:H0:00:00:01", config, worker, on_conversation, anchor=anchor,
                                  storage=Path(tmp), on_segments=on_segments)
        t0 = time.monotonic()

        def wall_at(stream_seconds: float) -> float:
            return t0 + stream_seconds / speed

        for i in range(0, len(stream.pcm), CHUNK):
            delay = wall_at(i / SAMPLE_RATE) - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing like a radio link, not synchronisation
            was_open = pipeline.in_conversation
            pipeline.write(stream.pcm[i:i + CHUNK])
            if was_open and not pipeline.in_conversation:
                closes.append(time.monotonic())
            backlog_max = max(backlog_max, pipeline.backlog_seconds())
        if pipeline.in_conversation:
            closes.append(time.monotonic())
        pipeline.close()
        worker.wait_idle(DRAIN_TIMEOUT)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while len(conversations) < len(closes) and time.monotonic() < deadline:
            time.sleep(0.05)
    worker.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = LiveResult(asr_cpu=worker.cpu_seconds, speech_seconds=stream.speech_seconds,
                        conversations=[c for _, c in conversations], calls=worker.calls,
                        peak_rss_mb=rss, backlog_max=backlog_max)
    result.conversation_ready = [ready - closed for (ready, _), closed in zip(conversations, closes,
                                                                             strict=False)]
    for clip in stream.clips:
        ready = [w for w, end in seg_events if end >= clip.speech_end - 0.5]
        if ready:
            result.segment_ready.append(min(ready) - wall_at(clip.speech_end))
    text = " ".join(s.text for c in result.conversations for s in c.segments)
    result.wer = _wer(stream.reference, text)
    return result


def measure_vad_cpu(stream: Stream, config: Config) -> float:
    """Process CPU per second of audio for VAD + endpointing + spooling (no ASR), % of a core."""
    worker = AsrWorker(config.asr)  # never started: windows only queue up as file references
    with tempfile.TemporaryDirectory(prefix="bench-vad-") as tmp:
        pipeline = SpeechPipeline("BE:NC:H0:00:00:02", config, worker, lambda c: None,
                                  storage=Path(tmp))
        cpu0 = time.process_time()
        for i in range(0, len(stream.pcm), CHUNK):
            pipeline.write(stream.pcm[i:i + CHUNK])
        cpu = time.process_time() - cpu0
    return 100.0 * cpu / (len(stream.pcm) / SAMPLE_RATE)


def measure_idle_cpu(seconds: float, config: Config) -> float:
    """A connected device hearing nothing, % of a core at real time: half link-gap zeros (the
    model is skipped), half quiet room noise (the model runs, nothing opens)."""
    worker = AsrWorker(config.asr)
    rng = np.random.default_rng(5)
    n = int(seconds * SAMPLE_RATE)
    audio = rng.normal(0, NOISE_RMS, n).astype(np.int16)
    audio[: n // 2] = 0
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        pipeline = SpeechPipeline("BE:NC:H0:00:00:03", config, worker, lambda c: None,
                                  storage=Path(tmp))
        cpu0 = time.process_time()
        for i in range(0, n, CHUNK):
            pipeline.write(audio[i:i + CHUNK])
        cpu = time.process_time() - cpu0
    return 100.0 * cpu / seconds


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.speech_live",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--speed", type=float, default=1.0, help="× real time for the live run")
    parser.add_argument("--gap", type=float, default=10.0, help="[conversation] gap_seconds to use")
    parser.add_argument("--idle-seconds", type=float, default=600.0, help="audio for the idle row")
    args = parser.parse_args(argv)
    if not (CORPUS / "manifest.json").exists():
        print(f"speech corpus not found at {CORPUS}", file=sys.stderr)
        return 2
    config = Config()
    config = replace(config, conversation=replace(config.conversation, gap_seconds=args.gap))
    stream = build_stream(args.gap)
    model = load_model(config.asr)
    warm_up(model)
    print(f"stream {len(stream.pcm) / SAMPLE_RATE:.0f} s, speech {stream.speech_seconds:.1f} s, "
          f"{len(stream.clips)} clips; model {config.asr.model} {config.asr.compute_type}, "
          f"{config.asr.cpu_threads} thread(s), beam {config.asr.beam_size}; live at {args.speed:g}× "
          "real time", flush=True)
    live = measure_live(model, stream, config, args.speed)
    whole = measure_whole_file(model, stream, config)
    vad = measure_vad_cpu(stream, config)
    idle = measure_idle_cpu(args.idle_seconds, config)
    seg = live.segment_ready
    rows = [
        ("ASR CPU-s per s of speech", f"{live.asr_cpu / live.speech_seconds:.4f} ({live.calls} calls)",
         f"whole-file vad_filter {whole['cpu'] / live.speech_seconds:.4f} "
         f"(ratio {live.asr_cpu / whole['cpu']:.2f}×, goal ≤ 1.1×)"),
        ("conversations", f"{len(live.conversations)}", "expected 2"),
        ("end of conversation → ready (s)", ", ".join(f"{x:.2f}" for x in live.conversation_ready),
         "goal ≤ 1 s"),
        ("end of speech → segment ready (s)",
         f"median {statistics.median(seg):.2f}, p95 {_pct(seg, 95):.2f}" if seg else "n/a",
         "waits for [asr] flush_pause_seconds or a full window"),
        ("max backlog (s of speech)", f"{live.backlog_max:.1f}", ""),
        ("VAD+spool CPU per stream", f"{vad:.2f} % of a core", "speech stream"),
        ("idle CPU (silent device)", f"{idle:.3f} % of a core", "goal ≤ 1 %"),
        ("peak RSS", f"{live.peak_rss_mb:.0f} MB", "goal ≤ 450 MB"),
        ("WER", f"{live.wer * 100:.1f} %", f"whole-file {whole['wer'] * 100:.1f} % (goal ≤ 1.2×)"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:<28} {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
