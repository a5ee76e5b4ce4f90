"""A local stand-in for the Omi developer API's ``from-segments`` endpoint (tests and the demo).

A real HTTP server on 127.0.0.1 (stdlib ThreadingHTTPServer in a background thread) that behaves
as omi-api.md describes the backend: the auth dependency (401/403 texts, key scopes), the per-key
limit of 25 writes per 3600 s checked *before* body validation (so retries and 422s count), every
422 rule, idempotency by ``client_session_id`` (deterministic uuid5 id; a repeat returns the stored
result and ignores the body), a "processing" claim while the synchronous pipeline runs, 500 that
deletes the claim, and the discard rule. Faults are injected per request (``inject``) and answers
can be slowed (``delay``) to test timeouts and crashes mid-request.

Run alone: ``python -m omi_bridge_sim.omi_api --port 8080 --keys omi_dev_test`` prints its URL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_LOGGER = logging.getLogger(__name__)

ENDPOINT = "/v1/dev/user/conversations/from-segments"
CONVERSATION_NAMESPACE = uuid.UUID("fb2f1f36-3c84-47a4-9c62-b3f6fdb3fd13")
"""uuid5 namespace for ids derived from client_session_id (omi-api.md §7, developer.py)."""
RATE_LIMIT = 25
RATE_WINDOW_SECONDS = 3600.0
"""Policy dev:conversations: 25 requests / 3600 s per key (omi-api.md §3, rate_limit_config.py)."""
MAX_SEGMENTS = 500
MAX_SESSION_ID_CHARS = 200
"""omi-api.md §4: 1–500 segments, client_session_id 1–200 chars."""
CLAIM_STALE_SECONDS = 15 * 60
"""FROM_SEGMENTS_CLAIM_STALE_AFTER (omi-api.md §7)."""
KEEP_WORDS = 100
"""A transcript over 100 words is never discarded (omi-api.md §6)."""
SHUTDOWN_POLL_SECONDS = 0.02
WRITE_SCOPE = "conversations:write"
DEFAULT_SCOPES = ("conversations:read", "memories:read", "action_items:read")
"""Scopes of a key created without explicit scopes (omi-api.md §2, scopes.py)."""

MSG_BAD_HEADER = "Missing or invalid Authorization header. Must be 'Bearer API_KEY'"
MSG_BAD_KEY = "Invalid API Key"
MSG_SCOPE = f"Insufficient permissions. Required scope: {WRITE_SCOPE}"
MSG_NO_IDENTITY = "Missing API key identity"
MSG_LIMITER_DOWN = "Rate limiter unavailable"
MSG_CONFLICT = "Conversation creation already in progress"
MSG_PIPELINE = "Error processing conversation, please try again later"


@dataclass(frozen=True)
class ApiKey:
    """What the backend knows about a developer key."""

    uid: str = "sim-user"
    scopes: tuple[str, ...] = (WRITE_SCOPE,)
    key_id: str | None = "key-1"


@dataclass
class StoredConversation:
    id: str
    uid: str
    client_session_id: str
    status: str
    discarded: bool
    body: dict[str, Any]
    claimed_at: float

    @property
    def transcript(self) -> str:
        return " ".join(s["text"].strip() for s in self.body.get("transcript_segments", []))


@dataclass
class Fault:
    """An injected answer: ``status`` 500 (after the claim, which is then deleted), 503 (limiter
    down), 409 (claim conflict), 429 (with ``retry_after``) or 422 (with ``detail``: a rule the
    bridge does not know about)."""

    status: int
    retry_after: int = 60
    detail: str = "rejected"


@dataclass
class RequestLog:
    status: int
    client_session_id: str | None
    key: str | None
    body: bytes = b""


@dataclass
class _State:
    conversations: dict[str, StoredConversation] = field(default_factory=dict)
    windows: dict[str, deque[float]] = field(default_factory=dict)
    faults: deque[Fault] = field(default_factory=deque)
    delays: deque[float] = field(default_factory=deque)
    requests: list[RequestLog] = field(default_factory=list)
    in_flight: int = 0


class OmiApiSim:
    """The server. ``with OmiApiSim(keys) as sim: sim.url ...``."""

    def __init__(self, keys: dict[str, ApiKey] | None = None, *, limit: int = RATE_LIMIT,
                 window: float = RATE_WINDOW_SECONDS, delay: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, host: str = "127.0.0.1",
                 port: int = 0, claim_conflict: bool = False) -> None:
        self.keys = dict(keys) if keys is not None else {"omi_dev_test": ApiKey()}
        self.limit = limit
        self.window = window
        self.delay = delay
        """Seconds every pipeline run takes (the real one is synchronous and slow)."""
        self.claim_conflict = claim_conflict
        """Answer 409 (instead of the claim's "processing") while another request holds a claim."""
        self.clock = clock
        self.on_stored: Callable[[StoredConversation], None] | None = None
        self._state = _State()
        self._cond = threading.Condition()
        sim = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, payload, headers = sim._handle(self.path, self.headers.get("Authorization"), raw)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout, crash): the work is done regardless

            def log_message(self, format: str, *args: Any) -> None:
                _LOGGER.debug("sim: " + format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------------------
    # Lifecycle

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> OmiApiSim:
        # A short poll interval: shutdown() waits up to one interval, and tests start many servers.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(SHUTDOWN_POLL_SECONDS,),
                                        name="omi-api-sim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> OmiApiSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------------
    # Test controls and observations

    def inject(self, status: int, *, times: int = 1, retry_after: int = 60,
               detail: str = "rejected") -> None:
        with self._cond:
            for _ in range(times):
                self._state.faults.append(Fault(status, retry_after, detail))

    def slow_next(self, seconds: float, *, times: int = 1) -> None:
        with self._cond:
            self._state.delays.extend([seconds] * times)

    @property
    def faults_pending(self) -> int:
        """Injected answers (errors and delays) not yet served to a request."""
        with self._cond:
            return len(self._state.faults) + len(self._state.delays)

    def conversations(self) -> list[StoredConversation]:
        """Completed (stored) conversations, in creation order."""
        with self._cond:
            return [c for c in self._state.conversations.values() if c.status != "processing"]

    def requests(self) -> list[RequestLog]:
        with self._cond:
            return list(self._state.requests)

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._state.in_flight

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` (re-checked on every server event) or ``timeout``."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def delete_conversation(self, conv_id: str) -> None:
        """The user deleted it in the app: repeats answer ``deleted`` (omi-api.md §5, docs)."""
        with self._cond:
            conv = self._state.conversations[conv_id]
            conv.status, conv.discarded = "deleted", True

    def reset_limits(self) -> None:
        with self._cond:
            self._state.windows.clear()

    @staticmethod
    def conversation_id(uid: str, client_session_id: str) -> str:
        return str(uuid.uuid5(CONVERSATION_NAMESPACE, uid + "\0" + client_session_id))

    # ---------------------------------------------------------------------------------------
    # The endpoint

    def _handle(self, path: str, auth: str | None, raw: bytes) -> tuple[int, Any, dict[str, str]]:
        with self._cond:
            self._state.in_flight += 1
            self._cond.notify_all()
        key = None
        csid = None
        try:
            status, payload, headers, key, csid = self._endpoint(path, auth, raw)
        finally:
            with self._cond:
                self._state.in_flight -= 1
        with self._cond:
            self._state.requests.append(RequestLog(status, csid, key, raw))
            self._cond.notify_all()
        return status, payload, headers

    def _endpoint(self, path: str, auth: str | None, raw: bytes
                  ) -> tuple[int, Any, dict[str, str], str | None, str | None]:
        if path.split("?")[0] != ENDPOINT:
            return 404, {"detail": "Not Found"}, {}, None, None
        # --- the auth dependency (dependencies.py / endpoints.py)
        if not auth or not auth.startswith("Bearer "):
            return 401, {"detail": MSG_BAD_HEADER}, {}, None, None
        key = auth[len("Bearer "):].strip()
        info = self.keys.get(key)
        if info is None:
            return 401, {"detail": MSG_BAD_KEY}, {}, None, None
        if info.key_id is None:
            return 403, {"detail": MSG_NO_IDENTITY}, {}, key, None
        if WRITE_SCOPE not in info.scopes:
            return 403, {"detail": MSG_SCOPE}, {}, key, None
        # --- the rate limit, before the body is even parsed
        with self._cond:
            fault = self._state.faults[0] if self._state.faults else None
            if fault is not None and fault.status == 503:
                self._state.faults.popleft()
                return 503, {"detail": MSG_LIMITER_DOWN}, {}, key, None
            now = self.clock()
            win = self._state.windows.setdefault(f"{info.uid}:{info.key_id}", deque())
            while win and win[0] <= now - self.window:
                win.popleft()
            if fault is not None and fault.status == 429:
                self._state.faults.popleft()
                retry = fault.retry_after
            elif len(win) >= self.limit:
                retry = max(1, math.ceil(win[0] + self.window - now))
            else:
                retry = 0
            if retry:
                return 429, {"detail": f"Rate limit exceeded. Try again in {retry}s."}, {
                    "X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": "0",
                    "Retry-After": str(retry)}, key, None
            win.append(now)
            rl_headers = {"X-RateLimit-Limit": str(self.limit),
                          "X-RateLimit-Remaining": str(max(0, self.limit - len(win)))}
        # --- body validation (pydantic model, then the handler's checks)
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            return 422, {"detail": [{"type": "json_invalid", "loc": ["body"],
                                     "msg": "JSON decode error"}]}, rl_headers, key, None
        problem = _validate(body)
        with self._cond:
            if problem is None and self._state.faults and self._state.faults[0].status == 422:
                problem = self._state.faults.popleft().detail
        csid_raw = body.get("client_session_id")
        csid = csid_raw.strip() if isinstance(csid_raw, str) else None
        if problem is not None:
            return 422, {"detail": problem}, rl_headers, key, csid
        # --- idempotency and the claim (developer.py)
        with self._cond:
            fault = self._state.faults[0] if self._state.faults else None
            if fault is not None and fault.status == 409:
                self._state.faults.popleft()
                return 409, {"detail": MSG_CONFLICT}, rl_headers, key, csid
            conv_id = self.conversation_id(info.uid, csid) if csid else str(uuid.uuid4())
            now = self.clock()
            existing = self._state.conversations.get(conv_id)
            if existing is not None:
                stale = existing.status == "processing" and now - existing.claimed_at > CLAIM_STALE_SECONDS
                if not stale:
                    if existing.status == "processing" and self.claim_conflict:
                        return 409, {"detail": MSG_CONFLICT}, rl_headers, key, csid
                    return 200, {"id": existing.id, "status": existing.status,
                                 "discarded": existing.discarded}, rl_headers, key, csid
                del self._state.conversations[conv_id]
            claim = StoredConversation(conv_id, info.uid, csid or "", "processing", False, body, now)
            self._state.conversations[conv_id] = claim
            delay = self._state.delays.popleft() if self._state.delays else self.delay
            self._cond.notify_all()
        # --- the synchronous pipeline (LLM discard check, summary, ...)
        if delay:
            time.sleep(delay)
        with self._cond:
            fault = self._state.faults[0] if self._state.faults else None
            if fault is not None and fault.status == 500:
                self._state.faults.popleft()
                self._state.conversations.pop(conv_id, None)
                return 500, {"detail": MSG_PIPELINE}, rl_headers, key, csid
            words = sum(len(s["text"].split()) for s in body["transcript_segments"])
            # > 100 words: never discarded; empty: discarded; otherwise the sim's "LLM" keeps it.
            claim.discarded = words == 0
            claim.status = "completed"
            self._cond.notify_all()
        if self.on_stored is not None:
            try:
                self.on_stored(claim)
            except Exception:
                _LOGGER.exception("on_stored hook failed")
        return 200, {"id": claim.id, "status": claim.status, "discarded": claim.discarded}, \
            rl_headers, key, csid


def _aware(value: Any, name: str) -> tuple[datetime | None, Any]:
    if value is None:
        return None, None
    if not isinstance(value, str):
        return None, [{"type": "datetime_type", "loc": ["body", name],
                       "msg": "Input should be a valid datetime"}]
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None, [{"type": "datetime_parsing", "loc": ["body", name],
                       "msg": "Input should be a valid datetime"}]
    if when.tzinfo is None:
        # The real server may fail comparing naive with aware times (omi-api.md §11.6); the sim
        # is stricter so that we never send one.
        return None, f"{name} must be timezone-aware"
    return when, None


def _validate(body: dict[str, Any]) -> Any:
    """The 422 detail for ``body``, or None if it is acceptable (omi-api.md §4.2)."""
    segs = body.get("transcript_segments")
    if not isinstance(segs, list):
        return [{"type": "missing", "loc": ["body", "transcript_segments"], "msg": "Field required"}]
    if len(segs) < 1:
        return [{"type": "too_short", "loc": ["body", "transcript_segments"],
                 "msg": "List should have at least 1 item after validation, not 0"}]
    if len(segs) > MAX_SEGMENTS:
        return [{"type": "too_long", "loc": ["body", "transcript_segments"],
                 "msg": f"List should have at most {MAX_SEGMENTS} items after validation, not {len(segs)}"}]
    csid = body.get("client_session_id")
    if csid is not None:
        if not isinstance(csid, str) or not csid.strip():
            return [{"type": "string_too_short", "loc": ["body", "client_session_id"],
                     "msg": "String should have at least 1 character"}]
        if len(csid.strip()) > MAX_SESSION_ID_CHARS:
            return [{"type": "string_too_long", "loc": ["body", "client_session_id"],
                     "msg": f"String should have at most {MAX_SESSION_ID_CHARS} characters"}]
    started, err = _aware(body.get("started_at"), "started_at")
    if err:
        return err
    finished, err = _aware(body.get("finished_at"), "finished_at")
    if err:
        return err
    for i, seg in enumerate(segs):
        numbers = isinstance(seg, dict) and all(isinstance(seg.get(k), int | float) for k in ("start", "end"))
        if not numbers or not isinstance(seg.get("text"), str):
            return [{"type": "model_type", "loc": ["body", "transcript_segments", i],
                     "msg": "Input should be a valid segment"}]
        if not seg["text"].strip():
            return f"Segment {i}: text cannot be empty"
        if seg["start"] < 0:
            return f"Segment {i}: start time must be non-negative"
        if seg["end"] <= seg["start"]:
            return f"Segment {i}: end time must be after start time"
    if started is not None and finished is not None and finished <= started:
        return "finished_at must be after started_at"
    if started is not None and finished is None and segs[-1]["end"] <= 0:
        return "finished_at must be after started_at"
    return None


def _parse_key(text: str) -> tuple[str, ApiKey]:
    key, _, scopes = text.partition(":")
    return key, ApiKey(scopes=tuple(s for s in scopes.split(",") if s) if scopes else (WRITE_SCOPE,))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omi_bridge_sim.omi_api",
                                     description="Local stand-in for the Omi developer API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--keys", nargs="+", default=["omi_dev_test"], metavar="KEY[:SCOPE,...]",
                        help=f"accepted keys (default scope {WRITE_SCOPE})")
    parser.add_argument("--limit", type=int, default=RATE_LIMIT, help="writes per window per key")
    parser.add_argument("--window", type=float, default=RATE_WINDOW_SECONDS, help="seconds")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each post takes")
    args = parser.parse_args(argv)
    keys = dict(_parse_key(k) for k in args.keys)
    sim = OmiApiSim(keys, limit=args.limit, window=args.window, delay=args.delay,
                    host=args.host, port=args.port)
    sim.on_stored = lambda c: print(f"stored {c.id} ({c.client_session_id}, discarded={c.discarded}): "
                                    f"{c.transcript[:200]}", flush=True)
    with sim:
        print(sim.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
