"""``omi-bridge run``: every paired device → its speech pipeline → one transcription worker →
the outbox → Omi, supervised, under systemd.

Task layout (one task per external thing; each restarts itself and says why):

- one task per ``[[devices]]`` entry: the device's ``DeviceLink`` writing into its own
  ``SpeechPipeline`` (``source`` = the device kind). A failure there is logged with the device
  name and the task restarts after a back-off; other devices never notice.
- one ``AsrWorker`` thread shared by all pipelines (Whisper costs the same per call whatever
  device the audio came from, and two models would not fit a Pi's RAM).
- one outbox ``Sender`` task. Pipelines hand finished conversations to ``Outbox.enqueue`` (a
  committed SQLite transaction) before they delete their own copy, and wake the sender.
- one housekeeping task: publishes ``state.json`` for ``omi-bridge status``, sends systemd
  ``STATUS=`` and pings ``WATCHDOG=1`` only while the transcription worker is healthy. Being a
  coroutine, it also stops pinging when the event loop stops turning.

Start: config checked (same messages as ``check-config``), lock taken, outbox opened, model
loaded, spool recovered (interrupted conversations are finished and queued), sender started,
then ``READY=1`` as soon as the Bluetooth adapter is there. Devices are never waited for.

Stop (SIGTERM/SIGINT): links disconnect, the worker finishes the window in hand, everything
else is already on disk (spooled speech, open conversations, the outbox); the next start resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge.app import report
from bridge.app.events import BridgeEvent, ButtonPressed, ConversationPosted, EventListener
from bridge.app.preflight import async_adapter_problem
from bridge.app.report import DeviceState
from bridge.app.state import acquire_daemon_locks, publish_dir, remove_state, write_state
from bridge.app.supervise import supervise
from bridge.app.systemd import Notifier
from bridge.config import Config
from bridge.core.errors import BridgeError
from bridge.core.health import HealthSnapshot
from bridge.core.kinds import DeviceKind
from bridge.core.records import Conversation
from bridge.core.stats import LinkStats

_LOGGER = logging.getLogger(__name__)

TICK_SECONDS = 2.0
"""How often state is published and STATUS= refreshed (status shows it as 'a few seconds' old)."""
OUTBOX_REFRESH_SECONDS = 10.0
"""Outbox counts read the whole table; refreshing them less often keeps a Pi's SD card quiet."""
ADAPTER_RETRY_SECONDS = 1.0
"""How often a missing or powered-off adapter is looked for again before READY."""
WORKER_STOP_SECONDS = 5.0
"""At shutdown the worker may finish the window in hand (≤ 4 s on a Pi 4, performance-notes.md
§6); what it has not finished stays spooled and is transcribed after the restart."""
EXIT_CONFIG = 78
"""sysexits.h EX_CONFIG: the unit's RestartPreventExitStatus stops a pointless restart loop."""

class StartupError(BridgeError):
    """The daemon cannot start for a reason no restart mends (a model that does not load)."""


def _model_hint(config: Config, exc: BridgeError) -> str:
    if config.asr.backend != "local":
        return exc.hint
    return ('set [asr] model to "tiny.en" (the bundled model) or to a directory holding a '
            "complete CTranslate2 model (ct2-transformers-converter), then check with "
            "omi-bridge check-config")


# --------------------------------------------------------------------------------------------
# The Bluetooth adapter


