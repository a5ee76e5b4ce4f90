"""Where the daemon's memory and a Whisper call's time go: the measured reasons behind the RSS and
ASR rows.

- **Memory**: a fresh Python process takes the daemon's steps one at a time (the libraries in
  the order the daemon imports them, the arena cap ``omi-bridge run`` sets, tiny.en, the Silero
  session, one 30 s window transcribed) and reads its resident set (``VmRSS``) and peak
  (``VmHWM``) after each, so each step's cost is the difference.
- **A Whisper call**: the encoder pass on one 30 s window (what every call pays, whatever it
  holds) against the whole call on a full window of speech; the rest is decoding, per token.

    python -m bench footprint [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

from bench.common import Results, load_corpus, median, model, part_main, spread
from bridge.config import AsrOptions
from bridge.core.pcm import SAMPLE_RATE

STEPS = """
import json, sys
from pathlib import Path

def rss():
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out

steps = [("Python", rss())]
from bridge.app.memory import limit_malloc_arenas
limit_malloc_arenas()
import numpy
steps.append(("numpy", rss()))
import onnxruntime
steps.append(("onnxruntime", rss()))
import ctranslate2
steps.append(("ctranslate2", rss()))
import bleak, dbus_fast
import bridge.app.daemon
steps.append(("bleak, dbus-fast and the bridge", rss()))
from bridge.config import AsrOptions
from bridge.speech.asr.local import load_model, transcribe_window
options = AsrOptions()
model = load_model(options)
steps.append(("faster-whisper and tiny.en (int8)", rss()))
from bridge.speech.vad import make_vad
vad = make_vad(-80.0)
vad.probs(numpy.zeros((4, 512), dtype=numpy.int16) + 1)
steps.append(("Silero VAD session", rss()))
audio = numpy.frombuffer(sys.stdin.buffer.read(), dtype=numpy.int16)
try:
    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts here: the call's own
except OSError:
    pass
transcribe_window(model, options, [audio])
steps.append(("one 30 s window transcribed", rss()))
av = sys.modules.get("av")
av_loaded = av is not None and (type(av).__name__ != "DeferredModule" or "_deferred_module" in vars(av))
print(json.dumps({"steps": steps, "av_loaded": av_loaded}))
"""


def memory_steps(audio: np.ndarray) -> tuple[list[tuple[str, dict[str, float]]], bool]:
    """(step, its VmRSS and VmHWM in MB) in order, and whether PyAV got loaded."""
    out = subprocess.run([sys.executable, "-c", STEPS], input=audio.astype(np.int16).tobytes(),
                         capture_output=True, check=True, timeout=300)
    data = json.loads(out.stdout)
    return [(name, vals) for name, vals in data["steps"]], bool(data["av_loaded"])


def encoder_seconds(runs: int) -> list[float]:
    """One encoder pass over a 30 s window of features, as every Whisper call makes."""
    import ctranslate2

    m = model()
    features = m.feature_extractor(np.zeros(30 * SAMPLE_RATE, dtype=np.float32))[:, :3000]
    storage = ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None], dtype=np.float32))
    times = []
    for _ in range(runs + 1):
        t0 = time.process_time()
        m.model.encode(storage, to_cpu=True)
        times.append(time.process_time() - t0)
    return times[1:]  # the first pays for allocations


def run(res: Results) -> None:
    clips = load_corpus(res.quick)
    speech = np.concatenate([c.pcm for c in clips])[: 28 * SAMPLE_RATE]
    steps, loaded_av = memory_steps(speech)
    lines = ["| step | resident after it | its cost | peak so far |", "|---|---|---|---|"]
    before = 0.0
    for name, vals in steps:
        lines.append(f"| {name} | {vals['VmRSS']:.0f} MB | {vals['VmRSS'] - before:+.0f} MB | "
                     f"{vals['VmHWM']:.0f} MB |")
        before = vals["VmRSS"]
    (_, loaded), (_, vad_on), (_, called) = steps[-3:]
    lines += ["", f"Loading tiny.en peaks {loaded['VmHWM'] - loaded['VmRSS']:.0f} MB above what it keeps "
              "(CTranslate2 widens the stored weights before quantising them to int8). A Whisper call "
              f"then peaks {called['VmHWM'] - vad_on['VmRSS']:.0f} MB above the resident set before it "
              "(the peak was reset before the call): the encoder's buffers for a 30 s window, whatever "
              "the window holds, freed when it returns. With the libraries and the model resident, the "
              f"daemon's peak is about {vad_on['VmRSS']:.0f} + {called['VmHWM'] - vad_on['VmRSS']:.0f} MB."]
    lines += ["", f"PyAV (ffmpeg) is {'loaded' if loaded_av else 'not loaded'} in the daemon: the bridge "
              "hands Whisper PCM arrays, so faster-whisper's file decoder is imported only if a file is "
              "decoded (`omi-bridge transcribe FILE`)."]

    from bridge.speech.asr.local import transcribe_window

    runs = 1 if res.quick else 3
    enc = encoder_seconds(runs)
    options = AsrOptions()
    m = model()
    calls, words = [], 0
    for _ in range(runs):
        t0 = time.process_time()
        out, _lang = transcribe_window(m, options, [speech])
        calls.append(time.process_time() - t0)
        words = sum(len(s.text.split()) for s in out[0])
    decode = median(calls) - median(enc)
    lines += ["", f"A Whisper call on {len(speech) / SAMPLE_RATE:.0f} s of speech ({words} words): "
              f"{median(calls):.2f} CPU-s ({spread(calls)}), of which the encoder pass on the 30 s "
              f"window {median(enc):.2f} s ({spread(enc)}): every call pays it whatever it holds, so "
              f"packing more speech per call saves it; the other {decode:.2f} s is decoding, about "
              f"{1000 * decode / max(words, 1):.0f} ms per word, which no packing saves."]
    res.section("Where the memory and a Whisper call's time go (`python -m bench footprint`)", lines)
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    return part_main("footprint", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
