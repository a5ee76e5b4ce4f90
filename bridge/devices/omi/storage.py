"""The Omi pendant's offline storage service: protocol numbers and parsers, per firmware generation.

Whenever no central is connected the firmware writes its codec frames to the SD card / flash
(docs/reference/omi-storage.md §7). Three generations serve them over the same two
characteristics with incompatible payloads (§2):

- **ring** (firmware ≥ 3.0.20): a ring of 444-byte records, each with its own UTC second stamp
  (§3); commands 0x10 INFO, 0x11 READ, 0x12 ADVANCE on ``30295781``, answers as notifications.
- **multi-file** (3.0.17–3.0.19): LittleFS files named by their start time; 0x10 LIST_FILES,
  0x11 READ_FILE, 0x12 DELETE_FILE (§4).
- **legacy** (before 3.0.17): one growing file, ``[cmd][file=1][be32 offset]`` commands, no
  time stamps at all (§5).

The generation is chosen from the firmware revision string only, as the official app does
(§2): the same opcodes mean different things in the ring and multi-file generations, so the
bridge never probes by sending a command. An unparseable revision means no sync.

Everything here is pure parsing (bytes in, typed values out); ``sync.py`` does the transfer.
Parsers raise ``StorageProtocolError`` with a sentence a journal reader understands.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

# --------------------------------------------------------------------------------------------
# GATT (docs/reference/omi-storage.md §1)

_STORAGE_SUFFIX = "-4301-eabd-2904-2849adfeae43"
STORAGE_SERVICE = "30295780" + _STORAGE_SUFFIX
"""Storage service; compiled only with CONFIG_OMI_ENABLE_OFFLINE_STORAGE (omi-storage.md §1)."""
STORAGE_DATA = "30295781" + _STORAGE_SUFFIX
"""Control writes and every answer as a notification (WRITE + NOTIFY, omi-storage.md §1, §3.3)."""
STORAGE_STATUS = "30295782" + _STORAGE_SUFFIX
"""Status snapshot, READ only in practice: the firmware never notifies it (omi-storage.md §1)."""
OMI_TIME_READ = "19b10032-e8f2-537e-4f6c-d104768a1214"
"""The pendant's clock, uint32 LE epoch seconds (omi-storage.md §1)."""
OMI_FEATURES = "19b10021-e8f2-537e-4f6c-d104768a1214"
"""Feature bitmask, uint32 LE (omi-storage.md §1)."""
FEATURE_OFFLINE_STORAGE = 1 << 6
"""Feature bit 6: the firmware has offline storage (omi-storage.md §1)."""

# --------------------------------------------------------------------------------------------
# Generations (docs/reference/omi-storage.md §2)


class Generation(Enum):
    RING = "ring"
    MULTI_FILE = "multi-file"
    LEGACY = "legacy"


RING_MIN_VERSION = (3, 0, 20)
"""First firmware with the ring-buffer protocol (omi-storage.md §2, omi PR #7216)."""
MULTI_FILE_MIN_VERSION = (3, 0, 17)
"""First firmware with the several-files protocol (omi-storage.md §2)."""
_VERSION = re.compile(r"^\s*v?(\d+)\.(\d+)\.(\d+)")
"""The app's rule ``^\\d+\\.\\d+\\.\\d+`` (omi-storage.md §2); a leading "v" is tolerated."""


def parse_version(revision: str | None) -> tuple[int, int, int] | None:
    """"3.0.20" → (3, 0, 20); None when the string does not start with MAJOR.MINOR.PATCH."""
    m = _VERSION.match(revision or "")
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def generation_for(revision: str | None) -> Generation | None:
    """The protocol a firmware revision speaks (omi-storage.md §2); None: unknown, do not sync."""
    version = parse_version(revision)
    if version is None:
        return None
    if version >= RING_MIN_VERSION:
        return Generation.RING
    if version >= MULTI_FILE_MIN_VERSION:
        return Generation.MULTI_FILE
    return Generation.LEGACY


class StorageProtocolError(Exception):
    """The pendant answered something the protocol does not allow (a bad length, a tag we did
    not expect); the message says what, for the journal."""


# --------------------------------------------------------------------------------------------
# Stored audio: the 444-byte record and its frames (docs/reference/omi-storage.md §3.1, §6)

