"""Speech figures on the real corpus: WER and ASR CPU, the bridge against its peers.

Conditions, all on the same corpus stream (every clip after 1.5 s of silence):

- **whole-file faster-whisper** (peer and reference): each original clip transcribed in one
  call with its own ``vad_filter``, tiny.en int8, beam 1, one thread: the daemon's settings.
- **bridge, original audio**: the PCM straight into ``SpeechPipeline`` (VAD → windows → the
  shared ``AsrWorker``), what ``omi-bridge transcribe`` does.
- **bridge, Omi path**: Opus 32 kbit/s as the firmware encodes it, 2 % of notifications lost,
  at MTU 247 (one notification per frame) and at a small MTU (frames in fragments), through
  the bridge's reassembly + decode + concealment, then the pipeline.
- **community SDK decoding** (peer): the same lossy notifications decoded the naive way
  (bench/paths.py), then the same pipeline, so only the decoding differs.
- **bridge, Frame path**: 8-bit 16 kHz PCM packets, 2 % lost, through ``FramePcmDecoder``.

Lossy conditions use several loss patterns (seeds); the table shows medians. The timeline error
is the decoded length minus the length the device produced.

ASR CPU per second of speech: process CPU (every thread) of the pipeline run on the original
audio, VAD included, against the whole-file calls, which include their own VAD; the same loaded
model serves both. End of speech → segment ready comes from the speech owner's live run
(``bench.speech_live.measure_live``, paced at real time).

    python -m bench quality [--quick]
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from bench.common import (
    PI4_CORE_FACTOR,
    Clip,
    Results,
    config,
    corpus_stream,
    cpu_seconds,
    load_corpus,
    median,
    model,
    p95,
    part_main,
    silence,
    spread,
    wer,
)
from bench.paths import (
    LOSS,
    MTU_NORMAL,
    MTU_SMALL,
    frame_decode,
    frame_packets,
    naive_decode,
    omi_decode,
    omi_packets,
)
from bridge.config import AsrOptions
from bridge.core.pcm import SAMPLE_RATE
from bridge.core.records import Conversation
from bridge.speech.asr.worker import AsrWorker
from bridge.speech.pipeline import SpeechPipeline

CHUNK = 320
"""20 ms writes, as a device driver delivers them."""
DRAIN_TIMEOUT = 600.0
"""Bound on waiting for the worker (minutes of speech on a loaded machine)."""
LIVE_GAP_SECONDS = 5.0
"""Conversation gap in the live run: short, so the paced stream (two conversations) is ~2 min."""
WER_FACTOR_GOAL = 0.85
ASR_FACTOR_GOAL = 0.5


def whole_file(clips: list[Clip]) -> tuple[str, float]:
    """(text, CPU seconds) of whole-file faster-whisper with vad_filter over every clip."""
    m = model()
    texts = []
    cpu0 = cpu_seconds()
    for c in clips:
        segments, _ = m.transcribe(c.pcm.astype(np.float32) / 32768.0, language="en", beam_size=1,
                                   vad_filter=True)
        texts += [s.text for s in segments]
    return " ".join(texts), cpu_seconds() - cpu0


def new_worker() -> AsrWorker:
    w = AsrWorker(AsrOptions(), model=model())
    w.start()
    return w


def pipeline_text(pcm: np.ndarray, worker: AsrWorker, *, label: str = "bench") -> tuple[str, float]:
    """(text of every conversation, CPU seconds) of one stream through ``SpeechPipeline``."""
    got: list[Conversation] = []
    with tempfile.TemporaryDirectory(prefix="omi-bench-") as tmp:
        pipeline = SpeechPipeline("BE:NC:00:00:00:01", config(Path(tmp)), worker, got.append, label=label)
        cpu0 = cpu_seconds()
        for i in range(0, len(pcm), CHUNK):
            pipeline.write(pcm[i:i + CHUNK])
        pipeline.close()
        if not worker.wait_idle(DRAIN_TIMEOUT):
            raise RuntimeError("transcription did not finish")
        cpu = cpu_seconds() - cpu0
    return " ".join(s.text for c in got for s in c.segments), cpu


def asr_floor(res: Results, speech_s: float, ours: float, whole: float, calls: int, words: int,
              runs: int) -> None:
    """How far packing alone can take the ASR ratio: every call pays one 30 s encoder pass, the
    rest is decoding, which grows with the words and which whole-file decoding pays as well."""
    from bench.footprint import encoder_seconds

    encs = encoder_seconds(runs)
    enc = median(encs)
    per_word = 1000 * max(0.0, ours - calls * enc) / max(words, 1)
    window = AsrOptions().window_seconds
    fewest = math.ceil(speech_s / window)
    decoding = max(0.0, ours - calls * enc)
    floor = (fewest * enc + decoding) / whole
    res.section("ASR cost: what packing can still save", [
        f"The pipeline transcribed {speech_s:.0f} s of speech in {calls} Whisper calls for {ours:.2f} "
        f"CPU-s (whole-file faster-whisper: {whole:.2f} CPU-s). One encoder pass on a 30 s window costs "
        f"{enc:.2f} s ({spread(encs)}) whatever the window holds, so {calls} × {enc:.2f} = "
        f"{calls * enc:.2f} s of the pipeline's cost is encoder and {decoding:.2f} s is decoding "
        f"{words} words (with the VAD and the feature extraction), about {per_word:.0f} ms a word."
        f" Packing can at best bring the calls down to {fewest} ({speech_s:.0f} s in "
        f"{window:g} s windows), which leaves the ratio at ({fewest} × {enc:.2f} + {decoding:.2f}) / "
        f"{whole:.2f} = **{floor:.2f} ×**: below that only cheaper decoding helps (fewer tokens, a "
        "faster decoder), not fewer calls.",
    ])


def run(res: Results) -> None:
    clips = load_corpus(res.quick)
    if not clips:
        why = "speech corpus not found (tests/data or $OMI_BRIDGE_CORPUS)"
        for key in ("asr_cpu", "wer_omi", "wer_frame", "segment_lag"):
            res.skip(key, why)
        print(f"speech: SKIPPED — {why}")
        return
    runs = 1 if res.quick else 3
    seeds = [1] if res.quick else [1, 2, 3]
    mtus = (MTU_NORMAL,) if res.quick else (MTU_NORMAL, MTU_SMALL)
    ref = " ".join(c.reference for c in clips)
    speech_s = sum(c.seconds for c in clips)
    stream = corpus_stream(clips)
    worker = new_worker()
    try:
        model()
        pipeline_text(stream[: SAMPLE_RATE * 3], worker)  # warm-up: first calls are slower

        # --- ASR CPU per second of speech, whole-file vs pipeline (original audio)
        base_cpu, our_cpu, our_calls = [], [], []
        base_text = our_text = ""
        for _ in range(runs):
            base_text, cpu = whole_file(clips)
            base_cpu.append(cpu)
            calls0 = worker.calls
            our_text, cpu = pipeline_text(stream, worker)
            our_cpu.append(cpu)
            our_calls.append(worker.calls - calls0)
        base_wer, clean_wer = wer(ref, base_text), wer(ref, our_text)
        b, o = median(base_cpu) / speech_s, median(our_cpu) / speech_s
        res.add("asr_cpu", f"{o:.4f} vs {b:.4f} → **{o / b:.2f} ×**", ok=o / b <= ASR_FACTOR_GOAL,
                ratio=o / b / ASR_FACTOR_GOAL,
                pi4=f"{o / b:.2f} × (a ratio of two figures on the same core); ≈ {o * PI4_CORE_FACTOR:.2f} "
                    f"CPU-s per speech-second (× {PI4_CORE_FACTOR:.0f})",
                note=f"{speech_s:.0f} s of speech; process CPU incl. VAD; median of {runs} (CPU s: "
                     f"pipeline {spread(our_cpu)}, whole-file {spread(base_cpu)})")
        print(f"asr cpu/speech-s: pipeline {o:.4f}  whole-file {b:.4f}")
        asr_floor(res, speech_s, median(our_cpu), median(base_cpu), int(median(our_calls)),
                  len(our_text.split()), runs)

        # --- the paths, with loss
        conditions: dict[str, dict[str, list[float]]] = {}

        def record(name: str, w: float, err: float) -> None:
            d = conditions.setdefault(name, {"wer": [], "err": []})
            d["wer"].append(w)
            d["err"].append(err)

        record("whole-file faster-whisper, original audio", base_wer, 0.0)
        record("bridge, original audio", clean_wer, 0.0)
        for mtu in mtus:
            for seed in seeds:
                notifs, _frames, true_len = omi_packets(stream, mtu=mtu, loss=LOSS, seed=seed)
                ours = omi_decode(notifs, mtu=mtu)
                text, _ = pipeline_text(ours, worker)
                record(f"bridge, Omi path, MTU {mtu}", wer(ref, text), (len(ours) - true_len) / SAMPLE_RATE)
                naive, _errors = naive_decode(notifs)
                text, _ = pipeline_text(naive, worker)
                record(f"community SDK decoding, MTU {mtu}", wer(ref, text),
                       (len(naive) - true_len) / SAMPLE_RATE)
                print(f"omi path mtu {mtu} seed {seed}: done")
        for seed in seeds:
            packets = frame_packets(stream, loss=LOSS, seed=seed)
            fpcm = frame_decode(packets)
            text, _ = pipeline_text(fpcm, worker)
            true_len = len(stream) // 240 * 240
            record("bridge, Frame path (8-bit PCM)", wer(ref, text), (len(fpcm) - true_len) / SAMPLE_RATE)
    finally:
        worker.stop()

    omi = median(conditions[f"bridge, Omi path, MTU {MTU_NORMAL}"]["wer"])
    small = conditions.get(f"bridge, Omi path, MTU {MTU_SMALL}")
    limit = base_wer * WER_FACTOR_GOAL
    shown = f"{omi:.1%} vs {base_wer:.1%}" + (f" → **{omi / base_wer:.2f} ×**" if base_wer else "")
    res.add("wer_omi", shown, ok=omi <= limit, ratio=omi / limit if limit else None,
            pi4="the same words (same model and decoding; only slower)",
            note=f"MTU {MTU_NORMAL}, median of {len(seeds)} loss patterns" + (
                f"; MTU {MTU_SMALL} (fragmented) {median(small['wer']):.1%}" if small else ""))
    fr = median(conditions["bridge, Frame path (8-bit PCM)"]["wer"])
    res.add("wer_frame", f"{fr:.1%} (whole-file {base_wer:.1%})", note="16 kHz 8-bit, 2 % packet loss")

    lines = [f"{len(clips)} clips, {speech_s:.1f} s of speech, {len(normalise_words(ref))} reference words "
             f"(one word ≈ {100 / max(1, len(normalise_words(ref))):.1f} % WER). Lossy rows: median over "
             f"{len(seeds)} loss patterns (min–max in brackets). Timeline error = decoded length − "
             "length the device produced. At a fragmenting MTU the packet index counts "
             "notifications, not frames, so how many frames a loss gap held is inferred: the "
             "bridge's small residual error there.", "",
             "| condition | WER | timeline error |", "|---|---|---|"]
    for name, d in conditions.items():
        w, e = d["wer"], d["err"]
        rng = f" ({min(w):.1%}–{max(w):.1%})" if len(w) > 1 else ""
        lines.append(f"| {name} | {median(w):.1%}{rng} | {median(e):+.2f} s |")
    res.section("Peers: what reassembly and concealment buy", lines)
    res.plots["wer"] = {name: median(d["wer"]) for name, d in conditions.items()}
    res.plots["timeline"] = {name: median(d["err"]) for name, d in conditions.items()}

    # --- end of speech → segment ready: the speech owner's live run (bench/speech_live.py)
    from bench import speech_live

    speed = 100.0 if res.quick else 1.0
    cfg = config(Path("."), gap_seconds=LIVE_GAP_SECONDS)
    if res.quick:  # one clip instead of the two-conversation stream
        c = clips[0]
        pcm = np.concatenate([silence(1.0), c.pcm, silence(1.0)])
        stream = speech_live.Stream(pcm, [speech_live.Clip(c.name, 1.0, 1.0 + c.seconds, c.reference)])
    else:
        stream = speech_live.build_stream(LIVE_GAP_SECONDS)
    live = speech_live.measure_live(model(), stream, cfg, speed)
    lags = live.segment_ready
    if lags:
        ready = ", ".join(f"{max(0.0, x):.2f}" for x in live.conversation_ready)
        res.add("segment_lag", f"{median(lags):.1f} s / {p95(lags):.1f} s",
                note=f"{len(lags)} clips' last words, stream paced at {speed:g}× real time (1 run; "
                     f"bench.speech_live); text waits for a {cfg.asr.flush_pause_seconds:g} s pause or a "
                     f"full window. Conversation close → ready: {ready} s")
        res.plots["lags"] = lags
    else:
        res.skip("segment_lag", "no segment came back")


def normalise_words(text: str) -> list[str]:
    from bench.common import normalise

    return normalise(text).split()


def main(argv: list[str] | None = None) -> int:
    return part_main("quality", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
