"""The simulated pendant's offline storage: what the firmware records while no central is
connected and how it serves it over BLE (docs/reference/omi-storage.md).

``PendantStorage`` models one of the three generations (§2), chosen by the pendant's firmware
revision like the real thing:

- **ring** (≥ 3.0.20, §3): 444-byte records ``[be32 UTC second][440 B of (u8 len, frame)…]``,
  a frame never split across records and a record closed when the next frame would not fit
  (``used + len + 1 >= 440``); read/write sequence numbers; INFO (31 bytes, or 41 with custody
  v1: caps, version, ring id), READ → READ_BEGIN, DATA, DONE (optionally with a CRC-32),
  ADVANCE (and 0x15 with the ring id), STOP, CLEAR; a full ring overwrites its oldest records
  and counts them in ``dropped_packets``. Nothing is freed by reading (custody rule, §3.7).
- **multi-file** (3.0.17–3.0.19, §4): one file per offline stretch, named by its start stamp;
  440-byte blocks with the firmware's dangling tail; LIST_FILES, READ_FILE, DELETE_FILE.
- **legacy** (< 3.0.17, §5): one growing file, no stamps; READ from an offset, DELETE.

Audio comes in two ways: frames the microphone produces while no central is connected
(``store_frame``, called by ``OmiModel``), and ``record_clip(pcm, spoken_at)`` which encodes a
clip as if the wearer had said it at ``spoken_at`` while away (tests and the demo use it to have
an hour "recorded" in no time). The pendant's clock is ``true time + clock_error`` until a
central writes the time; with ``rtc_valid=False`` stamps are 0 (``invalid_stamp="zero"``) or
``0x80000000 | uptime`` (``"uptime"``), §6.2.

DATA goes out in notifications of ATT_MTU − 4 bytes (§3.6) at ``rate_bytes_per_second``
(about 32 kB/s on a CV1, §8; tests raise it). A full notification socket is waited out, not
dropped, as the firmware's flow control does (§3.6). ``cut_after_bytes`` drops the link once a
transfer has sent that many DATA bytes; ``faults`` injects the bad input the bridge must
survive (see ``FAULTS``).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_LOGGER = logging.getLogger(__name__)

_SUFFIX = "-4301-eabd-2904-2849adfeae43"
STORAGE_SERVICE_UUID = "30295780" + _SUFFIX
STORAGE_DATA_UUID = "30295781" + _SUFFIX
STORAGE_STATUS_UUID = "30295782" + _SUFFIX
"""GATT of the storage service (omi-storage.md §1)."""

RECORD_BYTES = 444
BLOCK_BYTES = 440
"""Record and block sizes (omi-storage.md §3.1, §4, §5)."""
UPTIME_FLAG = 0x8000_0000
ATT_NOTIFY_OVERHEAD = 3
DATA_TAG_BYTES = 1
FILE_HEADER_BYTES = 4
FLOW_CONTROL_WAIT = 0.005
"""A full notification socket is retried after this long (BLE flow control, §3.6)."""

# Ring opcodes, tags and status codes (omi-storage.md §3.3, §3.4).
CMD_STOP = 0x03
CMD_INFO = 0x10
CMD_READ = 0x11
CMD_ADVANCE = 0x12
CMD_CLEAR = 0x13
CMD_ADVANCE_ID = 0x15
TAG_ACK, TAG_INFO, TAG_DATA, TAG_DONE, TAG_READ_BEGIN = 0x01, 0x02, 0x03, 0x04, 0x05
ST_OK, ST_INVALID, ST_NOT_READY, ST_RANGE, ST_RING_ID = 0, 6, 9, 10, 11
CAPS_CUSTODY = 0x01 | 0x04 | 0x08  # APP_ACK_RECLAIM | ADVANCE_IDEMPOTENT | RING_ID (§3.5)

# Multi-file and legacy single-byte answers (omi-storage.md §4, §5).
FILE_ACK, FILE_END, FILE_INVALID, FILE_INDEX_RANGE = 0, 100, 6, 8
LEGACY_READ, LEGACY_DELETE, LEGACY_STOP, LEGACY_END, LEGACY_DELETED = 0, 1, 3, 100, 200

FAULTS = {
    "overrun": "one record holds a frame length running past the record's end",
    "truncate": "the transfer stops short of what READ_BEGIN / the file size promised",
    "unknown_answer": "INFO / LIST_FILES / READ is answered with a tag the protocol lacks",
    "error_status": "READ is answered with ACK 9 (storage not ready); files with 8",
}


def generation_for(firmware: str) -> str:
    """Which generation a firmware revision gets (omi-storage.md §2)."""
    try:
        version = tuple(int(x) for x in firmware.split(".")[:3])
    except ValueError:
        return "ring"
    if version >= (3, 0, 20):
        return "ring"
    if version >= (3, 0, 17):
        return "multi-file"
    return "legacy"


@dataclass
class StorageStats:
    records_written: int = 0
    frames_stored: int = 0
    reads: int = 0
    data_bytes_sent: int = 0
    advances: list[int] = field(default_factory=list)
    deletes: int = 0
    cuts: int = 0
    clears: int = 0


class PendantStorage:
    """One pendant's storage (see the module docstring)."""

    def __init__(self, *, generation: str = "ring", custody: bool = True, done_crc: bool = False,
                 capacity_records: int = 1_100_000, rate_bytes_per_second: float | None = 32_000.0,
                 rtc_valid: bool = True, invalid_stamp: str = "uptime", clock_error: float = 0.0,
                 frame_seconds: float = 0.02, faults: tuple[str, ...] = (),
                 ring_id: int = 0x5EED_0000_0000_0001) -> None:
        self.generation = generation
        self.custody = custody
        self.done_crc = done_crc
        self.capacity = capacity_records
        self.rate = rate_bytes_per_second
        self.rtc_valid = rtc_valid
        self.invalid_stamp = invalid_stamp
        self.clock_error = clock_error
        """Seconds the pendant's clock is off until a central writes the time."""
        self.frame_seconds = frame_seconds
        self.faults = set(faults)
        self.recording = True
        """Store the microphone's frames while no central is connected (False: storage off)."""
        self.ring_id = ring_id
        self.cut_after_bytes: deque[int] = deque()
        """Per transfer, drop the link after this many DATA bytes (consumed one per cut)."""
        self.on_advance: Callable[[int], None] | None = None
        """Called with the new read sequence before an ADVANCE frees anything (tests check that
        the bridge had it on disk by then)."""
        self.stats = StorageStats()
        self.booted_at = time.monotonic()
        # ring
        self.records: deque[bytes] = deque()
        self.read_seq = 0
        self.write_seq = 0
        self.dropped = 0
        # files (multi-file: [stamp, bytearray]; legacy: one file)
        self.files: list[tuple[int, bytearray]] = []
        self._open = bytearray()
        self._open_stamp: int | None = None
        self._ctx: Any = None
        self._task: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[bytes] | None = None
        self._transfer: asyncio.Task[None] | None = None

    # --- the pendant's clock --------------------------------------------------------------
    def stamp_for(self, true_utc: float) -> int:
        """The stamp the firmware writes for a frame spoken at ``true_utc`` (omi-storage.md §6.2)."""
        if self.rtc_valid:
            return int(true_utc + self.clock_error)
        if self.invalid_stamp == "zero":
            return 0
        return UPTIME_FLAG | int(time.monotonic() - self.booted_at - (time.time() - true_utc))

    def pendant_time(self) -> int:
        return int(time.time() + self.clock_error) if self.rtc_valid else 0

    def time_written(self, _epoch: int) -> None:
        self.rtc_valid = True
        self.clock_error = 0.0

    # --- recording --------------------------------------------------------------------------
    def store_frame(self, frame: bytes, true_utc: float) -> None:
        """One encoded frame the firmware could not stream (no central connected)."""
        if not self.recording:
            return
        self.stats.frames_stored += 1
        entry = bytes([len(frame)]) + frame
        if self.generation == "ring":
            if self._open_stamp is not None and len(self._open) + len(entry) >= BLOCK_BYTES:
                self._close_record()
            if self._open_stamp is None:
                self._open_stamp = self.stamp_for(true_utc)
            self._open += entry
            return
        if not self.files or self._open_stamp is None:
            stamp = int(true_utc + self.clock_error) if self.generation == "multi-file" else 0
            if self.generation == "legacy" and self.files:
                self._open_stamp = 0
            else:
                self.files.append((stamp, bytearray()))
                self._open_stamp = stamp
        if len(self._open) + len(entry) > BLOCK_BYTES:
            # transport.c writes the length byte, then flushes the block without clearing its
            # tail: the block ends with a dangling length byte and stale bytes (§4).
            block = self._open + entry[:1]
            stale = self.files[-1][1][-BLOCK_BYTES:] if self.files[-1][1] else b""
            block += bytes(stale[len(block):BLOCK_BYTES]).ljust(BLOCK_BYTES - len(block), b"\x5a")
            self.files[-1][1].extend(block[:BLOCK_BYTES])
            self._open = bytearray()
        self._open += entry

    def _close_record(self) -> None:
        if self._open_stamp is None:
            return
        payload = bytes(self._open)
        if "overrun" in self.faults and self.stats.records_written == 3:
            payload = (payload + bytes([250]))[:BLOCK_BYTES]  # a length running past the record
        rec = struct.pack(">I", self._open_stamp & 0xFFFF_FFFF) + payload.ljust(BLOCK_BYTES, b"\0")
        self.records.append(rec[:RECORD_BYTES])
        self.write_seq += 1
        self.stats.records_written += 1
        if len(self.records) > self.capacity:  # overwrite-oldest (§3.1)
            self.records.popleft()
            self.read_seq += 1
            self.dropped += 1
        self._open = bytearray()
        self._open_stamp = None

    def flush(self) -> None:
        """Commit what the packer holds (the firmware flushes at least every second, §3.1; we do
        it when a central connects so all stored audio can be fetched)."""
        if self.generation == "ring":
            self._close_record()
        elif self._open:
            self.files[-1][1].extend(bytes(self._open).ljust(BLOCK_BYTES, b"\0"))
            self._open = bytearray()
            if self.generation == "multi-file":
                self._open_stamp = None  # the next offline stretch is a new file

    def record_clip(self, pcm: np.ndarray, spoken_at: float, encoder: Any) -> int:
        """Store ``pcm`` (16 kHz int16) as if said at UTC ``spoken_at`` while away; returns frames."""
        fs = round(self.frame_seconds * 16_000)
        n = 0
        recording, self.recording = self.recording, True
        for i in range(0, len(pcm) - fs + 1, fs):
            self.store_frame(encoder.encode(pcm[i:i + fs]), spoken_at + n * self.frame_seconds)
            n += 1
        self.recording = recording
        self.flush()
        return n

    @property
    def unread(self) -> int:
        return self.write_seq - self.read_seq

    @property
    def stored_bytes(self) -> int:
        if self.generation == "ring":
            return self.unread * RECORD_BYTES
        return sum(len(f[1]) for f in self.files)

    # --- GATT -------------------------------------------------------------------------------
    def status_value(self) -> bytes:
        if self.generation == "ring":
            free = max(0, self.capacity - self.unread) * RECORD_BYTES
            return struct.pack("<4I", self.unread * RECORD_BYTES, self.unread, free, int(self.rtc_valid))
        if self.generation == "multi-file":
            return struct.pack("<4I", self.stored_bytes, len(self.files), 0, 0)
        size = len(self.files[0][1]) if self.files else 0
        return struct.pack("<II", size, 0)

    def attach(self, ctx: Any) -> None:
        """A central connected: serve commands on this connection."""
        self.flush()
        self._ctx = ctx
        self._queue = asyncio.Queue(maxsize=8)  # commands queue 8 deep (§3.3)
        self._task = asyncio.get_running_loop().create_task(self._worker(ctx, self._queue))

    def detach(self) -> None:
        """The link is gone: an in-flight transfer is abandoned, nothing freed (§3.6)."""
        self._ctx = None
        for task in (self._task, self._transfer):
            if task is not None:
                task.cancel()
        self._task = self._transfer = None

    def on_write(self, data: bytes) -> None:
        if self._queue is None:
            return
        if data[:1] == bytes([CMD_STOP]) and self.generation == "ring" and self._transfer is not None:
            self._transfer.cancel()  # STOP acts at once from the write handler (§3.3)
        try:
            self._queue.put_nowait(bytes(data))
        except asyncio.QueueFull:
            _LOGGER.info("sim storage: command queue full; dropped")

    async def _worker(self, ctx: Any, queue: asyncio.Queue[bytes]) -> None:
        while True:
            cmd = await queue.get()
            try:
                if self.generation == "ring":
                    await self._ring_command(ctx, cmd)
                elif self.generation == "multi-file":
                    await self._file_command(ctx, cmd)
                else:
                    await self._legacy_command(ctx, cmd)
            except asyncio.CancelledError:
                raise
            except Exception:
                _LOGGER.exception("sim storage: command %s failed", cmd.hex())

    async def _send(self, ctx: Any, data: bytes) -> bool:
        """Notify with flow control: wait while the socket is full, give up when unsubscribed."""
        while True:
            if await ctx.notify(STORAGE_DATA_UUID, data):
                return True
            if not ctx.connected or not ctx.is_notifying(STORAGE_DATA_UUID):
                return False
            await asyncio.sleep(FLOW_CONTROL_WAIT)

    # --- ring (§3) --------------------------------------------------------------------------
    async def _ring_command(self, ctx: Any, cmd: bytes) -> None:
        op = cmd[0]
        if op == CMD_INFO:
            if "unknown_answer" in self.faults:
                await self._send(ctx, bytes([0x7F, 0, 0]))
                return
            info = struct.pack(">BQQIQH", TAG_INFO, self.read_seq, self.write_seq, self.capacity,
                               self.dropped, RECORD_BYTES)
            if self.custody:
                info += struct.pack(">BBQ", CAPS_CUSTODY, 1, self.ring_id)
            await self._send(ctx, info)
        elif op == CMD_READ and len(cmd) in (9, 13):
            if "error_status" in self.faults:
                await self._send(ctx, bytes([TAG_ACK, ST_NOT_READY]))
                return
            start = struct.unpack_from(">Q", cmd, 1)[0]
            count = struct.unpack_from(">I", cmd, 9)[0] if len(cmd) == 13 else 0
            if not self.read_seq <= start <= self.write_seq:
                await self._send(ctx, bytes([TAG_ACK, ST_RANGE]))
                return
            if self._transfer is not None and not self._transfer.done():
                await self._send(ctx, bytes([TAG_ACK, ST_NOT_READY]))
                return
            available = self.write_seq - start
            count = available if count == 0 else min(count, available)
            self.stats.reads += 1
            self._transfer = asyncio.get_running_loop().create_task(
                self._ring_transfer(ctx, start, count))
        elif op == CMD_ADVANCE and len(cmd) == 9:
            await self._advance(ctx, struct.unpack_from(">Q", cmd, 1)[0])
        elif op == CMD_ADVANCE_ID and len(cmd) == 17 and self.custody:
            ring_id, seq = struct.unpack_from(">QQ", cmd, 1)
            if ring_id != self.ring_id:
                await self._send(ctx, bytes([TAG_ACK, ST_RING_ID]))
            else:
                await self._advance(ctx, seq)
        elif op == CMD_CLEAR:
            self.stats.clears += 1
            self.records.clear()
            self.read_seq = self.write_seq = self.dropped = 0
            self.ring_id += 1
            await self._send(ctx, bytes([TAG_ACK, ST_OK]))
        elif op == CMD_STOP:
            await self._send(ctx, bytes([TAG_ACK, ST_OK]))
        else:
            await self._send(ctx, bytes([TAG_ACK, ST_INVALID]))

    async def _advance(self, ctx: Any, seq: int) -> None:
        if seq <= self.read_seq and self.custody:
            await self._send(ctx, bytes([TAG_ACK, ST_OK]))  # ADVANCE_IDEMPOTENT (§3.5)
            return
        if not self.read_seq <= seq <= self.write_seq:
            await self._send(ctx, bytes([TAG_ACK, ST_RANGE]))
            return
        if self.on_advance is not None:
            self.on_advance(seq)
        self.stats.advances.append(seq)
        while self.read_seq < seq:
            self.records.popleft()
            self.read_seq += 1
        await self._send(ctx, bytes([TAG_ACK, ST_OK]))

    async def _ring_transfer(self, ctx: Any, start: int, count: int) -> None:
        await self._send(ctx, struct.pack(">BQI", TAG_READ_BEGIN, start, count))
        first = start - self.read_seq
        data = b"".join(self.records[first + i] for i in range(count))
        if "truncate" in self.faults:
            data = data[:len(data) // 2 + 100]
        sent = await self._stream(ctx, data, lambda chunk: bytes([TAG_DATA]) + chunk,
                                  ctx.mtu - ATT_NOTIFY_OVERHEAD - DATA_TAG_BYTES)
        if sent is None:
            return
        done = struct.pack(">BBQ", TAG_DONE, ST_OK, start + count)
        if self.done_crc:
            done += struct.pack(">I", zlib.crc32(data) & 0xFFFF_FFFF)
        await self._send(ctx, done)

    async def _stream(self, ctx: Any, data: bytes, wrap: Callable[[bytes], bytes],
                      size: int) -> int | None:
        """Send ``data`` in ``size``-byte pieces at the configured rate; None when cut."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sent = 0
        cut = self.cut_after_bytes.popleft() if self.cut_after_bytes else None
        for i in range(0, len(data), size):
            piece = data[i:i + size]
            if cut is not None and sent + len(piece) > cut:
                self.stats.cuts += 1
                _LOGGER.info("sim storage: cutting the link after %d bytes", sent)
                ctx.drop_link()
                return None
            if not await self._send(ctx, wrap(piece)):
                return None
            sent += len(piece)
            self.stats.data_bytes_sent += len(piece)
            if self.rate:
                delay = t0 + sent / self.rate - loop.time()
                if delay > 0.002:
                    await asyncio.sleep(delay)
            elif sent % (size * 32) < size:
                await asyncio.sleep(0)
        return sent

    # --- multi-file (§4) ---------------------------------------------------------------------
    async def _file_command(self, ctx: Any, cmd: bytes) -> None:
        op = cmd[0]
        if op == 0x10:
            if "unknown_answer" in self.faults:
                await self._send(ctx, bytes([0xFF]))
                return
            body = bytes([len(self.files)]) + b"".join(struct.pack(">II", s, len(d)) for s, d in self.files)
            await self._send(ctx, body)
        elif op == 0x11 and len(cmd) in (2, 6):
            idx = cmd[1]
            offset = struct.unpack_from(">I", cmd, 2)[0] if len(cmd) == 6 else 0
            if idx >= len(self.files):
                await self._send(ctx, bytes([FILE_INDEX_RANGE]))
                return
            if "error_status" in self.faults:
                await self._send(ctx, bytes([FILE_INDEX_RANGE]))
                return
            await self._send(ctx, bytes([FILE_ACK]))
            stamp, data = self.files[idx]
            body = bytes(data[offset:])
            if "truncate" in self.faults:
                body = body[:len(body) // 2]
            header = struct.pack(">I", stamp)
            self.stats.reads += 1
            size = min(ctx.mtu - 7, BLOCK_BYTES)
            self._transfer = asyncio.get_running_loop().create_task(
                self._file_transfer(ctx, body, header, size))
        elif op == 0x12 and len(cmd) == 2:
            idx = cmd[1]
            if idx < len(self.files):
                del self.files[idx]
                self.stats.deletes += 1
                await self._send(ctx, bytes([FILE_ACK]))
            else:
                await self._send(ctx, bytes([FILE_INDEX_RANGE]))
        elif op == CMD_STOP:
            if self._transfer is not None:
                self._transfer.cancel()
        else:
            await self._send(ctx, bytes([FILE_INVALID]))

    async def _file_transfer(self, ctx: Any, body: bytes, header: bytes, size: int) -> None:
        if await self._stream(ctx, body, lambda chunk: header + chunk, size) is not None:
            await self._send(ctx, bytes([FILE_END]))

    # --- legacy (§5) ---------------------------------------------------------------------------
    async def _legacy_command(self, ctx: Any, cmd: bytes) -> None:
        if len(cmd) not in (2, 6):
            await self._send(ctx, bytes([FILE_INVALID]))
            return
        op = cmd[0]
        offset = struct.unpack_from(">I", cmd, 2)[0] if len(cmd) == 6 else 0
        data = self.files[0][1] if self.files else bytearray()
        if op == LEGACY_READ:
            if not data:
                await self._send(ctx, bytes([4]))
                return
            if offset >= len(data):
                await self._send(ctx, bytes([3]))
                return
            await self._send(ctx, bytes([0]))
            body = bytes(data[offset - offset % BLOCK_BYTES:])
            if "truncate" in self.faults:
                body = body[:len(body) // 2]
            self.stats.reads += 1
            size = min(BLOCK_BYTES, ctx.mtu - ATT_NOTIFY_OVERHEAD)
            self._transfer = asyncio.get_running_loop().create_task(
                self._legacy_transfer(ctx, body, size))
        elif op == LEGACY_DELETE:
            await self._send(ctx, bytes([0]))
            if self.on_advance is not None:
                self.on_advance(len(data))
            self.files.clear()
            self._open_stamp = None
            self.stats.deletes += 1
            await self._send(ctx, bytes([LEGACY_DELETED]))
        elif op == LEGACY_STOP:
            if self._transfer is not None:
                self._transfer.cancel()
            await self._send(ctx, bytes([0]))
        else:
            await self._send(ctx, bytes([FILE_INVALID]))

    async def _legacy_transfer(self, ctx: Any, body: bytes, size: int) -> None:
        if await self._stream(ctx, body, lambda chunk: chunk, size) is not None:
            await self._send(ctx, bytes([LEGACY_END]))
