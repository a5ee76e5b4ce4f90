"""``python -m bench``: every figure of issue 7 next to its goal → bench/results.md and results.png.

    python -m bench                 # the full suite (~10 min on 2 cores)
    python -m bench --quick         # tiny sizes, seconds (the smoke test); figures not meaningful
    python -m bench --out DIR       # write results.md / results.png into DIR instead of bench/
    python -m bench NAME [ARGS]     # one benchmark on its own, printing its figures:
                                    #   link, capture, quality, delivery, daemon, server, offline,
                                    #   looplag,
                                    #   speech_live

Parts of the suite: capture (decode + VAD CPU per stream, concurrent streams), quality (corpus
WER and ASR CPU vs whole-file Whisper and the community SDK's decoding, segment latency),
delivery (end of conversation → request sent), daemon (idle CPU, peak RSS of the real daemon, with
tiny.en and with remote ASR), server (streams per Wyoming server: several bridge processes into one
wyoming-faster-whisper),
offline (CPU per MB of a pendant's stored audio synced, and whether transcription keeps
pace with an hour's sync at the pendant's read rate), looplag (event-loop stalls while streaming
speech onto a disk whose every fsync takes 300 ms).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

from bench.common import Results

SUITE = {
    "capture": ("capture_cpu", "streams"),
    "quality": ("asr_cpu", "wer_omi", "wer_frame", "segment_lag"),
    "delivery": ("delivery",),
    "daemon": ("idle_cpu", "rss", "rss_remote"),
    "footprint": (),
    "server": ("server_streams", "server_cpu", "bridge_cpu"),
    "offline": ("offline_cpu", "offline_pace"),
    "looplag": ("loop_lag",),
}
"""Suite parts (modules under bench/, each with ``run(Results)``) and the rows each fills."""
STANDALONE = ["link", *SUITE, "speech_live"]
"""Modules with their own ``main(argv)``."""


def run_suite(quick: bool, out: Path | None) -> int:
    from bench import report

    res = Results(quick=quick)
    failed = []
    for name, keys in SUITE.items():
        print(f"== {name} ==", flush=True)
        res.loads.append((name, os.getloadavg()))
        t0 = time.monotonic()
        try:
            importlib.import_module(f"bench.{name}").run(res)
        except Exception as exc:  # one broken part must not lose the other figures
            traceback.print_exc()
            failed.append(name)
            for key in keys:
                if key not in res.rows:
                    res.add(key, f"FAILED: {type(exc).__name__}: {exc}"[:200])
        res.durations[name] = time.monotonic() - t0
    md = (out or report.HERE) / "results.md"
    png = (out or report.HERE) / "results.png"
    report.write(res, md, png)
    print(f"\nwrote {md} and {png}")
    print("\n".join(report.table(res)))
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if argv and not argv[0].startswith("-"):
        name = argv.pop(0)
        if name not in STANDALONE:
            print(f"unknown benchmark {name!r}; available: {', '.join(STANDALONE)}", file=sys.stderr)
            return 2
        return int(importlib.import_module(f"bench.{name}").main(argv) or 0)
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--quick", action="store_true", help="tiny sizes for the smoke test")
    ap.add_argument("--out", type=Path, help="directory for results.md / results.png (default bench/)")
    args = ap.parse_args(argv)
    return run_suite(args.quick, args.out)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
