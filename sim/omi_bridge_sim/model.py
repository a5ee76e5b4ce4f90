"""What a simulated BLE peripheral is, independent of the fake BlueZ that hosts it.

A ``DeviceModel`` describes the device (address, name, advertised UUIDs, GATT table, MTU) and
reacts to the central through hooks; the fake bluetoothd (``omi_bridge_sim.bluez``) owns the link and
D-Bus. The Omi pendant (``omi_bridge_sim.omi``) and Frame glasses are models on top of this.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# Bluetooth Base UUID: 16-bit SIG UUIDs expand into it (Bluetooth Core Spec Vol 3 Part B §2.5.1).
_BASE_UUID_SUFFIX = "-0000-1000-8000-00805f9b34fb"

# Client Characteristic Configuration descriptor (Bluetooth Assigned Numbers, 0x2902); BlueZ
# exports it for every notifying characteristic (bluez-for-tests.md §8).
CCCD_UUID = "00002902" + _BASE_UUID_SUFFIX

# ATT error codes a model may raise (Bluetooth Core Spec Vol 3 Part F §3.4.1.1).
ATT_READ_NOT_PERMITTED = 0x02
ATT_WRITE_NOT_PERMITTED = 0x03
ATT_INSUFFICIENT_AUTHENTICATION = 0x05
ATT_INVALID_ATTRIBUTE_VALUE_LENGTH = 0x0D
ATT_UNLIKELY_ERROR = 0x0E

# Default ATT MTU: what BlueZ and a modern peripheral usually settle on (LE Data Length 251
# minus L2CAP header); Omi asks for more (omi-device.md §5.3) but the central caps it.
DEFAULT_MTU = 247


def full_uuid(uuid: str) -> str:
    """Lower-case 128-bit form; accepts 16-bit ("180f", "0x180F") and 32-bit short forms."""
    u = uuid.lower()
    if u.startswith("0x"):
        u = u[2:]
    if len(u) == 4:
        return "0000" + u + _BASE_UUID_SUFFIX
    if len(u) == 8:
        return u + _BASE_UUID_SUFFIX
    return u


class AttError(Exception):
    """Raised by a model hook to answer with an ATT error; BlueZ turns it into
    ``org.bluez.Error.Failed: Operation failed with ATT error: 0x..`` (bleak parses that)."""

    def __init__(self, code: int, text: str = "") -> None:
        super().__init__(text or f"ATT error 0x{code:02x}")
        self.code = code


@dataclass(frozen=True)
class DescriptorSpec:
    uuid: str
    value: bytes = b""
    flags: tuple[str, ...] = ("read",)


@dataclass(frozen=True)
class CharacteristicSpec:
    uuid: str
    flags: tuple[str, ...]
    """BlueZ flag names: read, write, write-without-response, notify, indicate, ..."""
    value: bytes = b""
    descriptors: tuple[DescriptorSpec, ...] = ()
    encrypted: bool = False
    """Access needs a bond (firmware ``BT_GATT_PERM_*_ENCRYPT``): unpaired reads/writes/
    subscriptions fail like BlueZ does (Not paired / Insufficient authentication)."""


@dataclass(frozen=True)
class ServiceSpec:
    uuid: str
    characteristics: tuple[CharacteristicSpec, ...]
    primary: bool = True


class DeviceContext(Protocol):
    """What a model can do to its link; implemented by the fake BlueZ's device object."""

    @property
    def connected(self) -> bool: ...

    @property
    def mtu(self) -> int: ...

    def is_notifying(self, char_uuid: str) -> bool: ...

    async def notify(self, char_uuid: str, data: bytes) -> bool:
        """Send one notification the way the client subscribed (Value PropertiesChanged or the
        AcquireNotify socket). False when it could not be delivered (not connected/subscribed)."""
        ...

    def drop_link(self) -> None: ...

    def set_in_range(self, in_range: bool) -> None: ...


@dataclass
class DeviceModel:
    """Base of simulated peripherals. Subclasses fill ``services`` and override the hooks.

    Hooks may be plain functions or coroutines; the fake awaits coroutines (as tasks for
    ``on_connect``/``on_disconnect``/``on_notify_enabled``, inline for reads and writes).
    """

    address: str
    name: str | None = None
    advertised_uuids: Sequence[str] = ()
    services: Sequence[ServiceSpec] = ()
    mtu: int = DEFAULT_MTU
    rssi: int = -55
    manufacturer_data: dict[int, bytes] = field(default_factory=dict)
    service_data: dict[str, bytes] = field(default_factory=dict)
    ctx: DeviceContext | None = field(default=None, repr=False)
    values: dict[str, bytes] = field(default_factory=dict, repr=False)
    """Current characteristic values by full UUID; seeded from ``services``."""

    def __post_init__(self) -> None:
        self.address = self.address.upper()
        self.advertised_uuids = [full_uuid(u) for u in self.advertised_uuids]
        for svc in self.services:
            for ch in svc.characteristics:
                self.values.setdefault(full_uuid(ch.uuid), ch.value)

    # --- lifecycle, called by the fake -------------------------------------------------------
    def attach(self, ctx: DeviceContext) -> None:
        """The model now lives in a fake BlueZ; start background behaviour in ``start``."""
        self.ctx = ctx

    async def start(self) -> None:
        """Called once on the fake's loop after ``attach``; start device clocks here."""

    async def stop(self) -> None:
        """Called when the fake shuts down; cancel tasks started in ``start``."""

    def stats_dict(self) -> dict[str, Any]:
        """Counters for the simulator's control interface and tests (JSON-serialisable)."""
        return {}

    # --- hooks ---------------------------------------------------------------------------------
    def on_connect(self, ctx: DeviceContext) -> Awaitable[None] | None:
        return None

    def on_disconnect(self) -> Awaitable[None] | None:
        return None

    def on_read(self, char_uuid: str) -> bytes | Awaitable[bytes]:
        return self.values.get(full_uuid(char_uuid), b"")

    def on_write(self, char_uuid: str, data: bytes, with_response: bool) -> Awaitable[None] | None:
        self.values[full_uuid(char_uuid)] = bytes(data)
        return None

    def on_notify_enabled(self, char_uuid: str, enabled: bool) -> Awaitable[None] | None:
        return None


async def call_hook(result: Any) -> Any:
    """Await a hook's result when it is awaitable (hooks may be sync or async)."""
    if inspect.isawaitable(result):
        return await result
    return result
