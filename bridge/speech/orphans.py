"""Conversations spooled for devices no longer in the config (unpaired since) are finished and
delivered: removing a device from the file never silently drops what it had recorded."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from bridge.config import Config
from bridge.core.records import Conversation
from bridge.speech import spool
from bridge.speech.asr.worker import AsrWorker
from bridge.speech.pipeline import SpeechPipeline

_LOGGER = logging.getLogger(__name__)


def recover_orphans(config: Config, storage: Path, known: list[str], worker: AsrWorker,
                    on_conversation: Callable[[Conversation], None]) -> list[SpeechPipeline]:
    """Finish conversations spooled for devices not in ``known`` (unpaired since), so removing a
    device from the config never silently drops what it had recorded. Returns the pipelines
    still finishing them."""
    spool_root = storage / spool.SPOOL_DIR
    if not spool_root.is_dir():
        return []
    kept = {spool.device_dir(storage, address) for address in known}
    pipelines = []
    for folder in sorted(p for p in spool_root.iterdir() if p.is_dir() and p not in kept):
        if not any(c.is_dir() for c in folder.iterdir()):
            continue
        pipeline = SpeechPipeline(folder.name, config, worker, on_conversation, label=folder.name,
                                  storage=storage)
        found = pipeline.recover()
        if found:
            _LOGGER.info("%s: %d conversation(s) of a device no longer configured recovered",
                         folder.name, found)
            pipelines.append(pipeline)
    return pipelines
