"""End of conversation → request sent, with the real pipeline, outbox and sender.

Wired as the daemon wires them (``Daemon._enqueue``): ``SpeechPipeline`` → ``Outbox.enqueue`` →
``Sender.wake()``, the sender's ``run()`` on its own event loop, posting over loopback HTTP to the
simulated Omi API (``omi_bridge_sim.omi_api``) with the hourly budget free. For each conversation the
speech and a pause longer than ``[asr] flush_pause_seconds`` are fed first and the worker is let
finish (in real time it has ``gap_seconds`` to do so), then silence is fed up to the moment the
gap closes the conversation. Measured: from the write that closed it to the server receiving the
request.

    python -m bench delivery [--quick]
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from omi_bridge_sim.audio import demo_speech_path, load_pcm16k
from omi_bridge_sim.omi_api import ApiKey, OmiApiSim

from bench.common import Results, config, load_corpus, median, model, p95, part_main, silence
from bridge.config import ApiOptions, AsrOptions, LocationOptions
from bridge.core.pcm import SAMPLE_RATE
from bridge.core.records import Conversation
from bridge.outbox.sender import Sender
from bridge.outbox.store import Outbox
from bridge.speech.asr.worker import AsrWorker
from bridge.speech.pipeline import SpeechPipeline

GOAL_SECONDS = 1.0
KEY = "omi_dev_bench_key"
GAP_SECONDS = 6.0
"""Conversation gap for the bench (the default 120 s would only make the feed longer)."""
CHUNK = 320
WAIT_SECONDS = 60.0


def run(res: Results) -> None:
    clips = [c.pcm for c in load_corpus()][2:] or [load_pcm16k(demo_speech_path())]
    rounds = 1 if res.quick else 7
    latencies: list[float] = []
    worker = AsrWorker(AsrOptions(), model=model())
    worker.start()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    with tempfile.TemporaryDirectory(prefix="omi-bench-") as tmp, OmiApiSim({KEY: ApiKey()}) as api:
        cfg = config(Path(tmp), gap_seconds=GAP_SECONDS)
        cfg = replace(cfg, api=ApiOptions(base_url=api.url, api_key=KEY))
        outbox = Outbox.open(Path(tmp))
        sender = Sender(outbox, cfg.api)

        def enqueue(conv: Conversation) -> None:
            outbox.enqueue(conv, LocationOptions(), time.time())
            sender.wake()

        thread = threading.Thread(target=loop.run_until_complete, args=(sender.run(stop),), daemon=True)
        thread.start()
        try:
            pipeline = SpeechPipeline("BE:NC:00:00:00:20", cfg, worker, enqueue, label="bench")
            flush = cfg.asr.flush_pause_seconds + 0.5

            def feed(pcm: np.ndarray) -> None:
                for i in range(0, len(pcm), CHUNK):
                    pipeline.write(pcm[i:i + CHUNK])

            for n in range(rounds):
                feed(np.concatenate([silence(0.5), clips[n % len(clips)], silence(flush)]))
                worker.wait_idle(WAIT_SECONDS)
                before = len(api.requests())
                closed_at = None
                while pipeline.in_conversation:
                    closed_at = time.monotonic()
                    pipeline.write(silence(CHUNK / SAMPLE_RATE))
                if closed_at is None:
                    raise RuntimeError("no conversation opened (VAD heard no speech)")
                if not api.wait_until(lambda b=before: api.in_flight > 0 or len(api.requests()) > b,
                                      WAIT_SECONDS):
                    raise RuntimeError("the conversation never reached the API")
                latencies.append(time.monotonic() - closed_at)
                api.wait_until(lambda b=before: len(api.requests()) > b and api.in_flight == 0, WAIT_SECONDS)
            stored = len(api.conversations())
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(10)
            loop.close()
            worker.stop()
            outbox.close()
    med = median(latencies)
    res.add("delivery", f"{med * 1000:.0f} ms (p95 {p95(latencies) * 1000:.0f} ms)", ok=med <= GOAL_SECONDS,
            ratio=med / GOAL_SECONDS,
            note=f"{len(latencies)} conversations, {stored} stored by the simulated API; the last "
                 "window is transcribed before the gap ends, so this is outbox commit + wake-up + POST")
    res.plots["delivery"] = latencies
    print(f"delivery: median {med * 1000:.0f} ms over {len(latencies)}")


def main(argv: list[str] | None = None) -> int:
    return part_main("delivery", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
