"""Moments the daemon announces to its listeners (the MQTT publisher): things that happen,
as opposed to the state in the health snapshot. Listeners are called on the event loop and
must not block."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ButtonPressed:
    device: str
    """The device's name (label)."""
    address: str
    code: int
    """The event code the device sent (docs/reference/omi-device.md §8;
    ``bridge.core.gatt.BUTTON_EVENTS``)."""


@dataclass(frozen=True)
class ConversationPosted:
    device: str
    client_session_id: str
    server_id: str
    discarded: bool
    title: str | None = None
    """The title the API gave the conversation, when its answer carries one."""


BridgeEvent = ButtonPressed | ConversationPosted
EventListener = Callable[[BridgeEvent], None]
