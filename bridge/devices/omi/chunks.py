"""The Pi-side store of what was fetched from a pendant: chunk files of raw storage records.

``<storage>/offline/<pendant>/chunks``: each chunk is written whole (temp file, fsync, rename,
fsync of the directory, bridge/core/files.py), so it is either all there or absent, and the
pendant is told to free records only once the chunk holding them is (omi-storage.md §10). The
state file remembers, per storage source, how far the pendant's records are on this disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.core.files import write_atomic
from bridge.devices.omi import storage as st

_LOGGER = logging.getLogger(__name__)

OFFLINE_DIR = "offline"
"""``<storage>/offline/<pendant>/``: the download spool (chunks, state) and the speech side's runs."""


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "device"


def pendant_dir(storage: Path, address: str) -> Path:
    return storage / OFFLINE_DIR / _safe(address)


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
