"""Why a connection attempt failed, and what that means: how long to wait and what to tell a human.

After Home Assistant's bleak-retry-connector: BlueZ and bleak errors are sorted into a few kinds,
each with a minimum back-off and one line of advice; the supervisor logs the advice once per
change of kind, not on every retry (bluez-for-tests.md §9 for the errors BlueZ gives).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from bleak.exc import (
    BleakBluetoothNotAvailableError,
    BleakCharacteristicNotFoundError,
    BleakDBusError,
    BleakDeviceNotFoundError,
    BleakError,
)

from bridge.config import LinkOptions
from bridge.core.errors import BridgeError, DeviceNotFoundError

POWER_ON_ADVICE = "turn it on: `bluetoothctl power on` (and check `rfkill list`)"
"""What to do about an adapter that is powered off (every place that finds one says this)."""
START_BLUEZ_ADVICE = "start it: `sudo systemctl start bluetooth` (package bluez)"
"""What to do when bluetoothd is not on the system bus."""


@dataclass(frozen=True)
class FailureKind:
    name: str
    min_backoff: float
    """Seconds to wait at least before the next attempt."""
    advice: str


ADAPTER_OFF = FailureKind(
    "adapter", 5.0, f"the Bluetooth adapter is off or missing: {POWER_ON_ADVICE}; check "
    "`bluetoothctl list` and that bluetoothd runs ([link] adapter names it)")
DEVICE_MISSING = FailureKind(
    "device missing", 0.0, "not seen: out of range, switched off, flat, or connected to a "
    "phone (it takes one connection; close the Omi app)")
BUSY = FailureKind(
    "busy", 1.0, "BlueZ is busy with another operation on this adapter (scan or connect in "
    "progress); retrying")
AUTH = FailureKind(
    "auth", 10.0, "the device refused us (pairing/bond problem): remove it with "
    "`bluetoothctl remove ADDRESS` and on the phone, then `omi-bridge pair ADDRESS`")
TRANSIENT = FailureKind("transient", 0.0, "radio or timing failure; retrying")
WRONG_DEVICE = FailureKind(
    "wrong device", 60.0, "it lacks a characteristic its kind must have: check `kind` in its "
    "[[devices]] table (or --kind) and that its firmware is supported")
DEVICE_PROBLEM = FailureKind("device problem", 60.0, "")
"""A BridgeError from the session (e.g. unknown codec): retrying soon will not fix it."""

_BUSY_ERRORS = {"org.bluez.Error.InProgress", "org.bluez.Error.NotReady",
                "org.bluez.Error.AlreadyConnected", "org.bluez.Error.Busy"}
_AUTH_ERRORS = {"org.bluez.Error.AuthenticationFailed", "org.bluez.Error.AuthenticationRejected",
                "org.bluez.Error.NotAuthorized", "org.bluez.Error.NotPermitted",
                "org.bluez.Error.AuthenticationCanceled"}
_MISSING_ERRORS = {"org.bluez.Error.DoesNotExist", "org.freedesktop.DBus.Error.UnknownObject"}


def classify(exc: BaseException) -> FailureKind:
    """Sort an exception from finding/connecting/setting up into a failure kind."""
    if isinstance(exc, BridgeError):
        return DEVICE_MISSING if isinstance(exc, DeviceNotFoundError) else DEVICE_PROBLEM
    if isinstance(exc, BleakBluetoothNotAvailableError):
        return ADAPTER_OFF
    if isinstance(exc, BleakCharacteristicNotFoundError):
        return WRONG_DEVICE
    if isinstance(exc, BleakDeviceNotFoundError):
        return DEVICE_MISSING
    if isinstance(exc, BleakDBusError):
        if exc.dbus_error in _BUSY_ERRORS:
            return BUSY
        if exc.dbus_error in _AUTH_ERRORS or "authentication" in str(exc).lower():
            return AUTH
        if exc.dbus_error in _MISSING_ERRORS:
            return DEVICE_MISSING
        if exc.dbus_error == "org.freedesktop.DBus.Error.ServiceUnknown":
            return ADAPTER_OFF  # bluetoothd is not running
        return TRANSIENT
    if isinstance(exc, BleakError) and "not found" in str(exc).lower():
        return DEVICE_MISSING  # stale BLEDevice: plain BleakError (bluez-for-tests.md §9.2)
    if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
        return ADAPTER_OFF  # no system D-Bus socket
    return TRANSIENT


def backoff_seconds(failures: int, options: LinkOptions, kind: FailureKind,
                    rand: Callable[[], float] = random.random) -> float:
    """Capped exponential back-off with jitter for the ``failures``-th consecutive failure."""
    base = options.reconnect_min_seconds * (2 ** max(0, failures - 1))
    base = min(options.reconnect_max_seconds, max(base, kind.min_backoff))
    return float(base * (0.5 + rand() / 2))