class Daemon:
    """The running bridge. ``await Daemon(config).run(stop)`` until ``stop`` is set."""

    def __init__(self, config: Config, *, notifier: Notifier | None = None,
                 state_dir: Path | None = None, model: Any = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.state_dir = state_dir or publish_dir(config)
        self.storage = config.storage.path
        self._model = model
        self.started_at = datetime.now(UTC)
        self.ready = False
        self.phase = "starting"
        self.adapter_problem: str | None = None
        self.devices: list[DeviceState] = []
        self.orphans: list[Any] = []
        """Pipelines finishing conversations of devices that were removed from the config."""
        self.worker: Any = None
        self.outbox: Any = None
        self.sender: Any = None
        self._outbox_status: dict[str, Any] = {}
        self._outbox_checked = 0.0
        self.enqueued = 0
        self._enqueue_lock = threading.Lock()
        self.last_conversation: dict[str, Any] | None = None
        self.on_enqueued: Callable[[Conversation], None] | None = None
        """Test/demo hook, called after a conversation is committed to the outbox."""
        self.requests: dict[str, int] = {}
        """Omi API answers since start by status code ("network": no answer)."""
        self.last_posted_at: datetime | None = None
        self.listeners: list[EventListener] = []
        """Told of button presses and delivered conversations, on the event loop (MQTT)."""
        self.health: HealthSnapshot | None = None
        """The newest snapshot, replaced each housekeeping tick; safe to read from any thread."""

    # ------------------------------------------------------------------ conversations

    def _enqueue(self, conv: Conversation) -> None:
        """Speech → outbox. Runs on the ASR worker thread, a device's capture thread or the loop,
        several at once (the outbox serialises its writes); raising keeps the conversation on disk
        for the next recovery, so the commit must happen here, synchronously."""
        self.outbox.enqueue(conv, self.config.location, time.time())
        with self._enqueue_lock:
            self.enqueued += 1
        text = " ".join(s.text for s in conv.segments)
        self.last_conversation = {"device": conv.device, "client_session_id": conv.client_session_id,
                                  "started_at": conv.started_at.isoformat(timespec="seconds"),
                                  "queued_at": datetime.now(UTC).isoformat(timespec="seconds"),
                                  "words": len(text.split())}
        _LOGGER.info("%s: conversation %s ready (%d segments, %.0f s, %d words); queued for Omi",
                     conv.device, conv.client_session_id, len(conv.segments),
                     (conv.finished_at - conv.started_at).total_seconds(), len(text.split()))
        self._outbox_checked = 0.0
        self.sender.wake()
        if self.on_enqueued is not None:
            self.on_enqueued(conv)

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        from bridge.app.offline import offline_for
        from bridge.outbox.sender import Sender
        from bridge.outbox.store import Outbox
        from bridge.speech.asr.worker import AsrWorker
        from bridge.speech.orphans import recover_orphans
        from bridge.speech.pipeline import SpeechPipeline

        release_locks = acquire_daemon_locks(self.storage, self.state_dir)
        tasks: list[asyncio.Task[Any]] = []
        try:
            self._publish()
            self.outbox = Outbox.open(self.storage)
            self.sender = Sender(self.outbox, self.config.api)
            self._set_phase("loading the transcription model" if self.config.asr.backend == "local"
                            else "asking the transcription server what it runs")
            self.worker = AsrWorker(self.config.asr, model=self._model)
            try:
                await asyncio.to_thread(self.worker.start)
            except BridgeError as exc:  # per window it would fail for ever: stop here instead
                raise StartupError(exc.message, _model_hint(self.config, exc)) from exc
            _LOGGER.info("transcription: %s", self.worker.backend.describe())
            for dev in self.config.devices:
                pipeline = SpeechPipeline(dev.address, self.config, self.worker, self._enqueue,
                                          source=dev.kind, label=dev.label, storage=self.storage)
                self.devices.append(DeviceState(dev, pipeline))
                self.devices[-1].offline = await asyncio.to_thread(
                    offline_for, self.config, dev, self.worker, self._enqueue, self.storage)
            self._set_phase("recovering interrupted conversations")
            for state in self.devices:
                # resume: a conversation the crash interrupted continues with this run's audio.
                found = await asyncio.to_thread(state.pipeline.recover, resume=True)
                if found:
                    _LOGGER.info("%s: %d interrupted conversation(s) recovered", state.device.label, found)
            known = [d.device.address for d in self.devices]
            self.orphans = await asyncio.to_thread(
                recover_orphans, self.config, self.storage, known, self.worker, self._enqueue)
            self.sender.on_outcome = self._on_outcome
            tasks.append(asyncio.create_task(supervise("outbox sender", self.sender.run, stop)))
            tasks += self._start_publishers(stop)
            tasks.append(asyncio.create_task(self._housekeeping(stop)))
            await self._async_wait_for_adapter(stop)
            if stop.is_set():
                return
            for state in self.devices:
                tasks.append(asyncio.create_task(self._device_task(state, stop)))
                if state.offline is not None:
                    tasks.append(asyncio.create_task(supervise(
                        f"{state.device.label} offline sync", state.offline.run, stop)))
            self.ready = True
            self._set_phase("")
            names = ", ".join(f"{d.device.label} ({d.device.kind})" for d in self.devices)
            _LOGGER.info("ready: listening for %s", names)
            self.notifier.ready(self.summary())
            self._publish()
            await stop.wait()
        finally:
            self.notifier.stopping("stopping: saving open conversations")
            _LOGGER.info("stopping")
            stop.set()
            await self._async_shutdown(tasks)
            remove_state(self.state_dir)
            release_locks()
            _LOGGER.info("stopped; open conversations and spooled speech are kept for the next start")

    async def _async_shutdown(self, tasks: list[asyncio.Task[Any]]) -> None:
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=WORKER_STOP_SECONDS)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop, WORKER_STOP_SECONDS)
        if self.outbox is not None:
            self.outbox.close()

    async def _async_wait_for_adapter(self, stop: asyncio.Event) -> None:
        adapter = self.config.link.adapter
        reported = None
        while not stop.is_set():
            try:
                problem = await async_adapter_problem(adapter)
            except Exception as exc:  # a D-Bus hiccup is one more reason to look again
                problem = f"cannot query BlueZ: {exc}"
            self.adapter_problem = problem
            if problem is None:
                if reported is not None:
                    _LOGGER.info("Bluetooth adapter %s is back", adapter)
                return
            if problem != reported:
                _LOGGER.error("waiting for Bluetooth: %s", problem)
                reported = problem
                self._set_phase(f"waiting for Bluetooth: {problem}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), ADAPTER_RETRY_SECONDS)

    async def _device_task(self, state: DeviceState, stop: asyncio.Event) -> None:
        from bridge.devices.link import DeviceLink

        dev = state.device
        extra: dict[str, Any] = {"frame": self.config.frame} if dev.kind == DeviceKind.FRAME else {}
        extra["on_button"] = functools.partial(self._on_button, state)
        if state.offline is not None:
            extra["offline_sync"] = state.offline.sync

        async def run_link(stop: asyncio.Event) -> None:
            # Decoding, VAD and spool writes on the device's capture thread: a slow fsync
            # must not stop the loop reading notifications (bridge/audio/capture.py).
            link = DeviceLink(dev, self.config.link, state.pipeline,
                              on_stats=functools.partial(self._on_stats, state), extra=extra,
                              capture_thread=True)
            state.stats = link.stats
            await link.run(stop)

        def failed(exc: Exception) -> None:
            state.task_error = f"{type(exc).__name__}: {exc}"
            state.restarts += 1

        await supervise(dev.label, run_link, stop, on_failure=failed)

    def _on_button(self, state: DeviceState, code: int) -> None:
        state.button_presses += 1
        self._announce(ButtonPressed(state.device.label, state.device.address, code))

    def _on_outcome(self, item: Any, outcome: Any) -> None:
        """The API answered (or did not): count it; a delivered conversation is announced."""
        from bridge.outbox.client import Kind

        code = str(outcome.status_code) if outcome.status_code is not None else "network"
        self.requests[code] = self.requests.get(code, 0) + 1
        self._outbox_checked = 0.0
        if outcome.kind is Kind.SENT:
            self.last_posted_at = datetime.now(UTC)
            self._announce(ConversationPosted(item.device or "", item.client_session_id,
                                              outcome.server_id or "", bool(outcome.discarded)))

    def _announce(self, event: BridgeEvent) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a listener must never disturb capture or delivery
                _LOGGER.exception("event listener failed for %s", event)

    def _start_publishers(self, stop: asyncio.Event) -> list[asyncio.Task[Any]]:
        """MQTT and Prometheus, when configured: tasks of their own that only read snapshots."""
        tasks = []
        if self.config.mqtt.enabled:
            from bridge.app.mqtt import MqttPublisher

            publisher = MqttPublisher(self.config.mqtt, self.snapshot)
            self.listeners.append(publisher.post_event)
            tasks.append(asyncio.create_task(supervise("MQTT publisher", publisher.run, stop)))
        if self.config.metrics.enabled:
            from bridge.app.metrics import serve

            options = self.config.metrics
            tasks.append(asyncio.create_task(supervise(
                "metrics endpoint", lambda s: serve(options, lambda: self.health, s), stop)))
        return tasks

    def _on_stats(self, state: DeviceState, stats: LinkStats) -> None:
        state.stats = stats
        if stats.connected:
            state.disconnected_since = None
            state.task_error = None
        elif state.disconnected_since is None:
            state.disconnected_since = datetime.now(UTC)

    # ------------------------------------------------------------------ health and state

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        if phase:
            self.notifier.status(phase)
        self._publish()

    def worker_healthy(self) -> bool:
        return self.worker is None or self.worker.healthy()

    def backlog_seconds(self) -> float:
        pipelines = ([d.pipeline for d in self.devices] + self.orphans
                     + [d.offline for d in self.devices if d.offline is not None])
        return float(sum(p.backlog_seconds() for p in pipelines))

    def outbox_status(self, *, fresh: bool = False) -> dict[str, Any]:
        """The outbox's counts and schedule, read at most every ``OUTBOX_REFRESH_SECONDS``
        unless ``fresh``."""
        now = time.monotonic()
        if self.outbox is not None and (fresh or now - self._outbox_checked >= OUTBOX_REFRESH_SECONDS):
            from bridge.outbox.sender import outbox_status

            try:
                self._outbox_status = outbox_status(self.outbox, self.config.api, time.time())
            except Exception as exc:  # status must never take the daemon down
                _LOGGER.debug("outbox status failed: %s", exc)
            self._outbox_checked = now
        return self._outbox_status

    def summary(self) -> str:
        """The one-line STATUS=: devices, battery, backlog, outbox."""
        return report.summary(self, self.outbox_status())

    def quarantined(self) -> int:
        return report.quarantined(self)

    def state(self) -> dict[str, Any]:
        """What ``state.json`` says (``omi-bridge status`` reads it)."""
        return report.state(self, self.outbox_status())

    def snapshot(self) -> HealthSnapshot:
        """The bridge's health now (call on the event loop)."""
        return report.snapshot(self, self.outbox_status())

    def _publish(self) -> None:
        try:
            self.health = self.snapshot()
        except Exception as exc:  # never let a snapshot stop capture
            _LOGGER.debug("cannot take a health snapshot: %s", exc)
        try:
            write_state(self.state_dir, self.state())
        except Exception as exc:  # a full disk must not stop capture; status will show it stale
            _LOGGER.debug("cannot publish state: %s", exc)

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        interval = TICK_SECONDS
        if self.notifier.watchdog_interval is not None:
            interval = min(interval, self.notifier.watchdog_interval)
        last_status = ""
        stuck_reported = False
        while not stop.is_set():
            healthy = self.worker_healthy()
            if healthy:
                self.notifier.watchdog()
                stuck_reported = False
            elif not stuck_reported:
                # No ping: systemd's watchdog restarts us; whatever was spooled is recovered then.
                _LOGGER.error("transcription worker is stuck or dead; withholding the systemd watchdog")
                stuck_reported = True
            status = self.summary()
            if status != last_status:
                self.notifier.status(status)
                last_status = status
            self._publish()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


# --------------------------------------------------------------------------------------------


async def async_main(config: Config, *, notifier: Notifier | None = None,
                     stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        if received:
            _LOGGER.warning("second %s: exiting now", signal.Signals(signum).name)
            # Everything durable is already on disk; only the window in hand is redone.
            raise SystemExit(0)
        received.append(signum)
        _LOGGER.info("%s received", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await Daemon(config, notifier=notifier).run(stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
