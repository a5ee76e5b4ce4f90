"""The durable outbox: one SQLite file (WAL) under ``[storage] dir``.

A conversation is committed here, with its request bodies serialized once, before anything else
happens; it leaves the ``queued`` state only when the server answered 200 (or rejected it for good
with 422). Stored states are ``queued``, ``sent`` and ``dead``; ``waiting`` (due later) and
``paused`` (delivery stopped by an auth/config error) are derived when reading, so there is one
source of truth for "what still has to go".

Every request attempt is recorded in ``attempts`` *before* it is made, so the hourly write budget
survives restarts and counts attempts that were in flight when the process died.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.config import LocationOptions
from bridge.core.errors import BridgeError
from bridge.core.records import Conversation
from bridge.core.times import iso_seconds
from bridge.outbox.payload import request_bodies

_LOGGER = logging.getLogger(__name__)

DB_NAME = "outbox.sqlite3"
SCHEMA_VERSION = 1
"""PRAGMA user_version of the layout below; a newer file is refused rather than misread."""
BUSY_TIMEOUT_SECONDS = 10.0
"""How long a writer waits for another process (daemon vs. CLI) holding the write lock."""
RATE_WINDOW_SECONDS = 3600.0
"""The server counts writes per key over one hour (omi-api.md §3, rate_limit_config.py)."""

STATES = ("queued", "waiting", "paused", "sent", "dead")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    client_session_id TEXT NOT NULL UNIQUE,
    conversation_id TEXT NOT NULL,
    device TEXT NOT NULL DEFAULT '',
    body BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'sent', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    created_at REAL NOT NULL,
    last_attempt_at REAL,
    finished_at REAL,
    server_id TEXT,
    server_status TEXT,
    discarded INTEGER,
    error TEXT
);
CREATE INDEX IF NOT EXISTS items_due ON items (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS attempts (at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Item:
    """One request waiting for (or done with) delivery."""

    id: int
    client_session_id: str
    conversation_id: str
    device: str
    body: bytes
    state: str
    attempts: int
    next_attempt_at: float
    created_at: float
    last_attempt_at: float | None
    finished_at: float | None
    server_id: str | None
    server_status: str | None
    discarded: bool | None
    error: str | None

    def due_at(self, not_before: float | None = None) -> float | None:
        """When it may go, given a key-wide ``not_before`` (hourly budget, Retry-After)."""
        if self.state != "queued":
            return None
        return max(self.next_attempt_at, not_before or self.next_attempt_at)

    def view_state(self, now: float, paused: bool, not_before: float | None = None) -> str:
        if self.state != "queued":
            return self.state
        if paused:
            return "paused"
        due = self.due_at(not_before)
        return "waiting" if due is not None and due > now else "queued"

    def as_json(self, now: float, paused: bool, not_before: float | None = None) -> dict[str, Any]:
        """The ``outbox list --json`` shape."""
        return {
            "id": self.id,
            "client_session_id": self.client_session_id,
            "state": self.view_state(now, paused, not_before),
            "attempts": self.attempts,
            "next_attempt_at": iso_seconds(self.due_at(not_before)),
            "server_id": self.server_id,
            "discarded": self.discarded,
            "error": self.error,
        }


@dataclass(frozen=True)
class Pause:
    """Delivery is stopped until the key/base_url (whose fingerprint is kept) changes."""

    reason: str
    hint: str
    fingerprint: str


class Outbox:
    """The outbox database. Safe to share between threads; several processes may open it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None,
                                       check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            # WAL: readers (status, outbox list) never block the sender; FULL: a committed
            # conversation survives a power cut, not just a crash.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except sqlite3.Error as exc:
            raise BridgeError(f"cannot open the outbox {path}: {exc}",
                              "check [storage] dir and its permissions") from None

    @classmethod
    def open(cls, storage_dir: Path | str) -> Outbox:
        return cls(Path(storage_dir) / DB_NAME)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise BridgeError(f"{self.path} was written by a newer omi-bridge (schema {version})",
                              "upgrade omi-bridge, or move the file away to start a new outbox")
        if version < SCHEMA_VERSION:
            with self._tx():
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self._db.execute(stmt)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ---------------------------------------------------------------------------------------
    # Writing

    def enqueue(self, conv: Conversation, location: LocationOptions, now: float) -> list[int]:
        """Commit ``conv``'s bodies; returns their item ids. Idempotent by client_session_id:
        handing the same conversation again (after a crash) returns the existing items."""
        bodies = request_bodies(conv, location)
        if not bodies:
            _LOGGER.info("%s: conversation %s has no text; nothing to send",
                         conv.device or "-", conv.client_session_id)
            return []
        return self.enqueue_bodies(bodies, now, conversation_id=conv.client_session_id,
                                   device=conv.device)

    def enqueue_bodies(self, bodies: list[dict[str, Any]], now: float, *, conversation_id: str,
                       device: str = "") -> list[int]:
        """Commit ready-made request bodies (``enqueue`` builds them; tools and tests may bring
        their own). Idempotent by each body's client_session_id."""
        ids = []
        known = 0
        with self._tx() as db:
            for body in bodies:
                # Look first (inside the write transaction, so it is atomic): a repeat keeps the
                # stored bytes, which may already be on the wire.
                row = db.execute("SELECT id FROM items WHERE client_session_id = ?",
                                 (body["client_session_id"],)).fetchone()
                if row is not None:
                    ids.append(int(row[0]))
                    known += 1
                    continue
                data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
                cur = db.execute(
                    "INSERT INTO items (client_session_id, conversation_id, device, body,"
                    " state, next_attempt_at, created_at) VALUES (?, ?, ?, ?, 'queued', ?, ?)",
                    (body["client_session_id"], conversation_id, device, data, now, now))
                ids.append(int(cur.lastrowid or 0))
        _LOGGER.info("%s: conversation %s %s as item(s) %s", device or "-", conversation_id,
                     "was already queued" if known == len(ids) else "queued",
                     ", ".join(map(str, ids)))
        return ids

    def begin_attempt(self, item_id: int, now: float) -> None:
        """Count an attempt (budget and item) before the request leaves."""
        with self._tx() as db:
            db.execute("INSERT INTO attempts (at) VALUES (?)", (now,))
            db.execute("DELETE FROM attempts WHERE at < ?", (now - 2 * RATE_WINDOW_SECONDS,))
            db.execute("UPDATE items SET attempts = attempts + 1, last_attempt_at = ? WHERE id = ?",
                       (now, item_id))

    def mark_sent(self, item_id: int, server_id: str, status: str, discarded: bool,
                  now: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE items SET state = 'sent', server_id = ?, server_status = ?,"
                       " discarded = ?, finished_at = ?, error = NULL WHERE id = ?",
                       (server_id, status, int(discarded), now, item_id))

    def mark_dead(self, item_id: int, error: str, now: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE items SET state = 'dead', error = ?, finished_at = ? WHERE id = ?",
                       (error, now, item_id))

    def reschedule(self, item_id: int, at: float, error: str, *, server_id: str | None = None,
                   server_status: str | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE items SET next_attempt_at = ?, error = ?,"
                       " server_id = COALESCE(?, server_id),"
                       " server_status = COALESCE(?, server_status) WHERE id = ? AND state = 'queued'",
                       (at, error, server_id, server_status, item_id))

    def retry(self, item_id: int, now: float) -> bool:
        """Make a dead, waiting or paused item due now, and lift a pause (the operator says it is
        fixed; if not, the next answer pauses again). A server's Retry-After and the hourly budget
        still apply: ignoring them would only earn another 429. False if there is no such item or
        it was already sent."""
        with self._tx() as db:
            cur = db.execute("UPDATE items SET state = 'queued', next_attempt_at = ?"
                             " WHERE id = ? AND state != 'sent'", (now, item_id))
            if cur.rowcount:
                db.execute("DELETE FROM meta WHERE key = 'pause'")
            return cur.rowcount > 0

    def purge_sent(self) -> int:
        with self._tx() as db:
            return db.execute("DELETE FROM items WHERE state = 'sent'").rowcount

    def _set_meta(self, key: str, value: str | None) -> None:
        with self._tx() as db:
            if value is None:
                db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_pause(self, pause: Pause | None) -> None:
        self._set_meta("pause", None if pause is None else json.dumps(pause.__dict__))

    def pause(self) -> Pause | None:
        raw = self._meta("pause")
        return Pause(**json.loads(raw)) if raw else None

    def set_hold(self, until: float | None) -> None:
        """The server said (429) the key may not write before ``until``."""
        self._set_meta("hold_until", None if until is None else repr(until))

    def hold_until(self) -> float | None:
        raw = self._meta("hold_until")
        return float(raw) if raw else None

    # ---------------------------------------------------------------------------------------
    # Reading

    def _items(self, where: str = "", args: tuple[Any, ...] = ()) -> list[Item]:
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM items {where}", args).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["discarded"] = None if d["discarded"] is None else bool(d["discarded"])
            out.append(Item(**d))
        return out

    def get(self, item_id: int) -> Item | None:
        found = self._items("WHERE id = ?", (item_id,))
        return found[0] if found else None

    def items(self) -> list[Item]:
        return self._items("ORDER BY id")

    def due(self, now: float, among: set[int] | None = None) -> list[Item]:
        """Queued items whose time has come, oldest due first."""
        due = self._items("WHERE state = 'queued' AND next_attempt_at <= ? ORDER BY next_attempt_at, id",
                          (now,))
        return [i for i in due if among is None or i.id in among]

    def next_attempt_at(self, among: set[int] | None = None) -> float | None:
        queued = [i.next_attempt_at for i in self._items("WHERE state = 'queued'")
                  if among is None or i.id in among]
        return min(queued) if queued else None

    def attempts_since(self, since: float) -> list[float]:
        with self._lock:
            rows = self._db.execute("SELECT at FROM attempts WHERE at > ? ORDER BY at",
                                    (since,)).fetchall()
        return [r[0] for r in rows]

    def counts(self, now: float, not_before: float | None = None) -> dict[str, int]:
        paused = self.pause() is not None
        counts = dict.fromkeys(STATES, 0)
        for item in self.items():
            counts[item.view_state(now, paused, not_before)] += 1
        return counts


class DeliveryLock:
    """One deliverer at a time per outbox (the daemon, or a CLI command when no daemon runs).

    An flock on a file beside the database: the kernel drops it when its holder dies, even by
    kill -9, so a crash never leaves delivery locked."""

    def __init__(self, storage_dir: Path | str) -> None:
        self.path = Path(storage_dir) / "outbox.lock"
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
