"""A finished conversation → the exact POST bodies for ``/v1/dev/user/conversations/from-segments``.

Every rule the server enforces (omi-api.md §4, §9) is applied here, before anything leaves, so a
body that is stored in the outbox can only fail for reasons outside our control. The bodies are
computed once and stored serialized, so every retry sends identical bytes.

Speaker attribution: the bridge runs tiny.en, which has no diarization, and a pendant hears the
wearer *and* everybody around them. ``is_user: true`` would put other people's words under the
wearer's name in the Omi app, so every segment is sent as ``is_user: false``, ``SPEAKER_00``
(speaker_id 0): Omi shows it as "Speaker 0" and its own speaker-cluster logic may still attribute it.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bridge.config import LocationOptions
from bridge.core.records import SOURCES, Conversation

_LOGGER = logging.getLogger(__name__)

MAX_SEGMENTS = 500
"""Segments per request: pydantic min 1 / max 500 on transcript_segments (omi-api.md §4)."""
MAX_SESSION_ID_CHARS = 200
"""client_session_id length limit, 1–200 after stripping (omi-api.md §4)."""
MIN_SEGMENT_SECONDS = 0.001
"""Length given to a zero-length ASR segment: the server needs end > start (omi-api.md §4.2)."""
TIME_DECIMALS = 3
"""Segment times are sent in milliseconds; finer precision means nothing for ASR timestamps."""
MERGE_MAX_GAP_SECONDS = 2.0
"""Only segments at most this far apart are merged to fit 500: a longer pause is a turn boundary
worth keeping as its own segment."""
MERGE_MAX_SEGMENT_SECONDS = 60.0
"""A merged segment never spans more than this, so the app still shows readable chunks."""
PART_SUFFIX = ":part-{n}"
"""Id suffix of each part of a conversation split over 500 segments (omi-api.md §9.3)."""
DEFAULT_SPEAKER = "SPEAKER_00"
"""No diarization: one speaker label, consistent with speaker_id 0 (omi-api.md §4.1, §9.9)."""


@dataclass(frozen=True)
class _Seg:
    text: str
    start: float
    end: float


def _aware_utc(when: datetime) -> datetime:
    # A naive datetime might make the server compare naive with aware and fail (omi-api.md §11.6);
    # the contract says conversation times are UTC, so a naive one is taken as UTC.
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def _iso(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds")


def _to_ms(when: datetime) -> datetime:
    # Truncate to what _iso prints, so the finished_at > started_at check holds on the wire too.
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


def _clean(conv: Conversation) -> list[_Seg]:
    """Stripped, non-empty, start >= 0, end > start, sorted by start."""
    out = []
    for seg in conv.segments:
        text = " ".join(seg.text.split())
        if not text:
            continue
        start = max(0.0, float(seg.start))
        end = max(float(seg.end), start + MIN_SEGMENT_SECONDS)
        out.append(_Seg(text, start, end))
    out.sort(key=lambda s: (s.start, s.end))
    return out


def _merge(segs: list[_Seg], limit: int) -> list[_Seg]:
    """Merge adjacent segments, closest pairs first, until at most ``limit`` remain or no pair
    qualifies (gap ≤ MERGE_MAX_GAP_SECONDS, merged span ≤ MERGE_MAX_SEGMENT_SECONDS)."""
    if len(segs) <= limit:
        return segs
    groups: list[_Seg | None] = list(segs)
    nxt = list(range(1, len(segs) + 1))  # index of the next live group; len(segs) = none
    prv = list(range(-1, len(segs) - 1))
    version = [0] * len(segs)
    # (gap, merged span, left index, versions): equal gaps merge the shortest groups first, so
    # the merged segments come out even instead of a few one-minute blobs at the start.
    heap: list[tuple[float, float, int, int, int]] = []

    def push(i: int) -> None:
        j = nxt[i]
        if j >= len(groups):
            return
        a, b = groups[i], groups[j]
        assert a is not None and b is not None
        gap = round(b.start - a.end, TIME_DECIMALS)
        span = max(a.end, b.end) - a.start
        if gap <= MERGE_MAX_GAP_SECONDS and span <= MERGE_MAX_SEGMENT_SECONDS:
            heapq.heappush(heap, (gap, span, i, version[i], version[j]))

    for i in range(len(segs) - 1):
        push(i)
    live = len(segs)
    while live > limit and heap:
        _gap, _span, i, vi, vj = heapq.heappop(heap)
        j = nxt[i]
        if groups[i] is None or j >= len(groups) or version[i] != vi or version[j] != vj:
            continue
        a, b = groups[i], groups[j]
        assert a is not None and b is not None
        groups[i] = _Seg(f"{a.text} {b.text}", a.start, max(a.end, b.end))
        groups[j] = None
        version[i] += 1
        nxt[i] = nxt[j]
        if nxt[j] < len(groups):
            prv[nxt[j]] = i
        live -= 1
        push(i)
        if prv[i] >= 0:
            push(prv[i])
    return [g for g in groups if g is not None]


def part_session_id(client_session_id: str, n: int) -> str:
    """The id of part ``n`` (1-based) of a split conversation, ≤ 200 chars and deterministic."""
    suffix = PART_SUFFIX.format(n=n)
    base = client_session_id
    if len(base) + len(suffix) > MAX_SESSION_ID_CHARS:
        # Keep it unique: a digest of the full id replaces the tail that no longer fits.
        digest = hashlib.sha256(base.encode()).hexdigest()[:16]
        base = base[: MAX_SESSION_ID_CHARS - len(suffix) - len(digest) - 1] + "~" + digest
    return base + suffix


def _body(csid: str, conv: Conversation, started_at: datetime, finished_at: datetime,
          segs: list[_Seg], offset: float, location: LocationOptions) -> dict[str, Any]:
    segments: list[dict[str, Any]] = []
    last_end = 0.0
    for s in segs:
        start = round(s.start - offset, TIME_DECIMALS)
        start = max(start, 0.0)
        end = round(s.end - offset, TIME_DECIMALS)
        if end <= start:
            end = round(start + MIN_SEGMENT_SECONDS, TIME_DECIMALS)
        last_end = end
        segments.append({
            "text": s.text,
            "start": start,
            "end": end,
            "is_user": False,
            "person_id": None,
            "speaker": DEFAULT_SPEAKER,
            "speaker_id": 0,
        })
    started_at = _to_ms(started_at)
    finished_at = _to_ms(max(finished_at, started_at + timedelta(seconds=last_end)))
    if finished_at <= started_at:
        finished_at = started_at + timedelta(milliseconds=1)
    body: dict[str, Any] = {
        "transcript_segments": segments,
        "client_session_id": csid,
        "started_at": _iso(started_at),
        "finished_at": _iso(finished_at),
        "language": conv.language or "en",
        "source": conv.source,
    }
    if location.enabled:
        geo: dict[str, Any] = {"latitude": location.latitude, "longitude": location.longitude}
        if location.address:
            geo["address"] = location.address
        body["geolocation"] = geo
    return body


def request_bodies(conv: Conversation, location: LocationOptions) -> list[dict[str, Any]]:
    """The POST bodies for ``conv``: [] when it has no text, one body normally, several
    (``<id>:part-N``) when even after merging it has more than 500 segments."""
    if conv.source not in SOURCES:
        raise ValueError(f"source {conv.source!r} is not one of {SOURCES}")
    csid = conv.client_session_id.strip()
    if not csid or len(csid) > MAX_SESSION_ID_CHARS:
        raise ValueError(f"client_session_id must be 1–{MAX_SESSION_ID_CHARS} chars: {csid!r}")
    segs = _clean(conv)
    if not segs:
        return []
    started_at = _aware_utc(conv.started_at)
    finished_at = _aware_utc(conv.finished_at)
    merged = _merge(segs, MAX_SEGMENTS)
    if len(merged) < len(segs):
        _LOGGER.info("%s: conversation %s: merged %d segments into %d to fit the %d-segment limit",
                     conv.device or "-", csid, len(segs), len(merged), MAX_SEGMENTS)
    if len(merged) <= MAX_SEGMENTS:
        return [_body(csid, conv, started_at, finished_at, merged, 0.0, location)]
    chunks = [merged[i:i + MAX_SEGMENTS] for i in range(0, len(merged), MAX_SEGMENTS)]
    _LOGGER.info("%s: conversation %s: %d segments split into %d parts",
                 conv.device or "-", csid, len(merged), len(chunks))
    bodies = []
    for n, chunk in enumerate(chunks, start=1):
        offset = chunk[0].start
        part_start = started_at + timedelta(seconds=offset)
        part_end = started_at + timedelta(seconds=max(s.end for s in chunk))
        if n == len(chunks):
            part_end = max(part_end, finished_at)
        bodies.append(_body(part_session_id(csid, n), conv, part_start, part_end, chunk, offset,
                            location))
    return bodies
