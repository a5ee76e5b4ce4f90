"""A simulated Omi pendant (CV1 / DevKit) for the fake BlueZ.

Everything it does on the air follows omi-device.md: the GATT table (§2), the codec byte (§3),
Opus with the firmware's encoder settings (§4), the notification framing of ``transport.c``
``push_to_gatt()`` (§5.1) and when the firmware sends at all (§5.2). On top, seeded fault
injection (loss in the air, duplicates, link drops, out-of-range periods) and ground truth for
tests (how much audio the device produced, and when).

**Fragmentation (our reading of §5.1).** The firmware slices one encoded frame into pieces and
prefixes each with ``[idx_lo][idx_hi][sub]``. An ATT notification carries at most ``mtu − 3``
bytes, so the largest slice that fits is ``mtu − 3 − 3``; that is what we send by default, so
every notification is deliverable. The reference notes the firmware's arithmetic may slice at
``mtu − 3`` (3 bytes too long with the header); ``firmware_overflow=True`` reproduces that:
such notifications fail to send and the frame is lost (its index consumed), as inferred in §5.1.

**Index.** One uint16 per *notification* (fragments included), wrapping 65535→0, never reset
on reconnect (``start_index`` sets where it starts, e.g. 65500 to test the wrap). A frame "lost
in the air" consumes its index but never reaches the host, so the host sees a gap — the same as
a real over-the-air loss. A frame the firmware drops itself (not connected, not subscribed, MTU
too small) consumes no index.

**Clock.** The microphone runs from ``start()`` whether or not a central is connected: frame
``n`` is complete at ``clock_start + (n + 1) · frame_seconds`` on the loop's monotonic clock, so
after a reconnect the stream resumes at the current position (frames in between went to the SD
card and are never replayed, §5.2, §9).
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bridge.core.pcm import SAMPLE_RATE
from omi_bridge_sim.model import (
    ATT_INVALID_ATTRIBUTE_VALUE_LENGTH,
    AttError,
    CharacteristicSpec,
    DeviceContext,
    DeviceModel,
    ServiceSpec,
    full_uuid,
)
from omi_bridge_sim.omi_storage import (
    STORAGE_DATA_UUID,
    STORAGE_SERVICE_UUID,
    STORAGE_STATUS_UUID,
    PendantStorage,
)

_LOGGER = logging.getLogger(__name__)


def _omi(short: str) -> str:
    """Omi vendor UUIDs share one suffix (omi-device.md §2)."""
    return f"{short}-e8f2-537e-4f6c-d104768a1214"


# GATT table (omi-device.md §2, firmware transport.c / button_service.c / features.h).
AUDIO_SERVICE_UUID = _omi("19b10000")
AUDIO_DATA_UUID = _omi("19b10001")
CODEC_TYPE_UUID = _omi("19b10002")
FEATURES_SERVICE_UUID = _omi("19b10020")
FEATURES_UUID = _omi("19b10021")
TIME_SYNC_SERVICE_UUID = _omi("19b10030")
TIME_SYNC_WRITE_UUID = _omi("19b10031")
TIME_SYNC_READ_UUID = _omi("19b10032")
BATTERY_SERVICE_UUID = full_uuid("180f")
BATTERY_LEVEL_UUID = full_uuid("2a19")
DIS_SERVICE_UUID = full_uuid("180a")
DIS_MODEL_UUID = full_uuid("2a24")
DIS_SERIAL_UUID = full_uuid("2a25")
DIS_FIRMWARE_UUID = full_uuid("2a26")
DIS_HARDWARE_UUID = full_uuid("2a27")
DIS_MANUFACTURER_UUID = full_uuid("2a29")
BUTTON_SERVICE_UUID = "23ba7924-0000-1000-7450-346eac492e92"
BUTTON_EVENT_UUID = "23ba7925-0000-1000-7450-346eac492e92"

# Button events: first int32 of the button value (omi-device.md §8, firmware button.c).
BUTTON_SINGLE_TAP = 1
BUTTON_DOUBLE_TAP = 2
BUTTON_LONG_PRESS = 3
BUTTON_PRESS = 4
BUTTON_RELEASE = 5

# Features bitmask bits (omi-device.md §7, firmware features.h). CV1: button, battery, LED
# dimming and mic gain (the last two always set).
FEATURE_BUTTON = 1 << 2
FEATURE_BATTERY = 1 << 3
FEATURE_LED_DIMMING = 1 << 7
FEATURE_MIC_GAIN = 1 << 8
FEATURE_OFFLINE_STORAGE = 1 << 6  # features.h; omi-storage.md §1
CV1_FEATURES = FEATURE_BUTTON | FEATURE_BATTERY | FEATURE_LED_DIMMING | FEATURE_MIC_GAIN

# Codec ids, byte 0 of 19B10002 (omi-device.md §3).
CODEC_PCM16_16K = 0
CODEC_PCM16_8K = 1
CODEC_MULAW_16K = 10
CODEC_MULAW_8K = 11
CODEC_OPUS_10MS = 20  # DevKit firmware config.h: CODEC_ID 20, CODEC_PACKAGE_SAMPLES 160
CODEC_OPUS_20MS = 21  # CV1 firmware config.h: CODEC_ID 21, CODEC_PACKAGE_SAMPLES 160*2

HEADER_BYTES = 3  # [idx_lo][idx_hi][sub] (omi-device.md §5.1)
ATT_NOTIFY_OVERHEAD = 3  # opcode + handle: a notification carries at most MTU − 3 bytes
INDEX_MODULO = 1 << 16  # uint16 index wraps 65535 → 0 (omi-device.md §5.1)
MIN_AUDIO_MTU = 100  # firmware MINIMAL_PACKET_SIZE: no audio below this ATT MTU (§5.2)

# Opus encoder settings of the firmware (omi-device.md §4, codec.c / config.h).
OPUS_BITRATE = 32_000
OPUS_COMPLEXITY = 3
OPUS_LSB_DEPTH = 16

# Frames kept in OmiModel.frame_log: 10 minutes at 100 frames/s, bounded for long demos.
FRAME_LOG_LIMIT = 60_000


@dataclass(frozen=True)
class CodecSpec:
    """How the simulated firmware turns microphone samples into one frame."""

    frame_samples_16k: int
    """Microphone samples (16 kHz) per frame: the frame's duration."""
    kind: str
    """"opus", "pcm16" or "mulaw"."""
    rate: int
    """Sample rate on the wire."""


