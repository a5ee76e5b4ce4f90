"""One connection attempt per Bluetooth adapter at a time.

BlueZ sets up one LE connection per adapter at a time: a ``Connect`` to a second device while
the first is still connecting (LE create-connection, then service discovery, which BlueZ does
before it answers an LE ``Connect``, bluez-for-tests.md §6.1) is answered
``org.bluez.Error.InProgress``. Two paired devices starting together (the daemon at boot, both
back in range at once) would then fail and back off in turn. So every link takes its adapter's
lock around ``BleakClient.connect()`` and nothing else: streaming, scanning and the session's
own set-up run in parallel.

The locks belong to the running event loop (an ``asyncio.Lock`` is bound to one loop), so a
process that runs several loops one after another (tests, ``listen``) gets fresh ones.
"""

from __future__ import annotations

import asyncio
import weakref

from bleak.args.bluez import BlueZAdapterArgs, BlueZClientArgs, BlueZScannerArgs

DEFAULT_ADAPTER = ""
"""Key for "the adapter BlueZ picks" (``[link] adapter`` empty)."""

_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary())


def connect_lock(adapter: str | None) -> asyncio.Lock:
    """The lock serialising connection attempts on ``adapter`` (call on the event loop)."""
    per_loop = _locks.setdefault(asyncio.get_running_loop(), {})
    key = adapter or DEFAULT_ADAPTER
    lock = per_loop.get(key)
    if lock is None:
        lock = per_loop[key] = asyncio.Lock()
    return lock


# bleak takes the adapter choice as a typed dict per object kind; an empty one lets BlueZ pick.

def adapter_args(adapter: str | None) -> BlueZAdapterArgs:
    """``bluez=`` for ``BleakAdapter.get`` on ``adapter`` (empty: BlueZ's default)."""
    return {"adapter": adapter} if adapter else {}


def scanner_args(adapter: str | None) -> BlueZScannerArgs:
    """``bluez=`` for ``BleakScanner`` on ``adapter`` (empty: BlueZ's default)."""
    return {"adapter": adapter} if adapter else {}


def client_args(adapter: str | None) -> BlueZClientArgs:
    """``bluez=`` for ``BleakClient`` on ``adapter`` (empty: BlueZ's default)."""
    return {"adapter": adapter} if adapter else {}
