"""Offline sync (issue 13): the bridge's CPU per MB synced, and whether transcription keeps pace
with a long sync at the pendant's real read rate.

The stored audio is what a wearer away from the Pi leaves on the pendant: the corpus clips with
pauses of faint room noise between them (≈ −60 dBFS, so pauses cost bytes as on the real device:
≈ 4.4 kB per second of audio, ≈ 16 MB per hour, omi-storage.md §8), in stretches of a few minutes
separated by pauses in recording longer than the conversation gap, Opus-encoded frame by frame
and packed into 444-byte records with their UTC stamps by the simulated pendant
(``omi_bridge_sim.omi_storage``), served over the fake bluetoothd to real bleak.

- **CPU per MB** (``offline_cpu``): the bridge's side of one sync at the ring protocol's
  ≈ 100 kB/s (the issue's goal rate): ``DeviceLink`` + ``PendantSync`` in this process, receiving
  the notifications, reassembling records and making them durable (fsynced chunk files) before
  ADVANCE, with live audio (a silent microphone) streaming beside it as in the daemon. CPU = this
  process's CPU time minus the simulator thread's (``pthread_getcpuclockid``), from the first
  durable chunk to the end of the sync, minus the live-only rate measured right after for as long;
  dbus-daemon stands in for BlueZ and is not counted. Decoding and transcription are not part of
  it: at 100 kB/s a sync delivers ≈ 23 s of audio per second, which no Whisper keeps up with on
  one core, and the reading side runs at its own pace from the durable spool; the Opus decode of
  the hand-off (``PendantSync.consume``) is measured separately and given in the note, VAD and ASR
  are the capture and ASR rows.
- **Keeping pace** (``offline_pace``): the real daemon (``omi-bridge run``, its own process) syncs
  stored audio at a CV1's ≈ 32 kB/s (omi-storage.md §8) and posts to the simulated Omi API.
  Measured: the time from the transfer's end (the pendant's last ADVANCE) to the last offline
  conversation stored by the API, and the daemon's transcription backlog (its published state)
  sampled every second during the transfer. One hour of stored audio takes ≈ 8 minutes to transfer
  at that rate; the full bench syncs ``PACE_MINUTES`` of it (≈ 2.3 minutes of transfer) and
  extrapolates: transcription keeps pace when the backlog does not grow with the transfer, and
  then the lag after the transfer's end does not depend on its length. The row gives the measured
  lag plus the backlog's growth over the rest of an hour's transfer (its slope over the second
  half of the measured transfer, when positive).

    python -m bench offline [--quick]
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omi_bridge_sim.bus import PrivateBus
from omi_bridge_sim.harness import SimHarness
from omi_bridge_sim.omi import FrameEncoder, OmiModel
from omi_bridge_sim.omi_api import ApiKey, OmiApiSim
from omi_bridge_sim.omi_storage import RECORD_BYTES, PendantStorage

from bench.common import Results, load_corpus, median, part_main, spread
from bench.daemon import proc_cpu
from bridge.config import DeviceConfig, LinkOptions
from bridge.core.pcm import SAMPLE_RATE
from bridge.core.stored import StoredBlock
from bridge.devices.link import DeviceLink
from bridge.devices.omi.sync import PendantSync

SYNC_RATE = 100_000.0
"""The ring protocol's rate of the issue's CPU goal, bytes/s."""
CV1_RATE = 32_000.0
"""A CV1's read rate after the firmware's sync speed-up (omi-storage.md §8)."""
CPU_GOAL_PERCENT = 2.0
LAG_GOAL_SECONDS = 60.0
CPU_MB = 1.0
CPU_RUNS = 3
PACE_MINUTES = 16.0
"""Stored audio the full bench syncs through the daemon (≈ 2.3 min of transfer at 32 kB/s)."""
STRETCH_SECONDS = 180.0
"""A stretch of recording (one conversation): 20 per hour, inside the 25 writes/hour budget, so
the budget never holds a conversation back here ("budget aside", issue 13)."""
RECORDING_PAUSE = 300.0
"""Between stretches: the pendant recorded nothing (a recording gap > GAP_SECONDS)."""
GAP_SECONDS = 30.0
NOISE_RMS = 30.0
"""Room noise under everything (≈ −60 dBFS): silent to the VAD, full-size Opus frames."""
PAUSES = (1.5, 2.5, 4.0)
"""Pauses between clips inside a stretch, seconds, in turn."""
FRAME_SECONDS = 0.02
PENDANT = "C0:FF:EE:00:0F:01"
KEY = "omi_dev_bench_key"
FAST = LinkOptions(reconnect_min_seconds=0.1, reconnect_max_seconds=0.5, scan_timeout_seconds=5.0)
BASELINE_SECONDS = 3.0
"""Live-only CPU is measured for this long after each sync (the live stream's own cost)."""
TIMEOUT = 600.0
POLL = 0.5


# ------------------------------------------------------------------------------ stored audio


def stored_frames(seconds: float) -> list[tuple[bytes, float, bool]]:
    """(Opus frame, UTC time said, starts a stretch) for ``seconds`` of a wearer's time away."""
    clips = [c.pcm for c in load_corpus()]
    if not clips:
        raise RuntimeError("the speech corpus is missing (tests/data or $OMI_BRIDGE_CORPUS)")
    rng = np.random.default_rng(13)
    enc = FrameEncoder(21)
    fs = round(FRAME_SECONDS * SAMPLE_RATE)
    out: list[tuple[bytes, float, bool]] = []
    t0 = time.time() - 86_400.0  # yesterday
    done = 0.0
    stretch = 0
    n = 0
    while done < seconds:
        parts: list[np.ndarray] = []
        length = 0.0
        limit = min(STRETCH_SECONDS, seconds - done)
        while length < limit:
            clip = clips[n % len(clips)]
            pause = np.zeros(int(PAUSES[n % len(PAUSES)] * SAMPLE_RATE), np.int16)
            parts += [pause, clip]
            length += (len(pause) + len(clip)) / SAMPLE_RATE
            n += 1
        parts.append(np.zeros(int(PAUSES[0] * SAMPLE_RATE), np.int16))
        pcm = np.concatenate(parts).astype(np.float64)
        pcm = np.clip(pcm + rng.normal(0.0, NOISE_RMS, len(pcm)), -32768, 32767).astype(np.int16)
        start = t0 + done + stretch * RECORDING_PAUSE
        for k, i in enumerate(range(0, len(pcm) - fs + 1, fs)):
            out.append((enc.encode(pcm[i:i + fs]), start + k * FRAME_SECONDS, k == 0))
        done += len(pcm) / SAMPLE_RATE
        stretch += 1
    return out


def pendant_storage(frames: list[tuple[bytes, float, bool]], rate: float) -> PendantStorage:
    storage = PendantStorage(rate_bytes_per_second=rate)
    for frame, at, first in frames:
        if first:
            storage.flush()  # a pause in recording closes the record, as the firmware's packer
        storage.store_frame(frame, at)
    storage.flush()
    storage.recording = False  # only the time away is stored, not the bench's own start-up
    return storage


def stretches(frames: list[tuple[bytes, float, bool]]) -> int:
    return sum(1 for _f, _t, first in frames if first)


# ------------------------------------------------------------------------------ CPU per MB


class _NullSink:
    def write(self, pcm: np.ndarray, /) -> None:
        pass


class _Stored:
    """A StoredAudioSink that only counts (the decode of the hand-off is measured on its own)."""

    def __init__(self) -> None:
        self.cursor = 0
        self.seconds = 0.0

    def stored_audio(self, block: StoredBlock) -> None:
        self.cursor = block.cursor + 1
        self.seconds += len(block.pcm) / SAMPLE_RATE

    def stored_end(self) -> None:
        pass

    def resume_cursor(self) -> int:
        return self.cursor


def _thread_cpu(name: str) -> Callable[[], float]:
    thread = next(t for t in threading.enumerate() if t.name == name)
    assert thread.ident is not None
    clock = time.pthread_getcpuclockid(thread.ident)
    return lambda: time.clock_gettime(clock)


@dataclass
class CpuRun:
    mb: float
    seconds: float
    sync_cpu: float
    live_rate: float
    decode_cpu: float
    """Opus decode of the hand-off, CPU-seconds per MB."""
    audio_per_mb: float

    @property
    def cpu_per_mb(self) -> float:
        return max(0.0, self.sync_cpu - self.live_rate * self.seconds) / self.mb

    @property
    def percent_at_goal_rate(self) -> float:
        return 100.0 * self.cpu_per_mb * SYNC_RATE / 1e6


def cpu_run(frames: list[tuple[bytes, float, bool]], tmp: Path) -> CpuRun:
    storage = pendant_storage(frames, SYNC_RATE)
    model = OmiModel(address=PENDANT, audio=np.zeros(SAMPLE_RATE, np.int16), after_clip="silence",
                     firmware="3.0.20", storage=storage)
    with PrivateBus() as bus:
        saved = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address  # bleak binds to it on first use
        try:
            with SimHarness([model], bus_address=bus.address, control=False):
                sim_cpu = _thread_cpu("omi-bridge-sim")
                return asyncio.run(_cpu_session(storage, tmp, sim_cpu))
        finally:
            if saved is None:
                os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
            else:
                os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = saved


async def _cpu_session(storage: PendantStorage, tmp: Path, sim_cpu: Callable[[], float]) -> CpuRun:
    sink = _Stored()
    marks: dict[str, float] = {}

    def bridge_cpu() -> float:
        return time.process_time() - sim_cpu()

    def progress(status: Any) -> None:
        if "cpu0" not in marks and status.fetched_bytes:
            marks.update(cpu0=bridge_cpu(), t0=time.monotonic(), bytes0=status.fetched_bytes)

    sync = PendantSync(PENDANT, "bench", tmp, sink, gap_seconds=GAP_SECONDS, on_progress=progress)
    link = DeviceLink(DeviceConfig("omi", PENDANT), FAST, _NullSink(), extra={"offline_sync": sync})
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    try:
        async with asyncio.timeout(TIMEOUT):
            while sync.status.state not in ("done", "failed"):
                await sync.sync_ended.wait()
                sync.sync_ended.clear()
        cpu1, t1, bytes1 = bridge_cpu(), time.monotonic(), sync.status.fetched_bytes
        if sync.status.state != "done" or "cpu0" not in marks:
            raise RuntimeError(f"the sync did not finish: {sync.status.last_error}")
        await asyncio.sleep(BASELINE_SECONDS)  # live audio alone, for its share of the figure
        live_rate = (bridge_cpu() - cpu1) / (time.monotonic() - t1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    d0 = time.process_time()
    await asyncio.to_thread(sync.consume)  # nothing else runs now: all of it is the decode
    decode = time.process_time() - d0
    mb = (bytes1 - marks["bytes0"]) / 1e6
    return CpuRun(mb, t1 - marks["t0"], cpu1 - marks["cpu0"], live_rate, decode / (bytes1 / 1e6),
                  sink.seconds / (bytes1 / 1e6))


def run_cpu(res: Results) -> None:
    mb = 0.05 if res.quick else CPU_MB
    frames = stored_frames(mb * 1e6 / 4_400)
    runs = []
    for _ in range(1 if res.quick else CPU_RUNS):
        with tempfile.TemporaryDirectory(prefix="omi-bench-offline-") as tmp:
            runs.append(cpu_run(frames, Path(tmp)))
    per_mb = [r.cpu_per_mb for r in runs]
    pct = [r.percent_at_goal_rate for r in runs]
    med = median(pct)
    rate = median(r.mb * 1e6 / r.seconds for r in runs)
    audio_per_mb = median(r.audio_per_mb for r in runs)
    decode = median(r.decode_cpu for r in runs)
    live = median(100 * r.live_rate for r in runs)
    res.add("offline_cpu", f"{median(per_mb) * 1000:.0f} CPU-ms per MB = **{med:.2f} %** of a core at "
            f"100 kB/s", ok=med <= CPU_GOAL_PERCENT, ratio=med / CPU_GOAL_PERCENT,
            note=f"receive + reassemble + fsynced spool + ADVANCE, live audio's own "
                 f"{live:.2f} % subtracted; {runs[0].mb:.2f} MB synced at {rate / 1000:.0f} kB/s "
                 f"(≈ {audio_per_mb:.0f} s of audio per MB); median of {len(runs)} ({spread(pct)} %); "
                 f"not included: Opus decode of the hand-off {decode:.2f} CPU-s per MB "
                 f"({decode / audio_per_mb * 100:.2f} % of a core per real-time second), VAD and ASR "
                 "(capture and ASR rows)")
    res.plots["offline_cpu"] = pct
    print(f"offline cpu: {med:.2f} % of a core at 100 kB/s ({spread(pct)})")


# ------------------------------------------------------------------------------ keeping pace


def write_config(tmp: Path, api_url: str) -> Path:
    text = f"""[[devices]]
kind = "omi"
address = "{PENDANT}"
name = "pendant"

[conversation]
gap_seconds = {GAP_SECONDS}

[link]
scan_timeout_seconds = 2.0
reconnect_max_seconds = 2.0

[api]
base_url = "{api_url}"
api_key = "{KEY}"

[storage]
dir = "{tmp / 'state'}"
"""
    path = tmp / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def _published(tmp: Path) -> dict[str, Any]:
    try:
        data = json.loads((tmp / "state" / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class PaceRun:
    audio_seconds: float
    stored_mb: float
    transfer_seconds: float
    lag_seconds: float
    conversations: int
    expected: int
    backlog: list[tuple[float, float]]
    """(seconds into the transfer, transcription backlog seconds)."""
    daemon_cpu: float
    """The daemon's CPU share over the sync and the transcription after it, cores."""

    def slope(self) -> float:
        """Backlog growth (s of backlog per s of transfer) over the second half of the transfer."""
        half = [(t, b) for t, b in self.backlog if t >= self.transfer_seconds / 2]
        if len(half) < 3:
            return 0.0
        t, b = np.array(half).T
        return float(np.polyfit(t, b, 1)[0])

    def hour_transfer(self) -> float:
        """An hour of this stored audio at this run's transfer rate, seconds."""
        return 3600.0 * self.stored_mb / self.audio_seconds * self.transfer_seconds / self.stored_mb

    def hour_lag(self) -> float:
        rest = max(0.0, self.hour_transfer() - self.transfer_seconds)
        return self.lag_seconds + max(0.0, self.slope()) * rest


def pace_run(frames: list[tuple[bytes, float, bool]], tmp: Path, rate: float) -> PaceRun:
    storage = pendant_storage(frames, rate)
    total = storage.write_seq
    ended: list[float] = []

    def advanced(seq: int) -> None:
        if seq >= total:
            ended.append(time.monotonic())

    storage.on_advance = advanced
    stored: list[float] = []
    model = OmiModel(address=PENDANT, audio=np.zeros(SAMPLE_RATE, np.int16), after_clip="silence",
                     firmware="3.0.20", storage=storage)
    expected = stretches(frames)
    log = (tmp / "daemon.log").open("ab")
    daemon = None
    with OmiApiSim({KEY: ApiKey()}) as api, SimHarness([model], control=False) as sim:
        api.on_stored = lambda _c: stored.append(time.monotonic())
        env = sim.env()
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "OMI_API_KEY", "OMI_BRIDGE_CONFIG",
                     "STATE_DIRECTORY", "RUNTIME_DIRECTORY", "INVOCATION_ID", "JOURNAL_STREAM"):
            env.pop(name, None)
        config = write_config(tmp, api.url)
        try:
            daemon = subprocess.Popen([sys.executable, "-m", "bridge", "run", "--config", str(config)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + TIMEOUT
            while sim.run(lambda _f: storage.stats.data_bytes_sent) == 0:
                _check(daemon, deadline, tmp, "the transfer to start")
            t0, cpu0 = time.monotonic(), proc_cpu(daemon.pid)
            backlog: list[tuple[float, float]] = []
            while not ended:
                _check(daemon, deadline, tmp, "the transfer to end")
                state = _published(tmp)
                if "transcription" in state:
                    backlog.append((time.monotonic() - t0,
                                    float(state["transcription"].get("backlog_seconds") or 0.0)))
            while len(stored) < expected:
                _check(daemon, deadline, tmp, f"{expected} conversations (have {len(stored)})")
            cpu = (proc_cpu(daemon.pid) - cpu0) / (time.monotonic() - t0)
        finally:
            if daemon is not None and daemon.poll() is None:
                daemon.terminate()
                try:
                    daemon.wait(20)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
            log.close()
    audio = len(frames) * FRAME_SECONDS
    return PaceRun(audio, total * RECORD_BYTES / 1e6, ended[0] - t0, stored[-1] - ended[0], len(stored),
                   expected, backlog, cpu)


def _check(daemon: subprocess.Popen[bytes], deadline: float, tmp: Path, what: str) -> None:
    if daemon.poll() is not None:
        raise RuntimeError(f"the daemon exited ({daemon.returncode}) waiting for {what}: "
                           + (tmp / "daemon.log").read_text(errors="replace")[-2000:])
    if time.monotonic() > deadline:
        raise RuntimeError(f"timed out waiting for {what}")
    time.sleep(POLL)


def run_pace(res: Results) -> None:
    minutes = 0.5 if res.quick else PACE_MINUTES
    frames = stored_frames(minutes * 60)
    with tempfile.TemporaryDirectory(prefix="omi-bench-offline-") as tmp:
        run = pace_run(frames, Path(tmp), SYNC_RATE if res.quick else CV1_RATE)
    lag = run.hour_lag()
    peak = max((b for _t, b in run.backlog), default=0.0)
    at_end = run.backlog[-1][1] if run.backlog else 0.0
    rate = run.stored_mb * 1e6 / run.transfer_seconds
    res.add("offline_pace", f"{run.lag_seconds:.1f} s after the transfer's end → 1 h: **{lag:.1f} s**",
            ok=lag <= LAG_GOAL_SECONDS and run.conversations == run.expected,
            ratio=lag / LAG_GOAL_SECONDS,
            note=f"the daemon synced {run.audio_seconds / 60:.0f} min of stored audio "
                 f"({run.stored_mb:.1f} MB) in {run.transfer_seconds:.0f} s ({rate / 1000:.0f} kB/s), "
                 f"{run.conversations} of "
                 f"{run.expected} conversations stored by the API; transcription backlog peak "
                 f"{peak:.0f} s, {at_end:.0f} s at the transfer's end, growth {run.slope():+.3f} s per s "
                 f"over its second half (1 h = this lag + growth × the rest of its "
                 f"{run.hour_transfer():.0f} s of transfer); daemon CPU {100 * run.daemon_cpu:.0f} % "
                 "of a core from the transfer's start to the last conversation, ASR included; 1 run")
    res.plots["offline_pace"] = run.backlog
    print(f"offline pace: lag {run.lag_seconds:.1f} s, 1 h {lag:.1f} s, peak backlog {peak:.0f} s")


def run(res: Results) -> None:
    run_cpu(res)
    run_pace(res)


def main(argv: list[str] | None = None) -> int:
    return part_main("offline", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