# PCM and µ-law frames are 10 ms: the reference gives no frame size for them (the ids come from
# Protocol.mdx, §3); 10 ms matches the DevKit's packaging and keeps fragments few.
CODECS: dict[int, CodecSpec] = {
    CODEC_OPUS_20MS: CodecSpec(320, "opus", 16_000),
    CODEC_OPUS_10MS: CodecSpec(160, "opus", 16_000),
    CODEC_PCM16_16K: CodecSpec(160, "pcm16", 16_000),
    CODEC_PCM16_8K: CodecSpec(160, "pcm16", 8_000),
    CODEC_MULAW_16K: CodecSpec(160, "mulaw", 16_000),
    CODEC_MULAW_8K: CodecSpec(160, "mulaw", 8_000),
}


def opus_encoder(frame_samples: int) -> Any:
    """An opuslib encoder configured exactly like the firmware (omi-device.md §4)."""
    import opuslib
    import opuslib.api.ctl as ctl
    import opuslib.api.encoder as api

    enc = opuslib.Encoder(SAMPLE_RATE, 1, opuslib.APPLICATION_RESTRICTED_LOWDELAY)
    # Straight ctl calls: some opuslib 3.0.1 property setters drop the value (inband_fec).
    for request, value in (
        (ctl.set_bitrate, OPUS_BITRATE),
        (ctl.set_vbr, 1),
        (ctl.set_vbr_constraint, 0),
        (ctl.set_complexity, OPUS_COMPLEXITY),
        (ctl.set_signal, opuslib.SIGNAL_VOICE),
        (ctl.set_lsb_depth, OPUS_LSB_DEPTH),
        (ctl.set_dtx, 0),
        (ctl.set_inband_fec, 0),
        (ctl.set_packet_loss_perc, 0),
    ):
        api.encoder_ctl(enc.encoder_state, request, value)
    return enc


def _ulaw_encode(x: np.ndarray) -> bytes:
    """G.711 µ-law on the 14-bit magnitude, as the ITU-T reference (and Python's audioop) does:
    bias 33, clip 8159, 8 segments; negative samples floor before taking the magnitude."""
    v = x.astype(np.int32) >> 2
    mask = np.where(v < 0, 0x7F, 0xFF)
    v = np.minimum(np.abs(v), 8159) + 33
    seg = np.searchsorted(np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]), v)
    u = np.where(seg >= 8, 0x7F, (seg << 4) | ((v >> (seg + 1)) & 0x0F))
    return ((u ^ mask) & 0xFF).astype(np.uint8).tobytes()


