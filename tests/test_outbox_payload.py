"""Request bodies: whatever the speech stage hands over, what leaves passes every server rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from omi_bridge_sim.omi_api import _validate

from bridge.config import LocationOptions
from bridge.core.records import Conversation, Segment
from bridge.outbox.payload import MAX_SEGMENTS, request_bodies

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
NO_LOCATION = LocationOptions()


def conv(segments: list[Segment], *, csid: str = "omi:AA:BB:CC:DD:EE:FF:20260301T090000Z",
         minutes: float = 10, started_at: datetime = T0) -> Conversation:
    return Conversation(csid, "omi", started_at, started_at + timedelta(minutes=minutes), "en",
                        tuple(segments), device="pendant")


def test_a_messy_asr_result_becomes_one_valid_body() -> None:
    body, = request_bodies(conv([
        Segment("  later  ", 5.0, 5.0),      # zero length
        Segment("   ", 1.0, 2.0),            # nothing to say
        Segment("first", -0.02, 1.0),        # a hair before the start
    ]), NO_LOCATION)
    assert _validate(body) is None
    assert [s["text"] for s in body["transcript_segments"]] == ["first", "later"]
    first, later = body["transcript_segments"]
    assert first["start"] == 0.0 and later["end"] > later["start"]
    assert later == {"text": "later", "start": 5.0, "end": 5.001, "is_user": False, "person_id": None,
                     "speaker": "SPEAKER_00", "speaker_id": 0}
    assert body["client_session_id"] == "omi:AA:BB:CC:DD:EE:FF:20260301T090000Z"
    assert body["source"] == "omi" and body["language"] == "en"
    assert body["started_at"] == "2026-03-01T09:00:00.000+00:00"
    assert body["finished_at"] == "2026-03-01T09:10:00.000+00:00"
    assert "geolocation" not in body


def test_times_are_timezone_aware_utc_even_from_another_zone_or_naive() -> None:
    cet = timezone(timedelta(hours=1))
    body, = request_bodies(conv([Segment("hi", 0, 1)], started_at=datetime(2026, 3, 1, 10, tzinfo=cet)),
                           NO_LOCATION)
    assert body["started_at"] == "2026-03-01T09:00:00.000+00:00"
    naive = Conversation("x", "frame", datetime(2026, 3, 1, 9), datetime(2026, 3, 1, 9), "en",
                         (Segment("hi", 0, 2),))
    body, = request_bodies(naive, NO_LOCATION)
    # finished_at not after started_at in the input: the last segment's end pushes it out.
    assert body["finished_at"] == "2026-03-01T09:00:02.000+00:00"
    assert _validate(body) is None


def test_location_is_attached_when_configured() -> None:
    body, = request_bodies(conv([Segment("hi", 0, 1)]),
                           LocationOptions(latitude=52.52, longitude=13.405, address="Berlin"))
    assert body["geolocation"] == {"latitude": 52.52, "longitude": 13.405, "address": "Berlin"}


def test_an_empty_conversation_is_never_sent() -> None:
    assert request_bodies(conv([]), NO_LOCATION) == []
    assert request_bodies(conv([Segment(" \n", 0, 1)]), NO_LOCATION) == []


def test_over_500_close_segments_are_merged_without_losing_words() -> None:
    segs = [Segment(f"w{i}", i * 1.0, i * 1.0 + 0.6) for i in range(1200)]
    body, = request_bodies(conv(segs, minutes=30), NO_LOCATION)
    out = body["transcript_segments"]
    assert len(out) <= MAX_SEGMENTS
    assert " ".join(s["text"] for s in out).split() == [f"w{i}" for i in range(1200)]
    assert _validate(body) is None


def test_over_500_far_apart_segments_are_split_into_parts_with_their_own_ids() -> None:
    segs = [Segment(f"w{i}", i * 5.0, i * 5.0 + 1.0) for i in range(1200)]
    bodies = request_bodies(conv(segs, minutes=120, csid="c" * 200), NO_LOCATION)
    assert [len(b["transcript_segments"]) for b in bodies] == [500, 500, 200]
    ids = [b["client_session_id"] for b in bodies]
    assert len(set(ids)) == 3 and all(len(i) <= 200 for i in ids)
    assert [i.rsplit(":", 1)[1] for i in ids] == ["part-1", "part-2", "part-3"]
    second = bodies[1]
    assert second["started_at"] == (T0 + timedelta(seconds=2500)).isoformat(timespec="milliseconds")
    assert second["transcript_segments"][0]["start"] == 0.0  # re-based on the part's start
    assert bodies[2]["finished_at"] == (T0 + timedelta(minutes=120)).isoformat(timespec="milliseconds")
    for b in bodies:
        assert _validate(b) is None
    # Deterministic: the same conversation gives the same parts after a restart.
    assert request_bodies(conv(segs, minutes=120, csid="c" * 200), NO_LOCATION) == bodies
