"""``omi-bridge scan``: Omi and Frame devices nearby.

Omi is recognised by its audio service UUID (names can be changed by users, omi-device.md §10),
Frame by its service UUID or a name starting with "Frame" (old firmware advertised just that),
never "Frame Update" (the DFU bootloader; frame.md). Devices BlueZ already holds connected do
not advertise, so they are listed too (without RSSI).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from bleak import BleakAdapter, BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakBluetoothNotAvailableError, BleakBluetoothNotAvailableReason, BleakDBusError

from bridge.config import Config
from bridge.core.errors import BridgeError
from bridge.core.gatt import FRAME_NAME_PREFIX, FRAME_SERVICE, FRAME_UPDATE_PREFIX, OMI_AUDIO_SERVICE
from bridge.core.kinds import DeviceKind
from bridge.link.adapter import adapter_args, scanner_args
from bridge.link.failures import POWER_ON_ADVICE, START_BLUEZ_ADVICE

_LOGGER = logging.getLogger(__name__)


@dataclass
class FoundDevice:
    address: str
    name: str | None
    kind: str
    rssi: int | None


def device_kind(name: str | None, service_uuids: list[str] | tuple[str, ...]) -> DeviceKind | None:
    """The kind a device advertises itself as, or None."""
    uuids = {u.lower() for u in service_uuids}
    if OMI_AUDIO_SERVICE in uuids:
        return DeviceKind.OMI
    if FRAME_SERVICE in uuids:
        return DeviceKind.FRAME
    if name and name.startswith(FRAME_NAME_PREFIX) and not name.startswith(FRAME_UPDATE_PREFIX):
        return DeviceKind.FRAME
    return None


@contextlib.contextmanager
def bluetooth_errors(adapter: str) -> Iterator[None]:
    """Turn "no Bluetooth here" failures into errors that say what to do."""
    try:
        yield
    except BleakBluetoothNotAvailableError as exc:
        if exc.reason == BleakBluetoothNotAvailableReason.POWERED_OFF:
            raise BridgeError(f"Bluetooth adapter {adapter} is powered off",
                              POWER_ON_ADVICE) from None
        raise BridgeError(f"no usable Bluetooth adapter ({adapter}): {exc}",
                          "check `bluetoothctl list`; set [link] adapter to one it shows") from None
    except BleakDBusError as exc:
        if exc.dbus_error in ("org.freedesktop.DBus.Error.ServiceUnknown",
                              "org.freedesktop.DBus.Error.NameHasNoOwner"):
            raise BridgeError("BlueZ (bluetoothd) is not running",
                              START_BLUEZ_ADVICE) from None
        if exc.dbus_error == "org.bluez.Error.NotReady":
            raise BridgeError(f"Bluetooth adapter {adapter} is not ready (powered off?)",
                              POWER_ON_ADVICE) from None
        raise
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise BridgeError(f"cannot reach the system D-Bus: {exc}",
                          "is dbus running? (`systemctl status dbus`)") from None
    except KeyError as exc:
        # bleak raises KeyError / BleakError when the named adapter does not exist
        raise BridgeError(f"Bluetooth adapter {adapter} not found ({exc})",
                          "check `bluetoothctl list`; set [link] adapter to one it shows") from None


async def async_scan(config: Config | None = None, *, timeout: float = 10.0) -> list[FoundDevice]:
    """Omi and Frame devices seen within ``timeout`` seconds, strongest first (then connected)."""
    adapter = (config or Config()).link.adapter
    found: dict[str, FoundDevice] = {}

    def seen(dev: BLEDevice, adv: AdvertisementData) -> None:
        name = adv.local_name or dev.name
        kind = device_kind(name, adv.service_uuids)
        if kind is None:
            return
        address = dev.address.upper()
        prev = found.get(address)
        found[address] = FoundDevice(address, name or (prev.name if prev else None), kind,
                                     max(adv.rssi, prev.rssi or -127) if prev else adv.rssi)

    bleak_adapter = await BleakAdapter.get(bluez=adapter_args(adapter))
    for dev in await bleak_adapter.get_connected_devices([OMI_AUDIO_SERVICE, FRAME_SERVICE]):
        uuids = dev.details.get("props", {}).get("UUIDs", []) if isinstance(dev.details, dict) else []
        kind = device_kind(dev.name, uuids) or DeviceKind.OMI
        found[dev.address.upper()] = FoundDevice(dev.address.upper(), dev.name, kind, None)
    async with BleakScanner(seen, bluez=scanner_args(adapter)):
        await asyncio.sleep(timeout)  # a scan is a period of listening, not a wait for an event
    return sorted(found.values(), key=lambda d: (d.rssi is None, -(d.rssi or 0)))


async def async_detect_kind(address: str, timeout: float, adapter: str = "hci0") -> DeviceKind:
    """What kind of device ``address`` is, from BlueZ's connected devices or its advertisement."""
    address = address.upper()
    bleak_adapter = await BleakAdapter.get(bluez=adapter_args(adapter))
    for uuid, connected_kind in ((OMI_AUDIO_SERVICE, DeviceKind.OMI), (FRAME_SERVICE, DeviceKind.FRAME)):
        for dev in await bleak_adapter.get_connected_devices([uuid]):
            if dev.address.upper() == address:
                return connected_kind
    result: asyncio.Future[DeviceKind | None] = asyncio.get_running_loop().create_future()

    def seen(dev: BLEDevice, adv: AdvertisementData) -> None:
        if dev.address.upper() == address and not result.done():
            result.set_result(device_kind(adv.local_name or dev.name, adv.service_uuids))

    async with BleakScanner(seen, bluez=scanner_args(adapter)):
        try:
            kind = await asyncio.wait_for(result, timeout)
        except TimeoutError:
            raise BridgeError(f"{address} was not seen in {timeout:g} s",
                              "is it on and in range, and not connected to a phone? "
                              "`omi-bridge scan` lists what is nearby") from None
    if kind is None:
        raise BridgeError(f"{address} is neither an Omi nor a Frame device",
                          "pass --kind omi or --kind frame if you are sure")
    return kind