RECORD_BYTES = 444
"""One ring record: be32 stamp + 440 bytes of length-prefixed frames (omi-storage.md §3.1)."""
RECORD_HEADER_BYTES = 4
"""The be32 UTC-second stamp in front of each record (omi-storage.md §3.1)."""
BLOCK_BYTES = 440
"""Frame payload of a ring record, and the block size of the older generations' files
(``MAX_WRITE_SIZE``; omi-storage.md §3.1, §4, §5)."""
MIN_VALID_EPOCH = 1_700_000_000
"""The firmware rejects epochs below this; a smaller stamp is no wall-clock time (omi-storage.md §6.1)."""
UPTIME_FLAG = 0x8000_0000
"""Custody firmware stamps ``0x80000000 | uptime_s`` when its clock is not valid (omi-storage.md §6.2)."""


class StampKind(Enum):
    UTC = "utc"
    UPTIME = "uptime"
    NONE = "none"


def classify_stamp(stamp: int) -> StampKind:
    """Valid UTC (≥ 1 700 000 000, bit 31 clear), uptime-flagged, or no information (0 / other);
    omi-storage.md §6.2, §6.3."""
    if stamp & UPTIME_FLAG:
        return StampKind.UPTIME
    if stamp >= MIN_VALID_EPOCH:
        return StampKind.UTC
    return StampKind.NONE


def iter_frames(block: bytes) -> Iterator[bytes]:
    """The codec frames of one 440-byte block: ``[u8 len][len bytes]…``; a 0 byte is padding,
    an entry running past the block end is the dangling tail of the older generations and is
    dropped (omi-storage.md §3.1, §4)."""
    i, n = 0, len(block)
    while i < n:
        size = block[i]
        if size == 0:
            i += 1
            continue
        if i + 1 + size > n:
            return
        yield bytes(block[i + 1:i + 1 + size])
        i += 1 + size


@dataclass(frozen=True)
class Record:
    """One stored record: its stamp and frames (records of the older generations are turned into
    this shape too, with the stamp the file name gives, or none)."""

    stamp: int
    frames: tuple[bytes, ...]

    @property
    def stamp_kind(self) -> StampKind:
        return classify_stamp(self.stamp)


def parse_record(raw: bytes) -> Record:
    """A 444-byte ring record (omi-storage.md §3.1)."""
    if len(raw) != RECORD_BYTES:
        raise StorageProtocolError(f"a stored record is {len(raw)} bytes, not {RECORD_BYTES}")
    (stamp,) = struct.unpack_from(">I", raw)
    return Record(stamp, tuple(iter_frames(raw[RECORD_HEADER_BYTES:])))


def make_record(stamp: int, block: bytes) -> bytes:
    """A 444-byte record from a stamp and a ≤ 440-byte block (padding with zeros): how the older
    generations' blocks are kept in the same spool as ring records."""
    return struct.pack(">I", stamp & 0xFFFF_FFFF) + bytes(block[:BLOCK_BYTES]).ljust(BLOCK_BYTES, b"\0")


# --------------------------------------------------------------------------------------------
# Ring protocol (docs/reference/omi-storage.md §3)

RING_STATUS_BYTES = 16
"""Status read: 4 × u32 LE used_bytes, unread_packets, free_bytes, rtc_valid (omi-storage.md §3.2)."""

CMD_RING_INFO = 0x10
"""INFO request, any length ≥ 1 (omi-storage.md §3.3)."""
CMD_RING_READ = 0x11
"""READ: be64 start_seq [+ be32 count] (omi-storage.md §3.3)."""
CMD_RING_ADVANCE = 0x12
"""ADVANCE: be64 new_read_seq, frees everything below it (omi-storage.md §3.3)."""
CMD_RING_ADVANCE_ID = 0x15
"""ADVANCE with ring id (custody v1): be64 ring_id + be64 seq (omi-storage.md §3.3)."""
CMD_STOP = 0x03
"""STOP_SYNC: abort the transfer, nothing freed (omi-storage.md §3.3, §10 step 10)."""

TAG_ACK = 0x01
TAG_INFO = 0x02
TAG_DATA = 0x03
TAG_DONE = 0x04
TAG_READ_BEGIN = 0x05
TAG_LIVE_MARK = 0x06
"""Notification tags on 30295781, byte 0 (omi-storage.md §3.4)."""

INFO_BYTES = 31
"""INFO before custody v1 (omi-storage.md §3.4)."""
INFO_CUSTODY_BYTES = 41
"""INFO with custody v1: + caps, version, be64 ring_id (omi-storage.md §3.4)."""
DONE_BYTES = 10
"""DONE: tag, status, be64 next_seq (omi-storage.md §3.4)."""
DONE_CRC_BYTES = 14
"""DONE with the be32 CRC-32 of the DATA bytes (ring_transfer_integrity variant, omi-storage.md §3.4)."""
READ_BEGIN_BYTES = 13
"""READ_BEGIN: tag, be64 start_seq, be32 packet_count (omi-storage.md §3.4)."""