class FrameEncoder:
    """Microphone frames (int16, 16 kHz) → the firmware's encoded frame bytes for one codec."""

    def __init__(self, codec: int) -> None:
        # Unknown codec bytes (tests of the driver's error) still stream Opus 20 ms on the wire.
        self.spec = CODECS.get(codec, CODECS[CODEC_OPUS_20MS])
        self._enc = opus_encoder(self.spec.frame_samples_16k) if self.spec.kind == "opus" else None
        # CODEC_OUTPUT_MAX_BYTES = samples / 2 (firmware config.h, omi-device.md §4).
        self._max_bytes = self.spec.frame_samples_16k // 2

    def encode(self, pcm: np.ndarray) -> bytes:
        if self.spec.rate == 8_000:
            pcm = _decimate(pcm)
        if self.spec.kind == "opus":
            import opuslib.api.encoder as api

            buf = np.ascontiguousarray(pcm, dtype="<i2").tobytes()
            return bytes(api.encode(self._enc.encoder_state, buf, len(pcm), self._max_bytes))
        if self.spec.kind == "pcm16":
            return np.ascontiguousarray(pcm, dtype="<i2").tobytes()
        return _ulaw_encode(pcm)


def _decimate(pcm: np.ndarray) -> np.ndarray:
    """16 → 8 kHz by averaging pairs: a crude anti-alias filter, enough for a simulator."""
    x = pcm.astype(np.int32)
    return ((x[0::2] + x[1::2]) // 2).astype(np.int16)


def fragment(frame: bytes, mtu: int, *, firmware_overflow: bool = False) -> list[bytes]:
    """Slices of one encoded frame, each to be prefixed with its 3-byte header."""
    size = mtu - ATT_NOTIFY_OVERHEAD - (0 if firmware_overflow else HEADER_BYTES)
    size = max(1, size)
    return [frame[i:i + size] for i in range(0, len(frame), size)] or [b""]


@dataclass
class OmiStats:
    frames_produced: int = 0
    """Frames the microphone produced since ``start()`` (connected or not)."""
    frames_sent: int = 0
    """Frames whose every fragment reached the host."""
    frames_lost_in_air: int = 0
    """Frames with at least one fragment lost in the air (host sees an index gap)."""
    frames_offline: int = 0
    """Frames produced while no central was connected (to the SD card, never replayed)."""
    frames_held: int = 0
    """Frames the clip waited while no central was subscribed (``hold_while_unsubscribed``)."""
    frames_paused: int = 0
    """Frames not produced while the microphone was paused (``pause_notifications``)."""
    frames_unsubscribed: int = 0
    """Frames discarded while connected but not subscribed, or MTU below 100 (§5.2)."""
    notifications_sent: int = 0
    notifications_lost: int = 0
    duplicates: int = 0
    """Notifications sent twice."""
    connects: int = 0
    disconnects: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class OmiModel(DeviceModel):
    """The Omi pendant. ``audio``: int16 16 kHz mono (default: the bundled demo clip)."""

    address: str = "C0:FF:EE:00:00:01"
    name: str | None = "Omi"
    codec: int = CODEC_OPUS_20MS
    audio: np.ndarray | None = None
    after_clip: str = "silence"
    """At the end of ``audio``: "silence" (keep sending encoded digital silence), "loop" or
    "stop" (the microphone stops producing frames)."""
    start_index: int = 0
    min_mtu: int = MIN_AUDIO_MTU
    """The firmware sends no audio below ATT MTU 100; lower it to test fragmentation at a tiny MTU."""
    firmware_overflow: bool = False
    loss: float = 0.0
    """Probability that a notification is lost in the air (index consumed, never delivered)."""
    duplicate: float = 0.0
    """Probability that a delivered notification arrives twice."""
    seed: int = 0
    link_drop_at: Sequence[float] = ()
    """Seconds after ``start()`` at which the link is lost."""
    out_of_range: Sequence[tuple[float, float]] = ()
    """[t0, t1) periods (seconds after ``start()``) out of range: link lost, no advertising."""
    pause_notifications: Sequence[tuple[float, float]] = ()
    """[t0, t1) periods (seconds after ``start()``) in which the firmware pauses the microphone on
    silence while staying connected (AAD, omi-device.md §5.2): no frames, no notifications, no
    index consumed; the link and the subscription stay up."""
    hold_while_unsubscribed: bool = False
    """The clip advances only while a central is subscribed to audio: a wearer who waits for the
    bridge, so every word reaches one (restart tests). Frames meanwhile are "held"."""
    battery: int = 87
    battery_drain_s: float | None = None
    """Seconds per 1 % battery drop (None: constant level)."""
    firmware: str = "3.0.9"  # omi.conf snapshot (omi-device.md §7)
    model_number: str = "Omi CV 1"
    manufacturer: str = "Based Hardware"
    hardware: str = "5.0"
    serial: str = "SIM0001"
    features: int = CV1_FEATURES
    storage: PendantStorage | None = None
    """Offline storage (``omi_bridge_sim.omi_storage``): with it the pendant has the storage
    service and keeps what it records while no central is connected; None: a build without
    offline storage (omi-storage.md §1)."""
    frame_log: deque[tuple[int, float, int | None, str]] = field(
        default_factory=lambda: deque(maxlen=FRAME_LOG_LIMIT), repr=False)
    """Per produced frame: (frame number, due time on the loop clock, first index or None,
    status: "sent", "lost", "offline", "unsubscribed", "paused"); the most recent FRAME_LOG_LIMIT."""

    def __post_init__(self) -> None:
        if not self.advertised_uuids:
            self.advertised_uuids = [AUDIO_SERVICE_UUID]
        if not self.services:
            self.services = self._gatt_table()
        super().__post_init__()
        if self.audio is None:
            from omi_bridge_sim.audio import demo_speech_path, load_pcm16k

            self.audio = load_pcm16k(demo_speech_path())
        self.audio = np.ascontiguousarray(self.audio, dtype=np.int16)
        self.stats = OmiStats()
        self.time_writes: list[int] = []
        """Epoch seconds written to 19B10031 by the central (one per connect, like the app)."""
        self.button_events: list[int] = []
        self._time_set_at: tuple[int, float] | None = None
        self._rng = random.Random(self.seed)
        self._index = self.start_index % INDEX_MODULO
        self._encoder = FrameEncoder(self.codec)
        self._tasks: list[asyncio.Task[Any]] = []
        self._timers: list[asyncio.TimerHandle] = []
        self.clock_start: float | None = None
        """Loop time (monotonic) at which the microphone started."""

    # --- GATT ----------------------------------------------------------------------------------
    def _gatt_table(self) -> list[ServiceSpec]:
        c = CharacteristicSpec
        return [
            ServiceSpec(AUDIO_SERVICE_UUID, (
                c(AUDIO_DATA_UUID, ("read", "notify")),
                c(CODEC_TYPE_UUID, ("read",), bytes([self.codec & 0xFF])),
            )),
            ServiceSpec(BATTERY_SERVICE_UUID, (
                c(BATTERY_LEVEL_UUID, ("read", "notify"), bytes([self.battery])),
            )),
            ServiceSpec(DIS_SERVICE_UUID, (
                c(DIS_MODEL_UUID, ("read",), self.model_number.encode()),
                c(DIS_SERIAL_UUID, ("read",), self.serial.encode()),
                c(DIS_FIRMWARE_UUID, ("read",), self.firmware.encode()),
                c(DIS_HARDWARE_UUID, ("read",), self.hardware.encode()),
                c(DIS_MANUFACTURER_UUID, ("read",), self.manufacturer.encode()),
            )),
            ServiceSpec(BUTTON_SERVICE_UUID, (
                c(BUTTON_EVENT_UUID, ("read", "notify"), bytes(8)),
            )),
            ServiceSpec(TIME_SYNC_SERVICE_UUID, (
                c(TIME_SYNC_WRITE_UUID, ("write",)),
                c(TIME_SYNC_READ_UUID, ("read",), bytes(4)),
            )),
            ServiceSpec(FEATURES_SERVICE_UUID, (
                c(FEATURES_UUID, ("read",), struct.pack(
                    "<I", self.features | (FEATURE_OFFLINE_STORAGE if self.storage else 0))),
            )),
        ] + ([ServiceSpec(STORAGE_SERVICE_UUID, (
            c(STORAGE_DATA_UUID, ("write", "notify")),
            c(STORAGE_STATUS_UUID, ("read", "notify")),
        ))] if self.storage is not None else [])

    # --- derived facts for tests ---------------------------------------------------------------
    @property
    def frame_samples(self) -> int:
        """16 kHz samples per frame (320 for codec 21, 160 otherwise)."""
        return self._encoder.spec.frame_samples_16k

    @property
    def frame_seconds(self) -> float:
        return self.frame_samples / SAMPLE_RATE

    @property
    def next_index(self) -> int:
        return self._index

    def samples_produced_between(self, t0: float, t1: float) -> int:
        """Ground truth: 16 kHz samples the microphone completed in (t0, t1] (loop clock)."""
        if self.clock_start is None or t1 <= t0:
            return 0

        def completed(t: float) -> int:
            return max(0, int((t - self.clock_start) / self.frame_seconds + 1e-9))  # type: ignore[operator]

        return (completed(t1) - completed(t0)) * self.frame_samples

    def frame_audio(self, n: int) -> np.ndarray | None:
        """Microphone samples of frame ``n`` (None once the clip ended with after_clip="stop")."""
        assert self.audio is not None
        fs = self.frame_samples
        total = len(self.audio)
        start = n * fs
        if self.after_clip == "loop" and total:
            idx = (np.arange(start, start + fs) % total)
            return self.audio[idx]
        if start >= total:
            return None if self.after_clip == "stop" else np.zeros(fs, dtype=np.int16)
        out = self.audio[start:start + fs]
        if len(out) < fs:
            out = np.concatenate([out, np.zeros(fs - len(out), dtype=np.int16)])
        return out

    def stats_dict(self) -> dict[str, Any]:
        return {**self.stats.as_dict(), "codec": self.codec, "next_index": self._index,
                "battery": self.battery, "time_writes": list(self.time_writes),
                "frame_samples": self.frame_samples}

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.clock_start = loop.time()
        self._tasks.append(loop.create_task(self._microphone()))
        if self.battery_drain_s:
            self._tasks.append(loop.create_task(self._drain_battery()))
        for t in self.link_drop_at:
            self._timers.append(loop.call_at(self.clock_start + t, self._drop))
        for t0, t1 in self.out_of_range:
            self._timers.append(loop.call_at(self.clock_start + t0, self._range, False))
            self._timers.append(loop.call_at(self.clock_start + t1, self._range, True))

    async def stop(self) -> None:
        for h in self._timers:
            h.cancel()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
            except Exception:
                _LOGGER.exception("sim omi %s: task failed", self.address)
        self._tasks.clear()

    def _drop(self) -> None:
        if self.ctx is not None:
            _LOGGER.info("sim omi %s: scripted link drop", self.address)
            self.ctx.drop_link()

    def _range(self, in_range: bool) -> None:
        if self.ctx is not None:
            _LOGGER.info("sim omi %s: %s range", self.address, "back in" if in_range else "out of")
            self.ctx.set_in_range(in_range)

    # --- hooks ---------------------------------------------------------------------------------
    def on_connect(self, ctx: DeviceContext) -> None:
        self.stats.connects += 1
        if self.storage is not None:
            self.storage.attach(ctx)

    def on_disconnect(self) -> None:
        self.stats.disconnects += 1
        if self.storage is not None:
            self.storage.detach()

    def on_read(self, char_uuid: str) -> bytes:
        u = full_uuid(char_uuid)
        if u == AUDIO_DATA_UUID:
            return b""  # audio only arrives as notifications (omi-device.md §2)
        if u == TIME_SYNC_READ_UUID:
            if self.storage is not None:
                return struct.pack("<I", self.storage.pendant_time())
            return struct.pack("<I", self._device_time())
        if u == STORAGE_STATUS_UUID and self.storage is not None:
            return self.storage.status_value()
        return self.values.get(u, b"")

    def on_write(self, char_uuid: str, data: bytes, with_response: bool) -> None:
        u = full_uuid(char_uuid)
        if u == TIME_SYNC_WRITE_UUID:
            # Exactly 4 bytes, uint32 LE epoch seconds; other lengths rejected (§2, §7).
            if len(data) != 4:
                raise AttError(ATT_INVALID_ATTRIBUTE_VALUE_LENGTH, "time must be 4 bytes")
            (epoch,) = struct.unpack("<I", data)
            self.time_writes.append(epoch)
            self._time_set_at = (epoch, time.monotonic())
            if self.storage is not None:
                self.storage.time_written(epoch)
            return
        if u == STORAGE_DATA_UUID and self.storage is not None:
            self.storage.on_write(bytes(data))
            return
        self.values[u] = bytes(data)

    def _device_time(self) -> int:
        if self._time_set_at is None:
            return 0
        epoch, at = self._time_set_at
        return int(epoch + time.monotonic() - at)

    # --- button and battery --------------------------------------------------------------------
    async def press(self, event: int = BUTTON_SINGLE_TAP) -> bool:
        """A button event; 8 bytes = event int32 LE + int32 0 (omi-device.md §8)."""
        value = struct.pack("<ii", event, 0)
        self.values[BUTTON_EVENT_UUID] = value
        self.button_events.append(event)
        if self.ctx is not None and self.ctx.is_notifying(BUTTON_EVENT_UUID):
            return await self.ctx.notify(BUTTON_EVENT_UUID, value)
        return False

    async def set_battery(self, percent: int) -> None:
        self.battery = max(0, min(100, percent))
        value = bytes([self.battery])
        self.values[BATTERY_LEVEL_UUID] = value
        if self.ctx is not None and self.ctx.is_notifying(BATTERY_LEVEL_UUID):
            await self.ctx.notify(BATTERY_LEVEL_UUID, value)

    async def _drain_battery(self) -> None:
        assert self.battery_drain_s
        while True:
            await asyncio.sleep(self.battery_drain_s)
            await self.set_battery(self.battery - 1)

    # --- audio ---------------------------------------------------------------------------------
    async def _microphone(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.clock_start is not None
        n = 0
        clip = 0  # frame of the clip to play next; only differs from n with hold_while_unsubscribed
        while True:
            due = self.clock_start + (n + 1) * self.frame_seconds
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.hold_while_unsubscribed:
                ctx = self.ctx
                if ctx is None or not ctx.connected or not ctx.is_notifying(AUDIO_DATA_UUID):
                    self.stats.frames_held += 1
                    self.frame_log.append((n, due, None, "held"))
                    n += 1
                    continue
                pcm = self.frame_audio(clip)
                clip += 1
            else:
                pcm = self.frame_audio(n)
            if pcm is None:
                return  # after_clip="stop": the microphone is done
            if self._paused(due - self.clock_start):
                self.stats.frames_paused += 1
                self.frame_log.append((n, due, None, "paused"))
                n += 1
                continue
            # Encode every frame, connected or not: the firmware's encoder runs continuously,
            # so its state after a reconnect is what the real device's would be.
            frame = self._encoder.encode(pcm)
            self.stats.frames_produced += 1
            first, status = await self._push(frame)
            self.frame_log.append((n, due, first, status))
            n += 1

    def _paused(self, t: float) -> bool:
        return any(t0 <= t < t1 for t0, t1 in self.pause_notifications)

    async def _push(self, frame: bytes) -> tuple[int | None, str]:
        """transport.c push_to_gatt(): header + slice per notification (§5.1, §5.2)."""
        ctx = self.ctx
        if ctx is None or not ctx.connected:
            self.stats.frames_offline += 1
            if self.storage is not None:
                self.storage.store_frame(frame, time.time() - self.frame_seconds)
            return None, "offline"
        if ctx.mtu < self.min_mtu or not ctx.is_notifying(AUDIO_DATA_UUID):
            self.stats.frames_unsubscribed += 1
            return None, "unsubscribed"
        first = self._index
        lost = False
        for sub, piece in enumerate(fragment(frame, ctx.mtu, firmware_overflow=self.firmware_overflow)):
            idx = self._index
            self._index = (idx + 1) % INDEX_MODULO
            packet = struct.pack("<HB", idx, sub & 0xFF) + piece
            too_long = len(packet) > ctx.mtu - ATT_NOTIFY_OVERHEAD
            if too_long or (self.loss and self._rng.random() < self.loss):
                self.stats.notifications_lost += 1
                lost = True
                continue
            if not await ctx.notify(AUDIO_DATA_UUID, packet):
                lost = True
                continue
            self.stats.notifications_sent += 1
            if self.duplicate and self._rng.random() < self.duplicate:
                await ctx.notify(AUDIO_DATA_UUID, packet)
                self.stats.duplicates += 1
        if lost:
            self.stats.frames_lost_in_air += 1
            return first, "lost"
        self.stats.frames_sent += 1
        return first, "sent"

