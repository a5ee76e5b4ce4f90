"""``omi-bridge outbox`` and the delivery half of ``omi-bridge transcribe --send``.

``send_conversations`` and ``outbox retry`` deliver right away only when no other process (the
daemon) is delivering from the same outbox; otherwise they leave the work to it (it re-reads the
outbox at least every 30 s). Either way the conversation is committed to the outbox first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from bridge.config import Config, load_config
from bridge.core.errors import BridgeError
from bridge.core.records import Conversation
from bridge.core.times import iso_seconds
from bridge.outbox.sender import Sender, not_before, outbox_status
from bridge.outbox.store import DeliveryLock, Item, Outbox

EXIT_SENT = 0
"""Every conversation is on the server (sent now or before)."""
EXIT_REJECTED = 1
"""The server rejected some for good (422, dead-lettered); see ``omi-bridge outbox show ID``."""
EXIT_WAITING = 3
"""Some wait on the hourly budget, a Retry-After or a back-off; they stay queued."""
EXIT_PAUSED = 4
"""Delivery is paused by an auth/config error; nothing is lost."""
SYNC_MAX_WAIT_SECONDS = 60.0
"""The CLI waits in-line for a back-off or budget slot up to this long; longer waits are left to
the daemon (or a later ``outbox retry``), so a command never hangs for an hour."""


def _iso(ts: float | None) -> str:
    return iso_seconds(ts) or "-"


def _deliver(outbox: Outbox, config: Config, ids: set[int] | None, out: TextIO, *,
             clock: Callable[[], float], sleep: Callable[[float], None],
             sender_kwargs: dict[str, Any]) -> bool:
    """Deliver now if no daemon does; False if another process holds the delivery lock."""
    lock = DeliveryLock(outbox.path.parent)
    if not lock.try_acquire():
        print("another omi-bridge process (the daemon?) is delivering; it will send them", file=out)
        return False
    try:
        Sender(outbox, config.api, clock=clock, **sender_kwargs).deliver(
            ids, max_wait=SYNC_MAX_WAIT_SECONDS, sleep=sleep)
    finally:
        lock.release()
    return True


def _report(outbox: Outbox, config: Config, ids: list[int], out: TextIO, now: float) -> int:
    pause = outbox.pause()
    blocked_until = not_before(outbox, config.api, now)
    worst = EXIT_SENT
    for item_id in ids:
        item = outbox.get(item_id)
        if item is None:
            continue
        state = item.view_state(now, pause is not None, blocked_until)
        if state == "sent":
            flag = ", discarded by Omi as too short/empty" if item.discarded else ""
            print(f"sent      {item.client_session_id} → {item.server_id} "
                  f"({item.server_status}{flag})", file=out)
        elif state == "dead":
            print(f"rejected  {item.client_session_id}: {item.error} (item {item.id})", file=out)
            worst = max(worst, EXIT_REJECTED)
        elif state == "paused":
            print(f"paused    {item.client_session_id} (item {item.id})", file=out)
            worst = max(worst, EXIT_PAUSED)
        else:
            why = f": {item.error}" if item.error else ""
            print(f"queued    {item.client_session_id}: next try {_iso(item.due_at(blocked_until))}{why}",
                  file=out)
            worst = EXIT_PAUSED if worst == EXIT_PAUSED else EXIT_WAITING
    if pause is not None and worst == EXIT_PAUSED:
        print(f"delivery paused: {pause.reason}\n  → {pause.hint}\n"
              "the conversations stay queued and go out once this is fixed", file=out)
    if worst == EXIT_WAITING:
        print("some conversations wait (hourly budget, Retry-After or back-off); they stay queued: "
              "the daemon sends them, or run `omi-bridge outbox retry ID`", file=out)
    return worst


def send_conversations(conversations: Iterable[Conversation], config: Config,
                       out: TextIO = sys.stdout, *, clock: Callable[[], float] = time.time,
                       sleep: Callable[[float], None] = time.sleep,
                       **sender_kwargs: Any) -> int:
    """Enqueue ``conversations`` in the outbox, then deliver them now, retrying network errors and
    5xx (bounded by the hourly budget). Returns EXIT_SENT (0), EXIT_REJECTED (1), EXIT_WAITING (3)
    or EXIT_PAUSED (4). ``sender_kwargs`` (rng, transport) are for tests."""
    outbox = Outbox.open(config.storage.path)
    try:
        ids: list[int] = []
        for conv in conversations:
            new = outbox.enqueue(conv, config.location, clock())
            if not new:
                print(f"skipped   {conv.client_session_id}: no speech to send", file=out)
            ids.extend(new)
        if not ids:
            return EXIT_SENT
        # Not delivered here (a daemon holds the lock): the items report as queued → EXIT_WAITING.
        _deliver(outbox, config, set(ids), out, clock=clock, sleep=sleep, sender_kwargs=sender_kwargs)
        return _report(outbox, config, ids, out, clock())
    finally:
        outbox.close()


# -------------------------------------------------------------------------------------------
# omi-bridge outbox


def _show(item: Item, now: float, paused: bool, blocked_until: float | None) -> str:
    data = item.as_json(now, paused, blocked_until)
    lines = [f"item {item.id}: {data['state']}",
             f"  client_session_id  {item.client_session_id}",
             f"  device             {item.device or '-'}",
             f"  queued at          {_iso(item.created_at)}",
             f"  attempts           {item.attempts} (last {_iso(item.last_attempt_at)})"]
    if item.state == "queued":
        lines.append(f"  next attempt       {_iso(item.due_at(blocked_until))}")
    if item.server_id:
        lines.append(f"  server id          {item.server_id} (status {item.server_status}, "
                     f"discarded {item.discarded})")
    if item.error:
        lines.append(f"  last error         {item.error}")
    body = json.loads(item.body)
    lines.append(f"  segments           {len(body['transcript_segments'])}, "
                 f"{body['started_at']} → {body['finished_at']}")
    lines.append("  transcript         " + " ".join(s["text"] for s in body["transcript_segments"])[:400])
    return "\n".join(lines)


def cmd_outbox(args: argparse.Namespace, *, clock: Callable[[], float] = time.time) -> int:
    config = load_config(args.config)
    outbox = Outbox.open(config.storage.path)
    try:
        now = clock()
        paused = outbox.pause()
        blocked_until = not_before(outbox, config.api, now)
        action = args.action
        if action in ("show", "retry") and args.id is None:
            raise BridgeError(f"`omi-bridge outbox {action}` needs an item id",
                              "see the ids with `omi-bridge outbox list`")
        if action == "list":
            items = outbox.items()
            if args.json:
                rows = [i.as_json(now, paused is not None, blocked_until) for i in items]
                print(json.dumps(rows, indent=2))
                return 0
            if not items:
                print("the outbox is empty")
            for i in items:
                d = i.as_json(now, paused is not None, blocked_until)
                extra = {"sent": f"→ {i.server_id}" + (" (discarded)" if i.discarded else ""),
                         "waiting": f"until {d['next_attempt_at']}",
                         "dead": f"{i.error}"}.get(d["state"], "")
                print(f"{i.id:>5}  {d['state']:<8} {i.attempts:>3} tries  {i.client_session_id}  {extra}")
            status = outbox_status(outbox, config.api, now)
            if paused is not None:
                print(f"delivery paused: {paused.reason}\n  → {paused.hint}")
            print(f"writes in the last hour: {status['writes_last_hour']}/{status['writes_per_hour']}; "
                  f"next send: {status['next_send_at'] or '-'}")
            return 0
        if action == "purge-sent":
            n = outbox.purge_sent()
            print(json.dumps({"purged": n}) if args.json else f"removed {n} sent item(s)")
            return 0
        item = outbox.get(args.id)
        if item is None:
            raise BridgeError(f"there is no outbox item {args.id}", "see `omi-bridge outbox list`")
        if action == "show":
            if args.json:
                data = item.as_json(now, paused is not None, blocked_until)
                data["body"] = json.loads(item.body)
                print(json.dumps(data, indent=2))
            else:
                print(_show(item, now, paused is not None, blocked_until))
            return 0
        # retry
        if item.state == "sent":
            print(f"item {item.id} was already sent ({item.server_id})")
            return 0
        outbox.retry(item.id, now)
        delivered = _deliver(outbox, config, {item.id}, sys.stdout, clock=clock, sleep=time.sleep,
                             sender_kwargs={})
        if not delivered:
            print(f"item {item.id} is due now")
            return EXIT_WAITING
        return _report(outbox, config, [item.id], sys.stdout, clock())
    finally:
        outbox.close()