STATUS_OK = 0
STATUS_INVALID = 6
STATUS_NOT_READY = 9
STATUS_OUT_OF_RANGE = 10
STATUS_RING_ID_MISMATCH = 11
"""Ring status codes (omi-storage.md §3.4)."""
RING_STATUS_TEXT = {STATUS_OK: "ok", STATUS_INVALID: "invalid command",
                    STATUS_NOT_READY: "storage not ready", STATUS_OUT_OF_RANGE: "sequence out of range",
                    STATUS_RING_ID_MISMATCH: "ring id mismatch"}

CAP_APP_ACK_RECLAIM = 0x01
"""The firmware frees ring space only on ADVANCE/CLEAR (omi-storage.md §3.5)."""
CAP_ADVANCE_IDEMPOTENT = 0x04
"""ADVANCE to ≤ read_seq answers 0, not 10 (omi-storage.md §3.5)."""
CAP_RING_ID = 0x08
"""INFO carries a ring id; advance with 0x15 (omi-storage.md §3.5)."""


@dataclass(frozen=True)
class RingStatus:
    used_bytes: int
    unread_packets: int
    free_bytes: int
    rtc_valid: bool


def parse_ring_status(data: bytes) -> RingStatus:
    if len(data) < RING_STATUS_BYTES:
        raise StorageProtocolError(f"the storage status is {len(data)} bytes, not {RING_STATUS_BYTES}")
    used, unread, free, rtc = struct.unpack_from("<4I", data)
    return RingStatus(used, unread, free, bool(rtc))


@dataclass(frozen=True)
class RingInfo:
    read_seq: int
    write_seq: int
    capacity_packets: int
    dropped_packets: int
    packet_bytes: int
    caps: int = 0
    version: int = 0
    ring_id: int = 0

    @property
    def unread(self) -> int:
        return self.write_seq - self.read_seq


def parse_ring_info(data: bytes) -> RingInfo:
    """A 31- or 41-byte INFO (omi-storage.md §3.4)."""
    if len(data) not in (INFO_BYTES, INFO_CUSTODY_BYTES) or data[0] != TAG_INFO:
        raise StorageProtocolError(f"INFO answer of {len(data)} bytes (expected {INFO_BYTES} or "
                                   f"{INFO_CUSTODY_BYTES})")
    read_seq, write_seq, capacity, dropped, packet_bytes = struct.unpack_from(">QQIQH", data, 1)
    caps = version = ring_id = 0
    if len(data) == INFO_CUSTODY_BYTES:
        caps, version, ring_id = struct.unpack_from(">BBQ", data, INFO_BYTES)
    if packet_bytes != RECORD_BYTES:
        raise StorageProtocolError(f"the ring reports {packet_bytes}-byte records; this bridge reads "
                                   f"{RECORD_BYTES}-byte ones")
    if write_seq < read_seq:
        raise StorageProtocolError(f"the ring's write position {write_seq} is behind its read "
                                   f"position {read_seq}")
    return RingInfo(read_seq, write_seq, capacity, dropped, packet_bytes, caps, version, ring_id)


@dataclass(frozen=True)
class ReadBegin:
    start_seq: int
    count: int


def parse_read_begin(data: bytes) -> ReadBegin:
    if len(data) != READ_BEGIN_BYTES:
        raise StorageProtocolError(f"READ_BEGIN of {len(data)} bytes, not {READ_BEGIN_BYTES}")
    start, count = struct.unpack_from(">QI", data, 1)
    return ReadBegin(start, count)


@dataclass(frozen=True)
class Done:
    status: int
    next_seq: int
    crc: int | None = None


def parse_done(data: bytes) -> Done:
    """DONE, 10 bytes or 14 with a CRC (omi-storage.md §3.4, §11)."""
    if len(data) not in (DONE_BYTES, DONE_CRC_BYTES):
        raise StorageProtocolError(f"DONE of {len(data)} bytes (expected {DONE_BYTES} or {DONE_CRC_BYTES})")
    status, next_seq = struct.unpack_from(">BQ", data, 1)
    crc = struct.unpack_from(">I", data, DONE_BYTES)[0] if len(data) == DONE_CRC_BYTES else None
    return Done(status, next_seq, crc)


def crc32(data: bytes, value: int = 0) -> int:
    """CRC-32/IEEE as the firmware's integrity variant computes it (omi-storage.md §3.4)."""
    return zlib.crc32(data, value) & 0xFFFF_FFFF


def ring_info_cmd() -> bytes:
    return bytes([CMD_RING_INFO])


def ring_read_cmd(start_seq: int, count: int = 0) -> bytes:
    """READ from ``start_seq``, ``count`` records (0: all available); omi-storage.md §3.3."""
    return struct.pack(">BQI", CMD_RING_READ, start_seq, count)


