"""The scheduler: which queued item goes next, when, and what each answer does to it.

- Client-side budget: at most ``[api] writes_per_hour`` request attempts in any sliding hour,
  counted from the ``attempts`` table (persisted, so a restart does not reset it; retries and 422s
  count, as they do on the server, omi-api.md §3).
- 429: the item is rescheduled after ``Retry-After`` and the key is held until then; nothing
  sleeps inline, other items keep their place and go first when the hold ends.
- Network errors, timeouts, 5xx, 409, 503: the same body later, capped exponential back-off with
  jitter.
- 401/403 (and a missing key or bad base_url): delivery pauses with one message; everything stays
  queued until the (base_url, key) fingerprint changes or ``outbox retry`` is run.
- 422: dead, with the server's detail.
- 200 ``processing``: an earlier attempt of ours (e.g. one cut off by a crash or timeout) still
  runs on the server. It is not yet confirmed (a failing pipeline deletes its claim, omi-api.md §7),
  so the item stays queued and the same body is re-posted after PROCESSING_RECHECK_SECONDS; the
  idempotent answer then confirms it (or, if the claim vanished, it is created then).
- 200 anything else (``completed``, ``deleted``, ...): sent.

The clock, the random source and the sleep are injectable so tests run in no time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from bridge.config import ApiOptions
from bridge.core.errors import BridgeError
from bridge.core.times import iso_seconds
from bridge.outbox.client import AsyncOmiClient, Credentials, Kind, OmiClient, Outcome, fingerprint
from bridge.outbox.store import RATE_WINDOW_SECONDS, DeliveryLock, Item, Outbox, Pause

_LOGGER = logging.getLogger(__name__)

RETRY_BASE_SECONDS = 5.0
"""First back-off after a transient failure; doubles per attempt."""
RETRY_MAX_SECONDS = 1800.0
"""Back-off cap: with 25 writes an hour, trying more often than every half hour gains nothing."""
PROCESSING_RECHECK_SECONDS = 300.0
"""Re-post after a 200 "processing": the server's pipeline takes seconds to minutes, and a stale
claim is dropped after 15 min (omi-api.md §7, FROM_SEGMENTS_CLAIM_STALE_AFTER)."""
POLL_SECONDS = 30.0
"""The daemon re-reads the outbox at least this often: another process (``outbox retry``,
``transcribe --send``) may have changed it, and wake() only reaches this process."""
PAUSE_RECHECK_SECONDS = 30.0
"""While paused, how often the key file / environment is re-read for a changed key."""


@dataclass(frozen=True)
class Plan:
    """What to do now: send ``item`` with ``creds``, or nothing until ``wake_at`` (None: idle)."""

    item: Item | None = None
    creds: Credentials | None = None
    wake_at: float | None = None
    pause: Pause | None = None


class Sender:
    """Delivers the outbox: ``deliver()`` synchronously (CLI) or ``run()`` as the daemon's task."""

    def __init__(self, outbox: Outbox, api: ApiOptions, *, clock: Callable[[], float] = time.time,
                 rng: Callable[[], float] = random.random,
                 transport: httpx.BaseTransport | None = None,
                 async_transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.outbox = outbox
        self.api = api
        self.clock = clock
        self.rng = rng
        self._transport = transport
        self._async_transport = async_transport
        self.on_outcome: Callable[[Item, Outcome], None] | None = None
        """Called after each answer is recorded (tests, demo, status refresh)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_event: asyncio.Event | None = None
        self._announced: Pause | None = None

    # ---------------------------------------------------------------------------------------
    # Decisions shared by the blocking and the async paths

    def _credentials(self) -> tuple[Credentials | None, str, BridgeError | None]:
        try:
            creds = Credentials.from_config(self.api)
        except BridgeError as exc:
            # The error text names paths and settings, never the key.
            return None, fingerprint(self.api.base_url, "error:" + exc.message), exc
        return creds, creds.fingerprint, None

    def _pause(self, reason: str, hint: str, fp: str) -> Pause:
        pause = Pause(reason, hint, fp)
        if self.outbox.pause() != pause:
            self.outbox.set_pause(pause)
        return self._announce(pause)

    def _announce(self, pause: Pause) -> Pause:
        # One warning per pause and process: a restarted daemon says again why nothing is sent.
        if self._announced != pause:
            self._announced = pause
            _LOGGER.warning("delivery paused: %s; %s. Conversations stay queued.", pause.reason,
                            pause.hint)
        return pause

    def plan(self, now: float, among: set[int] | None = None) -> Plan:
        creds, fp, err = self._credentials()
        pause = self.outbox.pause()
        if pause is not None:
            if pause.fingerprint != fp:
                self.outbox.set_pause(None)
                _LOGGER.info("API settings changed; resuming delivery")
            else:
                return Plan(pause=self._announce(pause))
        next_at = self.outbox.next_attempt_at(among)
        if next_at is None:
            return Plan()
        if err is not None or creds is None:
            assert err is not None
            return Plan(pause=self._pause(err.message, err.hint, fp))
        wake_at = max(next_at, not_before(self.outbox, self.api, now) or next_at)
        if wake_at > now:
            return Plan(wake_at=wake_at)
        due = self.outbox.due(now, among)
        return Plan(item=due[0], creds=creds) if due else Plan(wake_at=next_at)

    def backoff(self, attempts: int) -> float:
        # The exponent is capped before the cap on seconds: 2**n overflows a float for a long outage.
        base = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** min(max(0, attempts - 1), 30))
        # Jitter in [base/2, base): restarts of several bridges do not retry in lockstep.
        return float(base * (0.5 + self.rng() / 2))

    def apply(self, item: Item, outcome: Outcome, creds: Credentials, now: float) -> None:
        """Record what the answer means for ``item``."""
        self._record(item, outcome, creds, now)
        if self.on_outcome is not None:
            self.on_outcome(item, outcome)

    def _record(self, item: Item, outcome: Outcome, creds: Credentials, now: float) -> None:
        label = f"item {item.id} ({item.client_session_id})"
        if outcome.kind is Kind.SENT:
            assert outcome.server_id is not None
            self.outbox.mark_sent(item.id, outcome.server_id, outcome.server_status or "",
                                  bool(outcome.discarded), now)
            self.outbox.set_hold(None)
            _LOGGER.info("%s: %s sent: server id %s, status %s, discarded %s", item.device or "-",
                         label, outcome.server_id, outcome.server_status, outcome.discarded)
        elif outcome.kind is Kind.PROCESSING:
            at = now + PROCESSING_RECHECK_SECONDS
            self.outbox.reschedule(item.id, at, "the server is still processing an earlier attempt; "
                                   "confirming later", server_id=outcome.server_id,
                                   server_status=outcome.server_status)
            _LOGGER.info("%s: %s accepted by an earlier attempt (server id %s, processing); "
                         "confirming at %s", item.device or "-", label, outcome.server_id, iso_seconds(at))
        elif outcome.kind is Kind.RETRY:
            at = now + self.backoff(item.attempts + 1)
            self.outbox.reschedule(item.id, at, outcome.detail)
            _LOGGER.warning("%s: %s not delivered (%s); retrying at %s", item.device or "-", label,
                            outcome.detail, iso_seconds(at))
        elif outcome.kind is Kind.RATE_LIMITED:
            at = now + (outcome.retry_after or 0.0)
            self.outbox.reschedule(item.id, at, outcome.detail)
            self.outbox.set_hold(at)
            _LOGGER.warning("%s: %s: the server's hourly limit is reached (%s); next try at %s",
                            item.device or "-", label, outcome.detail, iso_seconds(at))
        elif outcome.kind is Kind.PAUSE:
            self._pause(outcome.detail, outcome.hint, creds.fingerprint)
        elif outcome.kind is Kind.DEAD:
            self.outbox.mark_dead(item.id, outcome.detail, now)
            _LOGGER.error("%s: %s rejected by the server, not retried: %s", item.device or "-", label,
                          outcome.detail)

    # ---------------------------------------------------------------------------------------
    # Blocking delivery (CLI)

    def deliver(self, among: set[int] | None = None, *, max_wait: float,
                sleep: Callable[[float], None] = time.sleep) -> None:
        """Send due items (only ``among`` if given) until none is left, delivery pauses, or the
        next send is more than ``max_wait`` seconds away."""
        client: OmiClient | None = None
        client_fp = ""
        try:
            while True:
                now = self.clock()
                plan = self.plan(now, among)
                if plan.item is not None and plan.creds is not None:
                    if client is None or client_fp != plan.creds.fingerprint:
                        if client is not None:
                            client.close()
                        client = OmiClient(self.api, plan.creds, self._transport)
                        client_fp = plan.creds.fingerprint
                    self.outbox.begin_attempt(plan.item.id, now)
                    outcome = client.post(plan.item.body)
                    self.apply(plan.item, outcome, plan.creds, self.clock())
                    continue
                if plan.pause is not None or plan.wake_at is None:
                    return
                delay = plan.wake_at - now
                if delay > max_wait:
                    return
                sleep(max(0.0, delay))
        finally:
            if client is not None:
                client.close()

    # ---------------------------------------------------------------------------------------
    # The daemon's task

    def wake(self) -> None:
        """Something was enqueued or retried: look at the outbox now. Safe from any thread."""
        loop, event = self._loop, self._wake_event
        if loop is None or event is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            event.set()
        else:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(event.set)

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set. A request in flight at stop is abandoned; the item stays
        queued with the same body and goes again after the restart."""
        self._loop = asyncio.get_running_loop()
        self._wake_event = wake = asyncio.Event()
        lock = DeliveryLock(self.outbox.path.parent)
        client: AsyncOmiClient | None = None
        client_fp = ""
        try:
            while not lock.try_acquire():
                _LOGGER.info("another omi-bridge process is delivering; waiting for it")
                if await self._wait(stop, wake, POLL_SECONDS):
                    return
            while not stop.is_set():
                wake.clear()
                now = self.clock()
                plan = self.plan(now)
                if plan.item is not None and plan.creds is not None:
                    if client is None or client_fp != plan.creds.fingerprint:
                        if client is not None:
                            await client.aclose()
                        client = AsyncOmiClient(self.api, plan.creds, self._async_transport)
                        client_fp = plan.creds.fingerprint
                    self.outbox.begin_attempt(plan.item.id, now)
                    post = asyncio.ensure_future(client.post(plan.item.body))
                    stopping = asyncio.ensure_future(stop.wait())
                    await asyncio.wait({post, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    stopping.cancel()
                    if not post.done():
                        post.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await post
                        return
                    self.apply(plan.item, post.result(), plan.creds, self.clock())
                    continue
                if plan.pause is not None:
                    timeout = PAUSE_RECHECK_SECONDS
                elif plan.wake_at is None:
                    timeout = POLL_SECONDS
                else:
                    timeout = min(POLL_SECONDS, max(0.0, plan.wake_at - now))
                if await self._wait(stop, wake, timeout):
                    return
        finally:
            if client is not None:
                await client.aclose()
            lock.release()
            self._wake_event = None

    @staticmethod
    async def _wait(stop: asyncio.Event, wake: asyncio.Event, timeout: float) -> bool:
        """Wait for a wake-up, stop or the timeout; True if stopping."""
        waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())}
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        return stop.is_set()

    # ---------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For ``omi-bridge status``: counts per state, next send time, pause reason, budget."""
        return outbox_status(self.outbox, self.api, self.clock())


def not_before(outbox: Outbox, api: ApiOptions, now: float) -> float | None:
    """Key-wide: no request before this (the hourly budget is used up, or a 429's Retry-After)."""
    limits = []
    window = outbox.attempts_since(now - RATE_WINDOW_SECONDS)
    if len(window) >= api.writes_per_hour:
        limits.append(window[len(window) - api.writes_per_hour] + RATE_WINDOW_SECONDS)
    if (hold := outbox.hold_until()) is not None and hold > now:
        limits.append(hold)
    return max(limits) if limits else None


def outbox_status(outbox: Outbox, api: ApiOptions, now: float) -> dict[str, Any]:
    """Counts per state, when the next post may go, why delivery is paused, budget use."""
    pause = outbox.pause()
    blocked_until = not_before(outbox, api, now)
    counts = outbox.counts(now, blocked_until)
    next_send = None
    next_at = outbox.next_attempt_at()
    if next_at is not None and pause is None:
        next_send = max(next_at, blocked_until or next_at, now)
    return {
        "counts": counts,
        "next_send_at": iso_seconds(next_send),
        "paused": None if pause is None else {"reason": pause.reason, "hint": pause.hint},
        "writes_last_hour": len(outbox.attempts_since(now - RATE_WINDOW_SECONDS)),
        "writes_per_hour": api.writes_per_hour,
    }
