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
sync, since the drift accrued over that interval), at the first connection that found them: a
transfer cut and finished on a later connection still corrects by the error the pendant's clock
had while they were recorded, not by the near-zero one measured after the bridge had set it.
Stamps that are not wall-clock times (0, or ``0x80000000 | uptime``, §6.2) get estimated times:
from the bridge's last disconnect from the pendant (it records only while no central is
connected, §7), else "download time minus the stored audio's rough length"; such blocks are
marked ``estimated`` and the journal says so.

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
import logging
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from bleak import BleakClient

from bridge.audio.codecs import Decoder, make_decoder
from bridge.core.pcm import SAMPLE_RATE
from bridge.core.stored import StoredAudioSink, StoredBlock, SyncStatus
from bridge.core.times import iso_seconds
from bridge.devices.omi import storage as st
from bridge.devices.omi import transfers
from bridge.devices.omi.chunks import ChunkMeta, Spool, pendant_dir
from bridge.devices.omi.timing import TimePlacer
from bridge.devices.omi.transfers import (
    BYTES_PER_AUDIO_SECOND,
    RECORD_SECONDS_ESTIMATE,
    SyncAborted,
    SyncResult,
)
from bridge.link.notify import BatchedNotifications

_LOGGER = logging.getLogger(__name__)


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
        self.clock_info: dict[str, float | None] = {}
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
        self.clock_info = {"received_at": bridge_time, "offset": offset,
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
            return self._off(result)
        if client.services.get_characteristic(st.STORAGE_DATA) is None:
            result.error = "no storage service"
            _LOGGER.info("%s has no offline storage service (firmware %s); nothing to sync",
                         self.label, firmware)
            return self._off(result)
        self.spool.state["protocol"] = generation.value
        answers = transfers.Answers()
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
                await transfers.ring(self, client, answers, codec, result)
            elif generation is st.Generation.MULTI_FILE:
                await transfers.multi_file(self, client, answers, codec, mtu, result)
            else:
                await transfers.legacy(self, client, answers, codec, result)
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

    def _off(self, result: SyncResult) -> SyncResult:
        """No sync on this pendant: still a sync that ended, for whoever waits on it."""
        self.status.state, self.status.last_error = "off", result.error
        self.sync_ended.set()
        self._progress()
        return result

    async def write_command(self, client: BleakClient, data: bytes) -> None:
        await client.write_gatt_char(st.STORAGE_DATA, data, response=True)

    def note_clock_epoch(self, source: str, write_seq: int, fetched: int) -> None:
        """Remember which clock correction the ring's records up to ``write_seq`` need.

        Records are stamped by the pendant's clock as it was while they were recorded: those
        recorded before an earlier connection's time sync need that connection's offset, not
        this one's (which only measures the drift since). A transfer cut before it got them all
        leaves such records for a later connection, so each connection that finds new records
        notes its clock against the write position it found (the firmware records nothing while
        connected, omi-storage.md §7)."""
        epochs = self.spool.state.setdefault("clock_epochs", {}).setdefault(source, [])
        epochs[:] = [e for e in epochs if int(e[0]) > fetched]
        if not epochs or write_seq > int(epochs[-1][0]):
            epochs.append([write_seq, dict(self.clock_info)])

    def _clock_parts(self, records: list[bytes], source: str,
                     source_start: int) -> list[tuple[int, int, dict[str, float | None]]]:
        """``records`` split where the clock they were stamped by changes: (first, end, clock)."""
        epochs = self.spool.state.get("clock_epochs", {}).get(source) or []
        parts: list[tuple[int, int, dict[str, float | None]]] = []
        first, end = 0, len(records)
        for bound, clock in epochs:
            upto = min(end, int(bound) - source_start)
            if upto > first:
                parts.append((first, upto, clock))
                first = upto
        if first < end:
            parts.append((first, end, self.clock_info))
        return parts

    async def make_durable(self, records: list[bytes], source: str, source_start: int, codec: int,
                       result: SyncResult) -> None:
        if not records:
            return
        for first, end, clock in self._clock_parts(records, source, source_start):
            await asyncio.to_thread(self.spool.append, list(records[first:end]), source,
                                    source_start + first, codec, clock)
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

    def set_waiting(self, records: int | None, nbytes: int | None = None) -> None:
        if records is not None:
            nbytes = records * st.RECORD_BYTES
        self.status.waiting_bytes = nbytes
        self.status.waiting_audio_seconds = None if nbytes is None else round(
            nbytes / BYTES_PER_AUDIO_SECOND, 1)

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


def read_pendant_time(raw: bytes) -> int | None:
    """The time characteristic, uint32 LE epoch seconds (omi-storage.md §1)."""
    return struct.unpack_from("<I", raw)[0] if len(raw) >= 4 else None
