"""The one way the daemon keeps a long-lived task running: restart it with a back-off.

Every task of the daemon (each device, the outbox sender, each pendant's offline sync, the MQTT
and metrics publishers) runs under ``supervise``: an exception is logged with the task's name
(a ``BridgeError`` as its message and advice, anything else with its traceback, since that is a
bug), reported to ``on_failure`` (health: the device's last error, its restart count) and the task
starts again after a back-off that doubles per consecutive failure. Returning ends it; so does
``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from bridge.core.errors import BridgeError

_LOGGER = logging.getLogger(__name__)

RESTART_MIN_SECONDS = 2.0
RESTART_MAX_SECONDS = 60.0
"""Back-off when a task itself fails (the link supervisor already retries BLE errors; this is
for bugs and unexpected errors), doubling per consecutive failure."""


async def supervise(name: str, func: Callable[[asyncio.Event], Awaitable[object]], stop: asyncio.Event,
                    *, on_failure: Callable[[Exception], None] | None = None) -> None:
    """Run ``func(stop)`` until it returns or ``stop`` is set, restarting it when it raises."""
    delay = RESTART_MIN_SECONDS
    while not stop.is_set():
        try:
            await func(stop)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if on_failure is not None:
                on_failure(exc)
            if isinstance(exc, BridgeError):
                _LOGGER.error("%s: %s; retrying in %.0f s", name, exc, delay)
            else:
                _LOGGER.exception("%s failed; restarting in %.0f s", name, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, RESTART_MAX_SECONDS)
        else:
            return
