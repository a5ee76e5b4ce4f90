"""What the running daemon says about itself: the ``STATUS=`` line, ``state.json`` (read by
``omi-bridge status``) and the typed ``HealthSnapshot`` (Home Assistant, Prometheus).

Read-only views of the daemon's parts, so the wording and the schema change here and nowhere
else; ``bridge/app/daemon.py`` runs the tasks and calls these on its housekeeping tick.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from bridge.config import Config, DeviceConfig
from bridge.core.health import AsrHealth, DeviceHealth, HealthSnapshot, OutboxHealth
from bridge.core.stats import LinkStats


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


class BridgeView(Protocol):
    """The parts of the daemon these views read."""

    config: Config
    storage: Path
    started_at: datetime
    ready: bool
    phase: str
    adapter_problem: str | None
    devices: list[DeviceState]
    orphans: list[Any]
    worker: Any
    enqueued: int
    last_conversation: dict[str, Any] | None
    requests: dict[str, int]
    last_posted_at: datetime | None

    def backlog_seconds(self) -> float: ...


def summary(bridge: BridgeView, ob: dict[str, Any]) -> str:
    """The one-line STATUS=: devices, battery, backlog, outbox."""
    stuck = "" if (bridge.worker is None or bridge.worker.healthy()) else "; transcription STUCK"
    if not bridge.ready and bridge.phase:
        return bridge.phase + stuck
    parts = []
    connected = sum(1 for d in bridge.devices if d.stats.connected)
    devs = []
    for d in bridge.devices:
        text = d.device.label + (" up" if d.stats.connected else " down")
        if d.stats.battery is not None:
            text += f" {d.stats.battery}%"
        devs.append(text)
    parts.append(f"{connected}/{len(bridge.devices)} connected ({', '.join(devs)})")
    parts.append(f"backlog {bridge.backlog_seconds():.0f}s")
    parts.extend(_speech_problems(bridge))
    counts = ob.get("counts") or {}
    if counts:
        parts.append(f"outbox {counts.get('queued', 0) + counts.get('waiting', 0)} queued, "
                     f"{counts.get('sent', 0)} sent, {counts.get('dead', 0)} dead")
    if ob.get("paused"):
        parts.append("delivery PAUSED")
    return "; ".join(parts) + stuck

def quarantined(bridge: BridgeView) -> int:
    """Utterances in quarantine/ (they failed [asr] max_attempts times; kept, never posted)."""
    pipelines = [d.pipeline for d in bridge.devices] + bridge.orphans
    return sum(int(getattr(p, "quarantined", 0)) for p in pipelines)

def _speech_problems(bridge: BridgeView) -> list[str]:
    """What status says about speech that is not flowing: a failing engine, a full disk,
    utterances set aside."""
    out = []
    problem = bridge.worker.health().problem() if bridge.worker is not None else None
    if problem:
        out.append(problem)
    for d in bridge.devices:
        pause = _pause_text(d.pipeline)
        if pause is not None:
            out.append(f"{d.device.label}: {pause}")
    n = quarantined(bridge)
    if n:
        where = bridge.storage / "quarantine"
        out.append(f"{n} utterance{'s' if n != 1 else ''} could not be transcribed, kept in {where}")
    return out

def state(bridge: BridgeView, ob: dict[str, Any]) -> dict[str, Any]:
    devices = []
    for d in bridge.devices:
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
    if bridge.worker is not None:
        h = bridge.worker.health()
        health = {"alive": h.alive, "stuck": h.stuck, "busy_seconds": round(h.busy_seconds, 1),
                  "windows_done": h.windows_done, "errors": h.errors, "last_error": h.last_error,
                  "failing_since": h.failing_since.isoformat(timespec="seconds")
                  if h.failing_since else None,
                  "problem": h.problem(), "utterances_waiting": h.utterances_waiting,
                  "quarantined": quarantined(bridge),
                  "quarantine_dir": str(bridge.storage / "quarantine")}
        backend = getattr(bridge.worker, "backend", None)
        if backend is not None:  # which engine or server, its model, round trip, errors
            health["backend"] = backend.status()
    counts = ob.get("counts") or {}
    paused = ob.get("paused") or None
    return {
        "pid": _pid(), "started_at": bridge.started_at.isoformat(timespec="seconds"),
        "ready": bridge.ready, "phase": bridge.phase,
        "config": bridge.config.path,
        "adapter": {"name": bridge.config.link.adapter, "present": bridge.adapter_problem is None,
                    "error": bridge.adapter_problem},
        "devices": devices,
        "transcription": {"backlog_seconds": round(bridge.backlog_seconds(), 1), **health},
        "outbox": {**counts, "next_attempt_at": ob.get("next_send_at"),
                   "paused_reason": f"{paused['reason']} ({paused['hint']})" if paused else None,
                   "writes_last_hour": ob.get("writes_last_hour"),
                   "writes_per_hour": ob.get("writes_per_hour")},
        "conversations_queued_since_start": bridge.enqueued,
        "last_conversation": bridge.last_conversation,
    }

def snapshot(bridge: BridgeView, ob: dict[str, Any]) -> HealthSnapshot:
    """The bridge's health now (call on the event loop)."""
    devices = []
    for d in bridge.devices:
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
    if bridge.worker is not None:
        h = bridge.worker.health()
        asr = AsrHealth(alive=h.alive, backlog_seconds=bridge.backlog_seconds(),
                        windows=h.windows_done, errors=h.errors,
                        audio_seconds=float(getattr(bridge.worker, "speech_seconds", 0.0)),
                        busy_seconds=float(getattr(bridge.worker, "busy_seconds", 0.0)),
                        failing_since=h.failing_since, problem=h.problem(),
                        quarantined=quarantined(bridge))
    counts = ob.get("counts") or {}
    outbox = OutboxHealth(
        queued=counts.get("queued", 0) + counts.get("waiting", 0), sent=counts.get("sent", 0),
        dead=counts.get("dead", 0), writes_last_hour=ob.get("writes_last_hour") or 0,
        writes_per_hour=ob.get("writes_per_hour") or bridge.config.api.writes_per_hour,
        requests=dict(bridge.requests), last_posted_at=bridge.last_posted_at)
    return HealthSnapshot(taken_at=datetime.now(UTC), started_at=bridge.started_at, ready=bridge.ready,
                          devices=tuple(devices), asr=asr, outbox=outbox,
                          conversations_queued=bridge.enqueued)


def _pause_text(pipeline: Any) -> str | None:
    pause = getattr(getattr(pipeline, "disk", None), "paused", None)
    return None if pause is None else str(pause.describe())


def _stored_bytes(state: DeviceState) -> int | None:
    """Audio waiting on the pendant, when its offline sync knows (None: no sync, or not known)."""
    offline = getattr(state, "offline", None)
    if offline is None:
        return None
    waiting = offline.sync.status.waiting_bytes
    return int(waiting) if waiting is not None else None


def _pid() -> int:
    return os.getpid()
