"""What every benchmark shares: the corpus, WER, the result table and machine-noise notes.

A benchmark adds ``Row``s (one figure next to its goal) and free-form detail sections to a
``Results``; ``bench.report`` turns them into ``bench/results.md`` and ``bench/results.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bridge.config import AsrOptions, Config, ConversationOptions
from bridge.core.pcm import SAMPLE_RATE

CORPUS_ENV = "OMI_BRIDGE_CORPUS"
"""Overrides where the speech corpus is (default: the clips in tests/data, see its NOTICE.md)."""
DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data"

CORPUS_CLIPS = ("jfk.flac", "monologue.wav", "ljspeech/LJ001-0002.wav", "ljspeech/LJ001-0004.wav",
                "ljspeech/LJ001-0006.wav", "ljspeech/LJ001-0008.wav", "ljspeech/LJ001-0013.wav")
"""Single-speaker clips with one reference each. stereo_diarization.wav is left out: mixed down
it is two people talking at once, and its references are per channel."""
QUICK_CLIPS = ("ljspeech/LJ001-0004.wav",)

LEAD_SECONDS = 1.5
"""Silence before each clip in a corpus stream: one conversation, clips as separate utterances
(the same layout as tests/test_speech_pipeline.py)."""


def corpus_dir() -> Path | None:
    path = Path(os.environ.get(CORPUS_ENV) or DEFAULT_CORPUS)
    return path if (path / "manifest.json").exists() else None


@dataclass(frozen=True)
class Clip:
    name: str
    pcm: np.ndarray
    reference: str

    @property
    def seconds(self) -> float:
        return len(self.pcm) / SAMPLE_RATE


def load_corpus(quick: bool = False) -> list[Clip]:
    """The corpus clips as 16 kHz int16; [] when the corpus is not there."""
    root = corpus_dir()
    if root is None:
        return []
    from bridge.audio.files import decode_file as decode

    manifest = json.loads((root / "manifest.json").read_text())
    refs = {c["file"]: c.get("reference") for c in manifest["clips"]}
    return [Clip(n, decode(root / n), refs[n]) for n in (QUICK_CLIPS if quick else CORPUS_CLIPS)
            if refs.get(n) and (root / n).exists()]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.int16)


def corpus_stream(clips: Sequence[Clip], tail: float = 1.0) -> np.ndarray:
    """All clips in one timeline, each after LEAD_SECONDS of silence."""
    parts = []
    for c in clips:
        parts += [silence(LEAD_SECONDS), c.pcm]
    parts.append(silence(tail))
    return np.concatenate(parts)


def normalise(text: str) -> str:
    import jiwer

    tr = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                        jiwer.Strip()])
    return tr(text.replace("-", " "))


def wer(reference: str, hypothesis: str) -> float:
    import jiwer

    hyp = normalise(hypothesis)
    ref = normalise(reference)
    if not hyp:
        return 1.0
    return float(jiwer.wer(ref, hyp))


def config(storage: Path, *, gap_seconds: float = 120.0) -> Config:
    c = Config()
    return replace(c, conversation=replace(ConversationOptions(), gap_seconds=gap_seconds),
                   storage=replace(c.storage, dir=str(storage)))


_MODEL: Any = None


def model() -> Any:
    """The bundled tiny.en (int8, 1 thread, the daemon's defaults), loaded once per process."""
    global _MODEL
    if _MODEL is None:
        from bridge.speech.asr.worker import load_model

        _MODEL = load_model(AsrOptions())
    return _MODEL


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def spread(values: Sequence[float]) -> str:
    """"min–max over n" for a note on run-to-run noise."""
    if len(values) < 2:
        return "1 run"
    return f"{min(values):.3g}–{max(values):.3g} over {len(values)} runs"


def p95(values: Sequence[float]) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round(0.95 * (len(v) - 1)))]


@dataclass
class Row:
    """One figure of the result table."""

    key: str
    figure: str
    measured: str
    goal: str
    ok: bool | None = None
    """True/False against the goal; None for "report only" or not measured."""
    ratio: float | None = None
    """measured / goal limit (for the plot: ≤ 1 meets an upper-bound goal)."""
    note: str = ""
    pi4: str = ""
    """The figure estimated for a Raspberry Pi 4, with the scaling used (``PI4_CORE_FACTOR``)."""


PI4_CORE_FACTOR = 10.0
"""A Pi 4 core does the bridge's work about 10× slower than one of this machine's (9–11× per
Whisper call, docs/reference/performance-notes.md §6); CPU shares scale by it, ratios between two
figures measured on the same core do not, and memory stays (the same libraries on aarch64)."""


