"""Streams per server: several bridges sharing one Wyoming ASR server, against local transcription.

One real ``wyoming-faster-whisper`` (``omi_bridge_sim.wyoming.WyomingServer``: the bundled tiny.en,
int8, greedy, one CPU thread, so it computes like the local backend) listens on 127.0.0.1.
``BRIDGES`` bridge processes start beside it, each with ``PENDANTS`` simulated pendants: the
firmware's Opus encoder and framing (MTU 247, 2 % notification loss) feeding the daemon's per-device
path (``AudioStream`` → ``AudioTimeline`` → ``SpeechPipeline``) and one ``AsrWorker`` per process
with ``[asr] backend = "wyoming"`` at its default ``max_in_flight``. Each stream is 50 % speech
(corpus clips alternating with as much silence, as in ``bench.capture``).

Every bridge pushes its streams faster than real time, interleaved second by second, starting
together on a signal, until every window has come back from the server. With S stream-seconds
done in W seconds of wall time, the server keeps up with S / W real-time streams (the same
derivation as the ``streams`` row). The bridges run on the same 2 cores as the server here; on
a real network they run on their own Pis, so S / (server CPU-seconds) is also given: streams per
core of server CPU.

- **Server CPU per speech-second**: the server process's CPU (``/proc/PID/stat``, all threads)
  during the run / seconds of utterance audio sent to it. The local backend in the same run: the
  same streams through one process with ``[asr] backend = "local"`` (one shared worker, like the
  ``streams`` row), its CPU outside the feeding thread / the same utterance seconds.
- **Bridge side per stream**: each bridge process's CPU during the run / its stream-seconds,
  split into the feeding thread (link + VAD + spool) and the rest (the Wyoming client: reading
  the spool, sending PCM, waiting on sockets). The radio (bleak receiving notifications over
  D-Bus) is not in it: the ``idle_cpu`` row measures that, and it is the same for either backend.

    python -m bench server [--quick]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.common import Results, config, median, part_main, spread
from bench.daemon import proc_cpu

BRIDGE_GOAL_PERCENT = 1.0
BRIDGES = 3
PENDANTS = 4
"""Pendants per bridge: 12 streams in all, the size of the ``streams`` row's run."""
SECONDS = 60.0
RUNS = 2
DRAIN_TIMEOUT = 600.0
READY_TIMEOUT = 120.0
"""Encoding the pendants' Opus and loading Silero (or tiny.en for the local pass) before the start."""
NOTIFS_PER_SLICE = 50
"""Notifications pushed per stream per turn: one second of 20 ms frames."""
BRIDGE_FLAG = "--bridge-process"


@dataclass(frozen=True)
class BridgeSpec:
    """What one bridge process runs."""

    index: int
    """Which bridge: names its pendants."""
    seeds: list[int]
    """One stream per seed (its clips' order and loss pattern): the local pass carries the same
    seeds as all the bridges together, so both transcribe the same audio."""
    seconds: float
    """Length of each stream."""
    backend: str
    """``[asr] backend``: "wyoming" or "local"."""
    uri: str
    """The Wyoming server (unused for local)."""


def bridge_process(spec: BridgeSpec) -> dict[str, Any]:
    """The child side: build the streams, say ``ready``, wait for ``go`` on stdin, push, drain."""
    from bench.capture import fifty_fifty
    from bench.link import LOSS
    from bench.paths import MTU_NORMAL, omi_packets
    from bridge.audio.codecs import CODEC_OPUS_20MS
    from bridge.audio.stream import AudioStream
    from bridge.audio.timeline import AudioTimeline
    from bridge.config import AsrOptions
    from bridge.core.stats import LinkStats
    from bridge.speech.asr.worker import AsrWorker
    from bridge.speech.pipeline import SpeechPipeline

    words = 0

    def on_segments(_sid: str, _started: Any, segs: list[Any]) -> None:
        nonlocal words
        words += sum(len(s.text.split()) for s in segs)

    options = replace(AsrOptions(), backend=spec.backend, uri=spec.uri)
    worker = AsrWorker(options)
    worker.start()
    try:
        with tempfile.TemporaryDirectory(prefix="omi-bench-srv-") as tmp:
            cfg = replace(config(Path(tmp)), asr=options)
            lists = [omi_packets(fifty_fifty(spec.seconds, s), loss=LOSS, seed=s)[0] for s in spec.seeds]
            pipes = [SpeechPipeline(f"BE:5E:00:00:{spec.index:02X}:{k:02X}", cfg, worker, lambda c: None,
                                    on_segments=on_segments) for k in range(len(spec.seeds))]
            streams = [AudioStream(CODEC_OPUS_20MS, AudioTimeline(p), LinkStats(), mtu=MTU_NORMAL)
                       for p in pipes]
            print("ready", flush=True)
            if sys.stdin.readline().strip() != "go":
                raise RuntimeError("no start signal")
            wall0, cpu0, feed0 = time.monotonic(), time.process_time(), time.thread_time()
            for i in range(0, max(len(x) for x in lists), NOTIFS_PER_SLICE):
                for stream, notifs in zip(streams, lists, strict=True):
                    for p in notifs[i:i + NOTIFS_PER_SLICE]:
                        stream.push(p)
            for stream, pipe in zip(streams, pipes, strict=True):
                stream.close()
                pipe.close()
            feed_cpu = time.thread_time() - feed0
            if not worker.wait_idle(DRAIN_TIMEOUT):
                raise RuntimeError("transcription did not finish")
            wall1, cpu1 = time.monotonic(), time.process_time()
    finally:
        worker.stop()
    return {"start": wall0, "end": wall1, "cpu": cpu1 - cpu0, "feed_cpu": feed_cpu,
            "stream_seconds": len(spec.seeds) * spec.seconds, "speech": worker.speech_seconds,
            "windows": worker.windows_done, "errors": worker.errors, "words": words}


