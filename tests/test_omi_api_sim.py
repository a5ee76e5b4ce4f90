"""The local Omi API stand-in answers as omi-api.md says the real backend does.

The delivery tests trust this server, so its answers are pinned here over real HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from omi_bridge_sim.omi_api import DEFAULT_SCOPES, ENDPOINT, ApiKey, OmiApiSim

TIMEOUT = 10.0
GOOD = "omi_dev_good"


def body(csid: str | None = "s1", **over: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "transcript_segments": [{"text": "hello there", "start": 0.0, "end": 1.5}],
        "started_at": "2026-03-01T09:00:00+00:00",
        "finished_at": "2026-03-01T09:01:00+00:00",
        "language": "en", "source": "omi",
    }
    if csid is not None:
        b["client_session_id"] = csid
    b.update(over)
    return b


@pytest.fixture
def sim() -> Iterator[OmiApiSim]:
    keys = {GOOD: ApiKey(), "omi_dev_ro": ApiKey(scopes=DEFAULT_SCOPES),
            "omi_dev_noid": ApiKey(key_id=None)}
    with OmiApiSim(keys, limit=5) as s:
        yield s


def post(sim: OmiApiSim, data: Any, key: str | None = GOOD) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(sim.url + ENDPOINT, json=data, headers=headers, timeout=TIMEOUT)


@pytest.mark.parametrize(("key", "status", "detail"), [
    (None, 401, "Missing or invalid Authorization header. Must be 'Bearer API_KEY'"),
    ("omi_dev_unknown", 401, "Invalid API Key"),
    ("omi_dev_ro", 403, "Insufficient permissions. Required scope: conversations:write"),
    ("omi_dev_noid", 403, "Missing API key identity"),
])
def test_auth_errors_use_the_backend_texts(sim: OmiApiSim, key: str | None, status: int,
                                           detail: str) -> None:
    r = post(sim, body(), key)
    assert (r.status_code, r.json()["detail"]) == (status, detail)
    assert sim.conversations() == []


def test_the_hourly_limit_counts_retries_and_422s_and_says_when_to_retry(sim: OmiApiSim) -> None:
    assert post(sim, body("a")).status_code == 200
    assert post(sim, body("a")).status_code == 200  # idempotent repeat still counts
    assert post(sim, body("b", transcript_segments=[])).status_code == 422
    assert post(sim, body("c")).headers["X-RateLimit-Remaining"] == "1"
    assert post(sim, body("d")).status_code == 200
    r = post(sim, body("e"))
    assert r.status_code == 429
    assert r.json()["detail"].startswith("Rate limit exceeded. Try again in ")
    assert r.headers["X-RateLimit-Limit"] == "5" and r.headers["X-RateLimit-Remaining"] == "0"
    assert 3500 < int(r.headers["Retry-After"]) <= 3600


@pytest.mark.parametrize(("change", "detail"), [
    ({"transcript_segments": [{"text": "  ", "start": 0, "end": 1}]}, "Segment 0: text cannot be empty"),
    ({"transcript_segments": [{"text": "a", "start": 0, "end": 1}, {"text": "b", "start": 2, "end": 2}]},
     "Segment 1: end time must be after start time"),
    ({"transcript_segments": [{"text": "a", "start": -1, "end": 1}]},
     "Segment 0: start time must be non-negative"),
    ({"finished_at": "2026-03-01T09:00:00+00:00"}, "finished_at must be after started_at"),
    ({"started_at": "2026-03-01T09:00:00"}, "started_at must be timezone-aware"),
])
def test_each_validation_rule_has_its_detail(sim: OmiApiSim, change: dict[str, Any],
                                             detail: str) -> None:
    r = post(sim, body(**change))
    assert (r.status_code, r.json()["detail"]) == (422, detail)


@pytest.mark.parametrize("change", [
    {"transcript_segments": []},
    {"transcript_segments": [{"text": "a", "start": i, "end": i + 0.5} for i in range(501)]},
    {"client_session_id": "   "},
    {"client_session_id": "x" * 201},
])
def test_model_errors_are_pydantic_lists(sim: OmiApiSim, change: dict[str, Any]) -> None:
    r = post(sim, body(**change))
    assert r.status_code == 422
    assert isinstance(r.json()["detail"], list) and r.json()["detail"][0]["loc"][0] == "body"


def test_a_repeat_returns_the_same_conversation_and_ignores_the_new_body(sim: OmiApiSim) -> None:
    first = post(sim, body("s1")).json()
    again = post(sim, body("s1", transcript_segments=[{"text": "different", "start": 0, "end": 1}])).json()
    assert again == first == {"id": OmiApiSim.conversation_id("sim-user", "s1"), "status": "completed",
                              "discarded": False}
    assert [c.transcript for c in sim.conversations()] == ["hello there"]
    # Without a client_session_id every post is a new conversation.
    post(sim, body(None))
    post(sim, body(None))
    assert len(sim.conversations()) == 3


def test_a_pipeline_500_drops_the_claim_so_a_retry_creates_it(sim: OmiApiSim) -> None:
    sim.inject(500)
    r = post(sim, body())
    assert r.status_code == 500
    assert r.json()["detail"] == "Error processing conversation, please try again later"
    assert sim.conversations() == []
    assert post(sim, body()).json()["status"] == "completed"
    assert len(sim.conversations()) == 1


def test_limiter_down_is_503_and_a_conflict_is_409(sim: OmiApiSim) -> None:
    sim.inject(503)
    r = post(sim, body())
    assert (r.status_code, r.json()["detail"]) == (503, "Rate limiter unavailable")
    sim.inject(409)
    r = post(sim, body())
    assert (r.status_code, r.json()["detail"]) == (409, "Conversation creation already in progress")


def test_a_repeat_during_a_slow_first_post_sees_the_processing_claim(sim: OmiApiSim) -> None:
    sim.slow_next(0.3)
    results: list[httpx.Response] = []
    first = threading.Thread(target=lambda: results.append(post(sim, body())))
    first.start()
    assert sim.wait_until(lambda: sim.in_flight == 1, TIMEOUT)
    repeat = post(sim, body()).json()
    first.join(TIMEOUT)
    assert repeat["status"] == "processing"
    assert results[0].json() == {**repeat, "status": "completed"}
    sim.claim_conflict = True
    sim.slow_next(0.3)
    second = threading.Thread(target=lambda: post(sim, body("s2")))
    second.start()
    assert sim.wait_until(lambda: sim.in_flight == 1, TIMEOUT)
    assert post(sim, body("s2")).status_code == 409
    second.join(TIMEOUT)


def test_long_transcripts_are_kept_and_stored_ones_are_announced(sim: OmiApiSim) -> None:
    seen: list[str] = []
    sim.on_stored = lambda c: seen.append(c.id)
    words = " ".join(["word"] * 101)
    r = post(sim, body(transcript_segments=[{"text": words, "start": 0, "end": 30}]))
    assert r.json()["discarded"] is False
    assert seen == [r.json()["id"]]
    sim.delete_conversation(r.json()["id"])
    assert post(sim, body()).json() == {"id": r.json()["id"], "status": "deleted", "discarded": True}
