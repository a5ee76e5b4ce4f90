"""``omi-bridge status``: what the running daemon is doing, read from what it publishes."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bridge.app.state import EXIT_NOT_RUNNING, age_seconds, collect, parse_time
from bridge.config import Config, load_config
from bridge.core.errors import BridgeError


def format_span(seconds: float) -> str:
    """A duration for people: 42s, 3m 05s, 2h 10m, 1d 4h."""
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
    return f"{local:%H:%M:%S} ({format_span(age)} ago)"


def _until(when: Any) -> str:
    age, parsed = age_seconds(when), parse_time(when)
    if age is None or parsed is None:
        return "—"
    local = parsed.astimezone()
    return f"{local:%H:%M:%S} (now)" if age >= 0 else f"{local:%H:%M:%S} (in {format_span(-age)})"


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


def format_bytes(nbytes: float) -> str:
    """``nbytes`` for people: B, kB or MB."""
    if nbytes < 1000:
        return f"{int(nbytes)} B"
    if nbytes < 1_000_000:
        return f"{nbytes / 1000:.0f} kB"
    return f"{nbytes / 1_000_000:.1f} MB"


PROTOCOL_NAMES = {"ring": "ring buffer", "multi-file": "multi-file", "legacy": "legacy single file"}
"""How each storage generation is named to a user (docs/reference/omi-storage.md §2)."""


def format_offline(off: dict[str, Any]) -> list[str]:
    """A pendant's offline sync: its storage protocol, what waits on it, a transfer in progress,
    the last sync and anything a user should know about the times."""
    protocol = off.get("protocol")
    if protocol:
        head = f"    offline recordings ({PROTOCOL_NAMES.get(protocol, protocol)} storage): "
    elif off.get("state") == "off":
        head = "    offline recordings: not synced: "
    else:
        head = "    offline recordings (storage protocol known at the next connect): "
    waiting = off.get("waiting_bytes")
    if off.get("state") == "off":
        head += off.get("last_error") or "no storage service"
    elif waiting is None:
        head += "waiting audio not known yet"
    elif waiting == 0:
        head += "nothing waiting on the pendant"
    else:
        head += f"{format_bytes(waiting)} waiting on the pendant"
        if off.get("waiting_audio_seconds") is not None:
            head += f" (≈ {format_span(off['waiting_audio_seconds'])} of audio)"
    lines = [head]
    if off.get("state") == "syncing":
        total, fetched = off.get("total_bytes") or 0, off.get("fetched_bytes") or 0
        line = f"      syncing: {format_bytes(fetched)} of {format_bytes(total)}"
        if off.get("progress") is not None:
            line += f" ({off['progress']:.0%})"
        rate = off.get("rate_bytes_per_second") or 0.0
        if rate > 0:
            line += f", {format_bytes(rate)}/s, about {format_span((total - fetched) / rate)} left"
        lines.append(line)
    if off.get("last_sync_at"):
        line = f"      last sync {_ago(off['last_sync_at'])}"
        if off.get("last_sync_bytes") is not None:
            line += f": {format_bytes(off['last_sync_bytes'])} fetched"
        lines.append(line)
    else:
        lines.append("      last sync: never")
    convs = off.get("conversations") or 0
    if convs:
        line = f"      {convs} offline conversation{'s' if convs != 1 else ''} queued since start"
        if off.get("estimated_conversations"):
            line += (f", {off['estimated_conversations']} with ESTIMATED times (the pendant's "
                     "clock was not set)")
        lines.append(line)
    if (off.get("fetched_not_transcribed_seconds") or 0) > 0:
        lines.append(f"      ≈ {format_span(off['fetched_not_transcribed_seconds'])} of fetched audio "
                     "not transcribed yet")
    if off.get("state") == "failed" and off.get("last_error"):
        lines.append(f"      last sync stopped: {off['last_error']} (retried on the next connect)")
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
    if dev.get("offline"):
        lines += format_offline(dev["offline"])
    return lines


def format_status(info: dict[str, Any]) -> str:
    if not info.get("running"):
        return f"omi-bridge: {info.get('message')}"
    head = f"omi-bridge is running (pid {info.get('pid') or '?'}"
    if info.get("started_at"):
        head += f", up {format_span(age_seconds(info['started_at']) or 0)}"
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