def run_bridges(specs: list[BridgeSpec], tmp: Path, server_pid: int | None) -> dict[str, Any]:
    """Start one process per spec, let them all go at once, and add up what they report."""
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[1])
    procs = []
    for spec in specs:
        log = (tmp / f"bridge-{spec.backend}-{spec.index}.log").open("ab")
        procs.append(subprocess.Popen([sys.executable, "-m", "bench.server", BRIDGE_FLAG,
                                       json.dumps(spec.__dict__)], cwd=repo, env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                      text=True))
        log.close()
    try:
        for proc, spec in zip(procs, specs, strict=True):
            assert proc.stdout is not None
            line = "?"
            while line and line.strip() != "ready":
                line = proc.stdout.readline()  # blocks until that bridge has built its streams
            if not line:
                raise RuntimeError(f"bridge {spec.index} did not start: "
                                   + (tmp / f"bridge-{spec.backend}-{spec.index}.log").read_text()[-1500:])
        server0 = proc_cpu(server_pid) if server_pid else 0.0
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outs = []
        for proc, spec in zip(procs, specs, strict=True):
            out, _ = proc.communicate(timeout=DRAIN_TIMEOUT)
            if proc.returncode != 0:
                raise RuntimeError(f"bridge {spec.index} failed: "
                                   + (tmp / f"bridge-{spec.backend}-{spec.index}.log").read_text()[-1500:])
            outs.append(json.loads(out.strip().splitlines()[-1]))
        server_cpu = proc_cpu(server_pid) - server0 if server_pid else 0.0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    total = {k: sum(o[k] for o in outs) for k in ("cpu", "feed_cpu", "stream_seconds", "speech", "windows",
                                                   "errors", "words")}
    total["wall"] = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    total["server_cpu"] = server_cpu
    total["bridges"] = len(outs)
    return total


def warm_up(uri: str) -> None:
    """One request first, so the server has loaded its model before anything is timed."""
    import numpy as np

    from bridge.config import AsrOptions
    from bridge.speech.asr.wyoming import WyomingBackend

    backend = WyomingBackend(replace(AsrOptions(), backend="wyoming", uri=uri))
    backend.transcribe([np.zeros(16000, np.float32)])
    backend.close()