def pi4_cpu(percent: float) -> str:
    """A share of one core here as a share of one Pi 4 core."""
    return f"≈ {percent * PI4_CORE_FACTOR:.1f} % of a Pi 4 core (× {PI4_CORE_FACTOR:.0f})"


ROW_ORDER = ("capture_cpu", "asr_cpu", "delivery", "segment_lag", "idle_cpu", "streams", "rss",
             "rss_remote", "wer_omi", "wer_frame", "server_streams", "server_cpu", "bridge_cpu",
             "offline_cpu", "offline_pace", "loop_lag")
"""Every row the table has, in the issue's order (the smoke test checks them all)."""

ROW_TITLES = {
    "capture_cpu": "decode + reassembly + VAD CPU per stream",
    "asr_cpu": "ASR CPU-seconds per second of speech",
    "delivery": "end of conversation → request sent (budget free)",
    "segment_lag": "end of speech → segment ready, median / p95",
    "idle_cpu": "CPU while connected and silent",
    "streams": "concurrent real-time streams sustained with no backlog growth (50 % speech)",
    "rss": "peak RSS, one device / each extra device",
    "rss_remote": "peak RSS, one device, remote ASR (wyoming): with / without local-asr installed",
    "wer_omi": "corpus WER through the full Omi path (Opus 32 kbit/s, 2 % frame loss)",
    "wer_frame": "the same through the Frame path",
    "server_streams": "real-time streams one Wyoming server sustains (50 % speech)",
    "server_cpu": "Wyoming server CPU-seconds per second of speech, vs local",
    "bridge_cpu": "bridge side per stream with a Wyoming server",
    "offline_cpu": "offline sync: bridge CPU per MB synced (transfer + durable spool)",
    "offline_pace": "offline sync of 1 h stored at 32 kB/s: last conversation after the transfer's end",
    "loop_lag": "event-loop lag while streaming speech, every fsync 300 ms; notifications dropped",
}

ROW_GOALS = {
    "capture_cpu": "≤ 0.5 % of one core, off the event loop",
    "asr_cpu": "≤ 0.5 × whole-file faster-whisper (vad_filter)",
    "delivery": "≤ 1 s",
    "segment_lag": "report",
    "idle_cpu": "≤ 0.3 %",
    "streams": "≥ 40",
    "rss": "≤ 200 MB / ≤ 20 MB",
    "rss_remote": "report (Pi Zero 2 W: 512 MB)",
    "wer_omi": "≤ 0.85 × whole-file faster-whisper on the original audio",
    "wer_frame": "report",
    "server_streams": "report",
    "server_cpu": "report",
    "bridge_cpu": "≤ 1 % of one core",
    "offline_cpu": "< 2 % of a core at 100 kB/s",
    "offline_pace": "≤ 1 min (budget aside)",
    "loop_lag": "p99 < 20 ms, 0 dropped",
}


@dataclass
class Results:
    quick: bool = False
    rows: dict[str, Row] = field(default_factory=dict)
    sections: list[tuple[str, list[str]]] = field(default_factory=list)
    """(title, markdown lines) shown below the table."""
    plots: dict[str, Any] = field(default_factory=dict)
    """Data for results.png, by benchmark."""
    loads: list[tuple[str, tuple[float, float, float]]] = field(default_factory=list)
    """(benchmark, 1/5/15-min load average when it started)."""
    durations: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def add(self, key: str, measured: str, *, ok: bool | None = None, ratio: float | None = None,
            note: str = "", pi4: str = "") -> None:
        self.rows[key] = Row(key, ROW_TITLES[key], measured, ROW_GOALS[key], ok, ratio, note, pi4)

    def skip(self, key: str, why: str) -> None:
        self.add(key, f"not measured: {why}")

    def section(self, title: str, lines: list[str]) -> None:
        self.sections.append((title, lines))


def cpu_seconds() -> float:
    """This process's CPU time, all threads (CTranslate2 and onnxruntime compute in their own)."""
    return time.process_time()


def part_main(name: str, doc: str | None, run: Callable[[Results], None],
              argv: list[str] | None = None) -> int:
    """``python -m bench NAME``: run one part and print its rows (and sections) to the terminal."""
    ap = argparse.ArgumentParser(prog=f"python -m bench {name}", description=(doc or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the seconds-long version the smoke test runs")
    args = ap.parse_args(argv)
    res = Results(quick=args.quick)
    run(res)
    for row in res.rows.values():
        print(f"{row.figure}: {row.measured}  (goal {row.goal}) {row.note}")
    for title, lines in res.sections:
        print(f"\n{title}\n" + "\n".join(lines))
    return 0
