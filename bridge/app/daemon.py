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
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge.app.events import BridgeEvent, ButtonPressed, ConversationPosted, EventListener
from bridge.app.preflight import async_adapter_problem
from bridge.app.state import DaemonLock, publish_dir, remove_state, write_state
from bridge.app.systemd import Notifier, under_journald
from bridge.config import Config, DeviceConfig
from bridge.core.errors import BridgeError
from bridge.core.health import AsrHealth, DeviceHealth, HealthSnapshot, OutboxHealth
from bridge.core.kinds import DeviceKind
from bridge.core.records import Conversation
from bridge.core.stats import LinkStats

_LOGGER = logging.getLogger(__name__)

TICK_SECONDS = 2.0
"""How often state is published and STATUS= refreshed (status shows it as 'a few seconds' old)."""
OUTBOX_REFRESH_SECONDS = 10.0
"""Outbox counts read the whole table; refreshing them less often keeps a Pi's SD card quiet."""
DEVICE_RESTART_MIN_SECONDS = 2.0
DEVICE_RESTART_MAX_SECONDS = 60.0
"""Back-off when a device task itself fails (the link supervisor already retries BLE errors; this
is for bugs and unexpected errors), doubling per consecutive failure."""
ADAPTER_RETRY_SECONDS = 1.0
"""How often a missing or powered-off adapter is looked for again before READY."""
WORKER_STOP_SECONDS = 5.0
"""At shutdown the worker may finish the window in hand (≤ 4 s on a Pi 4, performance-notes.md
§6); what it has not finished stays spooled and is transcribed after the restart."""
EXIT_CONFIG = 78
"""sysexits.h EX_CONFIG: the unit's RestartPreventExitStatus stops a pointless restart loop."""
NOISY_LOGGERS = ("bleak", "dbus_fast", "httpx", "httpcore", "faster_whisper")
"""Libraries whose info-level chatter would drown our one-line-per-event log."""

# journald reads a "<N>" syslog priority prefix on each line (SyslogLevelPrefix=yes default).
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                    logging.CRITICAL: 2}


class StartupError(BridgeError):
    """The daemon cannot start for a reason no restart mends (a model that does not load)."""


def _model_hint(config: Config, exc: BridgeError) -> str:
    if config.asr.backend != "local":
        return exc.hint
    return ('set [asr] model to "tiny.en" (the bundled model) or to a directory holding a '
            "complete CTranslate2 model (ct2-transformers-converter), then check with "
            "omi-bridge check-config")


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return f"<{prio}>" + super().format(record)


def setup_logging(level: str, *, verbose: bool = False) -> None:
    """One line per event; no timestamp under journald (it adds its own)."""
    handler = logging.StreamHandler(sys.stderr)
    if under_journald():
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    numeric = logging.DEBUG if verbose else getattr(logging, level.upper(), logging.INFO)
    root.setLevel(numeric)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


# --------------------------------------------------------------------------------------------
# The Bluetooth adapter


