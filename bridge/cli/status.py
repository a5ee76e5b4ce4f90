"""``omi-bridge status``: what the running daemon is doing, read from what it publishes."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bridge.app.state import EXIT_NOT_RUNNING, age_seconds, collect, parse_time
from bridge.config import Config, load_config
from bridge.core.errors import BridgeError


def _span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def _ago(when: Any) -> str:
    age, parsed = age_seconds(when), parse_time(when)
    if age is None or parsed is None:
        return "never"
    local = parsed.astimezone()
    return f"{local:%H:%M:%S} ({_span(age)} ago)"


def _until(when: Any) -> str:
    age, parsed = age_seconds(when), parse_time(when)
    if age is None or parsed is None:
        return "—"
    local = parsed.astimezone()
    return f"{local:%H:%M:%S} (now)" if age >= 0 else f"{local:%H:%M:%S} (in {_span(-age)})"


def format_asr_backend(be: dict[str, Any]) -> list[str]:
    """Which Wyoming server transcribes, its model, round trip and errors (nothing for local)."""
    if be.get("backend") != "wyoming":
        return []
    rtt = be.get("rtt_seconds")
    line = (f"  on {be.get('server')}: {be.get('program') or 'server not reached yet'}"
            + (f", model {be['model']}" if be.get("model") else "")
            + (f", round trip {rtt:.2f} s" if rtt is not None else "")
            + f", {be.get('windows', 0)} windows, {be.get('errors', 0)} errors")
    if be.get("fallback_windows"):
        line += f", {be['fallback_windows']} transcribed locally while it was away"
    lines = [line]
    if be.get("reachable") is False and be.get("last_error"):
        lines.append(f"  server unreachable: {be['last_error']}")
    return lines


def format_device(dev: dict[str, Any]) -> list[str]:
    head = f"  {dev.get('name') or dev.get('address')} ({dev.get('kind')}, {dev.get('address')}): "
    if dev.get("connected"):
        head += f"connected since {_ago(dev.get('connected_since'))}"
    else:
        head += "not connected"
        if dev.get("disconnected_since"):
            head += f" since {_ago(dev.get('disconnected_since'))}"
    lines = [head]
    details = []
    if dev.get("battery") is not None:
        details.append(f"battery {dev['battery']}%")
    if dev.get("firmware"):
        details.append(f"firmware {dev['firmware']}")
    details.append(f"last audio {_ago(dev.get('last_audio_at'))}")
    if dev.get("conversation_open"):
        details.append(f"conversation open since {_ago(dev.get('conversation_started_at'))}")
    else:
        details.append("no conversation open")
    lines.append("    " + ", ".join(details))
    if dev.get("capture_paused"):
        lines.append(f"    {dev['capture_paused']}; it resumes by itself once there is space")
    if dev.get("last_error"):
        lines.append(f"    last error: {dev['last_error']}")
    if dev.get("task_error"):
        lines.append(f"    pipeline restarted after: {dev['task_error']}")
    return lines


def format_status(info: dict[str, Any]) -> str:
    if not info.get("running"):
        return f"omi-bridge: {info.get('message')}"
    head = f"omi-bridge is running (pid {info.get('pid') or '?'}"
    if info.get("started_at"):
        head += f", up {_span(age_seconds(info['started_at']) or 0)}"
    head += ", ready)" if info.get("ready") else ", starting)"
    lines = [head]
    if info.get("stale"):
        lines.append(f"  warning: its state was last published {_ago(info.get('updated_at'))}; "
                     "the daemon may be stuck (journalctl -u omi-bridge)")
    if info.get("phase"):
        lines.append(f"  {info['phase']}")
    adapter = info.get("adapter") or {}
    if adapter and not adapter.get("present", True) and adapter.get("error", "") not in info.get("phase", ""):
        lines.append(f"  Bluetooth adapter {adapter.get('name')} is missing: {adapter.get('error', '')}")
    devices = info.get("devices") or []
    lines.append(f"devices ({sum(1 for d in devices if d.get('connected'))}/{len(devices)} connected):")
    for dev in devices:
        lines += format_device(dev)
    tr = info.get("transcription") or {}
    if tr:
        backlog = tr.get("backlog_seconds") or 0.0
        lines.append(f"transcription: {backlog:.1f} s of speech waiting"
                     + (" (worker stuck!)" if tr.get("stuck") else ""))
        if tr.get("problem"):
            lines.append(f"  {tr['problem']}")
        if tr.get("quarantined"):
            n = tr["quarantined"]
            lines.append(f"  {n} utterance{'s' if n != 1 else ''} could not be transcribed; "
                         f"kept in {tr.get('quarantine_dir')} (never posted, never deleted)")
        lines += format_asr_backend(tr.get("backend") or {})
    last = info.get("last_conversation")
    if last:
        lines.append(f"last conversation: {last.get('device')}, started {_ago(last.get('started_at'))}, "
                     f"{last.get('words')} words, queued {_ago(last.get('queued_at'))}")
    ob = info.get("outbox") or {}
    if ob:
        counts = ", ".join(f"{ob.get(k, 0)} {k}" for k in ("queued", "waiting", "paused", "sent", "dead"))
        text = f"outbox: {counts}"
        if ob.get("next_attempt_at"):
            text += f"; next send {_until(ob['next_attempt_at'])}"
        lines.append(text)
        if ob.get("paused_reason"):
            lines.append(f"  delivery paused: {ob['paused_reason']}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    config_error = None
    try:
        config = load_config(args.config)
    except BridgeError as exc:
        # Unreadable for this user (/etc/omi-bridge is 0750) or broken: the service's state in
        # /run/omi-bridge is still found; the config only matters for a daemon run by hand.
        config_error = exc
        config = Config()
    info = collect(config)
    if config_error is not None and not info["running"]:
        print(f"warning: {config_error}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps(info, indent=2))
    else:
        print(format_status(info))
    return 0 if info["running"] else EXIT_NOT_RUNNING
