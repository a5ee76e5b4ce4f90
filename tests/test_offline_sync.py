"""Offline recordings: what the pendant stored while out of range reaches the bridge, durably,
once, at the times it was spoken. Real bleak against the fake bluetoothd and the simulated
pendant's storage service (sim/omi_bridge_sim/omi_storage.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from omi_bridge_sim.omi import FrameEncoder, OmiModel
from omi_bridge_sim.omi_storage import PendantStorage

from bridge.audio.files import decode_file
from bridge.config import DeviceConfig, LinkOptions
from bridge.core.pcm import SAMPLE_RATE
from bridge.core.stored import StoredBlock
from bridge.devices.link import DeviceLink
from bridge.devices.omi import storage as st
from bridge.devices.omi.chunks import Spool, pendant_dir
from bridge.devices.omi.sync import PendantSync

TIMEOUT = 30.0
FAST = LinkOptions(reconnect_min_seconds=0.1, reconnect_max_seconds=0.5, scan_timeout_seconds=5.0)
CORPUS = Path(__file__).resolve().parent / "data"
SPOKEN_AT = 1_780_000_000.0
"""When the wearer spoke, away from the Pi (2026-05-28, well in the past of the test run)."""
FAST_RATE = 400_000.0
"""Transfer rate for tests: 12× a CV1's ~32 kB/s (omi-storage.md §8), so a sync takes a second."""


async def until_synced(sync: PendantSync, predicate=None, timeout: float = TIMEOUT) -> None:
    """Wait until a sync ends with ``predicate`` true (default: it ended done or failed)."""
    check = predicate or (lambda: sync.status.state in ("done", "failed"))
    async with asyncio.timeout(timeout):
        while not check():
            await sync.sync_ended.wait()
            sync.sync_ended.clear()


class Collector:
    """A StoredAudioSink that keeps what it is given (and its resume cursor, like the feeder)."""

    def __init__(self) -> None:
        self.blocks: list[StoredBlock] = []
        self.ends = 0
        self.cursor = 0
        self.cond = threading.Condition()

    def stored_audio(self, block: StoredBlock) -> None:
        with self.cond:
            self.blocks.append(block)
            self.cursor = block.cursor + 1
            self.cond.notify_all()

    def stored_end(self) -> None:
        with self.cond:
            self.ends += 1
            self.cond.notify_all()

    def resume_cursor(self) -> int:
        return self.cursor

    def samples(self) -> int:
        return sum(len(b.pcm) for b in self.blocks)


def silent_pendant(storage: PendantStorage, **kw: object) -> OmiModel:
    """A pendant whose microphone hears silence (live audio keeps the link's watchdog fed)."""
    return OmiModel(audio=np.zeros(SAMPLE_RATE, np.int16), after_clip="silence",
                    firmware=kw.pop("firmware", "3.0.20"), storage=storage, **kw)  # type: ignore[arg-type]


def clip(name: str) -> np.ndarray:
    return decode_file(CORPUS / name)


async def sync_once(fake, model: OmiModel, sink: Collector, tmp_path: Path,
                    until=None) -> tuple[PendantSync, DeviceLink]:
    """Connect like the daemon does, until the pendant's storage is drained (or ``until``)."""
    sync = PendantSync(model.address, "pendant", tmp_path, sink, gap_seconds=30.0)
    link = DeviceLink(DeviceConfig("omi", model.address), FAST, _NullSink(),
                      extra={"offline_sync": sync})
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    consumer = asyncio.create_task(sync.run_consumer(stop))
    try:
        await until_synced(sync, until)
        await asyncio.to_thread(sync.consume)
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)
        await asyncio.wait_for(consumer, TIMEOUT)
    return sync, link


class _NullSink:
    def write(self, pcm: np.ndarray, /) -> None:
        pass


