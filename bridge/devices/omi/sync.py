"""Fetch what an Omi pendant recorded out of range, durably, resumably, with true times.

``PendantSync`` outlives connections (one per pendant with ``offline_sync``). On every connect
the Omi session has already written the time (and measured the pendant's clock offset before
that) and subscribed to live audio, which stays on throughout: the firmware throws frames away
while a central is connected but not subscribed (docs/reference/omi-storage.md §7). Then
``async_sync(client, ...)`` runs beside live streaming on the same connection; both are
notifications and share the firmware's TX throttle, so a sync slows live audio a little and
neither stops (§7).

**Durable before destructive.** Downloaded records go into a local spool of chunk files
(``<storage>/offline/<pendant>/chunks``): every ``CHECKPOINT_RECORDS`` records, and at the end
of each read batch, a chunk is written to a temp file, fsynced, renamed and the directory
fsynced; only then is the pendant told to free them (ring ADVANCE after the batch's DONE,
§3.7; the older generations' DELETE only after the whole file is on disk, §4, §5). A transfer
cut by a link drop, SIGKILL or power cut resumes on the next connect from the last durable
record: the first thing a ring sync does is ADVANCE the pendant to what is already on disk
(in case the last ADVANCE never landed), then READ from there. Nothing is ever CLEARed.

**True times.** Each ring record carries its own UTC second (§3.1, §6.3); frames inside it
follow at the codec's frame duration, and the next record's stamp is trusted over a frame
count: a jump between stamps is a pause in recording, and a new *run* (a conversation boundary)
when it exceeds the conversation gap. Valid stamps are corrected by the clock offset measured
when the bridge wrote the time (bridge minus pendant, spread linearly since the previous time
sync, since the drift accrued over that interval). Stamps that are not wall-clock times (0, or
``0x80000000 | uptime``, §6.2) get estimated times: from the bridge's last disconnect from the
pendant (it records only while no central is connected, §7), else "download time minus the
stored audio's rough length"; such blocks are marked ``estimated`` and the journal says so.

**Hand-off.** ``consume()`` (a worker thread) reads the spool from the speech side's
``resume_cursor()``, decodes each record with a decoder that is fresh at each run start, and
hands ``StoredBlock``s to the ``StoredAudioSink``. Chunks before the resume cursor are deleted.

**Bad input.** A protocol violation (length prefix overrunning a record, a truncated transfer
or file, an unexpected answer, a storage error code) ends this connection's sync with one
journal line naming the pendant, what it sent and what the bridge did; live streaming is not
touched, nothing on the pendant is freed beyond what is durable, and the next connect retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from bleak import BleakClient

from bridge.audio.codecs import OPUS_FRAME_SAMPLES, Decoder, make_decoder
from bridge.core.files import write_atomic
from bridge.core.pcm import SAMPLE_RATE
from bridge.core.stored import StoredAudioSink, StoredBlock, SyncStatus
from bridge.core.times import iso_seconds
from bridge.devices.omi import storage as st
from bridge.link.notify import BatchedNotifications

_LOGGER = logging.getLogger(__name__)

OFFLINE_DIR = "offline"
"""``<storage>/offline/<pendant>/``: the download spool (chunks, state) and the speech side's runs."""

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
STAMP_CENTRE = 0.5
"""Record stamps are whole UTC seconds of the first frame (omi-storage.md §3.1, §6.3): the frame
lies in [stamp, stamp + 1), so its best estimate is the middle."""
CONTINUITY_SECONDS = 2.0
"""A record whose stamp is within this of where the previous records end continues them; more
is a recording pause (omi-storage.md §6.3: "larger than ~2 s means a pause in recording")."""
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


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "device"


def pendant_dir(storage: Path, address: str) -> Path:
    return storage / OFFLINE_DIR / _safe(address)


# --------------------------------------------------------------------------------------------
# The download spool


@dataclass(frozen=True)
class ChunkMeta:
    """What a chunk file's header line says about its records."""

    start: int
    """Local cursor of the first record."""
    count: int
    source: str
    """Which storage the records came from: "r<ring id>" / "e<epoch>" (ring), "f<stamp>" (file)."""
    source_start: int
    """Ring sequence number (or block number in a file) of the first record."""
    codec: int
    clock: dict[str, float | None] = field(default_factory=dict)
    """received_at, offset, pendant_now, last_time_sync, estimate_start (see ``TimePlacer``)."""

    @property
    def end(self) -> int:
        return self.start + self.count


