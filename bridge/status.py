"""``omi-bridge status``: what the running daemon is doing, read from what it publishes.

The daemon holds an exclusive ``flock`` on ``daemon.lock`` for as long as it lives and rewrites
``state.json`` beside it every few seconds (write to a temporary file, then rename, so a reader
never sees half a file). The lock, not a pid file, says whether a daemon is running: the kernel
drops it when the process dies, however it dies. Both live in ``$RUNTIME_DIRECTORY``
(/run/omi-bridge under systemd, readable by every user so ``status`` needs no sudo) or, outside
systemd, in ``[storage] dir``. The state holds no secrets.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge.config import Config, load_config
from bridge.errors import BridgeError

STATE_FILE = "state.json"
LOCK_FILE = "daemon.lock"
STATE_VERSION = 1
RUNTIME_DIRECTORY_ENV = "RUNTIME_DIRECTORY"
SYSTEMD_RUNTIME_DIR = Path("/run/omi-bridge")
"""RuntimeDirectory=omi-bridge in systemd/omi-bridge.service."""
PUBLIC_MODE = 0o644
"""State and lock are readable by everyone: `status` runs as the login user, the daemon as its own."""
STALE_AFTER_SECONDS = 30.0
"""The daemon publishes every few seconds; a much older state means its event loop is stuck."""
EXIT_NOT_RUNNING = 3
"""Like `systemctl status` for an inactive unit (LSB: program is not running)."""
START_HINT = "start it with: sudo systemctl start omi-bridge"


def publish_dir(config: Config) -> Path:
    if runtime := os.environ.get(RUNTIME_DIRECTORY_ENV):
        return Path(runtime.split(":")[0])
    return config.storage.path


# --------------------------------------------------------------------------------------------
# The daemon's side


class DaemonLock:
    """Held by the running daemon; a second daemon on the same directory is refused."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PUBLIC_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                pid = _read_pid(self.path)
                raise BridgeError(f"another omi-bridge daemon (pid {pid or '?'}) is already running "
                                  f"on {self.path.parent}",
                                  "stop it first (sudo systemctl stop omi-bridge), or give this one "
                                  "another [storage] dir") from None
            raise
        with contextlib.suppress(OSError):
            os.fchmod(fd, PUBLIC_MODE)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """Atomically replace the published state."""
    directory.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"version": STATE_VERSION, "updated_at": _now_iso(), **state}, indent=1)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".state-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data)
        os.chmod(tmp, PUBLIC_MODE)
        os.replace(tmp, directory / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_state(directory: Path) -> None:
    (directory / STATE_FILE).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# The reader's side


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def daemon_running(directory: Path) -> int | None:
    """The pid of the daemon holding the lock in ``directory``, 0 if unknown, None if none runs."""
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except PermissionError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return _read_pid(path) or 0
        raise
    finally:
        os.close(fd)
    return None


def read_state(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _candidates(config: Config) -> list[Path]:
    out = []
    if runtime := os.environ.get(RUNTIME_DIRECTORY_ENV):
        out.append(Path(runtime.split(":")[0]))
    out += [SYSTEMD_RUNTIME_DIR, config.storage.path]
    seen: list[Path] = []
    for p in out:
        if p not in seen:
            seen.append(p)
    return seen


def collect(config: Config) -> dict[str, Any]:
    """``{"running": bool, "pid", "stale", ...the published state}`` for the first live daemon."""
    for directory in _candidates(config):
        pid = daemon_running(directory)
        if pid is None:
            continue
        state = read_state(directory) or {}
        age = _age_seconds(state.get("updated_at"))
        return {**state, "running": True, "pid": pid or state.get("pid"),
                "stale": age is None or age > STALE_AFTER_SECONDS, "state_dir": str(directory)}
    return {"running": False, "message": f"no daemon is running ({START_HINT})"}


# --------------------------------------------------------------------------------------------
# Presentation


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _parse(when: Any) -> datetime | None:
    if not isinstance(when, str) or not when:
        return None
    try:
        parsed = datetime.fromisoformat(when)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _age_seconds(when: Any) -> float | None:
    parsed = _parse(when)
    return None if parsed is None else (datetime.now(UTC) - parsed).total_seconds()


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
    age = _age_seconds(when)
    if age is None:
        return "never"
    local = _parse(when).astimezone()  # type: ignore[union-attr]
    return f"{local:%H:%M:%S} ({_span(age)} ago)"


def _until(when: Any) -> str:
    age = _age_seconds(when)
    if age is None:
        return "—"
    local = _parse(when).astimezone()  # type: ignore[union-attr]
    return f"{local:%H:%M:%S} (now)" if age >= 0 else f"{local:%H:%M:%S} (in {_span(-age)})"


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
        head += f", up {_span(_age_seconds(info['started_at']) or 0)}"
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