async def test_ring_sync_gives_every_stored_frame_its_spoken_time(fake_bluez, tmp_path):
    storage = PendantStorage(rate_bytes_per_second=FAST_RATE, clock_error=-7.0)
    speech = clip("jfk.flac")
    enc = FrameEncoder(21)
    frames_a = storage.record_clip(speech, SPOKEN_AT, enc)
    frames_b = storage.record_clip(speech, SPOKEN_AT + 600, enc)  # ten minutes later
    model = silent_pendant(storage)
    await fake_bluez.add_device(model)
    sink = Collector()
    sync, _link = await sync_once(fake_bluez, model, sink, tmp_path)
    assert sync.status.state == "done" and sync.status.protocol == "ring"
    # Both clips, every frame, decoded (the silent microphone's own offline frames come after).
    first = [b for b in sink.blocks if b.started_at < SPOKEN_AT + 300]
    second = [b for b in sink.blocks if SPOKEN_AT + 300 <= b.started_at < SPOKEN_AT + 1200]
    assert sum(len(b.pcm) for b in first) == frames_a * 320
    assert sum(len(b.pcm) for b in second) == frames_b * 320
    # True times: the pendant's clock ran 7 s slow; corrected by the offset measured at time sync.
    assert first[0].started_at == pytest.approx(SPOKEN_AT, abs=1.0)
    assert second[0].started_at == pytest.approx(SPOKEN_AT + 600, abs=1.0)
    assert second[0].new_run and first[0].new_run and not first[1].new_run
    assert sync.status.clock_offset_seconds == pytest.approx(7.0, abs=1.5)
    # Freed on the pendant only up to what is on disk, and everything was freed in the end.
    assert storage.unread == 0 and storage.stats.advances
    assert not any(b.estimated for b in sink.blocks)
    assert model.time_writes, "the time was written on connect"


async def test_cut_transfers_resume_from_the_last_durable_record(fake_bluez, tmp_path):
    # The pendant's clock ran slow while it recorded; the first connect set it right.
    storage = PendantStorage(rate_bytes_per_second=FAST_RATE, clock_error=-7.0)
    enc = FrameEncoder(21)
    total = storage.record_clip(clip("monologue.wav"), SPOKEN_AT, enc)
    rng = random.Random(4)
    cuts = [rng.randrange(2_000, 60_000) for _ in range(10)]
    storage.cut_after_bytes.extend(cuts)
    spool_root = pendant_dir(tmp_path, "C0:FF:EE:00:00:01")
    violations: list[str] = []

    def check_durable(seq: int) -> None:
        # Before anything is freed, the records below ``seq`` must be in fsynced chunk files.
        fresh = Spool(spool_root)
        on_disk = fresh.fetched(f"r{storage.ring_id:016x}") or 0
        if on_disk < seq:
            violations.append(f"advance to {seq} with only {on_disk} on disk")

    storage.on_advance = check_durable
    model = silent_pendant(storage)
    await fake_bluez.add_device(model)
    sink = Collector()
    sync = PendantSync(model.address, "pendant", tmp_path, sink, gap_seconds=30.0)
    link = DeviceLink(DeviceConfig("omi", model.address), FAST, _NullSink(), extra={"offline_sync": sync})
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    consumer = asyncio.create_task(sync.run_consumer(stop))
    try:
        await until_synced(sync, lambda: storage.stats.cuts == len(cuts)
                           and sync.status.state == "done", TIMEOUT * 3)
        await asyncio.to_thread(sync.consume)
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)
        await asyncio.wait_for(consumer, TIMEOUT)
    assert violations == []
    speech = [b for b in sink.blocks if b.started_at < SPOKEN_AT + 3600]
    # 0 lost, 0 duplicated: every frame exactly once, in order.
    assert sum(len(b.pcm) for b in speech) == total * 320
    positions = [b.position for b in sink.blocks]
    assert len(positions) == len(set(positions))
    assert [b.cursor for b in sink.blocks] == sorted(b.cursor for b in sink.blocks)
    # Records fetched on later connects keep the first connect's clock correction: one run,
    # at the time it was said, not split where a connection after the time was set took over.
    assert [b.new_run for b in speech].count(True) == 1
    assert speech[0].started_at == pytest.approx(SPOKEN_AT, abs=1.0)
    assert speech[-1].started_at + len(speech[-1].pcm) / SAMPLE_RATE == pytest.approx(
        SPOKEN_AT + total * 0.02, abs=1.0)
    assert link.stats.reconnects >= len(cuts)
    assert storage.unread == 0
    # "Last sync" in status counts what the cut syncs fetched too, each record once.
    assert sync.status.last_sync_bytes == sync.spool.next_cursor * st.RECORD_BYTES


@pytest.mark.parametrize("firmware,generation", [("3.0.18", "multi-file"), ("3.0.12", "legacy")])
async def test_older_generations_sync_by_firmware_revision(fake_bluez, tmp_path, firmware, generation):
    storage = PendantStorage(generation=generation, rate_bytes_per_second=FAST_RATE)
    enc = FrameEncoder(21)
    frames = storage.record_clip(clip("jfk.flac"), SPOKEN_AT, enc)
    model = silent_pendant(storage, firmware=firmware)
    await fake_bluez.add_device(model)
    sink = Collector()
    sync, _link = await sync_once(fake_bluez, model, sink, tmp_path)
    assert sync.status.protocol == generation and sync.status.state == "done"
    # The dangling tail of each 440-byte block is not taken for a frame: every frame, once.
    assert sink.samples() >= frames * 320
    assert sink.samples() - frames * 320 < 60 * SAMPLE_RATE  # + what the idle mic stored since
    assert storage.stats.deletes >= 1 and storage.stored_bytes == 0
    if generation == "multi-file":
        assert sink.blocks[0].started_at == pytest.approx(SPOKEN_AT, abs=1.0)
        assert not sink.blocks[0].estimated
    else:
        assert sink.blocks[0].estimated and sync.status.times_estimated  # no stamps at all (§5)


