"""The kinds of wearable the bridge speaks to, and the ``source`` each one's conversations carry.

The list lives here and only here: the config's ``kind`` key, the CLI's ``--kind`` choices, the
API's ``source`` value and the driver table in ``bridge/devices/link.py`` all read it.
"""

from __future__ import annotations

from enum import StrEnum

from bridge.core.errors import BridgeError


class DeviceKind(StrEnum):
    """A paired device's kind, spelled as in the config (``kind = "omi"``)."""

    OMI = "omi"
    """An Omi pendant (docs/reference/omi-device.md)."""
    FRAME = "frame"
    """Brilliant Labs Frame glasses (docs/reference/frame.md)."""

    @property
    def source(self) -> str:
        """The ``source`` its conversations are posted with (docs/reference/omi-api.md §8)."""
        return self.value

    @classmethod
    def parse(cls, text: str, where: str = "kind") -> DeviceKind:
        """``text`` as a kind; a ``BridgeError`` naming ``where`` and the valid kinds otherwise."""
        try:
            return cls(text)
        except ValueError:
            raise BridgeError(f"unknown device kind {text!r} ({where})",
                              f"use one of: {', '.join(KIND_NAMES)}") from None


KIND_NAMES: tuple[str, ...] = tuple(kind.value for kind in DeviceKind)
"""Every kind as spelled in the config and on the command line."""

EXTERNAL_SOURCE = "external_integration"
"""``source`` of conversations from files rather than a wearable (``omi-bridge transcribe``)."""
