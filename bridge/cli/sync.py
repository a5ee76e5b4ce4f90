"""``omi-bridge sync [DEVICE]``: fetch what a pendant recorded out of range, now, in the foreground.

The daemon does this on every connect by itself; this command is for when it is stopped (a first
look at a pendant, a Pi that was off, a test of the storage). It does what the daemon does for one
pendant: one connection with the time written first and live audio kept subscribed (its speech
goes to the device's live pipeline as in the daemon, so nothing said meanwhile is lost), the
download made durable before anything is freed on the pendant, the fetched audio transcribed by
the same speech path and every conversation committed to the outbox, from which the daemon sends
it (within the shared hourly budget) when it runs again.

It takes the daemon's locks: while the daemon runs it holds the pendant and the spool, so this
refuses; while this runs, a daemon started meanwhile refuses likewise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from bridge.cli.status import format_bytes, format_span
from bridge.config import Config, DeviceConfig, load_config, resolve_config_path
from bridge.core.errors import BridgeError
from bridge.core.kinds import DeviceKind
from bridge.core.records import Conversation
from bridge.core.stored import SyncStatus

PROGRESS_EVERY_SECONDS = 0.5
"""At most this often a progress line (a terminal line is rewritten; a log or pipe gets lines)."""
SETTLE_POLL_SECONDS = 0.2
"""How often the end of transcription is looked for once the download is over."""
WORKER_STOP_SECONDS = 5.0
"""Like the daemon's stop: what the worker has not finished by then stays spooled for the next start."""


def pick_device(config: Config, wanted: str | None) -> DeviceConfig:
    """The paired pendant named (by name or address) or, with none named, the only one."""
    where = config.path or str(resolve_config_path(None))
    pendants = [d for d in config.devices if d.kind == DeviceKind.OMI]
    names = ", ".join(d.label for d in pendants) or "none"
    if wanted is None:
        if len(pendants) == 1:
            device = pendants[0]
        elif not pendants:
            raise BridgeError(f"no Omi pendant is paired in {where}",
                              "pair one first: omi-bridge pair")
        else:
            raise BridgeError(f"{len(pendants)} pendants are paired in {where}: say which one",
                              f"omi-bridge sync NAME, one of: {names}")
    else:
        key = wanted.strip().lower()
        found = [d for d in config.devices if key in (d.name.lower(), d.address.lower())]
        if not found:
            raise BridgeError(f"no paired device {wanted!r} in {where}",
                              f"paired pendants: {names} (or pair it: omi-bridge pair)")
        device = found[0]
        if device.kind != DeviceKind.OMI:
            raise BridgeError(f"{device.label} is {device.kind} glasses; only Omi pendants store "
                              "audio while out of range", f"paired pendants: {names}")
    if not device.offline_sync:
        raise BridgeError(f"offline sync is off for {device.label} in {where}",
                          "set offline_sync = true in its [[devices]] table")
    return device


class Progress:
    """The progress line on stderr: bytes, audio minutes, transfer rate and ETA."""

    def __init__(self, label: str, stream: TextIO, bytes_per_audio_second: float) -> None:
        self.label = label
        self.stream = stream
        self.tty = stream.isatty()
        self.per_second = bytes_per_audio_second
        self._printed_at = 0.0
        self._start: tuple[float, int] | None = None
        self._pending_newline = False

    def __call__(self, status: SyncStatus) -> None:
        now = time.monotonic()
        if status.state != "syncing":
            self._start = None  # a cut or the end: the next connection measures its own rate
            return
        if self._start is None or status.fetched_bytes < self._start[1]:
            self._start = (now, status.fetched_bytes)
        if now - self._printed_at < PROGRESS_EVERY_SECONDS and status.fetched_bytes < status.total_bytes:
            return
        self._printed_at = now
        self.write(self.line(status, now))

    def line(self, status: SyncStatus, now: float) -> str:
        fetched, total = status.fetched_bytes, status.total_bytes
        text = f"{self.label}: {format_bytes(fetched)}"
        if total:
            text += f" of {format_bytes(total)} ({min(1.0, fetched / total):.0%})"
        text += f", ≈ {fetched / self.per_second / 60:.1f} min of audio"
        assert self._start is not None
        elapsed, since = now - self._start[0], fetched - self._start[1]
        if elapsed > 0 and since > 0:
            rate = since / elapsed
            text += f", {format_bytes(rate)}/s"
            if total > fetched:
                text += f", ETA {format_span((total - fetched) / rate)}"
        return text

    def write(self, text: str) -> None:
        if self.tty:
            self.stream.write(f"\r\x1b[K{text}")
            self._pending_newline = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self._pending_newline:
            self.stream.write("\n")
            self.stream.flush()
            self._pending_newline = False


@dataclass
class Summary:
    """What one ``omi-bridge sync`` did (``--json`` prints ``as_json()``)."""

    device: str
    bytes: int = 0
    audio_seconds: float = 0.0
    conversations: list[Conversation] = field(default_factory=list)
    seconds: float = 0.0
    complete: bool = False
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"device": self.device, "bytes": self.bytes,
                "audio_seconds": round(self.audio_seconds, 1),
                "conversations": len(self.conversations), "seconds": round(self.seconds, 1)}

    def text(self) -> str:
        head = (f"{self.device}: fetched {format_bytes(self.bytes)} (≈ {format_span(self.audio_seconds)} of "
                f"audio) in {format_span(self.seconds)}")
        if not self.complete:
            head += f"; the sync stopped: {self.error}"
        n = len(self.conversations)
        lines = [head, f"{n} offline conversation{'s' if n != 1 else ''} queued in the outbox"
                 + (":" if n else "")]
        for conv in sorted(self.conversations, key=lambda c: c.started_at):
            words = len(" ".join(s.text for s in conv.segments).split())
            start, end = conv.started_at.astimezone(), conv.finished_at.astimezone()
            lines.append(f"  {start:%Y-%m-%d %H:%M:%S} → {end:%H:%M:%S}  {words} words")
        if n:
            lines.append("the daemon sends them to Omi when it runs, oldest first, within the "
                         "hourly write limit (omi-bridge outbox lists them)")
        if not self.complete:
            lines.append("what was fetched is kept; the rest is fetched on the next connect")
        return "\n".join(lines)


