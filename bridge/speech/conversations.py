"""An open conversation: what is persisted of it, and how it becomes a ``Conversation``.

Times inside a conversation are samples from its start (``offset``), so a conversation
interrupted by a crash can be finished after a restart, when the stream timeline is a new one.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from bridge.core.pcm import SAMPLE_RATE
from bridge.core.records import Conversation, Segment
from bridge.speech import spool

STATE_VERSION = 1
MAX_SESSION_ID = 200
"""client_session_id is 1–200 chars (omi-api.md §4)."""


def live_session_id(device: str, started_at: datetime) -> str:
    """Stable per conversation of a device: the same after a restart (it is persisted anyway)."""
    sid = f"omi-bridge:{device}:{started_at.isoformat(timespec='milliseconds')}"
    return sid[:MAX_SESSION_ID]


@dataclass
class Utterance:
    key: str
    offset: int
    """Samples from the conversation start."""
    samples: int


@dataclass
class OpenConversation:
    dir: Path
    client_session_id: str
    source: str
    device: str
    started_at: datetime
    start_sample: int | None = None
    """Where it starts on the current stream's timeline; None when recovered from disk."""
    segments: list[Segment] = field(default_factory=list)
    utterances: dict[str, Utterance] = field(default_factory=dict)
    """Accepted (complete) utterances, transcribed or not."""
    done: set[str] = field(default_factory=set)
    """Utterance keys already transcribed (their segments are in ``segments``)."""
    last_end: int = 0
    """End of the last speech, in samples from the start."""
    closed: bool = False
    emitted: bool = False
    languages: dict[str, float] = field(default_factory=dict)
    next_index: int = 1
    default_language: str = "en"

    @property
    def waiting(self) -> list[Utterance]:
        return [u for k, u in self.utterances.items() if k not in self.done]

    @property
    def waiting_samples(self) -> int:
        return sum(u.samples for u in self.waiting)

    @property
    def finished_at(self) -> datetime:
        return self.started_at + timedelta(seconds=max(self.last_end, 1) / SAMPLE_RATE)

    @property
    def ready(self) -> bool:
        return self.closed and not self.waiting and not self.emitted

    def new_key(self) -> str:
        key = f"u{self.next_index:06d}"
        self.next_index += 1
        return key

    def pcm_path(self, key: str) -> Path:
        return self.dir / f"{key}.pcm"

    def meta_path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def language(self) -> str:
        if self.languages:
            return max(self.languages, key=self.languages.__getitem__)
        return self.default_language

    def to_conversation(self) -> Conversation:
        segs = tuple(sorted(self.segments, key=lambda s: (s.start, s.end)))
        return Conversation(client_session_id=self.client_session_id, source=self.source,
                            started_at=self.started_at, finished_at=self.finished_at,
                            language=self.language(), segments=segs, device=self.device)

    # ---- persistence

    def state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "client_session_id": self.client_session_id,
            "source": self.source,
            "device": self.device,
            "started_at": self.started_at.isoformat(),
            "segments": [[s.text, s.start, s.end] for s in self.segments],
            "done": sorted(self.done),
            "last_end": self.last_end,
            "closed": self.closed,
            "languages": dict(self.languages),
            "next_index": self.next_index,
            "default_language": self.default_language,
        }

    def save(self) -> None:
        spool.write_json(self.dir / spool.CONVERSATION_FILE, self.state())

    @classmethod
    def load(cls, path: Path) -> OpenConversation | None:
        data = spool.read_json(path / spool.CONVERSATION_FILE)
        if not data or data.get("version") != STATE_VERSION:
            return None
        conv = cls(dir=path, client_session_id=data["client_session_id"], source=data["source"],
                   device=data["device"], started_at=datetime.fromisoformat(data["started_at"]),
                   segments=[Segment(t, s, e) for t, s, e in data["segments"]],
                   done=set(data["done"]), last_end=int(data["last_end"]),
                   closed=bool(data["closed"]),
                   languages=dict(data.get("languages", {})),
                   next_index=int(data.get("next_index", 1)),
                   default_language=data.get("default_language", "en"))
        return conv

    def save_utterance(self, utt: Utterance, complete: bool) -> None:
        spool.write_json(self.meta_path(utt.key),
                         {"offset": utt.offset, "samples": utt.samples if complete else None})

    def load_utterances(self, *, keep_cut: bool) -> Utterance | None:
        """Read the spooled utterances of a conversation a previous run left (``load``); drop
        what holds no audio. With ``keep_cut`` the utterance still being spoken when the process
        died (its length never saved) is returned instead of being taken as it is."""
        cut: Utterance | None = None
        for meta in sorted(self.dir.glob("u*.json")):
            key = meta.stem
            data = spool.read_json(meta)
            pcm = self.pcm_path(key)
            if data is None or not pcm.exists() or key in self.done:
                self.drop_utterance_files(key)
                continue
            if data["samples"] is None:
                spool.recover_tail(pcm)
            on_disk = spool.pcm_samples(pcm)
            samples = on_disk if data["samples"] is None else min(data["samples"], on_disk)
            if samples <= 0:
                self.drop_utterance_files(key)
                continue
            utt = Utterance(key, int(data["offset"]), samples)
            if keep_cut and data["samples"] is None:
                cut = utt
                continue
            self.utterances[key] = utt
            self.last_end = max(self.last_end, utt.offset + samples)
        return cut

    def drop_utterance_files(self, key: str) -> None:
        for p in (self.pcm_path(key), self.meta_path(key), spool.tail_path(self.pcm_path(key))):
            p.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
