"""Decode + reassembly CPU per Omi stream (issue 2's budget: well under 1 % of one core).

A long synthetic notification stream — the bundled speech clip, Opus-encoded with the firmware's
settings (omi_bridge_sim.omi) and framed like ``transport.c`` — goes through the bridge's real
per-connection audio path (``AudioStream``: depacketizer → decoder/PLC → timeline). CPU is
``time.process_time`` for the whole pass, median of several passes, reported as the share of one
core a live stream (frames per second of real time) would use.

    python -m bench link [--seconds 120] [--runs 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import struct
import time

import numpy as np
from omi_bridge_sim.audio import demo_speech_path, load_pcm16k
from omi_bridge_sim.omi import FrameEncoder, fragment

from bridge.audio.stream import AudioStream
from bridge.audio.timeline import AudioTimeline
from bridge.core.pcm import SAMPLE_RATE
from bridge.core.stats import LinkStats

LOSS = 0.02
"""Notification loss in the lossy rows: the 2 % the link tests use, so PLC is exercised."""


class _NullSink:
    def write(self, pcm: np.ndarray, /) -> None:
        pass


def packets(codec: int, seconds: float, mtu: int, loss: float, seed: int = 1) -> tuple[list[bytes], int]:
    """(notifications, frames) for ``seconds`` of speech framed at ``mtu``."""
    clip = load_pcm16k(demo_speech_path())
    enc = FrameEncoder(codec)
    fs = enc.spec.frame_samples_16k
    n_frames = int(seconds * SAMPLE_RATE) // fs
    rng = random.Random(seed)
    out: list[bytes] = []
    idx = 0
    for n in range(n_frames):
        start = (n * fs) % (len(clip) - fs)
        frame = enc.encode(clip[start:start + fs])
        for sub, piece in enumerate(fragment(frame, mtu)):
            if not (loss and rng.random() < loss):
                out.append(struct.pack("<HB", idx, sub) + piece)
            idx = (idx + 1) & 0xFFFF
    return out, n_frames


def one_pass(codec: int, notifs: list[bytes], mtu: int) -> float:
    stream = AudioStream(codec, AudioTimeline(_NullSink()), LinkStats(), mtu=mtu)
    t0 = time.process_time()
    for p in notifs:
        stream.push(p)
    stream.close()
    return time.process_time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench link", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="stream length (default 120)")
    ap.add_argument("--runs", type=int, default=5, help="passes; the median is shown (default 5)")
    args = ap.parse_args(argv)
    rows = [
        ("opus 20 ms (CV1), MTU 247", 21, 247, 0.0),
        ("opus 20 ms, MTU 247, 2 % loss", 21, 247, LOSS),
        ("opus 10 ms (DevKit), MTU 247", 20, 247, 0.0),
        ("opus 20 ms, MTU 40 (fragmented)", 21, 40, 0.0),
    ]
    print(f"{args.seconds:g} s stream per row, median of {args.runs} passes (process CPU time)\n")
    print(f"{'stream':<34}{'notifs':>8}{'frames':>8}{'µs/frame':>10}{'% of a core':>13}")
    for label, codec, mtu, loss in rows:
        notifs, n_frames = packets(codec, args.seconds, mtu, loss)
        cpu = statistics.median(one_pass(codec, notifs, mtu) for _ in range(args.runs))
        print(f"{label:<34}{len(notifs):>8}{n_frames:>8}{cpu / n_frames * 1e6:>10.1f}"
              f"{cpu / args.seconds * 100:>12.3f}%")
    print("\ngoal: well under 1 % of one core per stream")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
