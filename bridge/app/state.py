"""``omi-bridge status``: what the running daemon is doing, read from what it publishes.

The daemon holds an exclusive ``flock`` on ``daemon.lock`` for as long as it lives and rewrites
``state.json`` beside it every few seconds (write to a temporary file, then rename, so a reader
never sees half a file). The lock, not a pid file, says whether a daemon is running: the kernel
drops it when the process dies, however it dies. Both live in ``$RUNTIME_DIRECTORY``
(/run/omi-bridge under systemd, readable by every user so ``status`` needs no sudo) or, outside
systemd, in ``[storage] dir``. The state holds no secrets.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge.config import Config
from bridge.core.errors import BridgeError
from bridge.core.files import write_atomic
from bridge.core.times import now_iso

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


def acquire_daemon_locks(storage: Path, state_dir: Path) -> Callable[[], None]:
    """Lock the storage directory (a second daemon, e.g. a manual ``run`` beside the service,
    stays off the same spool and outbox) and, when it is elsewhere, the state directory (the lock
    beside state.json is what ``status`` checks for liveness). Returns the release."""
    directories = [storage]
    if state_dir.resolve() != storage.resolve():
        directories.append(state_dir)
    held: list[DaemonLock] = []

    def release() -> None:
        for lock in reversed(held):
            lock.release()

    try:
        for directory in directories:
            lock = DaemonLock(directory)
            lock.acquire()
            held.append(lock)
    except BaseException:
        release()
        raise
    return release


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """Atomically replace the published state."""
    directory.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"version": STATE_VERSION, "updated_at": now_iso(), **state}, indent=1)
    # Rewritten every few seconds and only about the present: no fsync (an SD card's worth).
    write_atomic(directory / STATE_FILE, data.encode("utf-8"), mode=PUBLIC_MODE, durable=False)


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
        data = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
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
        age = age_seconds(state.get("updated_at"))
        return {**state, "running": True, "pid": pid or state.get("pid"),
                "stale": age is None or age > STALE_AFTER_SECONDS, "state_dir": str(directory)}
    return {"running": False, "message": f"no daemon is running ({START_HINT})"}


# --------------------------------------------------------------------------------------------
# Presentation


def parse_time(when: Any) -> datetime | None:
    if not isinstance(when, str) or not when:
        return None
    try:
        parsed = datetime.fromisoformat(when)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def age_seconds(when: Any) -> float | None:
    parsed = parse_time(when)
    return None if parsed is None else (datetime.now(UTC) - parsed).total_seconds()


