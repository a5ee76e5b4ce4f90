"""Prometheus ``/metrics``: the daemon's health snapshot, rendered at scrape time.

Off unless ``[metrics] enabled``. A custom collector turns the newest ``HealthSnapshot`` into
metric families when Prometheus asks, so there is no second set of counters to keep in step
with ``status``; prometheus-client's process collector adds ``process_*`` (RSS, CPU seconds, open
files). prometheus-client serves HTTP on a thread of its own; the collector only reads the
snapshot the daemon last published (an immutable object, swapped by reference), never the
daemon's live parts.

Names follow the Prometheus conventions (docs/reference/prometheus-naming.md §1): one ``omi_bridge_`` prefix,
base units (seconds, bytes, ratios 0–1), ``_total`` on counters, ``_timestamp_seconds`` on Unix
times. Counters count since the daemon started (Prometheus' ``rate()`` handles the restarts).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from bridge.config import MetricsOptions
from bridge.core.errors import BridgeError
from bridge.core.health import HealthSnapshot

_LOGGER = logging.getLogger(__name__)

PREFIX = "omi_bridge"
DEVICE_LABELS = ("device", "address", "kind")


def _ts(when: datetime | None) -> float | None:
    return when.timestamp() if when is not None else None


class HealthCollector(Collector):
    """Metric families from ``snapshot()``, computed at each scrape."""

    def __init__(self, snapshot: Callable[[], HealthSnapshot | None]) -> None:
        self.snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        # Names are fixed; describing nothing keeps registration from calling collect().
        return []

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        if snap is None:
            return
        yield from self._bridge(snap)
        yield from self._devices(snap)
        yield from self._speech(snap)
        yield from self._outbox(snap)

    @staticmethod
    def _bridge(snap: HealthSnapshot) -> Iterator[Metric]:
        yield GaugeMetricFamily(f"{PREFIX}_ready", "1 once the daemon listens for its devices.",
                                value=float(snap.ready))
        yield GaugeMetricFamily(f"{PREFIX}_start_time_seconds", "When the daemon started (Unix time).",
                                value=snap.started_at.timestamp())
        yield CounterMetricFamily(f"{PREFIX}_errors", "Errors since start: failed transcriptions, "
                                  "device task failures, conversations the API rejected.",
                                  value=snap.errors)

    @staticmethod
    def _devices(snap: HealthSnapshot) -> Iterator[Metric]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_device_{name}", doc, labels=DEVICE_LABELS)

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_device_{name}", doc, labels=DEVICE_LABELS)

        connected = gauge("connected", "1 while the device's Bluetooth link is up.")
        battery = gauge("battery_ratio", "Battery level reported by the device (0–1).")
        last_audio = gauge("last_audio_timestamp_seconds", "When the device last sent audio (Unix time).")
        notifications = counter("notifications", "Audio notifications received.")
        frames = counter("frames", "Codec frames decoded.")
        lost = counter("frames_lost", "Frames missing from the sequence, concealed with PLC or silence.")
        reconnects = counter("reconnects", "Connections made after the first one.")
        presses = counter("button_presses", "Button events from the device.")
        speech = counter("speech_seconds", "Speech the VAD kept as utterances.")
        stored = gauge("stored_audio_bytes", "Audio recorded while out of range, still on the device.")
        for dev in snap.devices:
            labels = [dev.name, dev.address, dev.kind]
            connected.add_metric(labels, float(dev.connected))
            if dev.battery is not None:
                battery.add_metric(labels, dev.battery / 100)
            if (ts := _ts(dev.last_audio_at)) is not None:
                last_audio.add_metric(labels, ts)
            notifications.add_metric(labels, dev.notifications)
            frames.add_metric(labels, dev.frames)
            lost.add_metric(labels, dev.frames_lost)
            reconnects.add_metric(labels, dev.reconnects)
            presses.add_metric(labels, dev.button_presses)
            speech.add_metric(labels, dev.speech_seconds)
            if dev.stored_audio_bytes is not None:
                stored.add_metric(labels, dev.stored_audio_bytes)
        yield from (connected, battery, last_audio, notifications, frames, lost, reconnects, presses,
                    speech, stored)

    @staticmethod
    def _speech(snap: HealthSnapshot) -> Iterator[Metric]:
        asr = snap.asr
        yield GaugeMetricFamily(f"{PREFIX}_asr_up", "1 while the transcription thread runs.",
                                value=float(asr.alive))
        yield CounterMetricFamily(f"{PREFIX}_asr_windows", "Whisper calls that succeeded.", value=asr.windows)
        yield CounterMetricFamily(f"{PREFIX}_asr_errors", "Whisper calls that failed.", value=asr.errors)
        yield CounterMetricFamily(f"{PREFIX}_asr_audio_seconds", "Speech transcribed.",
                                  value=asr.audio_seconds)
        yield CounterMetricFamily(f"{PREFIX}_asr_busy_seconds", "Wall time spent in Whisper calls.",
                                  value=asr.busy_seconds)
        rtf = asr.busy_seconds / asr.audio_seconds if asr.audio_seconds > 0 else 0.0
        yield GaugeMetricFamily(f"{PREFIX}_asr_real_time_factor", "Whisper wall time per second of "
                                "speech since start (below 1: keeps up).", value=rtf)
        yield GaugeMetricFamily(f"{PREFIX}_asr_backlog_seconds", "Speech waiting for transcription.",
                                value=asr.backlog_seconds)

    @staticmethod
    def _outbox(snap: HealthSnapshot) -> Iterator[Metric]:
        ob = snap.outbox
        yield CounterMetricFamily(f"{PREFIX}_conversations_queued", "Conversations handed to the "
                                  "outbox since start.", value=snap.conversations_queued)
        items = GaugeMetricFamily(f"{PREFIX}_outbox_items", "Conversations in the outbox by state.",
                                  labels=["state"])
        for state, count in (("queued", ob.queued), ("sent", ob.sent), ("dead", ob.dead)):
            items.add_metric([state], count)
        yield items
        requests = CounterMetricFamily(f"{PREFIX}_api_requests", "Answers from the Omi API by HTTP "
                                       "status code (\"network\": no answer).", labels=["code"])
        for code, count in sorted(ob.requests.items()):
            requests.add_metric([code], count)
        yield requests
        yield GaugeMetricFamily(f"{PREFIX}_api_budget_remaining", "Conversation writes left in the "
                                "API key's hourly budget.", value=ob.budget_left)
        yield GaugeMetricFamily(f"{PREFIX}_api_budget_limit", "Conversation writes allowed per hour.",
                                value=ob.writes_per_hour)
        if (ts := _ts(ob.last_posted_at)) is not None:
            yield GaugeMetricFamily(f"{PREFIX}_last_posted_timestamp_seconds", "When the last "
                                    "conversation was accepted by the API (Unix time).", value=ts)


def build_registry(snapshot: Callable[[], HealthSnapshot | None]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HealthCollector(snapshot))
    ProcessCollector(registry=registry)
    return registry


async def serve(options: MetricsOptions, snapshot: Callable[[], HealthSnapshot | None],
                stop: asyncio.Event) -> None:
    """Serve ``/metrics`` on ``options.address:port`` until ``stop``."""
    registry = build_registry(snapshot)
    try:
        server, thread = start_http_server(options.port, options.address, registry=registry)
    except OSError as exc:
        raise BridgeError(f"cannot serve metrics on {options.address}:{options.port}: {exc.strerror}",
                          "choose another [metrics] port, or stop what listens there") from None
    _LOGGER.info("Prometheus metrics on http://%s:%d/metrics", options.address, server.server_port)
    try:
        await stop.wait()
    finally:
        await asyncio.to_thread(_shutdown, server, thread)


def _shutdown(server: WSGIServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(5)
