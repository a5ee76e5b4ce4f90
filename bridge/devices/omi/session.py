"""The Omi pendant: what happens on each connection (a session for ``LinkSupervisor``).

On connect, on the same connection (a second one would fight the device's single slot,
omi-device.md §12.1): write the time first (the pendant stamps what it stores with it; with
offline sync, its clock is read just before to measure the drift), learn the ATT MTU (warn
below 100: the firmware then sends nothing), read the codec byte, battery and firmware
revision, then subscribe to audio (and battery / button notifications). Audio goes through a
fresh ``AudioStream`` (new depacketizer and decoder) into the device timeline. With offline
sync, the pendant's stored audio is then fetched beside live audio (``sync.PendantSync``).

Everything except the codec and the audio subscription is best effort: a firmware without
battery notifications or time sync still streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import struct
import time
from typing import Any

from bleak import BleakClient
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.exc import BleakCharacteristicNotFoundError

from bridge.audio.codecs import CODEC_NAMES
from bridge.audio.stream import AudioStream
from bridge.core.errors import UnknownCodecError
from bridge.core.gatt import (
    BATTERY_LEVEL,
    BUTTON_EVENTS,
    FIRMWARE_REVISION,
    OMI_AUDIO_DATA,
    OMI_AUDIO_SERVICE,
    OMI_BUTTON_EVENT,
    OMI_CODEC,
    OMI_MIN_MTU,
    OMI_TIME_SYNC,
)
from bridge.devices.omi.storage import OMI_TIME_READ
from bridge.devices.omi.sync import PendantSync, read_pendant_time
from bridge.link.notify import BatchedNotifications
from bridge.link.supervisor import SessionContext

_LOGGER = logging.getLogger(__name__)


ATT_WRITE_OVERHEAD = 3
"""A write without response carries MTU − 3 bytes (opcode + handle; Bluetooth Core Vol 3 Part F)."""

DEFAULT_ATT_MTU = 23
"""The minimum ATT MTU; bleak reports it when it does not know better (Core Vol 3 Part F §3.2.8)."""

async def acquire_mtu(client: BleakClient, char: BleakGATTCharacteristic | None = None) -> int | None:
    """The negotiated ATT MTU, or None if the backend cannot tell.

    BlueZ ≥ 5.62 exports it as the characteristic's ``MTU`` property, which bleak shows as
    ``max_write_without_response_size + 3``; that costs nothing. Otherwise bleak reports 23 until
    its private ``_acquire_mtu()`` asks BlueZ through AcquireWrite/AcquireNotify (omi-device.md
    §5.2, frame.md); best effort, since it is private API.
    """
    if char is not None:
        mtu = char.max_write_without_response_size + ATT_WRITE_OVERHEAD
        if mtu > DEFAULT_ATT_MTU:
            return mtu
    backend: Any = getattr(client, "_backend", None)
    acquire = getattr(backend, "_acquire_mtu", None)
    if acquire is None:
        return None
    try:
        await acquire()
        return int(client.mtu_size)
    except Exception as exc:
        _LOGGER.debug("MTU not available: %s", exc)
        return None


class OmiSession:
    """One connection to an Omi pendant."""

    SERVICE_UUIDS = (OMI_AUDIO_SERVICE,)
    FILL_QUIET = True
    """Newer firmware may stop notifying during silence while connected (AAD, omi-device.md
    §5.2): the link fills such quiet spells with wall-clock silence (``AudioTimeline.quiet``)."""

    def __init__(self, ctx: SessionContext) -> None:
        self.ctx = ctx
        self.label = ctx.label
        self.stream: AudioStream | None = None
        self.mtu: int | None = None
        self.started_at = time.monotonic()
        self.notifications: BatchedNotifications | None = None
        self._on_button = ctx.extra.get("on_button")
        self._sync: PendantSync | None = ctx.extra.get("offline_sync")
        """The pendant's offline sync (``bridge.devices.omi.sync``), when enabled."""
        self._sync_task: asyncio.Task[Any] | None = None

    @property
    def last_activity(self) -> float | None:
        # Taken on the loop as packets arrive (decoding may run later, on the capture thread).
        return self.notifications.last_packet_at if self.notifications else None

    async def async_start(self, client: BleakClient) -> None:
        stats = self.ctx.stats
        # The time first, before anything else: the pendant stamps what it records after this
        # connection with it (docs/reference/omi-storage.md §6.1, §10 step 2).
        await self._time_sync(client)
        self.mtu = await acquire_mtu(client, client.services.get_characteristic(OMI_AUDIO_DATA))
        if self.mtu is not None and self.mtu < OMI_MIN_MTU:
            _LOGGER.warning("%s ATT MTU is %d; Omi sends no audio below %d", self.label, self.mtu,
                            OMI_MIN_MTU)

        raw = await client.read_gatt_char(OMI_CODEC)
        if not raw:
            raise UnknownCodecError(f"{self.label} returned an empty codec characteristic",
                                    "update the pendant's firmware with the Omi app")
        codec = raw[0]
        stats.codec = codec
        self.stream = AudioStream(codec, self.ctx.timeline, stats, mtu=self.mtu, device=self.label)
        _LOGGER.info("%s codec %d (%s), MTU %s", self.label, codec, CODEC_NAMES[codec], self.mtu)

        await self._extras(client)
        # AcquireNotify read in batches (StartNotify when BlueZ refuses): the idle CPU budget
        # cannot pay for a D-Bus signal or a loop wake-up per notification (notify.py).
        self.notifications = BatchedNotifications(self.label, self._on_batch)
        audio = client.services.get_characteristic(OMI_AUDIO_DATA)
        if audio is None:
            raise BleakCharacteristicNotFoundError(OMI_AUDIO_DATA)
        mode = await self.notifications.async_start(client, audio)
        _LOGGER.debug("%s audio notifications: %s", self.label, mode)
        if self._sync is not None:
            # Beside live audio, which stays subscribed: the firmware drops frames while a
            # central is connected but not subscribed (omi-storage.md §7).
            self._sync_task = asyncio.create_task(
                self._sync.async_sync(client, firmware=stats.firmware, codec=codec, mtu=self.mtu))

    async def _time_sync(self, client: BleakClient) -> None:
        char = client.services.get_characteristic(OMI_TIME_SYNC)
        if char is None:
            return
        pendant: int | None = None
        if self._sync is not None and (reader := client.services.get_characteristic(OMI_TIME_READ)):
            # The pendant's clock just before we set it: its drift since the last sync corrects
            # the stamps of what it stored meanwhile (omi-storage.md §6.1).
            with contextlib.suppress(Exception):
                pendant = read_pendant_time(bytes(await client.read_gatt_char(reader)))
        now = time.time()
        try:
            await client.write_gatt_char(char, struct.pack("<I", int(now)), response=True)
        except Exception as exc:
            _LOGGER.debug("%s time sync: %s", self.label, exc)
            return
        if self._sync is not None:
            self._sync.time_synced(pendant, float(int(now)))

    async def async_stop(self, client: BleakClient) -> None:
        if self._sync is not None:
            await self._sync.async_stop(client)

    async def _extras(self, client: BleakClient) -> None:
        stats = self.ctx.stats
        services = client.services
        if (char := services.get_characteristic(BATTERY_LEVEL)) is not None:
            try:
                # Read before subscribing: BlueZ signals the read value too (bluez-for-tests.md §9.4).
                value = await client.read_gatt_char(char)
                if value:
                    stats.battery = value[0]
                if "notify" in char.properties:
                    await client.start_notify(char, self._on_battery)
            except Exception as exc:
                _LOGGER.debug("%s battery: %s", self.label, exc)
        if (char := services.get_characteristic(FIRMWARE_REVISION)) is not None:
            try:
                stats.firmware = bytes(await client.read_gatt_char(char)).decode(
                    "utf-8", "replace").strip("\x00 ")
            except Exception as exc:
                _LOGGER.debug("%s firmware revision: %s", self.label, exc)
        if (char := services.get_characteristic(OMI_BUTTON_EVENT)) is not None:
            try:
                await client.start_notify(char, self._on_button_event)
            except Exception as exc:
                _LOGGER.debug("%s button: %s", self.label, exc)

    def _on_battery(self, _char: BleakGATTCharacteristic, data: bytearray) -> None:
        if data:
            self.ctx.stats.battery = data[0]

    def _on_button_event(self, _char: BleakGATTCharacteristic, data: bytearray) -> None:
        if len(data) < 4:
            return
        (event,) = struct.unpack_from("<i", data)
        _LOGGER.info("%s button: %s (%d)", self.label, BUTTON_EVENTS.get(event, "unknown"), event)
        if self._on_button is not None:
            try:
                self._on_button(event)
            except Exception:
                _LOGGER.exception("%s button handler failed", self.label)

    def _on_batch(self, packets: list[bytes], at: float) -> None:
        """On the loop: hand the bytes to the capture thread, which decodes them in order."""
        stream = self.stream
        if stream is not None:
            self.ctx.capture.submit(functools.partial(stream.push_batch, packets, at),
                                    packets=len(packets))

    def flush(self) -> None:
        """Hand on notifications still buffered (the link's quiet check calls this first)."""
        if self.notifications is not None:
            self.notifications.flush()

    def connection_lost(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()  # what is durable stays; the rest is read again next time
        if self._sync is not None:
            self._sync.link_down()
        if self.notifications is not None:
            self.notifications.close()  # hands on buffered packets and releases the socket
        if self.stream is not None:
            self.ctx.capture.submit(functools.partial(self.stream.close, time.monotonic()))
