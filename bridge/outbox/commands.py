"""``omi-bridge outbox`` and the delivery half of ``omi-bridge transcribe --send``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import TextIO

from bridge.config import Config
from bridge.conversation import Conversation

EXIT_SENT = 0
"""Every conversation is on the server (sent now or before)."""
EXIT_WAITING = 3
"""Some wait on the hourly budget or a Retry-After; they stay queued."""
EXIT_PAUSED = 4
"""Delivery is paused by an auth/config error; nothing is lost."""


def send_conversations(conversations: Iterable[Conversation], config: Config,
                       out: TextIO = sys.stdout) -> int:
    """Enqueue ``conversations`` in the outbox, then deliver them now; returns 0, 3 or 4."""
    raise NotImplementedError("delivery lands with issue 4")


def cmd_outbox(args: argparse.Namespace) -> int:
    raise NotImplementedError("delivery lands with issue 4")