class Spool:
    """Chunk files ``<start>.chunk``: one JSON header line, then ``count`` × 444-byte records.
    Written whole to a temp file, fsynced, renamed: a chunk is either all there or absent."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.chunks = root / "chunks"
        self.chunks.mkdir(parents=True, exist_ok=True)
        self.state_path = root / "sync.json"
        self.state: dict[str, Any] = self._load_state()

    def _load_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            state = {}
        if not isinstance(state, dict):
            state = {}
        state.setdefault("next_cursor", 0)
        state.setdefault("fetched", {})
        state.setdefault("epoch", 0)
        for meta in self.metas():  # a chunk written just before a crash, state not yet
            state["next_cursor"] = max(state["next_cursor"], meta.end)
            state["fetched"][meta.source] = max(state["fetched"].get(meta.source, 0),
                                                meta.source_start + meta.count)
        return state

    def save_state(self) -> None:
        write_atomic(self.state_path, json.dumps(self.state).encode())

    @property
    def next_cursor(self) -> int:
        return int(self.state["next_cursor"])

    def fetched(self, source: str) -> int | None:
        value = self.state["fetched"].get(source)
        return None if value is None else int(value)

    def append(self, records: list[bytes], source: str, source_start: int, codec: int,
               clock: dict[str, float | None]) -> ChunkMeta:
        """Make ``records`` durable; returns their chunk. Blocking (fsync): run it off the loop."""
        meta = ChunkMeta(self.next_cursor, len(records), source, source_start, codec, dict(clock))
        header = json.dumps({"start": meta.start, "count": meta.count, "source": source,
                             "source_start": source_start, "codec": codec, "clock": meta.clock})
        write_atomic(self.chunks / f"{meta.start:012d}.chunk",
                       header.encode() + b"\n" + b"".join(records))
        self.state["next_cursor"] = meta.end
        self.state["fetched"][source] = source_start + len(records)
        self.save_state()
        return meta

    def metas(self) -> list[ChunkMeta]:
        out = []
        for path in sorted(self.chunks.glob("*.chunk")):
            meta = self._header(path)
            if meta is not None:
                out.append(meta)
        return out

    def _header(self, path: Path) -> ChunkMeta | None:
        try:
            with open(path, "rb") as f:
                head = json.loads(f.readline())
            return ChunkMeta(int(head["start"]), int(head["count"]), str(head["source"]),
                             int(head["source_start"]), int(head["codec"]), dict(head["clock"]))
        except (OSError, ValueError, KeyError, TypeError):
            _LOGGER.warning("offline spool: unreadable chunk %s; left in place", path)
            return None

    def records(self, meta: ChunkMeta) -> bytes:
        with open(self.chunks / f"{meta.start:012d}.chunk", "rb") as f:
            f.readline()
            data = f.read()
        if len(data) != meta.count * st.RECORD_BYTES:
            raise OSError(f"chunk {meta.start} holds {len(data)} bytes, expected "
                          f"{meta.count * st.RECORD_BYTES}")
        return data

    def delete_before(self, cursor: int) -> int:
        """Delete chunks wholly before ``cursor`` (speech no longer needs them); returns bytes freed."""
        freed = 0
        for meta in self.metas():
            if meta.end <= cursor:
                path = self.chunks / f"{meta.start:012d}.chunk"
                with contextlib.suppress(OSError):
                    freed += path.stat().st_size
                    path.unlink()
        return freed

    def pending_records(self, cursor: int) -> int:
        return sum(max(0, m.end - max(m.start, cursor)) for m in self.metas())


# --------------------------------------------------------------------------------------------
# Times and decoding (the reading side)


class TimePlacer:
    """Gives each record its wall-clock start and says where runs begin (see the module doc)."""

    def __init__(self, gap_seconds: float) -> None:
        self.gap_seconds = gap_seconds
        self.expected: float | None = None
        """Where the previous record's audio ends (UTC), None outside a run."""
        self.source: str | None = None
        self.estimated = False
        self._uptime_base: tuple[int, float] | None = None

    def close_run(self) -> None:
        self.expected = None

    def place(self, record: st.Record, meta: ChunkMeta) -> tuple[float, bool, bool]:
        """(start UTC, estimated, starts a new run)."""
        kind = record.stamp_kind
        clock = meta.clock
        new_run = self.expected is None or meta.source != self.source
        if kind is st.StampKind.UTC:
            t = self.correct(record.stamp, clock) + STAMP_CENTRE
            estimated = False
        else:
            estimated = True
            if kind is st.StampKind.UPTIME:
                uptime = record.stamp & ~st.UPTIME_FLAG
                if (self._uptime_base is None or new_run or not self.estimated
                        or uptime < self._uptime_base[0]):
                    base = self.expected if (self.expected is not None and self.estimated
                                             and not new_run) else _estimate_start(clock)
                    self._uptime_base = (uptime, base)
                t = self._uptime_base[1] + (uptime - self._uptime_base[0])
            else:
                t = self.expected if (self.expected is not None and self.estimated
                                      and not new_run) else _estimate_start(clock)
        if not new_run and estimated != self.estimated:
            new_run = True
        if not new_run and self.expected is not None:
            jump = t - self.expected
            if jump > self.gap_seconds or jump < -CONTINUITY_SECONDS:
                new_run = True
            elif jump <= CONTINUITY_SECONDS:
                t = self.expected  # the same recording: frames follow frames
        self.source = meta.source
        self.estimated = estimated
        return t, estimated, new_run

    @staticmethod
    def correct(stamp: int, clock: dict[str, float | None]) -> float:
        """Pendant UTC → bridge UTC: the offset measured at this connection's time sync, spread
        linearly over the time since the previous sync (drift accrues with time)."""
        offset = clock.get("offset")
        if not offset:
            return float(stamp)
        now, last = clock.get("pendant_now"), clock.get("last_time_sync")
        share = 1.0
        if now is not None and last is not None and now > last:
            share = min(1.0, max(0.0, (stamp - last) / (now - last)))
        return stamp + offset * share


