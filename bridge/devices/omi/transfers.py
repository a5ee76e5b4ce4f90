"""Reading a pendant's storage, one function per firmware generation's protocol: the ring
(>= 3.0.20, omi-storage.md §3), multi-file (3.0.17–3.0.19, §4) and the legacy single file (§5).

Each transfer asks the pendant, hands what arrives to ``host.make_durable`` and frees records on
the pendant only after that returned (durable before destructive, see sync.py's module doc).
``SyncHost`` is the part of ``PendantSync`` a transfer uses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from bleak import BleakClient

from bridge.audio.codecs import OPUS_FRAME_SAMPLES
from bridge.core.pcm import SAMPLE_RATE
from bridge.core.stored import SyncStatus
from bridge.devices.omi import storage as st
from bridge.devices.omi.chunks import Spool

_LOGGER = logging.getLogger(__name__)

RING_BATCH_RECORDS = 1000
"""Records per READ (≈ 100 s of audio, ≈ 440 kB): each batch is committed and advanced on its
own, so a cut costs at most one batch of re-reading (omi-storage.md §10 step 6)."""
CHECKPOINT_RECORDS = 64
"""Records made durable at a time inside a batch (≈ 28 kB, ≈ 6 s of audio): a cut resumes from
here, and speech starts on them before the batch is over."""
ANSWER_TIMEOUT = 10.0
"""Wait for an answer to a command: the firmware takes up to 5 s for the SD card after a connect
and 5 s more before answering INFO/READ (omi-storage.md §8, §10 step 5)."""
DATA_TIMEOUT = 5.0
"""No data for this long inside a transfer: give up this sync (omi-storage.md §8, §10 step 7)."""
RECORD_SECONDS_ESTIMATE = 0.1
"""Rough audio per 444-byte record (≈ 5 frames of ≈ 80 B, omi-storage.md §8); only for the
'waiting' figure and for estimating times when no better anchor exists."""
BYTES_PER_AUDIO_SECOND = 4_400
"""Rough bytes of stored Opus per second of audio (omi-storage.md §8), for status."""
FILE_DATA_MAX = 440
"""Multi-file data chunk: min(MTU − 7, 440) bytes of audio (omi-storage.md §4)."""
DEFAULT_FRAME_SAMPLES = 320
"""Codec 21 (20 ms) when a codec byte is not Opus (omi-storage.md §6.3)."""


class SyncAborted(Exception):
    """This connection's sync stops; the message is the journal line's reason."""


class Answers:
    """Every notification on ``30295781`` in arrival order (omi-storage.md §10 step 3)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def on_batch(self, packets: list[bytes], _at: float) -> None:
        for p in packets:
            self.queue.put_nowait(bytes(p))

    async def next(self, timeout: float, what: str) -> bytes:
        if not self.queue.empty():
            # A transfer's notifications come in batches, so most are already here; a timeout
            # task per packet was a third of the sync's CPU at 100 kB/s (bench/offline.py).
            return self.queue.get_nowait()
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            raise SyncAborted(f"no answer {what} within {timeout:g} s") from None

    def drain(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()


@dataclass
class SyncResult:
    """What one sync did (``omi-bridge sync`` prints it)."""

    protocol: str | None
    bytes: int = 0
    records: int = 0
    seconds: float = 0.0
    complete: bool = False
    error: str | None = None


def frame_seconds(codec: int) -> float:
    return float(OPUS_FRAME_SAMPLES.get(codec, DEFAULT_FRAME_SAMPLES) / SAMPLE_RATE)


class SyncHost(Protocol):
    label: str
    spool: Spool
    status: SyncStatus
    clock: Callable[[], float]
    clock_info: dict[str, float | None]

    async def write_command(self, client: BleakClient, data: bytes) -> None: ...

    async def make_durable(self, records: list[bytes], source: str, source_start: int, codec: int,
                           result: SyncResult) -> None: ...

    def set_waiting(self, records: int | None, nbytes: int | None = None) -> None: ...

    def note_clock_epoch(self, source: str, write_seq: int, fetched: int) -> None: ...


# ---------------------------------------------------------------------------------------------
# ring (§3)


async def ring(host: SyncHost, client: BleakClient, answers: Answers, codec: int,
                result: SyncResult) -> None:
    raw = await client.read_gatt_char(st.STORAGE_STATUS)
    status = st.parse_ring_status(bytes(raw))
    await host.write_command(client, st.ring_info_cmd())
    info = await _ring_answer(host, answers, st.TAG_INFO, "to INFO")
    ring = st.parse_ring_info(info)
    state = host.spool.state
    source = (f"r{ring.ring_id:016x}" if ring.caps & st.CAP_RING_ID and ring.ring_id
              else f"e{state['epoch']}")
    fetched = host.spool.fetched(source)
    if fetched is not None and fetched > ring.write_seq:
        # Sequence numbers restart at 0 after a CLEAR or a metadata re-init (§3.1).
        state["epoch"] = int(state["epoch"]) + 1
        source, fetched = f"e{state['epoch']}", None
        _LOGGER.warning("%s storage was reset (its write position %d is behind what the bridge "
                        "already holds); reading it afresh", host.label, ring.write_seq)
    dropped_seen = int(state.get("dropped", {}).get(source, 0))
    if ring.dropped_packets > dropped_seen:
        lost = ring.dropped_packets - dropped_seen
        _LOGGER.warning("%s storage was full: it overwrote its %d oldest records (≈ %.0f s of "
                        "audio) before the bridge could fetch them", host.label, lost,
                        lost * RECORD_SECONDS_ESTIMATE)
    state.setdefault("dropped", {})[source] = ring.dropped_packets
    if status.free_bytes == 0 and ring.unread:
        _LOGGER.warning("%s storage is full; it overwrites the oldest audio until the sync "
                        "frees space", host.label)
    if fetched is None or fetched < ring.read_seq:
        if fetched is not None:
            _LOGGER.warning("%s freed records %d..%d before the bridge had them (older ring "
                            "firmware frees what it sends, §3.7); they are lost", host.label,
                            fetched, ring.read_seq)
        fetched = ring.read_seq
    elif fetched > ring.read_seq:
        # On disk already but the pendant still holds them: the last ADVANCE never landed.
        await _ring_advance(host, client, answers, fetched, ring)
    unread = ring.write_seq - fetched
    host.set_waiting(unread)
    host.status.total_bytes = unread * st.RECORD_BYTES
    if unread == 0:
        _LOGGER.info("%s offline sync: nothing stored (ring firmware, clock %s)", host.label,
                     "valid" if status.rtc_valid else "not set")
        result.complete = True
        return
    if not status.rtc_valid:
        _LOGGER.info("%s clock was not set before this connection; stored audio without valid "
                     "stamps gets estimated times", host.label)
    host.clock_info["estimate_start"] = host.clock_info.get("estimate_start") or (
        host.clock() - unread * RECORD_SECONDS_ESTIMATE)
    host.note_clock_epoch(source, ring.write_seq, fetched)
    _LOGGER.info("%s offline sync: %d records (%.0f kB, ≈ %.0f s of audio) stored, ring "
                 "protocol%s", host.label, unread, unread * st.RECORD_BYTES / 1000,
                 unread * RECORD_SECONDS_ESTIMATE, f" v{ring.version}" if ring.version else "")
    t0 = time.monotonic()
    while fetched < ring.write_seq:
        count = min(RING_BATCH_RECORDS, ring.write_seq - fetched)
        fetched = await _ring_batch(host, client, answers, source, fetched, count, codec, result)
        await _ring_advance(host, client, answers, fetched, ring)
        host.set_waiting(ring.write_seq - fetched)
        elapsed = time.monotonic() - t0
        host.status.rate_bytes_per_second = round(result.bytes / elapsed, 1) if elapsed > 0 else 0.0
    result.complete = True
    _LOGGER.info("%s offline sync done: %d records, %.0f kB in %.1f s", host.label,
                 result.records, result.bytes / 1000, time.monotonic() - t0)


async def _ring_answer(host: SyncHost, answers: Answers, tag: int, what: str) -> bytes:
    """The next notification with ``tag``; an ACK with an error status (or a tag not in the
    protocol) ends the sync; LIVE_MARK and stray DATA are ignored (§3.4, §10 step 3)."""
    while True:
        pkt = await answers.next(ANSWER_TIMEOUT, what)
        if not pkt:
            raise st.StorageProtocolError(f"an empty notification {what}")
        if pkt[0] == tag:
            return pkt
        if pkt[0] == st.TAG_ACK:
            code = pkt[1] if len(pkt) > 1 else -1
            if tag == st.TAG_ACK:
                return pkt
            raise SyncAborted(f"the pendant answered {what} with status {code} "
                              f"({st.RING_STATUS_TEXT.get(code, 'unknown')})")
        if pkt[0] in (st.TAG_LIVE_MARK, st.TAG_DATA, st.TAG_DONE, st.TAG_INFO, st.TAG_READ_BEGIN):
            continue
        raise st.StorageProtocolError(f"unknown answer tag 0x{pkt[0]:02x} ({len(pkt)} bytes) {what}")


async def _ring_advance(host: SyncHost, client: BleakClient, answers: Answers, seq: int,
                        ring: st.RingInfo) -> None:
    """Free everything below ``seq``; only ever called for records already durable."""
    ring_id = ring.ring_id if ring.caps & st.CAP_RING_ID else None
    await host.write_command(client, st.ring_advance_cmd(seq, ring_id))
    ack = await _ring_answer(host, answers, st.TAG_ACK, "to ADVANCE")
    code = ack[1] if len(ack) > 1 else -1
    if code == st.STATUS_OUT_OF_RANGE and seq <= ring.write_seq:
        _LOGGER.debug("%s ADVANCE %d answered 10: already freed (§3.7)", host.label, seq)
    elif code != st.STATUS_OK:
        raise SyncAborted(f"ADVANCE to {seq} answered status {code} "
                          f"({st.RING_STATUS_TEXT.get(code, 'unknown')})")


async def _ring_batch(host: SyncHost, client: BleakClient, answers: Answers, source: str, start: int,
                      count: int, codec: int, result: SyncResult) -> int:
    """READ ``count`` records from ``start``; returns the sequence after the last durable one."""
    await host.write_command(client, st.ring_read_cmd(start, count))
    begin = st.parse_read_begin(await _ring_answer(host, answers, st.TAG_READ_BEGIN, "to READ"))
    if begin.start_seq != start:
        raise st.StorageProtocolError(f"READ from {start} began at {begin.start_seq}")
    buf = bytearray()
    pending: list[bytes] = []
    pending_seq = start
    crc = 0
    total = 0
    while True:
        pkt = await answers.next(DATA_TIMEOUT, "during the transfer")
        if not pkt:
            continue
        tag = pkt[0]
        if tag == st.TAG_DATA:
            payload = pkt[1:]
            crc = st.crc32(payload, crc)
            total += len(payload)
            buf += payload
            while len(buf) >= st.RECORD_BYTES:
                pending.append(bytes(buf[:st.RECORD_BYTES]))
                del buf[:st.RECORD_BYTES]
            if len(pending) >= CHECKPOINT_RECORDS:
                _check_records(host, pending, pending_seq)
                await host.make_durable(pending, source, pending_seq, codec, result)
                pending_seq += len(pending)
                pending = []
            continue
        if tag == st.TAG_DONE:
            done = st.parse_done(pkt)
            break
        if tag == st.TAG_ACK:
            code = pkt[1] if len(pkt) > 1 else -1
            _check_records(host, pending, pending_seq)
            await host.make_durable(pending, source, pending_seq, codec, result)
            raise SyncAborted(f"the pendant stopped the transfer with status {code} "
                              f"({st.RING_STATUS_TEXT.get(code, 'unknown')})")
        if tag == st.TAG_LIVE_MARK:
            continue
        raise st.StorageProtocolError(f"unknown tag 0x{tag:02x} ({len(pkt)} bytes) during the transfer")
    sent = done.next_seq - start
    if done.crc is not None and done.crc != crc:
        raise SyncAborted(f"the transfer's CRC does not match (pendant {done.crc:08x}, "
                          f"received {crc:08x}); the batch is not freed")
    _check_records(host, pending, pending_seq)
    await host.make_durable(pending, source, pending_seq, codec, result)
    pending_seq += len(pending)
    if buf or total != sent * st.RECORD_BYTES or done.status != st.STATUS_OK:
        why = (f"status {done.status} ({st.RING_STATUS_TEXT.get(done.status, 'unknown')})"
               if done.status != st.STATUS_OK else
               f"{total} bytes for {sent} records of {st.RECORD_BYTES} (truncated)")
        raise SyncAborted(f"the transfer from {start} ended early: {why}; the "
                          f"{pending_seq - start} whole records received are kept")
    return pending_seq


def _check_records(host: SyncHost, records: list[bytes], first_seq: int) -> None:
    """A frame length running past its record is corruption in the ring (frames never span
    records, §3.1): say so; the record's other frames are kept."""
    for i, rec in enumerate(records):
        block = rec[st.RECORD_HEADER_BYTES:]
        j = 0
        while j < len(block):
            n = block[j]
            if n == 0:
                j += 1
                continue
            if j + 1 + n > len(block):
                _LOGGER.warning("%s stored record %d: a frame length (%d at byte %d) runs past "
                                "the record; that frame is skipped, the rest kept", host.label,
                                first_seq + i, n, j)
                break
            j += 1 + n


# ---------------------------------------------------------------------------------------------
# multi-file (§4)


async def multi_file(host: SyncHost, client: BleakClient, answers: Answers, codec: int,
                      mtu: int | None, result: SyncResult) -> None:
    await host.write_command(client, bytes([st.CMD_LIST_FILES]))
    files = st.parse_file_list(await answers.next(ANSWER_TIMEOUT, "to LIST_FILES"))
    total = sum(f.size for f in files)
    host.set_waiting(None, total)
    host.status.total_bytes = total
    if not files:
        _LOGGER.info("%s offline sync: nothing stored (multi-file firmware)", host.label)
        result.complete = True
        return
    _LOGGER.info("%s offline sync: %d files, %.0f kB, multi-file protocol", host.label,
                 len(files), total / 1000)
    done_files: list[st.StoredFile] = []
    for f in files:
        await _read_file(host, client, answers, f, codec, result)
        done_files.append(f)
    # Indices shift down after a delete: highest first (§4). Only files wholly on disk.
    for f in sorted(done_files, key=lambda f: f.index, reverse=True):
        await host.write_command(client, st.delete_file_cmd(f.index))
        code = (await answers.next(ANSWER_TIMEOUT, "to DELETE_FILE"))[:1]
        if code != bytes([st.FILE_ACK]):
            raise SyncAborted(f"DELETE_FILE {f.index} answered {code.hex() or 'nothing'}")
    result.complete = True


async def _read_file(host: SyncHost, client: BleakClient, answers: Answers, f: st.StoredFile, codec: int,
                     result: SyncResult) -> None:
    source = f"f{f.stamp:08x}"
    blocks_done = host.spool.fetched(source) or 0
    offset = blocks_done * st.BLOCK_BYTES
    if offset >= f.size:
        return  # on disk from an earlier, cut sync
    await host.write_command(client, st.read_file_cmd(f.index, offset))
    buf = bytearray()
    pending: list[bytes] = []
    got = offset
    per_frame = frame_seconds(codec)
    frames_before = host.spool.state.setdefault("file_frames", {}).get(source, 0)
    acked = False
    while True:
        pkt = await answers.next(DATA_TIMEOUT if acked else ANSWER_TIMEOUT, "during a file read")
        if len(pkt) == 1:
            code = pkt[0]
            if code == st.FILE_ACK and not acked:
                acked = True
                continue
            if code == st.FILE_END:
                break
            raise SyncAborted(f"file {f.index} answered {code} "
                              f"({st.FILE_STATUS_TEXT.get(code, 'unknown command answer')})")
        if len(pkt) <= st.FILE_DATA_HEADER_BYTES:
            raise st.StorageProtocolError(f"a {len(pkt)}-byte file data notification")
        acked = True
        buf += pkt[st.FILE_DATA_HEADER_BYTES:]
        got += len(pkt) - st.FILE_DATA_HEADER_BYTES
        while len(buf) >= st.BLOCK_BYTES:
            block = bytes(buf[:st.BLOCK_BYTES])
            del buf[:st.BLOCK_BYTES]
            stamp = f.stamp + int(frames_before * per_frame)
            frames_before += sum(1 for _ in st.iter_frames(block))
            pending.append(st.make_record(stamp, block))
        if len(pending) >= CHECKPOINT_RECORDS:
            host.spool.state["file_frames"][source] = frames_before
            await host.make_durable(pending, source, blocks_done, codec, result)
            blocks_done += len(pending)
            pending = []
    if buf:
        stamp = f.stamp + int(frames_before * per_frame)
        frames_before += sum(1 for _ in st.iter_frames(bytes(buf)))
        pending.append(st.make_record(stamp, bytes(buf)))
    host.spool.state["file_frames"][source] = frames_before
    await host.make_durable(pending, source, blocks_done, codec, result)
    if got < f.size:
        raise SyncAborted(f"file {f.index} ended after {got} of {f.size} bytes (truncated); "
                          "what arrived is kept, the file is not deleted")


# ---------------------------------------------------------------------------------------------
# legacy (§5)


async def legacy(host: SyncHost, client: BleakClient, answers: Answers, codec: int,
                  result: SyncResult) -> None:
    status = st.parse_legacy_status(bytes(await client.read_gatt_char(st.STORAGE_STATUS)))
    state = host.spool.state
    source = f"legacy{state['epoch']}"
    blocks_done = host.spool.fetched(source) or 0
    offset = blocks_done * st.BLOCK_BYTES
    if offset > status.file_size:
        state["epoch"] = int(state["epoch"]) + 1
        source, blocks_done, offset = f"legacy{state['epoch']}", 0, 0
    remaining = status.file_size - offset
    host.set_waiting(None, remaining)
    host.status.total_bytes = remaining
    if remaining <= 0:
        _LOGGER.info("%s offline sync: nothing stored (legacy firmware)", host.label)
        if status.file_size and offset >= status.file_size:
            await _legacy_delete(host, client, answers, source)
        result.complete = True
        return
    _LOGGER.info("%s offline sync: %.0f kB stored, legacy protocol (no time stamps: times "
                 "are estimated)", host.label, remaining / 1000)
    # No stamps at all (§5, §6.2): place it from the last disconnect, else "now − length".
    host.clock_info["estimate_start"] = host.clock_info.get("estimate_start") or (
        host.clock() - remaining / BYTES_PER_AUDIO_SECOND)
    await host.write_command(client, st.legacy_cmd(st.LEGACY_READ, offset))
    buf = bytearray()
    pending: list[bytes] = []
    got = offset
    acked = False
    while True:
        pkt = await answers.next(DATA_TIMEOUT if acked else ANSWER_TIMEOUT, "during the read")
        if len(pkt) == 1:
            code = pkt[0]
            if code == st.LEGACY_OK and not acked:
                acked = True
                continue
            if code == st.LEGACY_END:
                break
            raise SyncAborted(f"the read answered {code} "
                              f"({st.LEGACY_STATUS_TEXT.get(code, 'unknown command answer')})")
        acked = True
        buf += pkt
        got += len(pkt)
        while len(buf) >= st.BLOCK_BYTES:
            pending.append(st.make_record(0, bytes(buf[:st.BLOCK_BYTES])))
            del buf[:st.BLOCK_BYTES]
        if len(pending) >= CHECKPOINT_RECORDS:
            await host.make_durable(pending, source, blocks_done, codec, result)
            blocks_done += len(pending)
            pending = []
    if buf:
        pending.append(st.make_record(0, bytes(buf)))
    await host.make_durable(pending, source, blocks_done, codec, result)
    if got < status.file_size:
        raise SyncAborted(f"the file ended after {got} of {status.file_size} bytes (truncated); "
                          "what arrived is kept, the file is not deleted")
    await _legacy_delete(host, client, answers, source)
    result.complete = True


async def _legacy_delete(host: SyncHost, client: BleakClient, answers: Answers, source: str) -> None:
    await host.write_command(client, st.legacy_cmd(st.LEGACY_DELETE))
    while True:
        pkt = await answers.next(ANSWER_TIMEOUT, "to DELETE")
        if pkt == bytes([st.LEGACY_DELETED]):
            break
        if pkt != bytes([st.LEGACY_OK]):
            raise SyncAborted(f"DELETE answered {pkt.hex()}")
    # Offsets restart at 0 in the emptied file: a new epoch.
    host.spool.state["epoch"] = int(host.spool.state["epoch"]) + 1
    await asyncio.to_thread(host.spool.save_state)


# ---------------------------------------------------------------------------------------------
# the reading side
