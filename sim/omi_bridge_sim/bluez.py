"""A fake ``bluetoothd``: BlueZ's D-Bus API on a private bus, driven by simulated devices.

Real bleak (unmodified) talks to this exactly as it talks to BlueZ, so tests and the demo run
the product's real BLE code path without hardware. Built on dbus-fast's low-level MessageBus
with one message handler, because BlueZ sends all interfaces of an object in one
InterfacesAdded from ``/``, which dbus-fast's ServiceInterface export cannot do
(bluez-for-tests.md §8). Behaviour reproduced: bluez-for-tests.md §4–§9.

Devices are ``omi_bridge_sim.model.DeviceModel`` instances; each gets a ``FakeDevice`` that is
both its link (``DeviceContext``) and the test's handle for fault injection.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import logging
import random
import socket
import struct
import termios
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from omi_bridge_sim.model import (
    CCCD_UUID,
    AttError,
    CharacteristicSpec,
    DescriptorSpec,
    DeviceModel,
    call_hook,
    full_uuid,
)

_LOGGER = logging.getLogger(__name__)

BLUEZ_SERVICE = "org.bluez"
ADAPTER_IFACE = "org.bluez.Adapter1"
DEVICE_IFACE = "org.bluez.Device1"
SERVICE_IFACE = "org.bluez.GattService1"
CHAR_IFACE = "org.bluez.GattCharacteristic1"
DESC_IFACE = "org.bluez.GattDescriptor1"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
OM_IFACE = "org.freedesktop.DBus.ObjectManager"
DBUS_NAME = "org.freedesktop.DBus"
# RequestName flag and reply (D-Bus specification, "org.freedesktop.DBus.RequestName").
DBUS_NAME_FLAG_DO_NOT_QUEUE = 4
DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER = 1
# CCCD value with notifications enabled (Bluetooth Core Spec Vol 3 Part G §3.3.3.3).
CCCD_NOTIFY = 0x0001

# BlueZ error names and texts (bluez src/error.c); bleak matches some texts literally
# (bleak bluezdbus/utils.py assert_gatt_reply).
ERR_FAILED = "org.bluez.Error.Failed"
ERR_IN_PROGRESS = "org.bluez.Error.InProgress"
ERR_NOT_PERMITTED = "org.bluez.Error.NotPermitted"
ERR_NOT_SUPPORTED = "org.bluez.Error.NotSupported"
ERR_NOT_READY = "org.bluez.Error.NotReady"
ERR_NOT_CONNECTED = "org.bluez.Error.NotConnected"
ERR_ALREADY_EXISTS = "org.bluez.Error.AlreadyExists"
ERR_DOES_NOT_EXIST = "org.bluez.Error.DoesNotExist"
ERR_INVALID_ARGS = "org.bluez.Error.InvalidArguments"
ERR_AUTH_FAILED = "org.bluez.Error.AuthenticationFailed"
ERR_UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
ERR_UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
ERR_UNKNOWN_PROPERTY = "org.freedesktop.DBus.Error.UnknownProperty"
ERR_READ_ONLY = "org.freedesktop.DBus.Error.PropertyReadOnly"

# bluetoothd's TemporaryTimeout default (main.conf): unpaired devices are forgotten this long
# after they were last seen (bluez-for-tests.md §8, §9.2).
DEFAULT_TEMPORARY_TIMEOUT_S = 30.0
# Advertising interval of the simulated peripherals while the adapter scans. Real Omi advertises
# every ~100 ms; a device appears within one interval of StartDiscovery.
ADVERTISING_INTERVAL_S = 0.1
# BlueZ only re-signals RSSI when it moved by at least this much (bluez-for-tests.md §6.4).
RSSI_CHANGE_THRESHOLD_DBM = 8
# Advertising RSSI wanders this much around the model's value, so a long scan sees changes.
RSSI_JITTER_DBM = 6
# Throttle for bulk signals: wait while more than this many bytes sit unsent in our bus socket,
# because dbus-fast treats EAGAIN on a full socket as fatal (bluez-for-tests.md §8, §9.5).
SEND_BACKLOG_LIMIT_BYTES = 64 * 1024
_BACKLOG_POLL_S = 0.001
# First ATT handle used for a device's GATT table (arbitrary but stable; bleak takes handles
# from the last 4 hex digits of each path, bluez-for-tests.md §5).
FIRST_GATT_HANDLE = 0x0010
DEFAULT_ADAPTER_ADDRESS = "00:1A:7D:DA:71:13"
# Method calls remembered in FakeBluez.calls (bounded for long demos).
CALL_LOG_LIMIT = 10_000
# Connect error text BlueZ gives for an LE connection it aborted itself; bleak retries it.
LE_ABORT_BY_LOCAL = "le-connection-abort-by-local"


class BluezError(Exception):
    """A D-Bus error reply (name, text) from the fake."""

    def __init__(self, name: str, text: str = "") -> None:
        super().__init__(f"{name}: {text}")
        self.name = name
        self.text = text


def _att_error_text(code: int) -> str:
    return f"Operation failed with ATT error: 0x{code:02x}"


def device_path(adapter_path: str, address: str) -> str:
    return f"{adapter_path}/dev_{address.upper().replace(':', '_')}"


class _NotifySession:
    """Who receives a characteristic's notifications: StartNotify clients and/or one
    AcquireNotify socket (mutually exclusive in BlueZ)."""

    def __init__(self) -> None:
        self.clients: set[str] = set()
        self.sock: socket.socket | None = None

    @property
    def active(self) -> bool:
        return bool(self.clients) or self.sock is not None


class _Char:
    def __init__(self, spec: CharacteristicSpec, path: str, handle: int) -> None:
        self.spec = spec
        self.uuid = full_uuid(spec.uuid)
        self.path = path
        self.handle = handle
        self.notify = _NotifySession()
        self.write_sock: socket.socket | None = None
        self.desc_paths: dict[str, str] = {}

    @property
    def can_notify(self) -> bool:
        return "notify" in self.spec.flags or "indicate" in self.spec.flags


class FakeDevice:
    """One simulated peripheral as BlueZ sees it. Also the model's ``DeviceContext`` and the
    test's fault-injection handle."""

    def __init__(self, fake: FakeBluez, model: DeviceModel, *, paired: bool = False) -> None:
        self.fake = fake
        self.model = model
        self.address = model.address
        self.path = device_path(fake.adapter_path, model.address)
        self.present = False
        """Device1 object exported (BlueZ knows the device)."""
        self._connected = False
        self.services_resolved = False
        self.paired = paired
        self.trusted = paired
        self.in_range = True
        self._in_range_event = asyncio.Event()
        self._in_range_event.set()
        self.rssi: int | None = None
        self.last_seen = 0.0
        self._temp_timer: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._abort_connect: asyncio.Event | None = None
        self.chars: dict[str, _Char] = {}
        self._gatt_paths: list[tuple[str, str]] = []
        # Fault injection.
        self.connect_error: tuple[str, str] | None = None
        """(error name, text) returned by the next Connect calls, e.g.
        ("org.bluez.Error.Failed", "le-connection-abort-by-local")."""
        self.connect_errors: list[tuple[str, str]] = []
        """One-shot errors: each Connect takes the next one (before ``connect_error``)."""
        self.connect_delay = 0.0
        self.resolve_delay = 0.0
        self.disconnect_delay = 0.0
        self.acquire_notify_error: tuple[str, str] | None = None
        """(error name, text) every AcquireNotify answers, e.g. (ERR_NOT_SUPPORTED, ...) for a
        BlueZ or characteristic that refuses it: clients must fall back to StartNotify."""
        self.requires_bond = False
        """Every characteristic behaves as encrypted (needs Pair first)."""
        self.pair_error: tuple[str, str] | None = None
        """Pair fails with this, e.g. (ERR_AUTH_FAILED, "Authentication Failed") to emulate a
        pendant bonded to another host."""
        # Stats.
        self.connects = 0
        self.disconnects = 0
        self.link_losses = 0
        self.notifications_sent = 0
        self.notifications_dropped = 0
        """Notifications that could not be delivered (socket full, not subscribed)."""
        if paired:
            # BlueZ loads bonded devices at start-up: they exist without being seen.
            self.present = True

    # --- DeviceContext -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def mtu(self) -> int:
        return self.model.mtu

    @property
    def bonded(self) -> bool:
        return self.paired

    def is_notifying(self, char_uuid: str) -> bool:
        ch = self.chars.get(full_uuid(char_uuid))
        return bool(self._connected and ch is not None and ch.notify.active)

    async def notify(self, char_uuid: str, data: bytes) -> bool:
        ch = self.chars.get(full_uuid(char_uuid))
        if not self._connected or ch is None or not ch.notify.active:
            self.notifications_dropped += 1
            return False
        data = bytes(data)
        self.model.values[ch.uuid] = data
        if ch.notify.sock is not None:
            try:
                ch.notify.sock.send(data)
            except (BlockingIOError, OSError):
                # Real BlueZ also drops when the AcquireNotify socket is full (§7).
                self.notifications_dropped += 1
                return False
            self.notifications_sent += 1
            return True
        await self.fake._emit_props_throttled(ch.path, CHAR_IFACE, {"Value": Variant("ay", data)})
        self.notifications_sent += 1
        return True

    def drop_link(self) -> None:
        """Link loss (supervision timeout, device reset): Connected goes False from the device
        side, no method call involved."""
        if self._connected:
            self.link_losses += 1
            _LOGGER.info("sim %s: link lost", self.address)
            self._teardown_link()

    def set_in_range(self, in_range: bool) -> None:
        """Out of range: no advertising, Connect hangs; a live link is lost."""
        self.in_range = in_range
        if in_range:
            self._in_range_event.set()
        else:
            self._in_range_event.clear()
            self.drop_link()
        self.fake._changed()

    # --- state helpers -------------------------------------------------------------------------
    @property
    def advertising(self) -> bool:
        # A connected peripheral does not advertise (omi-device.md §10); Omi allows one link.
        return self.in_range and not self._connected and self.fake.powered

    def device_props(self) -> dict[str, Variant]:
        m = self.model
        alias = m.name if m.name else self.address.replace(":", "-")
        props: dict[str, Variant] = {
            "Address": Variant("s", self.address),
            "AddressType": Variant("s", "public"),
            "Alias": Variant("s", alias),
            "Paired": Variant("b", self.paired),
            "Bonded": Variant("b", self.paired),
            "Trusted": Variant("b", self.trusted),
            "Blocked": Variant("b", False),
            "LegacyPairing": Variant("b", False),
            "Connected": Variant("b", self._connected),
            "ServicesResolved": Variant("b", self.services_resolved),
            "UUIDs": Variant("as", list(m.advertised_uuids)),
            "Adapter": Variant("o", self.fake.adapter_path),
            "ManufacturerData": Variant(
                "a{qv}", {k: Variant("ay", bytes(v)) for k, v in m.manufacturer_data.items()}),
            "ServiceData": Variant(
                "a{sv}", {full_uuid(k): Variant("ay", bytes(v)) for k, v in m.service_data.items()}),
        }
        if m.name:
            props["Name"] = Variant("s", m.name)
        if self.rssi is not None:
            props["RSSI"] = Variant("n", self.rssi)
        return props

    def _set(self, **changes: Any) -> None:
        types = {"Connected": "b", "ServicesResolved": "b", "Paired": "b", "Bonded": "b",
                 "Trusted": "b", "RSSI": "n"}
        self.fake._set_props(self.path, DEVICE_IFACE,
                             {k: Variant(types[k], v) for k, v in changes.items()})

    def _expose(self) -> None:
        if not self.present:
            self.present = True
            self.fake._export(self.path, {DEVICE_IFACE: self.device_props()})

    def sight(self) -> None:
        """One received advertisement while the adapter scans."""
        if not self.advertising or not self.fake._accepts(self):
            return
        self.last_seen = time.monotonic()
        rssi = self.model.rssi + self.fake.rng.randint(-RSSI_JITTER_DBM, RSSI_JITTER_DBM)
        if not self.present:
            self.rssi = rssi
            self._expose()
        elif self.rssi is None or abs(rssi - self.rssi) >= RSSI_CHANGE_THRESHOLD_DBM:
            self.rssi = rssi
            self._set(RSSI=rssi)
        self._arm_temporary_timer()

    def _arm_temporary_timer(self) -> None:
        if self._temp_timer is not None:
            self._temp_timer.cancel()
            self._temp_timer = None
        if self.paired or self._connected or not self.present:
            return
        self._temp_timer = self.fake.loop.call_later(self.fake.temporary_timeout, self._expire)

    def _expire(self) -> None:
        self._temp_timer = None
        if self.present and not self.paired and not self._connected and self._connecting is None:
            _LOGGER.debug("sim %s: temporary device removed", self.address)
            self.remove()

    def remove(self) -> None:
        """Forget the device (TemporaryTimeout or RemoveDevice)."""
        if self._connected:
            self._teardown_link()
        self._remove_gatt()
        if self._temp_timer is not None:
            self._temp_timer.cancel()
            self._temp_timer = None
        if self.present:
            self.present = False
            self.rssi = None
            self.fake._unexport(self.path, [DEVICE_IFACE])
        self.fake._changed()

    # --- GATT objects --------------------------------------------------------------------------
    def _export_gatt(self) -> None:
        if self._gatt_paths:
            return
        handle = FIRST_GATT_HANDLE
        for svc in self.model.services:
            spath = f"{self.path}/service{handle:04x}"
            self.fake._export(spath, {SERVICE_IFACE: {
                "UUID": Variant("s", full_uuid(svc.uuid)),
                "Device": Variant("o", self.path),
                "Primary": Variant("b", svc.primary),
                "Includes": Variant("ao", []),
                "Handle": Variant("q", handle),
            }})
            self._gatt_paths.append((spath, SERVICE_IFACE))
            handle += 1
            for spec in svc.characteristics:
                cpath = f"{spath}/char{handle:04x}"
                ch = _Char(spec, cpath, handle)
                self.chars[ch.uuid] = ch
                props: dict[str, Variant] = {
                    "UUID": Variant("s", ch.uuid),
                    "Service": Variant("o", spath),
                    "Value": Variant("ay", self.model.values.get(ch.uuid, b"")),
                    "Flags": Variant("as", list(spec.flags)),
                    "MTU": Variant("q", self.model.mtu),
                    "Handle": Variant("q", handle),
                }
                if ch.can_notify:
                    props["Notifying"] = Variant("b", False)
                    # Presence of NotifyAcquired enables bleak's AcquireNotify path (§4.3).
                    props["NotifyAcquired"] = Variant("b", False)
                if "write-without-response" in spec.flags:
                    props["WriteAcquired"] = Variant("b", False)
                self.fake._export(cpath, {CHAR_IFACE: props})
                self._gatt_paths.append((cpath, CHAR_IFACE))
                handle += 2  # declaration + value attribute
                descs = list(spec.descriptors)
                if ch.can_notify and all(full_uuid(d.uuid) != CCCD_UUID for d in descs):
                    descs.append(DescriptorSpec(CCCD_UUID, b"\x00\x00", ("read", "write")))
                for d in descs:
                    dpath = f"{cpath}/desc{handle:04x}"
                    ch.desc_paths[dpath] = full_uuid(d.uuid)
                    self.fake._desc_values[dpath] = d.value
                    self.fake._export(dpath, {DESC_IFACE: {
                        "UUID": Variant("s", full_uuid(d.uuid)),
                        "Characteristic": Variant("o", cpath),
                        "Value": Variant("ay", d.value),
                        "Flags": Variant("as", list(d.flags)),
                        "Handle": Variant("q", handle),
                    }})
                    self.fake._char_by_path[dpath] = (self, ch)
                    self._gatt_paths.append((dpath, DESC_IFACE))
                    handle += 1
                self.fake._char_by_path[cpath] = (self, ch)

    def _remove_gatt(self) -> None:
        # Children first, like BlueZ.
        for path, iface in reversed(self._gatt_paths):
            self.fake._char_by_path.pop(path, None)
            self.fake._desc_values.pop(path, None)
            self.fake._unexport(path, [iface])
        self._gatt_paths.clear()
        self.chars.clear()

    # --- link ----------------------------------------------------------------------------------
    async def connect(self) -> None:
        if self._connected:
            return
        if self._connecting is not None:
            raise BluezError(ERR_IN_PROGRESS, "In Progress")
        if not self.fake.powered:
            raise BluezError(ERR_NOT_READY, "Resource Not Ready")
        if self.fake.connecting is not None:
            # One LE connection attempt per adapter at a time: a Connect to a second device
            # while the first is still being set up is refused, not queued.
            self.fake.connects_refused_busy += 1
            raise BluezError(ERR_IN_PROGRESS, "In Progress")
        self._abort_connect = abort = asyncio.Event()
        self._connecting = asyncio.current_task()
        self.fake.connecting = self
        try:
            if self.connect_delay:
                await asyncio.sleep(self.connect_delay)
            error = self.connect_errors.pop(0) if self.connect_errors else self.connect_error
            if error is not None:
                if error[1] == LE_ABORT_BY_LOCAL:
                    # BlueZ really connected before aborting: bleak waits for Connected to
                    # go False before it retries (bleak client.py, BlueZ >= 5.62).
                    self._set(Connected=True)
                    self._set(Connected=False)
                raise BluezError(*error)
            # LE create-connection waits for an advertisement: out of range, it hangs until
            # the device comes back or the caller gives up (Disconnect cancels it).
            waiter = asyncio.ensure_future(self._in_range_event.wait())
            aborter = asyncio.ensure_future(abort.wait())
            try:
                await asyncio.wait({waiter, aborter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                aborter.cancel()
            if abort.is_set():
                raise BluezError(ERR_FAILED, "Operation was aborted")
            self._connected = True
            self.connects += 1
            self._expose()
            if self._temp_timer is not None:
                self._temp_timer.cancel()
                self._temp_timer = None
            self._set(Connected=True)
            # BlueZ replies to an LE Connect only after service discovery (§6.1).
            self._export_gatt()
            if self.resolve_delay:
                await asyncio.sleep(self.resolve_delay)
            if not self._connected:
                raise BluezError(ERR_FAILED, "Software caused connection abort")
            self.services_resolved = True
            self._set(ServicesResolved=True)
            _LOGGER.info("sim %s: connected (mtu %d)", self.address, self.model.mtu)
            self.fake._spawn(call_hook(self.model.on_connect(self)))
            self.fake._changed()
        finally:
            self._connecting = None
            self._abort_connect = None
            if self.fake.connecting is self:
                self.fake.connecting = None

    async def disconnect(self) -> None:
        if self._abort_connect is not None:
            self._abort_connect.set()
        if not self._connected:
            return
        self.disconnects += 1

        async def later() -> None:
            if self.disconnect_delay:
                await asyncio.sleep(self.disconnect_delay)
            self._teardown_link()

        # The reply goes out before the PropertiesChanged (§6.2): run after this call returns.
        self.fake._spawn(later())

    def _teardown_link(self) -> None:
        if not self._connected:
            return
        for ch in self.chars.values():
            self._release_notify(ch)
            if ch.write_sock is not None:
                self.fake.loop.remove_reader(ch.write_sock.fileno())
                ch.write_sock.close()
                ch.write_sock = None
        self._connected = False
        self.services_resolved = False
        self._set(ServicesResolved=False)
        self._set(Connected=False)
        if not self.paired:
            self._remove_gatt()
        self._arm_temporary_timer()
        _LOGGER.info("sim %s: disconnected", self.address)
        self.fake._spawn(call_hook(self.model.on_disconnect()))
        self.fake._changed()
        if self.fake.discovering:
            self.fake.loop.call_later(ADVERTISING_INTERVAL_S, self.sight)

    async def pair(self) -> None:
        if self.paired:
            raise BluezError(ERR_ALREADY_EXISTS, "Already Exists")
        if not self._connected:
            await self.connect()
        if self.pair_error is not None:
            raise BluezError(*self.pair_error)
        self.paired = True
        self._set(Paired=True, Bonded=True)
        if self._temp_timer is not None:
            self._temp_timer.cancel()
            self._temp_timer = None
        self.fake._changed()

    # --- notify sessions -----------------------------------------------------------------------
    def _set_notifying(self, ch: _Char, was_active: bool) -> None:
        active = ch.notify.active
        if active != was_active:
            changes = {"Notifying": Variant("b", active)}
            self.fake._set_props(ch.path, CHAR_IFACE, changes)
            self.fake._spawn(call_hook(self.model.on_notify_enabled(ch.uuid, active)))
            self.fake._changed()

    def _release_notify(self, ch: _Char) -> None:
        was = ch.notify.active
        ch.notify.clients.clear()
        if ch.notify.sock is not None:
            with contextlib.suppress(Exception):
                self.fake.loop.remove_reader(ch.notify.sock.fileno())
            ch.notify.sock.close()
            ch.notify.sock = None
            self.fake._set_props(ch.path, CHAR_IFACE, {"NotifyAcquired": Variant("b", False)})
        if was:
            self.fake._set_props(ch.path, CHAR_IFACE, {"Notifying": Variant("b", False)})
            self.fake._spawn(call_hook(self.model.on_notify_enabled(ch.uuid, False)))

    def drop_client(self, sender: str) -> None:
        for ch in self.chars.values():
            if sender in ch.notify.clients:
                was = ch.notify.active
                ch.notify.clients.discard(sender)
                self._set_notifying(ch, was)

    def check_access(self, ch: _Char) -> None:
        if (ch.spec.encrypted or self.requires_bond) and not self.paired:
            # What BlueZ answers when the peripheral demands encryption on an unbonded link
            # (bleak's assert_gatt_reply notes "Not paired" under NotPermitted).
            raise BluezError(ERR_NOT_PERMITTED, "Not paired")

    @property
    def stats(self) -> dict[str, int]:
        return {"connects": self.connects, "disconnects": self.disconnects,
                "link_losses": self.link_losses, "notifications_sent": self.notifications_sent,
                "notifications_dropped": self.notifications_dropped}


class FakeBluez:
    """Our bluetoothd: owns ``org.bluez`` on the bus at ``bus_address`` (a private bus).

    ``await start()`` / ``await stop()`` or ``async with``. Runs on the current event loop.
    """

    def __init__(self, bus_address: str, *, adapter: str = "hci0",
                 adapter_address: str = DEFAULT_ADAPTER_ADDRESS,
                 temporary_timeout: float = DEFAULT_TEMPORARY_TIMEOUT_S,
                 value_on_read: bool = True, seed: int = 0) -> None:
        self.bus_address = bus_address
        self.adapter_path = f"/org/bluez/{adapter}"
        self.adapter_address = adapter_address.upper()
        self.temporary_timeout = temporary_timeout
        self.value_on_read = value_on_read
        """BlueZ signals Value after ReadValue too (§6.5); False turns that off."""
        self.rng = random.Random(seed)
        self.powered = True
        self.devices: dict[str, FakeDevice] = {}
        self._objects: dict[str, dict[str, dict[str, Variant]]] = {}
        self._char_by_path: dict[str, tuple[FakeDevice, _Char]] = {}
        self._desc_values: dict[str, bytes] = {}
        self._discovery: dict[str, dict[str, Variant]] = {}
        self._filters: dict[str, dict[str, Variant]] = {}
        self._bus: MessageBus | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cond: asyncio.Condition | None = None
        self._adv_task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.calls: deque[tuple[str, str, str]] = deque(maxlen=CALL_LOG_LIMIT)
        """(sender, interface, member) of recent method calls, for tests."""
        self.connecting: FakeDevice | None = None
        """The device whose Connect (LE connection and service discovery) is under way."""
        self.connects_refused_busy = 0
        """Connect calls answered ``InProgress`` because another device was connecting."""

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> FakeBluez:
        self.loop = asyncio.get_running_loop()
        self._cond = asyncio.Condition()
        bus = MessageBus(bus_address=self.bus_address, bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
        await bus.connect()
        self._bus = bus
        bus.add_message_handler(self._on_message)
        await self._dbus_call("AddMatch", "s", [
            "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
            "member='NameOwnerChanged'"])
        self._objects[self.adapter_path] = {ADAPTER_IFACE: self._adapter_props()}
        reply = await self._dbus_call("RequestName", "su", [BLUEZ_SERVICE, DBUS_NAME_FLAG_DO_NOT_QUEUE])
        if reply.body[0] != DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER:
            raise RuntimeError(f"cannot own {BLUEZ_SERVICE} on {self.bus_address}")
        for dev in self.devices.values():
            await self._start_model(dev)
        self._adv_task = self.loop.create_task(self._advertise_loop())
        return self

    async def stop(self) -> None:
        if self._adv_task is not None:
            self._adv_task.cancel()
            self._adv_task = None
        for dev in self.devices.values():
            with contextlib.suppress(Exception):
                await dev.model.stop()
            for ch in dev.chars.values():
                dev._release_notify(ch)
        pending = list(self._tasks)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._bus is not None:
            self._bus.disconnect()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._bus.wait_for_disconnect(), 1.0)
            self._bus = None

    async def __aenter__(self) -> FakeBluez:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def add_device(self, model: DeviceModel, *, paired: bool = False) -> FakeDevice:
        """Add a peripheral. It becomes visible when it advertises during a scan (or at once
        when ``paired``: BlueZ loads bonded devices at start-up)."""
        if model.address in self.devices:
            raise ValueError(f"a simulated device with address {model.address} already exists")
        dev = FakeDevice(self, model, paired=paired)
        self.devices[model.address] = dev
        model.attach(dev)
        if self._bus is not None:
            await self._start_model(dev)
        return dev

    async def _start_model(self, dev: FakeDevice) -> None:
        if dev.present and dev.path not in self._objects:
            self._export(dev.path, {DEVICE_IFACE: dev.device_props()})
        await dev.model.start()

    def device(self, address: str) -> FakeDevice:
        return self.devices[address.upper()]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait for a state change making ``predicate`` true (connections, subscriptions...)."""
        assert self._cond is not None
        async with self._cond:
            await asyncio.wait_for(self._cond.wait_for(predicate), timeout)

    def _changed(self) -> None:
        cond = self._cond
        if cond is None:
            return

        async def wake() -> None:
            async with cond:
                cond.notify_all()

        self._spawn(wake())

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = self.loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _LOGGER.error("sim task failed", exc_info=task.exception())

    # --- adapter -------------------------------------------------------------------------------
    def _adapter_props(self) -> dict[str, Variant]:
        return {
            "Address": Variant("s", self.adapter_address),
            "AddressType": Variant("s", "public"),
            "Name": Variant("s", "omi-bridge-sim"),
            "Alias": Variant("s", "omi-bridge-sim"),
            "Class": Variant("u", 0),
            "Powered": Variant("b", self.powered),
            "PowerState": Variant("s", "on" if self.powered else "off"),
            "Discoverable": Variant("b", False),
            "Pairable": Variant("b", True),
            "DiscoverableTimeout": Variant("u", 180),
            "PairableTimeout": Variant("u", 0),
            "Discovering": Variant("b", bool(self._discovery)),
            "UUIDs": Variant("as", []),
            "Modalias": Variant("s", "usb:v1D6Bp0246d0548"),
            "Roles": Variant("as", ["central", "peripheral"]),
        }

    @property
    def discovering(self) -> bool:
        return bool(self._discovery) and self.powered

    def set_powered(self, powered: bool) -> None:
        """Adapter power (bleak raises BleakBluetoothNotAvailableError when off)."""
        if powered == self.powered:
            return
        self.powered = powered
        if not powered:
            for dev in self.devices.values():
                dev.drop_link()
            if self._discovery:
                self._discovery.clear()
                self._set_props(self.adapter_path, ADAPTER_IFACE, {"Discovering": Variant("b", False)})
        self._set_props(self.adapter_path, ADAPTER_IFACE, {
            "Powered": Variant("b", powered), "PowerState": Variant("s", "on" if powered else "off")})
        self._changed()

    def _accepts(self, dev: FakeDevice) -> bool:
        """Does any scanning client's filter want this device? (BlueZ merges client filters.)"""
        if not self._discovery:
            return False
        uuids = set(dev.model.advertised_uuids)
        for flt in self._discovery.values():
            want = flt.get("UUIDs")
            if want is None or not want.value:
                return True
            if uuids & {full_uuid(u) for u in want.value}:
                return True
        return False

    async def _advertise_loop(self) -> None:
        while True:
            await asyncio.sleep(ADVERTISING_INTERVAL_S)
            if self.discovering:
                for dev in list(self.devices.values()):
                    dev.sight()

    def _start_discovery(self, sender: str) -> None:
        if not self.powered:
            raise BluezError(ERR_NOT_READY, "Resource Not Ready")
        if sender in self._discovery:
            raise BluezError(ERR_IN_PROGRESS, "Operation already in progress")
        first = not self._discovery
        self._discovery[sender] = self._filters.get(sender, {})
        if first:
            self._set_props(self.adapter_path, ADAPTER_IFACE, {"Discovering": Variant("b", True)})
            self._changed()
        # First advertisements arrive shortly after the scan starts (after our reply).
        self.loop.call_later(ADVERTISING_INTERVAL_S / 5, self._sight_all)

    def _sight_all(self) -> None:
        for dev in list(self.devices.values()):
            dev.sight()

    def _stop_discovery(self, sender: str) -> None:
        if sender not in self._discovery:
            raise BluezError(ERR_FAILED, "No discovery started")
        del self._discovery[sender]
        if not self._discovery:
            self._discovery_stopped()

    def _discovery_stopped(self) -> None:
        self._set_props(self.adapter_path, ADAPTER_IFACE, {"Discovering": Variant("b", False)})
        self._changed()
        # BlueZ invalidates RSSI/TxPower when discovery stops, so the next scan re-signals it
        # (bluez-for-tests.md §6.4).
        for dev in self.devices.values():
            if dev.present and dev.rssi is not None and not dev.connected:
                dev.rssi = None
                self._set_props(dev.path, DEVICE_IFACE, {}, ["RSSI", "TxPower"])

    def _client_gone(self, name: str) -> None:
        self._filters.pop(name, None)
        if name in self._discovery:
            del self._discovery[name]
            if not self._discovery:
                self._discovery_stopped()
        for dev in self.devices.values():
            dev.drop_client(name)
        self._changed()

    # --- object tree and signals ---------------------------------------------------------------
    def _signal(self, path: str, iface: str, member: str, signature: str, body: list[Any]) -> Any:
        if self._bus is None:
            return None
        return self._bus.send(Message.new_signal(path, iface, member, signature, body))

    def _export(self, path: str, ifaces: dict[str, dict[str, Variant]]) -> None:
        self._objects.setdefault(path, {}).update(ifaces)
        self._signal("/", OM_IFACE, "InterfacesAdded", "oa{sa{sv}}", [path, ifaces])

    def _unexport(self, path: str, ifaces: list[str]) -> None:
        if self._objects.pop(path, None) is not None:
            self._signal("/", OM_IFACE, "InterfacesRemoved", "oas", [path, ifaces])

    def _set_props(self, path: str, iface: str, changes: dict[str, Variant],
                   invalidated: Iterable[str] = ()) -> Any:
        obj = self._objects.get(path, {}).get(iface)
        invalidated = list(invalidated)
        if obj is not None:
            obj.update(changes)
            for k in invalidated:
                obj.pop(k, None)
            return self._signal(path, PROPS_IFACE, "PropertiesChanged", "sa{sv}as",
                                [iface, changes, invalidated])
        return None

    def _backlog(self) -> int:
        if self._bus is None or self._bus._sock is None:
            return 0
        buf = array.array("i", [0])
        try:
            fcntl.ioctl(self._bus._sock.fileno(), termios.TIOCOUTQ, buf, True)
        except OSError:
            return 0
        return buf[0]

    async def _emit_props_throttled(self, path: str, iface: str, changes: dict[str, Variant]) -> None:
        while self._backlog() > SEND_BACKLOG_LIMIT_BYTES:
            await asyncio.sleep(_BACKLOG_POLL_S)
        fut = self._set_props(path, iface, changes)
        if fut is not None:
            await fut

    async def _dbus_call(self, member: str, signature: str, body: list[Any]) -> Message:
        assert self._bus is not None
        reply = await self._bus.call(Message(
            destination=DBUS_NAME, path="/org/freedesktop/DBus", interface=DBUS_NAME,
            member=member, signature=signature, body=body))
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            raise RuntimeError(f"{member}: {reply.error_name} {reply.body}")
        return reply

    # --- method dispatch -----------------------------------------------------------------------
    def _on_message(self, msg: Message) -> bool | None:
        if msg.message_type == MessageType.SIGNAL:
            if (msg.member == "NameOwnerChanged" and msg.sender == DBUS_NAME
                    and len(msg.body) == 3 and not msg.body[2] and msg.body[0].startswith(":")):
                self._client_gone(msg.body[0])
            return None
        if msg.message_type != MessageType.METHOD_CALL:
            return None
        if msg.interface == "org.freedesktop.DBus.Peer" or (
                msg.interface == "org.freedesktop.DBus.Introspectable"):
            return None  # dbus-fast's defaults answer these
        self.calls.append((msg.sender or "", msg.interface or "", msg.member or ""))
        self._spawn(self._handle(msg))
        return True

    async def _handle(self, msg: Message) -> None:
        try:
            result = await self._dispatch(msg)
        except BluezError as e:
            reply = Message.new_error(msg, e.name, e.text)
        except AttError as e:
            reply = Message.new_error(msg, ERR_FAILED, _att_error_text(e.code))
        except Exception as e:  # a fake bug must not hang the caller
            _LOGGER.exception("sim: %s.%s failed", msg.interface, msg.member)
            reply = Message.new_error(msg, ERR_FAILED, f"fake bluetoothd error: {e}")
        else:
            if result is _ALREADY_SENT:
                return
            if isinstance(result, Message):
                reply = result
            else:
                signature, body = result if result is not None else ("", [])
                reply = Message.new_method_return(msg, signature, body)
        if self._bus is not None and not self._bus._disconnected:
            fut = self._bus.send(reply)
            await fut

    async def _dispatch(self, msg: Message) -> tuple[str, list[Any]] | Message | None:
        iface, member, path = msg.interface, msg.member, msg.path or ""
        sender = msg.sender or ""
        if iface == OM_IFACE and member == "GetManagedObjects":
            if path != "/":
                raise BluezError(ERR_UNKNOWN_METHOD, "GetManagedObjects only at /")
            return "a{oa{sa{sv}}}", [self._objects]
        if iface == PROPS_IFACE:
            return self._properties(msg)
        if path not in self._objects:
            raise BluezError(ERR_UNKNOWN_OBJECT, f"Method \"{member}\" with signature "
                             f"\"{msg.signature}\" on interface \"{iface}\" doesn't exist")
        if iface == ADAPTER_IFACE and path == self.adapter_path:
            return await self._adapter_method(member or "", sender, msg)
        if iface == DEVICE_IFACE:
            dev = self._device_at(path)
            if member == "Connect":
                await dev.connect()
                return None
            if member == "Disconnect":
                await dev.disconnect()
                return None
            if member == "Pair":
                await dev.pair()
                return None
            if member == "CancelPairing":
                return None
        if iface in (CHAR_IFACE, DESC_IFACE) and path in self._char_by_path:
            dev, ch = self._char_by_path[path]
            if iface == CHAR_IFACE:
                return await self._char_method(dev, ch, member or "", sender, msg)
            return await self._desc_method(dev, ch, path, member or "", msg)
        raise BluezError(ERR_UNKNOWN_METHOD, f"Method \"{member}\" with signature \"{msg.signature}\" "
                         f"on interface \"{iface}\" doesn't exist")

    def _device_at(self, path: str) -> FakeDevice:
        for dev in self.devices.values():
            if dev.path == path:
                return dev
        raise BluezError(ERR_UNKNOWN_OBJECT, f"no device at {path}")

    def _properties(self, msg: Message) -> tuple[str, list[Any]]:
        path = msg.path or ""
        obj = self._objects.get(path)
        if obj is None:
            raise BluezError(ERR_UNKNOWN_OBJECT, f"no object at {path}")
        iface = msg.body[0]
        props = obj.get(iface)
        if props is None:
            raise BluezError(ERR_INVALID_ARGS, f"No such interface '{iface}'")
        if msg.member == "GetAll":
            return "a{sv}", [props]
        if msg.member == "Get":
            name = msg.body[1]
            if name not in props:
                raise BluezError(ERR_INVALID_ARGS, f"No such property '{name}'")
            return "v", [props[name]]
        if msg.member == "Set":
            name, value = msg.body[1], msg.body[2]
            if iface == DEVICE_IFACE and name in ("Trusted", "Alias", "Blocked"):
                dev = self._device_at(path)
                if name == "Trusted":
                    dev.trusted = bool(value.value)
                self._set_props(path, iface, {name: Variant(props[name].signature, value.value)})
                return "", []
            if iface == ADAPTER_IFACE and name == "Powered":
                self.set_powered(bool(value.value))
                return "", []
            if name in props:
                raise BluezError(ERR_READ_ONLY, f"Property '{name}' is not writable")
            raise BluezError(ERR_INVALID_ARGS, f"No such property '{name}'")
        raise BluezError(ERR_UNKNOWN_METHOD, f"Properties.{msg.member}")

    async def _adapter_method(self, member: str, sender: str, msg: Message) -> tuple[str, list[Any]] | None:
        if member == "SetDiscoveryFilter":
            flt = dict(msg.body[0])
            if flt:
                self._filters[sender] = flt
            else:
                self._filters.pop(sender, None)
            if sender in self._discovery:
                self._discovery[sender] = flt
            return None
        if member == "StartDiscovery":
            self._start_discovery(sender)
            return None
        if member == "StopDiscovery":
            self._stop_discovery(sender)
            return None
        if member == "RemoveDevice":
            target = msg.body[0]
            for dev in self.devices.values():
                if dev.path == target and dev.present:
                    dev.paired = False
                    dev.trusted = False
                    dev.remove()
                    return None
            raise BluezError(ERR_DOES_NOT_EXIST, "Does Not Exist")
        if member == "GetDiscoveryFilters":
            return "as", [["UUIDs", "RSSI", "Pathloss", "Transport", "DuplicateData", "Discoverable",
                           "Pattern"]]
        raise BluezError(ERR_UNKNOWN_METHOD, f"Method \"{member}\" doesn't exist")

    async def _char_method(self, dev: FakeDevice, ch: _Char, member: str, sender: str,
                           msg: Message) -> tuple[str, list[Any]] | Message | None:
        if not dev.connected:
            raise BluezError(ERR_NOT_CONNECTED, "Not connected")
        flags = ch.spec.flags
        if member == "ReadValue":
            if "read" not in flags:
                raise BluezError(ERR_NOT_PERMITTED, "Read not permitted")
            dev.check_access(ch)
            offset = int(msg.body[0].get("offset", Variant("q", 0)).value) if msg.body else 0
            value = bytes(await call_hook(dev.model.on_read(ch.uuid)))
            if offset > len(value):
                raise BluezError(ERR_INVALID_ARGS, "Invalid offset")
            dev.model.values[ch.uuid] = value
            if self.value_on_read:
                # BlueZ updates Value (and signals it) on reads too (§6.5).
                self._set_props(ch.path, CHAR_IFACE, {"Value": Variant("ay", value)})
            return "ay", [value[offset:]]
        if member == "WriteValue":
            data, opts = bytes(msg.body[0]), msg.body[1]
            kind = opts["type"].value if "type" in opts else (
                "request" if "write" in flags else "command")
            allowed = "write" in flags if kind == "request" else "write-without-response" in flags
            if kind not in ("request", "command", "reliable") or not allowed:
                raise BluezError(ERR_NOT_PERMITTED, "Write not permitted")
            dev.check_access(ch)
            if len(data) > dev.mtu - 3 and kind == "command":
                raise BluezError(ERR_INVALID_ARGS, "Invalid Length")
            try:
                await call_hook(dev.model.on_write(ch.uuid, data, kind != "command"))
            except AttError:
                if kind == "command":
                    return None  # write without response: the central never hears back
                raise
            return None
        if member in ("StartNotify", "AcquireNotify"):
            self._reap_notify_sock(dev, ch)
        if member == "StartNotify":
            if not ch.can_notify:
                raise BluezError(ERR_NOT_SUPPORTED, "Operation is not supported")
            if ch.notify.sock is not None:
                raise BluezError(ERR_NOT_PERMITTED, "Notify acquired")
            dev.check_access(ch)
            was = ch.notify.active
            ch.notify.clients.add(sender)
            dev._set_notifying(ch, was)
            return None
        if member == "StopNotify":
            if sender not in ch.notify.clients:
                raise BluezError(ERR_FAILED, "No notify session started")
            was = ch.notify.active
            ch.notify.clients.discard(sender)
            dev._set_notifying(ch, was)
            return None
        if member == "AcquireNotify":
            if dev.acquire_notify_error is not None:
                raise BluezError(*dev.acquire_notify_error)
            if not ch.can_notify:
                raise BluezError(ERR_NOT_SUPPORTED, "Operation is not supported")
            if ch.notify.sock is not None:
                raise BluezError(ERR_NOT_PERMITTED, "Notify already acquired")
            if ch.notify.clients:
                raise BluezError(ERR_IN_PROGRESS, "In Progress")
            dev.check_access(ch)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ours.setblocking(False)
            was = ch.notify.active
            ch.notify.sock = ours
            self.loop.add_reader(ours.fileno(), self._on_notify_sock, dev, ch)
            self._set_props(ch.path, CHAR_IFACE, {"NotifyAcquired": Variant("b", True)})
            dev._set_notifying(ch, was)
            return await self._reply_fd(msg, theirs, dev.mtu)
        if member == "AcquireWrite":
            if "write-without-response" not in flags:
                raise BluezError(ERR_NOT_SUPPORTED, "Operation is not supported")
            if ch.write_sock is not None:
                raise BluezError(ERR_NOT_PERMITTED, "Write acquired")
            dev.check_access(ch)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ours.setblocking(False)
            ch.write_sock = ours
            self.loop.add_reader(ours.fileno(), self._on_write_sock, dev, ch)
            self._set_props(ch.path, CHAR_IFACE, {"WriteAcquired": Variant("b", True)})
            return await self._reply_fd(msg, theirs, dev.mtu)
        raise BluezError(ERR_UNKNOWN_METHOD, f"Method \"{member}\" doesn't exist")

    async def _reply_fd(self, msg: Message, theirs: socket.socket, mtu: int) -> Message:
        assert self._bus is not None
        reply = Message.new_method_return(msg, "hq", [0, mtu], unix_fds=[theirs.fileno()])
        try:
            await self._bus.send(reply)
        finally:
            # dbus-fast passes the fd number without duplicating it: close only once sent.
            theirs.close()
        return _ALREADY_SENT

    def _reap_notify_sock(self, dev: FakeDevice, ch: _Char) -> None:
        """Notice a closed AcquireNotify socket now: the client may close the fd and call
        StartNotify at once (bleak's _acquire_mtu does), and the D-Bus call can overtake the
        socket's hang-up event in our loop."""
        sock = ch.notify.sock
        if sock is None:
            return
        try:
            closed = sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            closed = False
        except OSError:
            closed = True
        if closed:
            self._on_notify_sock(dev, ch)

    def _on_notify_sock(self, dev: FakeDevice, ch: _Char) -> None:
        sock = ch.notify.sock
        if sock is None:
            return
        try:
            data = sock.recv(1)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            # The client closed its end (stop_notify, process exit): release like BlueZ.
            was = ch.notify.active
            self.loop.remove_reader(sock.fileno())
            sock.close()
            ch.notify.sock = None
            self._set_props(ch.path, CHAR_IFACE, {"NotifyAcquired": Variant("b", False)})
            dev._set_notifying(ch, was)

    def _on_write_sock(self, dev: FakeDevice, ch: _Char) -> None:
        sock = ch.write_sock
        if sock is None:
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(sock.fileno())
            sock.close()
            ch.write_sock = None
            self._set_props(ch.path, CHAR_IFACE, {"WriteAcquired": Variant("b", False)})
            return
        self._spawn(self._write_from_sock(dev, ch, data))

    async def _write_from_sock(self, dev: FakeDevice, ch: _Char, data: bytes) -> None:
        with contextlib.suppress(AttError):
            await call_hook(dev.model.on_write(ch.uuid, data, False))

    async def _desc_method(self, dev: FakeDevice, ch: _Char, path: str, member: str,
                           msg: Message) -> tuple[str, list[Any]] | None:
        if not dev.connected:
            raise BluezError(ERR_NOT_CONNECTED, "Not connected")
        if member == "ReadValue":
            value = self._desc_values.get(path, b"")
            if ch.desc_paths.get(path) == CCCD_UUID:
                value = struct.pack("<H", CCCD_NOTIFY if ch.notify.active else 0)
            return "ay", [value]
        if member == "WriteValue":
            if ch.desc_paths.get(path) == CCCD_UUID:
                # BlueZ owns the CCCD; clients must use StartNotify (BlueZ answers NotPermitted).
                raise BluezError(ERR_NOT_PERMITTED, "Write not permitted")
            self._desc_values[path] = bytes(msg.body[0])
            self._set_props(path, DESC_IFACE, {"Value": Variant("ay", bytes(msg.body[0]))})
            return None
        raise BluezError(ERR_UNKNOWN_METHOD, f"Method \"{member}\" doesn't exist")


# Marker: the handler already sent its reply itself (fd passing needs to await the send).
_ALREADY_SENT = Message(message_type=MessageType.METHOD_RETURN, reply_serial=1)
