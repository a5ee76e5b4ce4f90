"""Offline sync wired into the daemon: per pendant, the download (``PendantSync``, devices) and
the speech side (``OfflineFeeder``), joined by ``bridge.core.stored``.

Sync runs on every connect of an Omi device with ``offline_sync = true``, beside live audio on
the same connection (docs/reference/omi-storage.md §7: both are notifications; the firmware
allows them at once). Offline conversations go to the same outbox as live ones and share its
hourly write budget; the outbox sends in the order conversations became ready, so a backlog
from a long absence goes out oldest first and a live conversation finished meanwhile waits
behind only what was queued before it (every item's wait is bounded by the queue ahead of it
divided by the budget; none is skipped).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge.config import Config, DeviceConfig
from bridge.core.kinds import DeviceKind
from bridge.core.records import Conversation
from bridge.devices.omi.chunks import pendant_dir
from bridge.devices.omi.sync import PendantSync
from bridge.speech.offline import OfflineFeeder


class OfflineParts:
    """One pendant's offline sync: ``sync`` goes into the session (``extra["offline_sync"]``),
    ``run(stop)`` is the task handing durable records to speech."""

    def __init__(self, config: Config, device: DeviceConfig, worker: Any,
                 on_conversation: Callable[[Conversation], None], storage: Path) -> None:
        root = pendant_dir(storage, device.address)
        self.feeder = OfflineFeeder(device.address, config, worker, on_conversation,
                                    label=device.label, root=root, source=device.kind)
        self.sync = PendantSync(device.address, device.label, storage, self.feeder,
                                gap_seconds=config.conversation.gap_seconds)
        self.recovered = self.feeder.recover()

    async def run(self, stop: asyncio.Event) -> None:
        await self.sync.run_consumer(stop)

    def backlog_seconds(self) -> float:
        return self.feeder.backlog_seconds() + self.sync.pending_seconds()

    def status(self) -> dict[str, Any]:
        out = self.sync.status.as_json()
        out["conversations"] = self.feeder.conversations
        out["estimated_conversations"] = self.feeder.estimated_conversations
        out["fetched_not_transcribed_seconds"] = round(self.sync.pending_seconds(), 1)
        return out


def offline_for(config: Config, device: DeviceConfig, worker: Any,
                on_conversation: Callable[[Conversation], None], storage: Path) -> OfflineParts | None:
    """The device's offline sync, or None (not an Omi pendant, or ``offline_sync = false``)."""
    if device.kind != DeviceKind.OMI or not device.offline_sync:
        return None
    return OfflineParts(config, device, worker, on_conversation, storage)