@dataclass
class DeviceState:
    device: DeviceConfig
    pipeline: Any
    stats: LinkStats = field(default_factory=LinkStats)
    task_error: str | None = None
    disconnected_since: datetime | None = None
    restarts: int = 0
    button_presses: int = 0
    offline: Any = None
    """The pendant's offline sync (``bridge.app.offline.OfflineParts``), when enabled."""


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
        self._orphans: list[Any] = []
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
        from bridge.speech.pipeline import SpeechPipeline

        # The storage lock keeps a second daemon (e.g. a manual `run` beside the service) off the
        # same spool and outbox; the one beside state.json is what `status` checks for liveness.
        locks = [DaemonLock(self.storage)]
        if self.state_dir.resolve() != self.storage.resolve():
            locks.append(DaemonLock(self.state_dir))
        acquired: list[DaemonLock] = []
        try:
            for lock in locks:
                lock.acquire()
                acquired.append(lock)
        except BaseException:
            for lock in acquired:
                lock.release()
            raise
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
            await asyncio.to_thread(self._recover_orphans, SpeechPipeline)
            self.sender.on_outcome = self._on_outcome
            tasks.append(asyncio.create_task(self._supervise("outbox sender", self.sender.run, stop)))
            tasks += self._start_publishers(stop)
            tasks.append(asyncio.create_task(self._housekeeping(stop)))
            await self._async_wait_for_adapter(stop)
            if stop.is_set():
                return
            for state in self.devices:
                tasks.append(asyncio.create_task(self._device_task(state, stop)))
                if state.offline is not None:
                    tasks.append(asyncio.create_task(self._supervise(
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
            for lock in acquired:
                lock.release()
            _LOGGER.info("stopped; open conversations and spooled speech are kept for the next start")

    def _recover_orphans(self, pipeline_cls: Any) -> None:
        """Finish conversations spooled for devices no longer in the config (unpaired since),
        so removing a device from the file never silently drops what it had recorded."""
        from bridge.speech import spool

        spool_root = self.storage / spool.SPOOL_DIR
        known = {spool.device_dir(self.storage, d.device.address) for d in self.devices}
        if not spool_root.is_dir():
            return
        for folder in sorted(p for p in spool_root.iterdir() if p.is_dir() and p not in known):
            if not any(c.is_dir() for c in folder.iterdir()):
                continue
            pipeline = pipeline_cls(folder.name, self.config, self.worker, self._enqueue,
                                    label=folder.name, storage=self.storage)
            found = pipeline.recover()
            if found:
                _LOGGER.info("%s: %d conversation(s) of a device no longer configured recovered",
                             folder.name, found)
                self._orphans.append(pipeline)

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

    async def _supervise(self, name: str, func: Callable[[asyncio.Event], Any], stop: asyncio.Event) -> None:
        """Run ``func(stop)`` until stop, restarting it with a back-off if it fails."""
        delay = DEVICE_RESTART_MIN_SECONDS
        while not stop.is_set():
            try:
                await func(stop)
            except asyncio.CancelledError:
                raise
            except Exception:
                _LOGGER.exception("%s failed; restarting in %.0f s", name, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, DEVICE_RESTART_MAX_SECONDS)
            else:
                return

    async def _device_task(self, state: DeviceState, stop: asyncio.Event) -> None:
        from bridge.devices.link import DeviceLink

        dev = state.device
        delay = DEVICE_RESTART_MIN_SECONDS
        extra: dict[str, Any] = {"frame": self.config.frame} if dev.kind == DeviceKind.FRAME else {}
        extra["on_button"] = lambda code, s=state: self._on_button(s, code)
        if state.offline is not None:
            extra["offline_sync"] = state.offline.sync
        while not stop.is_set():
            try:
                # Decoding, VAD and spool writes on the device's capture thread: a slow fsync
                # must not stop the loop reading notifications (bridge/audio/capture.py).
                link = DeviceLink(dev, self.config.link, state.pipeline,
                                  on_stats=functools.partial(self._on_stats, state), extra=extra,
                                  capture_thread=True)
                state.stats = link.stats
                await link.run(stop)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                state.task_error = f"{type(exc).__name__}: {exc}"
                state.restarts += 1
                if isinstance(exc, BridgeError):
                    _LOGGER.error("%s: %s; retrying in %.0f s", dev.label, exc, delay)
                else:
                    _LOGGER.exception("%s: device pipeline failed; restarting in %.0f s", dev.label, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, DEVICE_RESTART_MAX_SECONDS)

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
            tasks.append(asyncio.create_task(self._supervise("MQTT publisher", publisher.run, stop)))
        if self.config.metrics.enabled:
            from bridge.app.metrics import serve

            options = self.config.metrics
            tasks.append(asyncio.create_task(self._supervise(
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
        pipelines = ([d.pipeline for d in self.devices] + self._orphans
                     + [d.offline for d in self.devices if d.offline is not None])
        return float(sum(p.backlog_seconds() for p in pipelines))

    def outbox_status(self) -> dict[str, Any]:
        now = time.monotonic()
        if self.outbox is not None and now - self._outbox_checked >= OUTBOX_REFRESH_SECONDS:
            from bridge.outbox.sender import outbox_status

            try:
                self._outbox_status = outbox_status(self.outbox, self.config.api, time.time())
            except Exception as exc:  # status must never take the daemon down
                _LOGGER.debug("outbox status failed: %s", exc)
            self._outbox_checked = now
        return self._outbox_status

    def summary(self) -> str:
        """The one-line STATUS=: devices, battery, backlog, outbox."""
        stuck = "" if self.worker_healthy() else "; transcription STUCK"
        if not self.ready and self.phase:
            return self.phase + stuck
        parts = []
        connected = sum(1 for d in self.devices if d.stats.connected)
        devs = []
        for d in self.devices:
            text = d.device.label + (" up" if d.stats.connected else " down")
            if d.stats.battery is not None:
                text += f" {d.stats.battery}%"
            devs.append(text)
        parts.append(f"{connected}/{len(self.devices)} connected ({', '.join(devs)})")
        parts.append(f"backlog {self.backlog_seconds():.0f}s")
        parts.extend(self._speech_problems())
        ob = self.outbox_status()
        counts = ob.get("counts") or {}
        if counts:
            parts.append(f"outbox {counts.get('queued', 0) + counts.get('waiting', 0)} queued, "
                         f"{counts.get('sent', 0)} sent, {counts.get('dead', 0)} dead")
        if ob.get("paused"):
            parts.append("delivery PAUSED")
        return "; ".join(parts) + stuck

    def quarantined(self) -> int:
        """Utterances in quarantine/ (they failed [asr] max_attempts times; kept, never posted)."""
        pipelines = [d.pipeline for d in self.devices] + self._orphans
        return sum(int(getattr(p, "quarantined", 0)) for p in pipelines)

    def _speech_problems(self) -> list[str]:
        """What status says about speech that is not flowing: a failing engine, a full disk,
        utterances set aside."""
        out = []
        problem = self.worker.health().problem() if self.worker is not None else None
        if problem:
            out.append(problem)
        for d in self.devices:
            pause = _pause_text(d.pipeline)
            if pause is not None:
                out.append(f"{d.device.label}: {pause}")
        n = self.quarantined()
        if n:
            where = self.storage / "quarantine"
            out.append(f"{n} utterance{'s' if n != 1 else ''} could not be transcribed, kept in {where}")
        return out

    def state(self) -> dict[str, Any]:
        devices = []
        for d in self.devices:
            stats = d.stats.as_json()
            conv_start = getattr(d.pipeline, "conversation_started_at", None)
            devices.append({
                "name": d.device.label, "address": d.device.address, "kind": d.device.kind,
                "connected": d.stats.connected,
                "connected_since": stats["connected_since"],
                "disconnected_since": d.disconnected_since.isoformat() if d.disconnected_since else None,
                "last_error": d.stats.last_error, "task_error": d.task_error,
                "battery": d.stats.battery, "firmware": d.stats.firmware,
                "last_audio_at": stats["last_audio_at"],
                "conversation_open": bool(getattr(d.pipeline, "in_conversation", False)),
                "conversation_started_at": conv_start.isoformat() if conv_start is not None else None,
                "capture_paused": _pause_text(d.pipeline),
                "link": stats,
                "offline": d.offline.status() if d.offline is not None else None,
            })
        health: dict[str, Any] = {}
        if self.worker is not None:
            h = self.worker.health()
            health = {"alive": h.alive, "stuck": h.stuck, "busy_seconds": round(h.busy_seconds, 1),
                      "windows_done": h.windows_done, "errors": h.errors, "last_error": h.last_error,
                      "failing_since": h.failing_since.isoformat(timespec="seconds")
                      if h.failing_since else None,
                      "problem": h.problem(), "utterances_waiting": h.utterances_waiting,
                      "quarantined": self.quarantined(),
                      "quarantine_dir": str(self.storage / "quarantine")}
            backend = getattr(self.worker, "backend", None)
            if backend is not None:  # which engine or server, its model, round trip, errors
                health["backend"] = backend.status()
        ob = self.outbox_status()
        counts = ob.get("counts") or {}
        paused = ob.get("paused") or None
        return {
            "pid": _pid(), "started_at": self.started_at.isoformat(timespec="seconds"),
            "ready": self.ready, "phase": self.phase,
            "config": self.config.path,
            "adapter": {"name": self.config.link.adapter, "present": self.adapter_problem is None,
                        "error": self.adapter_problem},
            "devices": devices,
            "transcription": {"backlog_seconds": round(self.backlog_seconds(), 1), **health},
            "outbox": {**counts, "next_attempt_at": ob.get("next_send_at"),
                       "paused_reason": f"{paused['reason']} ({paused['hint']})" if paused else None,
                       "writes_last_hour": ob.get("writes_last_hour"),
                       "writes_per_hour": ob.get("writes_per_hour")},
            "conversations_queued_since_start": self.enqueued,
            "last_conversation": self.last_conversation,
        }

    def snapshot(self) -> HealthSnapshot:
        """The bridge's health now (call on the event loop)."""
        devices = []
        for d in self.devices:
            st = d.stats
            devices.append(DeviceHealth(
                name=d.device.label, address=d.device.address, kind=d.device.kind,
                connected=st.connected, battery=st.battery, firmware=st.firmware,
                last_audio_at=st.last_audio_at, notifications=st.packets, frames=st.frames,
                frames_lost=st.lost_frames, reconnects=st.reconnects,
                speech_seconds=float(getattr(d.pipeline, "speech_seconds", 0.0)),
                button_presses=d.button_presses, task_failures=d.restarts,
                stored_audio_bytes=_stored_bytes(d), capture_paused=_pause_text(d.pipeline)))
        asr = AsrHealth()
        if self.worker is not None:
            h = self.worker.health()
            asr = AsrHealth(alive=h.alive, backlog_seconds=self.backlog_seconds(),
                            windows=h.windows_done, errors=h.errors,
                            audio_seconds=float(getattr(self.worker, "speech_seconds", 0.0)),
                            busy_seconds=float(getattr(self.worker, "busy_seconds", 0.0)),
                            failing_since=h.failing_since, problem=h.problem(),
                            quarantined=self.quarantined())
        ob = self.outbox_status()
        counts = ob.get("counts") or {}
        outbox = OutboxHealth(
            queued=counts.get("queued", 0) + counts.get("waiting", 0), sent=counts.get("sent", 0),
            dead=counts.get("dead", 0), writes_last_hour=ob.get("writes_last_hour") or 0,
            writes_per_hour=ob.get("writes_per_hour") or self.config.api.writes_per_hour,
            requests=dict(self.requests), last_posted_at=self.last_posted_at)
        return HealthSnapshot(taken_at=datetime.now(UTC), started_at=self.started_at, ready=self.ready,
                              devices=tuple(devices), asr=asr, outbox=outbox,
                              conversations_queued=self.enqueued)

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


def _pause_text(pipeline: Any) -> str | None:
    pause = getattr(pipeline, "disk_paused", None)
    return None if pause is None else str(pause.describe())


def _stored_bytes(state: DeviceState) -> int | None:
    """Audio waiting on the pendant, when its offline sync knows (None: no sync, or not known)."""
    offline = getattr(state, "offline", None)
    if offline is None:
        return None
    waiting = offline.sync.status.waiting_bytes
    return int(waiting) if waiting is not None else None


def _pid() -> int:
    import os

    return os.getpid()


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