async def async_sync(config: Config, device: DeviceConfig, *, timeout: float,
                     progress: Progress | None) -> Summary:
    """Connect to ``device``, sync it to the end, transcribe and queue what it held."""
    from bridge.app.offline import offline_for
    from bridge.devices.link import DeviceLink
    from bridge.outbox.store import Outbox
    from bridge.speech.asr.worker import AsrWorker
    from bridge.speech.pipeline import SpeechPipeline

    started = time.monotonic()
    summary = Summary(device.label)
    storage = config.storage.path
    outbox = Outbox.open(storage)
    worker = AsrWorker(config.asr)
    try:
        await asyncio.to_thread(worker.start)
        if worker.backend is not None:
            # One-shot: an unreachable Wyoming server is an error now, not windows retried forever.
            await asyncio.to_thread(worker.backend.probe)

        def enqueue(conv: Conversation) -> None:
            outbox.enqueue(conv, config.location, time.time())

        def enqueue_offline(conv: Conversation) -> None:
            enqueue(conv)
            summary.conversations.append(conv)

        live = SpeechPipeline(device.address, config, worker, enqueue, source=device.kind,
                              label=device.label, storage=storage)
        await asyncio.to_thread(live.recover, resume=True)
        parts = await asyncio.to_thread(offline_for, config, device, worker, enqueue_offline, storage)
        assert parts is not None  # pick_device checked kind and offline_sync
        sync = parts.sync
        sync.on_progress = progress
        carried = int(sync.spool.state.get("unfinished_bytes", 0))
        link = DeviceLink(device, config.link, live, extra={"offline_sync": sync}, capture_thread=True)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(link.run(stop)), asyncio.create_task(parts.run(stop))]
        try:
            await _until_synced(sync, link, timeout)
            summary.complete = sync.status.state == "done"
            summary.error = sync.status.last_error
        finally:
            if progress is not None:
                progress.done()
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        # Whatever is on disk goes through speech now, even after a failed sync.
        await asyncio.to_thread(sync.consume)
        while not (parts.feeder.settled() and worker.healthy()):
            if not worker.healthy():
                summary.error = (f"transcription stopped ({worker.health().problem()}); the "
                                 "fetched audio stays spooled and the daemon finishes it")
                summary.complete = False
                break
            await asyncio.sleep(SETTLE_POLL_SECONDS)
        fetched = sync.status.last_sync_bytes if summary.complete else None
        summary.bytes = (fetched - carried if fetched is not None
                         else int(sync.spool.state.get("unfinished_bytes", 0)) - carried)
        summary.audio_seconds = sync.status.audio_seconds_handed_on
    finally:
        await asyncio.to_thread(worker.stop, WORKER_STOP_SECONDS)
        outbox.close()
    summary.seconds = time.monotonic() - started
    return summary


async def _until_synced(sync: Any, link: Any, timeout: float) -> None:
    """Until a sync ends done, failed or impossible; a cut one resumes on the link's reconnect.
    Raises when the pendant is out of reach for ``timeout`` seconds."""
    seen_at = time.monotonic()
    while True:
        try:
            await asyncio.wait_for(sync.sync_ended.wait(), 1.0)
        except TimeoutError:
            if link.stats.connected:
                seen_at = time.monotonic()
            elif time.monotonic() - seen_at > timeout:
                raise BridgeError(
                    f"{link.device.label} ({link.device.address}) was not reachable for "
                    f"{timeout:.0f} s", "bring it near and wake it (press its button), or pass "
                    "--timeout; whatever it already sent is kept") from None
            continue
        sync.sync_ended.clear()
        seen_at = time.monotonic()
        if sync.status.state in ("done", "failed", "off"):
            return


def _refuse_if_daemon(config: Config, device: DeviceConfig) -> Any:
    from bridge.app.state import acquire_daemon_locks, publish_dir

    try:
        return acquire_daemon_locks(config.storage.path, publish_dir(config))
    except BridgeError as exc:
        raise BridgeError(
            f"the daemon is running and holds {device.label} ({exc.message}); it syncs the "
            "pendant by itself on every connect: omi-bridge status shows how far it is",
            "to sync in the foreground instead, stop it first: sudo systemctl stop omi-bridge") from None


def cmd_sync(args: argparse.Namespace) -> int:
    from bridge.devices.omi.transfers import BYTES_PER_AUDIO_SECOND

    config = load_config(args.config, required=True)
    device = pick_device(config, args.device)
    if not args.verbose:
        # The journal lines the daemon writes are noise beside a progress line; warnings stay.
        logging.getLogger().setLevel(logging.WARNING)
    release = _refuse_if_daemon(config, device)
    try:
        progress = Progress(device.label, sys.stderr, BYTES_PER_AUDIO_SECOND)
        summary = asyncio.run(async_sync(config, device, timeout=args.timeout, progress=progress))
    finally:
        release()
    if args.json:
        print(json.dumps(summary.as_json()))
    else:
        print(summary.text())
    return 0 if summary.complete else 1