def run(res: Results) -> None:
    from omi_bridge_sim.wyoming import WyomingServer

    from bridge.config import AsrOptions

    bridges, pendants, seconds, runs = (2, 1, 5.0, 1) if res.quick else (BRIDGES, PENDANTS, SECONDS, RUNS)
    def seeds(bridge: int) -> list[int]:
        return [bridge * pendants + k for k in range(pendants)]

    remote: list[dict[str, Any]] = []
    local: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="omi-bench-srv-") as name:
        tmp = Path(name)
        with WyomingServer(tmp) as server:
            warm_up(server.uri)
            for _ in range(runs):
                remote.append(run_bridges([BridgeSpec(b, seeds(b), seconds, "wyoming", server.uri)
                                           for b in range(bridges)], tmp, server.pid))
                print(f"wyoming: {remote[-1]}", flush=True)
        # The local peer: every stream through one process and its one worker, the server gone.
        for _ in range(runs):
            every = [s for b in range(bridges) for s in seeds(b)]
            local.append(run_bridges([BridgeSpec(0, every, seconds, "local", "")], tmp, None))
            print(f"local: {local[-1]}", flush=True)
    for r in remote:
        r["streams"] = r["stream_seconds"] / r["wall"]
        r["core_streams"] = r["stream_seconds"] / r["server_cpu"]
        r["server_per_speech"] = r["server_cpu"] / r["speech"]
        r["bridge_pct"] = r["cpu"] / r["stream_seconds"] * 100
        r["client_pct"] = (r["cpu"] - r["feed_cpu"]) / r["stream_seconds"] * 100
    for r in local:
        r["streams"] = r["stream_seconds"] / r["wall"]
        r["asr_per_speech"] = (r["cpu"] - r["feed_cpu"]) / r["speech"]

    def mid(rows: list[dict[str, Any]], key: str) -> float:
        return median(r[key] for r in rows)

    def spr(rows: list[dict[str, Any]], key: str) -> str:
        return spread([r[key] for r in rows])

    def listed(rows: list[dict[str, Any]]) -> str:
        return ", ".join(f"{r['streams']:.1f}" for r in rows)

    n, n_core, n_local = mid(remote, "streams"), mid(remote, "core_streams"), mid(local, "streams")
    srv, loc = mid(remote, "server_per_speech"), mid(local, "asr_per_speech")
    bridge, client = mid(remote, "bridge_pct"), mid(remote, "client_pct")
    best = min(remote, key=lambda r: abs(r["streams"] - n))
    peer = min(local, key=lambda r: abs(r["streams"] - n_local))
    errors = sum(r["errors"] for r in remote)
    res.add("server_streams", f"**{n:.1f}** (local {n_local:.1f})",
            note=f"{bridges} bridge processes × {pendants} pendants × {seconds:g} s into one "
                 f"wyoming-faster-whisper, bridges on the same 2 cores; median of {len(remote)} "
                 f"({spr(remote, 'streams')}); per core of server CPU: {n_core:.1f} "
                 f"({spr(remote, 'core_streams')}); local: the same streams through one process's "
                 f"worker ({spr(local, 'streams')}); {errors} failed requests")
    res.add("server_cpu", f"{srv:.4f} vs local {loc:.4f} → **{srv / loc:.2f} ×**",
            note=f"server process CPU / utterance seconds sent ({best['speech']:.0f} s per run, "
                 f"{best['windows']} requests); local: CPU outside the feeding thread "
                 f"({peer['speech']:.0f} s, {peer['windows']} Whisper calls); median of {len(remote)} "
                 f"(server {spr(remote, 'server_per_speech')}, local {spr(local, 'asr_per_speech')})")
    res.add("bridge_cpu", f"{bridge:.2f} % of a core", ok=bridge <= BRIDGE_GOAL_PERCENT,
            ratio=bridge / BRIDGE_GOAL_PERCENT,
            note=f"bridge processes' CPU / stream-seconds: link + VAD + spool {bridge - client:.2f} %, "
                 f"Wyoming client {client:.2f} %; median of {len(remote)} ({spr(remote, 'bridge_pct')} %); "
                 "bleak and D-Bus (the idle row) come on top, as with local ASR")
    res.section("Streams per Wyoming server: how the figures are derived", [
        f"{bridges} bridge processes, {pendants} simulated pendants each ({bridges * pendants} streams × "
        f"{seconds:g} s, 50 % speech, Opus MTU 247 with 2 % loss), all pushing faster than real time "
        "from the same moment into one wyoming-faster-whisper on 127.0.0.1 (tiny.en int8, beam 1, one "
        "CPU thread); each bridge has one AsrWorker with `[asr] backend = \"wyoming\"`, "
        f"`max_in_flight = {AsrOptions().max_in_flight}`. The local peer in the same run: all the "
        "streams through one process with the local backend.", "",
        "| | Wyoming server | local backend |", "|---|---|---|",
        f"| stream-seconds per run | {best['stream_seconds']:.0f} | {peer['stream_seconds']:.0f} |",
        f"| wall time until every window was transcribed | {best['wall']:.1f} s | {peer['wall']:.1f} s |",
        f"| utterance seconds transcribed / requests | {best['speech']:.0f} s / {best['windows']} | "
        f"{peer['speech']:.0f} s / {peer['windows']} |",
        f"| ASR CPU (server process / local worker side) | {best['server_cpu']:.2f} s | "
        f"{peer['cpu'] - peer['feed_cpu']:.2f} s |",
        f"| ASR CPU per speech-second | {best['server_per_speech']:.4f} | {peer['asr_per_speech']:.4f} |",
        f"| **real-time streams sustained = stream-seconds / wall** | **{n:.1f}** "
        f"({listed(remote)}) | {n_local:.1f} ({listed(local)}) |",
        f"| bridge CPU per stream (feeding thread + the rest) | {best['bridge_pct']:.2f} % "
        f"({best['bridge_pct'] - best['client_pct']:.2f} + {best['client_pct']:.2f}) | |",
        f"| words transcribed | {best['words']} | {peer['words']} |", "",
        "Sustained streams are bounded by the one server: its model decodes one window at a time, like "
        "the local worker, while the bridges here take part of the second core. The server still ran "
        f"on more than one core at times ({best['server_cpu']:.1f} CPU-seconds in {best['wall']:.1f} s: "
        "it reads and prepares the next request while the model decodes another), so per core of "
        f"server CPU, stream-seconds / server CPU-seconds = {n_core:.1f} streams is the figure to scale "
        "by a server machine's speed; a larger model costs more per speech-second. The server decodes "
        "a little differently from the local backend "
        "(it conditions on earlier text and keeps every segment, docs/reference/wyoming.md §6), so its "
        "cost per speech-second is compared, not its text.",
    ])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == BRIDGE_FLAG:
        out = bridge_process(BridgeSpec(**json.loads(args[1])))
        print(json.dumps(out), flush=True)
        return 0
    return part_main("server", __doc__, run, args)


if __name__ == "__main__":
    raise SystemExit(main())
