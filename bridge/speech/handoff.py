"""Finished conversations handed to the outbox, and offered again while it cannot take them.

The callback commits a conversation to the outbox database; only after it returned is the
conversation's folder removed from the spool. When it raises (the database on a full disk), the
conversation stays on disk and is offered again after a back-off; a restart in between hands it
on from ``recover()``, and the outbox drops the duplicate by ``client_session_id``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable

from bridge.core.records import Conversation
from bridge.speech.conversations import OpenConversation

_LOGGER = logging.getLogger(__name__)

HAND_ON_RETRY_MIN_SECONDS = 1.0
HAND_ON_RETRY_MAX_SECONDS = 60.0
"""A finished conversation the outbox refused (its database on a full disk) is offered again
after this back-off, doubling per failure in a row."""


class HandOff:
    """One device's finished conversations on their way to ``on_conversation``."""

    def __init__(self, label: str, on_conversation: Callable[[Conversation], None]) -> None:
        self.label = label
        self.on_conversation = on_conversation
        self.emitted = 0
        """Conversations handed on."""
        self._lock = threading.Lock()
        self._unhanded: list[OpenConversation] = []
        """Finished conversations the outbox could not take yet (retried on a timer)."""
        self._timer: threading.Timer | None = None
        self._delay = 0.0

    @property
    def waiting(self) -> int:
        """Finished conversations waiting for the outbox to take them."""
        with self._lock:
            return len(self._unhanded)

    def _later(self, state: OpenConversation, exc: Exception) -> None:
        with self._lock:
            first = not self._unhanded
            if all(s is not state for s in self._unhanded):
                self._unhanded.append(state)
            delay = self._delay = min(self._delay * 2 or HAND_ON_RETRY_MIN_SECONDS,
                                              HAND_ON_RETRY_MAX_SECONDS)
            if self._timer is None:
                self._timer = threading.Timer(delay, self._retry)
                self._timer.daemon = True
                self._timer.start()
        # A full disk is said in words (OSError, sqlite3's "database or disk is full"); anything
        # else may be a bug and gets its traceback, once.
        expected = isinstance(exc, OSError | sqlite3.Error)
        log = _LOGGER.exception if first and not expected else _LOGGER.error
        log("%s: cannot queue conversation %s for Omi (%s); it stays on disk, next try in %.0f s",
            self.label, state.client_session_id, exc, delay)

    def _retry(self) -> None:
        with self._lock:
            ready, self._unhanded = self._unhanded, []
            self._timer = None
        self.deliver(ready)
        with self._lock:
            if not self._unhanded:
                self._delay = 0.0

    def deliver(self, ready: list[OpenConversation]) -> None:
        """Outside the lock: the callback may take its time without stalling capture."""
        for state in ready:
            result = state.to_conversation()
            if not result.segments:
                _LOGGER.info("%s: conversation %s had no text; dropped", self.label,
                             state.client_session_id)
            else:
                try:
                    self.on_conversation(result)
                except Exception as exc:
                    # Keep its state on disk (recover() after a restart hands it on too) and try
                    # again by itself: the outbox database may be on a full disk for a while.
                    self._later(state, exc)
                    continue
                self.emitted += 1
            # If we die between the callback and this removal, recover() hands it on again and
            # the outbox drops the duplicate by client_session_id.
            state.remove()