def ring_advance_cmd(seq: int, ring_id: int | None = None) -> bytes:
    """ADVANCE to ``seq``; with a ring id (cap 0x08) the id-checked form 0x15 (omi-storage.md §3.3)."""
    if ring_id:
        return struct.pack(">BQQ", CMD_RING_ADVANCE_ID, ring_id, seq)
    return struct.pack(">BQ", CMD_RING_ADVANCE, seq)


def stop_cmd() -> bytes:
    return bytes([CMD_STOP])


# --------------------------------------------------------------------------------------------
# Multi-file protocol (docs/reference/omi-storage.md §4)

CMD_LIST_FILES = 0x10
CMD_READ_FILE = 0x11
CMD_DELETE_FILE = 0x12
"""Multi-file commands (omi-storage.md §4)."""
FILE_LIST_ERROR = 0xFF
"""LIST_FILES answer ``[0xFF]``: the firmware could not list (omi-storage.md §4)."""
FILE_ACK = 0
FILE_BAD_OFFSET = 3
FILE_EMPTY = 4
FILE_INVALID = 6
FILE_NOT_FOUND = 7
FILE_INDEX_RANGE = 8
FILE_END = 100
"""Single-byte notifications of the multi-file generation (omi-storage.md §4)."""
FILE_STATUS_TEXT = {FILE_ACK: "ok", FILE_BAD_OFFSET: "bad size or offset", FILE_EMPTY: "empty file",
                    FILE_INVALID: "invalid command", FILE_NOT_FOUND: "file not found",
                    FILE_INDEX_RANGE: "file index out of range", FILE_END: "end of file"}
FILE_DATA_HEADER_BYTES = 4
"""Each data notification starts with the file's be32 start stamp (omi-storage.md §4)."""


@dataclass(frozen=True)
class StoredFile:
    index: int
    stamp: int
    size: int


def parse_file_list(data: bytes) -> list[StoredFile]:
    """``[u8 count]`` then ``count`` × ``[be32 start][be32 size]`` (omi-storage.md §4)."""
    if not data:
        raise StorageProtocolError("empty LIST_FILES answer")
    if data[0] == FILE_LIST_ERROR and len(data) == 1:
        raise StorageProtocolError("the pendant could not list its files (answer 0xFF)")
    count = data[0]
    if len(data) != 1 + 8 * count:
        raise StorageProtocolError(f"LIST_FILES announces {count} files in {len(data)} bytes "
                                   f"(needs {1 + 8 * count})")
    return [StoredFile(i, *struct.unpack_from(">II", data, 1 + 8 * i)) for i in range(count)]


def read_file_cmd(index: int, offset: int = 0) -> bytes:
    return struct.pack(">BBI", CMD_READ_FILE, index, offset)


def delete_file_cmd(index: int) -> bytes:
    return bytes([CMD_DELETE_FILE, index])


# --------------------------------------------------------------------------------------------
# Legacy single-file protocol (docs/reference/omi-storage.md §5)

LEGACY_STATUS_BYTES = 8
"""Status read: u32 LE file_size, saved_offset (omi-storage.md §5)."""
LEGACY_READ = 0
LEGACY_DELETE = 1
LEGACY_STOP = 3
"""Legacy commands ``[cmd][file=1][be32 offset]`` (omi-storage.md §5)."""
LEGACY_FILE_NUMBER = 1
LEGACY_OK = 0
LEGACY_BAD_OFFSET = 3
LEGACY_EMPTY = 4
LEGACY_INVALID = 6
LEGACY_END = 100
LEGACY_DELETED = 200
"""Legacy single-byte answers (omi-storage.md §5)."""
LEGACY_STATUS_TEXT = {LEGACY_OK: "ok", LEGACY_BAD_OFFSET: "invalid file or offset",
                      LEGACY_EMPTY: "file size 0", LEGACY_INVALID: "invalid command",
                      LEGACY_END: "end of transfer", LEGACY_DELETED: "deleted"}


@dataclass(frozen=True)
class LegacyStatus:
    file_size: int
    saved_offset: int


def parse_legacy_status(data: bytes) -> LegacyStatus:
    if len(data) < LEGACY_STATUS_BYTES:
        raise StorageProtocolError(f"the storage status is {len(data)} bytes, not {LEGACY_STATUS_BYTES}")
    size, offset = struct.unpack_from("<II", data)
    return LegacyStatus(size, offset)


def legacy_cmd(cmd: int, offset: int = 0) -> bytes:
    return struct.pack(">BBI", cmd, LEGACY_FILE_NUMBER, offset)