def _estimate_start(clock: dict[str, float | None]) -> float:
    est = clock.get("estimate_start")
    if est is not None:
        return est
    received = clock.get("received_at")
    return received if received is not None else time.time()


# --------------------------------------------------------------------------------------------
# Notifications on the storage characteristic


class _Answers:
    """Every notification on ``30295781`` in arrival order (omi-storage.md §10 step 3)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def on_batch(self, packets: list[bytes], _at: float) -> None:
        for p in packets:
            self.queue.put_nowait(bytes(p))

    async def next(self, timeout: float, what: str) -> bytes:
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


ProgressFn = Callable[[SyncStatus], None]


class PendantSync:
    """One pendant's offline sync state and spool (see the module docstring)."""

    def __init__(self, address: str, label: str, storage: Path, sink: StoredAudioSink, *,
                 gap_seconds: float, on_progress: ProgressFn | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.address = address
        self.label = label
        self.sink = sink
        self.gap_seconds = gap_seconds
        self.on_progress = on_progress
        self.clock = clock
        self.spool = Spool(pendant_dir(storage, address))
        self.status = SyncStatus()
        self.status.last_sync_at = self.spool.state.get("last_sync_at")
        self.status.protocol = self.spool.state.get("protocol")
        self.status.last_sync_bytes = self.spool.state.get("last_sync_bytes")
        self.new_data = asyncio.Event()
        """Set when records became durable (the consumer task waits on it)."""
        self.sync_ended = asyncio.Event()
        """Set whenever a sync on a connection ends, however (``omi-bridge sync`` waits on it)."""
        self._consume_lock = threading.Lock()
        self._placer = TimePlacer(gap_seconds)
        self._decoder: Decoder | None = None
        self._read_cursor: int | None = None
        self._ended_at: int | None = None
        self._clock_info: dict[str, float | None] = {}
        self._client: BleakClient | None = None
        self._active = False

    # ------------------------------------------------------------------ connection events

    def time_synced(self, pendant_time: int | None, bridge_time: float) -> None:
        """The session wrote ``bridge_time`` to the pendant, whose clock read ``pendant_time``
        just before (None: not readable)."""
        state = self.spool.state
        offset = None
        if pendant_time is not None and pendant_time >= st.MIN_VALID_EPOCH:
            offset = round(bridge_time - pendant_time, 3)
        self.status.clock_offset_seconds = offset
        self._clock_info = {"received_at": bridge_time, "offset": offset,
                            "pendant_now": None if pendant_time is None else float(pendant_time),
                            "last_time_sync": state.get("last_time_sync"),
                            "estimate_start": state.get("last_disconnect")}
        state["last_time_sync"] = bridge_time
        state["connected"] = True

    def link_down(self) -> None:
        """The connection ended: from now on the pendant records again."""
        state = self.spool.state
        if state.get("connected"):
            state["connected"] = False
            state["last_disconnect"] = self.clock()
            with contextlib.suppress(OSError):
                self.spool.save_state()
        if self.status.state == "syncing":
            self.status.state = "idle"

    async def async_stop(self, client: BleakClient) -> None:
        """Before our own disconnect: abort a transfer in flight (nothing is freed, §3.3)."""
        if self._active:
            with contextlib.suppress(Exception):
                await client.write_gatt_char(st.STORAGE_DATA, st.stop_cmd(), response=True)

    # ------------------------------------------------------------------ the transfer

    async def async_sync(self, client: BleakClient, *, firmware: str | None, codec: int,
                         mtu: int | None = None) -> SyncResult:
        """One sync on this connection. Never raises except cancellation: problems become one
        journal line and ``status.last_error``."""
        generation = st.generation_for(firmware)
        self.status.protocol = generation.value if generation else None
        result = SyncResult(self.status.protocol)
        started = time.monotonic()
        if generation is None:
            result.error = f"firmware revision {firmware!r} is not MAJOR.MINOR.PATCH"
            _LOGGER.warning("%s offline sync: %s, so its storage protocol is unknown; not syncing "
                            "(live audio is unaffected)", self.label, result.error)
            self.status.state, self.status.last_error = "off", result.error
            return result
        if client.services.get_characteristic(st.STORAGE_DATA) is None:
            result.error = "no storage service"
            _LOGGER.info("%s has no offline storage service (firmware %s); nothing to sync",
                         self.label, firmware)
            self.status.state, self.status.last_error = "off", result.error
            return result
        self.spool.state["protocol"] = generation.value
        answers = _Answers()
        notes = BatchedNotifications(f"{self.label} storage", answers.on_batch, period=0.05)
        self._active = True
        self._client = client
        self.status.state, self.status.last_error = "syncing", None
        self.status.fetched_bytes = self.status.total_bytes = 0
        try:
            char = client.services.get_characteristic(st.STORAGE_DATA)
            assert char is not None
            await notes.async_start(client, char)
            if generation is st.Generation.RING:
                await self._ring(client, answers, codec, result)
            elif generation is st.Generation.MULTI_FILE:
                await self._multi_file(client, answers, codec, mtu, result)
            else:
                await self._legacy(client, answers, codec, result)
        except SyncAborted as exc:
            result.error = str(exc)
            self.status.last_error = result.error
            _LOGGER.warning("%s offline sync stopped: %s; kept %d records fetched so far, freed "
                            "nothing more on the pendant; retrying on the next connect (live audio "
                            "is unaffected)", self.label, exc, result.records)
        except st.StorageProtocolError as exc:
            result.error = str(exc)
            self.status.last_error = result.error
            _LOGGER.warning("%s offline sync: the pendant sent a malformed answer (%s); stopped "
                            "this sync, kept %d records fetched so far, freed nothing more on the "
                            "pendant (live audio is unaffected)", self.label, exc, result.records)
        except OSError as exc:
            result.error = f"cannot write the download spool: {exc}"
            self.status.last_error = result.error
            _LOGGER.error("%s offline sync: %s; stopped, nothing freed on the pendant", self.label,
                          result.error)
        except asyncio.CancelledError:
            result.error = "cut"
            raise
        except Exception as exc:  # a BLE error: the link is going away
            result.error = f"{type(exc).__name__}: {exc}"
            self.status.last_error = result.error
            _LOGGER.info("%s offline sync cut (%s); resumes from record %d on the next connect",
                         self.label, result.error, self.spool.next_cursor)
        finally:
            self._active = False
            notes.close()
            with contextlib.suppress(Exception):
                if client.is_connected:
                    await client.stop_notify(st.STORAGE_DATA)
            result.seconds = time.monotonic() - started
            # A sync cut by a drop is finished by a later one: "last sync" counts them all.
            fetched = int(self.spool.state.get("unfinished_bytes", 0)) + result.bytes
            self.spool.state["unfinished_bytes"] = fetched
            if result.complete:
                now = self.clock()
                self.status.state = "done"
                self.status.last_sync_at = iso_seconds(now)
                self.status.last_sync_bytes = fetched
                self.spool.state["last_sync_at"] = self.status.last_sync_at
                self.spool.state["last_sync_bytes"] = fetched
                self.spool.state["unfinished_bytes"] = 0
                self.spool.state["drained_cursor"] = self.spool.next_cursor
            elif self.status.state == "syncing":
                self.status.state = "failed" if result.error not in (None, "cut") else "idle"
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.spool.save_state)
            self.new_data.set()
            self.sync_ended.set()
            self._progress()
        return result

    async def _write(self, client: BleakClient, data: bytes) -> None:
        await client.write_gatt_char(st.STORAGE_DATA, data, response=True)

    async def _durable(self, records: list[bytes], source: str, source_start: int, codec: int,
                       result: SyncResult) -> None:
        if not records:
            return
        await asyncio.to_thread(self.spool.append, list(records), source, source_start, codec,
                                self._clock_info)
        result.records += len(records)
        result.bytes += len(records) * st.RECORD_BYTES
        self.status.fetched_bytes = result.bytes
        self.new_data.set()
        self._progress()

    def _progress(self) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(self.status)
            except Exception:
                _LOGGER.exception("%s sync progress callback failed", self.label)

    def _waiting(self, records: int | None, nbytes: int | None = None) -> None:
        if records is not None:
            nbytes = records * st.RECORD_BYTES
        self.status.waiting_bytes = nbytes
        self.status.waiting_audio_seconds = None if nbytes is None else round(
            nbytes / BYTES_PER_AUDIO_SECOND, 1)

    # ------------------------------------------------------------------ ring (§3)

    async def _ring(self, client: BleakClient, answers: _Answers, codec: int,
                    result: SyncResult) -> None:
        raw = await client.read_gatt_char(st.STORAGE_STATUS)
        status = st.parse_ring_status(bytes(raw))
        await self._write(client, st.ring_info_cmd())
        info = await self._ring_answer(answers, st.TAG_INFO, "to INFO")
        ring = st.parse_ring_info(info)
        state = self.spool.state
        if ring.caps & st.CAP_RING_ID and ring.ring_id:
            source = f"r{ring.ring_id:016x}"
        else:
            source = f"e{state['epoch']}"
        fetched = self.spool.fetched(source)
        if fetched is not None and fetched > ring.write_seq:
            # Sequence numbers restart at 0 after a CLEAR or a metadata re-init (§3.1).
            state["epoch"] = int(state["epoch"]) + 1
            source, fetched = f"e{state['epoch']}", None
            _LOGGER.warning("%s storage was reset (its write position %d is behind what the bridge "
                            "already holds); reading it afresh", self.label, ring.write_seq)
        dropped_seen = int(state.get("dropped", {}).get(source, 0))
        if ring.dropped_packets > dropped_seen:
            lost = ring.dropped_packets - dropped_seen
            _LOGGER.warning("%s storage was full: it overwrote its %d oldest records (≈ %.0f s of "
                            "audio) before the bridge could fetch them", self.label, lost,
                            lost * RECORD_SECONDS_ESTIMATE)
        state.setdefault("dropped", {})[source] = ring.dropped_packets
        if status.free_bytes == 0 and ring.unread:
            _LOGGER.warning("%s storage is full; it overwrites the oldest audio until the sync "
                            "frees space", self.label)
        if fetched is None or fetched < ring.read_seq:
            if fetched is not None:
                _LOGGER.warning("%s freed records %d..%d before the bridge had them (older ring "
                                "firmware frees what it sends, §3.7); they are lost", self.label,
                                fetched, ring.read_seq)
            fetched = ring.read_seq
        elif fetched > ring.read_seq:
            # On disk already but the pendant still holds them: the last ADVANCE never landed.
            await self._ring_advance(client, answers, fetched, ring)
        unread = ring.write_seq - fetched
        self._waiting(unread)
        self.status.total_bytes = unread * st.RECORD_BYTES
        if unread == 0:
            _LOGGER.info("%s offline sync: nothing stored (ring firmware, clock %s)", self.label,
                         "valid" if status.rtc_valid else "not set")
            result.complete = True
            return
        if not status.rtc_valid:
            _LOGGER.info("%s clock was not set before this connection; stored audio without valid "
                         "stamps gets estimated times", self.label)
        self._clock_info["estimate_start"] = self._clock_info.get("estimate_start") or (
            self.clock() - unread * RECORD_SECONDS_ESTIMATE)
        _LOGGER.info("%s offline sync: %d records (%.0f kB, ≈ %.0f s of audio) stored, ring "
                     "protocol%s", self.label, unread, unread * st.RECORD_BYTES / 1000,
                     unread * RECORD_SECONDS_ESTIMATE, f" v{ring.version}" if ring.version else "")
        t0 = time.monotonic()
        while fetched < ring.write_seq:
            count = min(RING_BATCH_RECORDS, ring.write_seq - fetched)
            fetched = await self._ring_batch(client, answers, source, fetched, count, codec, result)
            await self._ring_advance(client, answers, fetched, ring)
            self._waiting(ring.write_seq - fetched)
            elapsed = time.monotonic() - t0
            self.status.rate_bytes_per_second = round(result.bytes / elapsed, 1) if elapsed > 0 else 0.0
        result.complete = True
        _LOGGER.info("%s offline sync done: %d records, %.0f kB in %.1f s", self.label,
                     result.records, result.bytes / 1000, time.monotonic() - t0)

    async def _ring_answer(self, answers: _Answers, tag: int, what: str) -> bytes:
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

    async def _ring_advance(self, client: BleakClient, answers: _Answers, seq: int,
                            ring: st.RingInfo) -> None:
        """Free everything below ``seq``; only ever called for records already durable."""
        ring_id = ring.ring_id if ring.caps & st.CAP_RING_ID else None
        await self._write(client, st.ring_advance_cmd(seq, ring_id))
        ack = await self._ring_answer(answers, st.TAG_ACK, "to ADVANCE")
        code = ack[1] if len(ack) > 1 else -1
        if code == st.STATUS_OUT_OF_RANGE and seq <= ring.write_seq:
            _LOGGER.debug("%s ADVANCE %d answered 10: already freed (§3.7)", self.label, seq)
        elif code != st.STATUS_OK:
            raise SyncAborted(f"ADVANCE to {seq} answered status {code} "
                              f"({st.RING_STATUS_TEXT.get(code, 'unknown')})")

    async def _ring_batch(self, client: BleakClient, answers: _Answers, source: str, start: int,
                          count: int, codec: int, result: SyncResult) -> int:
        """READ ``count`` records from ``start``; returns the sequence after the last durable one."""
        await self._write(client, st.ring_read_cmd(start, count))
        begin = st.parse_read_begin(await self._ring_answer(answers, st.TAG_READ_BEGIN, "to READ"))
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
                    self._check_records(pending, pending_seq)
                    await self._durable(pending, source, pending_seq, codec, result)
                    pending_seq += len(pending)
                    pending = []
                continue
            if tag == st.TAG_DONE:
                done = st.parse_done(pkt)
                break
            if tag == st.TAG_ACK:
                code = pkt[1] if len(pkt) > 1 else -1
                self._check_records(pending, pending_seq)
                await self._durable(pending, source, pending_seq, codec, result)
                raise SyncAborted(f"the pendant stopped the transfer with status {code} "
                                  f"({st.RING_STATUS_TEXT.get(code, 'unknown')})")
            if tag == st.TAG_LIVE_MARK:
                continue
            raise st.StorageProtocolError(f"unknown tag 0x{tag:02x} ({len(pkt)} bytes) during the transfer")
        sent = done.next_seq - start
        if done.crc is not None and done.crc != crc:
            raise SyncAborted(f"the transfer's CRC does not match (pendant {done.crc:08x}, "
                              f"received {crc:08x}); the batch is not freed")
        self._check_records(pending, pending_seq)
        await self._durable(pending, source, pending_seq, codec, result)
        pending_seq += len(pending)
        if buf or total != sent * st.RECORD_BYTES or done.status != st.STATUS_OK:
            why = (f"status {done.status} ({st.RING_STATUS_TEXT.get(done.status, 'unknown')})"
                   if done.status != st.STATUS_OK else
                   f"{total} bytes for {sent} records of {st.RECORD_BYTES} (truncated)")
            raise SyncAborted(f"the transfer from {start} ended early: {why}; the "
                              f"{pending_seq - start} whole records received are kept")
        return pending_seq

    def _check_records(self, records: list[bytes], first_seq: int) -> None:
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
                                    "the record; that frame is skipped, the rest kept", self.label,
                                    first_seq + i, n, j)
                    break
                j += 1 + n

    # ------------------------------------------------------------------ multi-file (§4)

    async def _multi_file(self, client: BleakClient, answers: _Answers, codec: int,
                          mtu: int | None, result: SyncResult) -> None:
        await self._write(client, bytes([st.CMD_LIST_FILES]))
        files = st.parse_file_list(await answers.next(ANSWER_TIMEOUT, "to LIST_FILES"))
        total = sum(f.size for f in files)
        self._waiting(None, total)
        self.status.total_bytes = total
        if not files:
            _LOGGER.info("%s offline sync: nothing stored (multi-file firmware)", self.label)
            result.complete = True
            return
        _LOGGER.info("%s offline sync: %d files, %.0f kB, multi-file protocol", self.label,
                     len(files), total / 1000)
        done_files: list[st.StoredFile] = []
        for f in files:
            await self._read_file(client, answers, f, codec, result)
            done_files.append(f)
        # Indices shift down after a delete: highest first (§4). Only files wholly on disk.
        for f in sorted(done_files, key=lambda f: f.index, reverse=True):
            await self._write(client, st.delete_file_cmd(f.index))
            code = (await answers.next(ANSWER_TIMEOUT, "to DELETE_FILE"))[:1]
            if code != bytes([st.FILE_ACK]):
                raise SyncAborted(f"DELETE_FILE {f.index} answered {code.hex() or 'nothing'}")
        result.complete = True

    async def _read_file(self, client: BleakClient, answers: _Answers, f: st.StoredFile, codec: int,
                         result: SyncResult) -> None:
        source = f"f{f.stamp:08x}"
        blocks_done = self.spool.fetched(source) or 0
        offset = blocks_done * st.BLOCK_BYTES
        if offset >= f.size:
            return  # on disk from an earlier, cut sync
        await self._write(client, st.read_file_cmd(f.index, offset))
        buf = bytearray()
        pending: list[bytes] = []
        got = offset
        frame_seconds = _frame_seconds(codec)
        frames_before = self.spool.state.setdefault("file_frames", {}).get(source, 0)
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
                stamp = f.stamp + int(frames_before * frame_seconds)
                frames_before += sum(1 for _ in st.iter_frames(block))
                pending.append(st.make_record(stamp, block))
            if len(pending) >= CHECKPOINT_RECORDS:
                self.spool.state["file_frames"][source] = frames_before
                await self._durable(pending, source, blocks_done, codec, result)
                blocks_done += len(pending)
                pending = []
        if buf:
            stamp = f.stamp + int(frames_before * frame_seconds)
            frames_before += sum(1 for _ in st.iter_frames(bytes(buf)))
            pending.append(st.make_record(stamp, bytes(buf)))
        self.spool.state["file_frames"][source] = frames_before
        await self._durable(pending, source, blocks_done, codec, result)
        if got < f.size:
            raise SyncAborted(f"file {f.index} ended after {got} of {f.size} bytes (truncated); "
                              "what arrived is kept, the file is not deleted")

    # ------------------------------------------------------------------ legacy (§5)

    async def _legacy(self, client: BleakClient, answers: _Answers, codec: int,
                      result: SyncResult) -> None:
        status = st.parse_legacy_status(bytes(await client.read_gatt_char(st.STORAGE_STATUS)))
        state = self.spool.state
        source = f"legacy{state['epoch']}"
        blocks_done = self.spool.fetched(source) or 0
        offset = blocks_done * st.BLOCK_BYTES
        if offset > status.file_size:
            state["epoch"] = int(state["epoch"]) + 1
            source, blocks_done, offset = f"legacy{state['epoch']}", 0, 0
        remaining = status.file_size - offset
        self._waiting(None, remaining)
        self.status.total_bytes = remaining
        if remaining <= 0:
            _LOGGER.info("%s offline sync: nothing stored (legacy firmware)", self.label)
            if status.file_size and offset >= status.file_size:
                await self._legacy_delete(client, answers, source)
            result.complete = True
            return
        _LOGGER.info("%s offline sync: %.0f kB stored, legacy protocol (no time stamps: times "
                     "are estimated)", self.label, remaining / 1000)
        # No stamps at all (§5, §6.2): place it from the last disconnect, else "now − length".
        self._clock_info["estimate_start"] = self._clock_info.get("estimate_start") or (
            self.clock() - remaining / BYTES_PER_AUDIO_SECOND)
        await self._write(client, st.legacy_cmd(st.LEGACY_READ, offset))
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
                await self._durable(pending, source, blocks_done, codec, result)
                blocks_done += len(pending)
                pending = []
        if buf:
            pending.append(st.make_record(0, bytes(buf)))
        await self._durable(pending, source, blocks_done, codec, result)
        if got < status.file_size:
            raise SyncAborted(f"the file ended after {got} of {status.file_size} bytes (truncated); "
                              "what arrived is kept, the file is not deleted")
        await self._legacy_delete(client, answers, source)
        result.complete = True

    async def _legacy_delete(self, client: BleakClient, answers: _Answers, source: str) -> None:
        await self._write(client, st.legacy_cmd(st.LEGACY_DELETE))
        while True:
            pkt = await answers.next(ANSWER_TIMEOUT, "to DELETE")
            if pkt == bytes([st.LEGACY_DELETED]):
                break
            if pkt != bytes([st.LEGACY_OK]):
                raise SyncAborted(f"DELETE answered {pkt.hex()}")
        # Offsets restart at 0 in the emptied file: a new epoch.
        self.spool.state["epoch"] = int(self.spool.state["epoch"]) + 1
        await asyncio.to_thread(self.spool.save_state)

    # ------------------------------------------------------------------ the reading side

    async def run_consumer(self, stop: asyncio.Event) -> None:
        """Hand durable records to speech whenever new ones arrive, until ``stop``."""
        while not stop.is_set():
            await asyncio.to_thread(self.consume)
            waiter = asyncio.ensure_future(self.new_data.wait())
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopper.cancel()
            self.new_data.clear()

    def consume(self) -> int:
        """Decode durable records from the speech side's resume cursor and hand them on; returns
        how many. Blocking (decoding, VAD): a worker thread."""
        with self._consume_lock:
            if self._read_cursor is None:
                # The first call since start: an unfinished run is re-read from its first record
                # (fresh decoder and placer), so it gives the same conversations as before.
                self._read_cursor = self.sink.resume_cursor()
            cursor = self._read_cursor
            handed = 0
            for meta in self.spool.metas():
                if meta.end <= cursor:
                    continue
                try:
                    data = self.spool.records(meta)
                except OSError as exc:
                    _LOGGER.error("%s offline spool: %s; its audio cannot be read", self.label, exc)
                    continue
                for i in range(max(0, cursor - meta.start), meta.count):
                    raw = data[i * st.RECORD_BYTES:(i + 1) * st.RECORD_BYTES]
                    self._hand_on(st.parse_record(raw), meta, meta.start + i)
                    handed += 1
                cursor = meta.end
                self._read_cursor = cursor
            self._read_cursor = cursor
            drained = self.spool.state.get("drained_cursor")
            if drained is not None and cursor >= int(drained) and self._ended_at != cursor:
                self.sink.stored_end()
                self._placer.close_run()
                self._ended_at = cursor
            freed = self.spool.delete_before(self.sink.resume_cursor())
            if freed:
                _LOGGER.debug("%s offline spool: %d bytes handed on and freed", self.label, freed)
            return handed

    def _hand_on(self, record: st.Record, meta: ChunkMeta, cursor: int) -> None:
        start, estimated, new_run = self._placer.place(record, meta)
        if new_run or self._decoder is None:
            self._decoder = make_decoder(meta.codec, self.label)
        pcm = [self._decoder.decode(frame) for frame in record.frames]
        samples = np.concatenate(pcm) if pcm else np.zeros(0, np.int16)
        if not len(samples):
            return
        self._placer.expected = start + len(samples) / SAMPLE_RATE
        if estimated:
            self.status.times_estimated = True
        self.status.audio_seconds_handed_on += len(samples) / SAMPLE_RATE
        seq = meta.source_start + (cursor - meta.start)
        self.sink.stored_audio(StoredBlock(samples, start, estimated,
                                           f"{meta.source}-{seq}-{record.stamp:x}", cursor,
                                           new_run=new_run))

    def pending_seconds(self) -> float:
        """Rough audio fetched to disk and not yet handed to speech."""
        return self.spool.pending_records(self.sink.resume_cursor()) * RECORD_SECONDS_ESTIMATE


def _frame_seconds(codec: int) -> float:
    return OPUS_FRAME_SAMPLES.get(codec, DEFAULT_FRAME_SAMPLES) / SAMPLE_RATE


def read_pendant_time(raw: bytes) -> int | None:
    """The time characteristic, uint32 LE epoch seconds (omi-storage.md §1)."""
    return struct.unpack_from("<I", raw)[0] if len(raw) >= 4 else None