async def test_invalid_pendant_clock_gives_estimated_times(fake_bluez, tmp_path):
    storage = PendantStorage(rate_bytes_per_second=FAST_RATE, rtc_valid=False, invalid_stamp="zero")
    storage.record_clip(clip("jfk.flac"), time.time() - 30, FrameEncoder(21))
    model = silent_pendant(storage)
    await fake_bluez.add_device(model)
    sink = Collector()
    sync, _ = await sync_once(fake_bluez, model, sink, tmp_path)
    assert sink.blocks and all(b.estimated for b in sink.blocks[:10])
    assert sync.status.times_estimated
    # Estimated, never wildly off: placed before the sync, not in the future.
    assert sink.blocks[0].started_at < time.time()


@pytest.mark.parametrize("fault", ["overrun", "truncate", "unknown_answer", "error_status", "full",
                                   "empty"])
async def test_bad_input_is_named_in_the_journal_and_nothing_is_cleared(fake_bluez, tmp_path, caplog,
                                                                        fault):
    caplog.set_level(logging.INFO)
    storage = PendantStorage(rate_bytes_per_second=FAST_RATE,
                             faults=(fault,) if fault in ("overrun", "truncate", "unknown_answer",
                                                          "error_status") else (),
                             capacity_records=40 if fault == "full" else 1_100_000)
    if fault != "empty":
        storage.record_clip(clip("jfk.flac"), SPOKEN_AT, FrameEncoder(21))
    storage.recording = False  # only the clip is stored, not the microphone before the connect
    unread = storage.unread
    model = OmiModel(firmware="3.0.20", storage=storage)  # the demo clip streams live meanwhile
    await fake_bluez.add_device(model)
    sink = Collector()
    live = _CountSink()
    sync = PendantSync(model.address, "pendant", tmp_path, sink, gap_seconds=30.0)
    link = DeviceLink(DeviceConfig("omi", model.address), FAST, live, extra={"offline_sync": sync})
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    try:
        await until_synced(sync)
        await link.supervisor.connected_event.wait()
        await live.wait(2 * SAMPLE_RATE)
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("bridge.devices.omi.")]
    text = "\n".join(lines)
    assert "pendant" in text
    assert live.samples > SAMPLE_RATE, "live audio kept streaming"
    if fault in ("unknown_answer", "error_status"):
        assert sync.status.state == "failed" and storage.stats.advances == []
        assert storage.unread == unread, "nothing freed"
        assert ("unknown answer tag" in text) if fault == "unknown_answer" else ("status 9" in text)
        assert "freed nothing" in text
    elif fault == "truncate":
        assert "truncated" in text and sync.status.state == "failed"
        on_disk = Spool(pendant_dir(tmp_path, model.address)).fetched(f"r{storage.ring_id:016x}") or 0
        assert all(seq <= on_disk for seq in storage.stats.advances)
    elif fault == "overrun":
        assert "runs past the record" in text and sync.status.state == "done"
    elif fault == "full":
        assert "overwrote" in text and sync.status.state == "done"
    else:
        assert "nothing stored" in text and sync.status.state == "done"


class _CountSink:
    """Counts live samples; ``wait(n)`` until that many arrived."""

    def __init__(self) -> None:
        self.samples = 0
        self._grew = asyncio.Event()

    def write(self, pcm: np.ndarray, /) -> None:
        self.samples += len(pcm)
        self._grew.set()

    async def wait(self, n: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            while self.samples < n:
                self._grew.clear()
                await self._grew.wait()


def test_generation_is_chosen_by_firmware_revision_only() -> None:
    assert st.generation_for("3.0.20") is st.Generation.RING
    assert st.generation_for("v3.1.0-beta") is st.Generation.RING
    assert st.generation_for("3.0.19") is st.Generation.MULTI_FILE
    assert st.generation_for("3.0.17") is st.Generation.MULTI_FILE
    assert st.generation_for("2.0.5") is st.Generation.LEGACY
    assert st.generation_for("CV1 build 7") is None
    assert st.crc32(b"123456789") == 0xCBF43926  # the reference's test vector (§3.4)
