"""Prometheus ``/metrics`` of the running daemon, scraped over HTTP with httpx and read with
prometheus-client's own parser, while a simulated pendant streams speech into it."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import test_daemon_e2e as e2e
from omi_bridge_sim.bus import PrivateBus
from omi_bridge_sim.omi_api import OmiApiSim
from prometheus_client.parser import text_string_to_metric_families
from test_daemon_e2e import Daemon, Simulator, daemon_env, logs, write_config

# The e2e module's fixtures: a private bus, the fake Omi API, the demo clip after a lead-in.
bus, api, speech_wav = e2e.bus, e2e.api, e2e.speech_wav

START_TIMEOUT = 60.0
CONVERSATION_TIMEOUT = 120.0
PENDANT = "C0:FF:EE:00:00:01"
POLL = 0.2

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(url: str) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, labels), and every family's type, as Prometheus would read them."""
    response = httpx.get(url, timeout=5)
    response.raise_for_status()
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(response.text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def wait_scrape(url: str, predicate: Callable[[Samples], bool], timeout: float, what: str) -> Samples:
    deadline = time.monotonic() + timeout
    last: Samples = {}
    while time.monotonic() < deadline:
        try:
            last, _ = scrape(url)
        except httpx.TransportError:
            last = {}
        if last and predicate(last):
            return last
        time.sleep(POLL)
    raise AssertionError(f"/metrics never showed {what}; last scrape: {sorted(last.items())[:40]}")


DEV = (("address", PENDANT), ("device", "pendant"), ("kind", "omi"))


def test_metrics_follow_a_streaming_pendant_and_a_delivered_conversation(
        tmp_path: Path, bus: PrivateBus, api: OmiApiSim, speech_wav: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, [("omi", PENDANT, "pendant")], api.url, gap=3.0)
    config.write_text(config.read_text() + f"\n[metrics]\nenabled = true\nport = {port}\n")
    url = f"http://127.0.0.1:{port}/metrics"
    dlog, slog = tmp_path / "daemon.log", tmp_path / "sim.log"
    daemon = Daemon(config, daemon_env(bus), dlog)
    sim = None
    try:
        sim = Simulator(bus, [("omi", PENDANT)], speech_wav, slog)
        first = wait_scrape(url, lambda s: s.get(("omi_bridge_device_connected", DEV)) == 1.0,
                            START_TIMEOUT, "the pendant connected")
        later = wait_scrape(url, lambda s: s[("omi_bridge_device_notifications_total", DEV)]
                            > first[("omi_bridge_device_notifications_total", DEV)] + 50,
                            START_TIMEOUT, "notifications increasing while the pendant streams")
        assert later[("omi_bridge_device_battery_ratio", DEV)] == 0.87
        assert later[("omi_bridge_device_frames_total", DEV)] > 0
        assert later[("omi_bridge_device_frames_lost_total", DEV)] == 0
        assert later[("omi_bridge_device_last_audio_timestamp_seconds", DEV)] > time.time() - 30
        assert later[("process_resident_memory_bytes", ())] > 50e6  # Whisper and Silero are loaded
        assert later[("process_cpu_seconds_total", ())] > 0

        assert api.wait_until(lambda: len(api.conversations()) >= 1, CONVERSATION_TIMEOUT), logs(dlog, slog)
        done = wait_scrape(url, lambda s: s.get(("omi_bridge_api_requests_total", (("code", "200"),))) == 1.0,
                           START_TIMEOUT, "one answered request")
        assert done[("omi_bridge_conversations_queued_total", ())] == 1
        assert done[("omi_bridge_outbox_items", (("state", "sent"),))] == 1
        assert done[("omi_bridge_api_budget_remaining", ())] == 24
        assert done[("omi_bridge_api_budget_limit", ())] == 25
        assert done[("omi_bridge_last_posted_timestamp_seconds", ())] > time.time() - 120
        assert done[("omi_bridge_device_speech_seconds_total", DEV)] > 10  # the clip holds ~20 s of speech
        assert done[("omi_bridge_asr_windows_total", ())] >= 1
        assert done[("omi_bridge_asr_audio_seconds_total", ())] > 10
        assert 0 < done[("omi_bridge_asr_real_time_factor", ())] < 1  # tiny.en keeps up on this box
        assert done[("omi_bridge_asr_errors_total", ())] == 0
        _, types = scrape(url)
        assert types["omi_bridge_device_notifications"] == "counter"
        assert types["omi_bridge_device_connected"] == "gauge"
        assert daemon.terminate() == 0, logs(dlog)
    finally:
        daemon.kill()
        if sim is not None:
            sim.stop()
