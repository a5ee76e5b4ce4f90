"""Delivery: every conversation reaches Omi exactly once, whatever the network, the server or a
kill -9 does in between. Runs against the local API stand-in over real HTTP; the scheduler's clock
is a fake that sleeps by jumping forward, so an hour of back-off takes no time."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from omi_bridge_sim.omi_api import DEFAULT_SCOPES, ApiKey, OmiApiSim

from bridge.cli.outbox import EXIT_PAUSED, EXIT_REJECTED, EXIT_SENT, EXIT_WAITING, send_conversations
from bridge.config import ApiOptions, Config, StorageOptions
from bridge.core.errors import BridgeError
from bridge.core.records import Conversation, Segment
from bridge.outbox.client import Credentials, check_base_url
from bridge.outbox.sender import Sender, outbox_status
from bridge.outbox.store import DeliveryLock, Outbox

TIMEOUT = 15.0
KEY = "omi_dev_GOODSECRET"
READONLY_KEY = "omi_dev_READONLYSECRET"
ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


class FakeClock:
    """time.time stand-in; ``sleep`` moves it forward instead of waiting."""

    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def sim() -> Iterator[OmiApiSim]:
    with OmiApiSim({KEY: ApiKey(), READONLY_KEY: ApiKey(scopes=DEFAULT_SCOPES)}) as s:
        yield s


@pytest.fixture(autouse=True)
def no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMI_API_KEY", raising=False)


def config(tmp_path: Path, sim: OmiApiSim, key: str = KEY, **api: object) -> Config:
    return Config(api=ApiOptions(base_url=sim.url, api_key=key, **api),  # type: ignore[arg-type]
                  storage=StorageOptions(dir=str(tmp_path / "state")))


def conversation(n: int = 1, text: str = "remember to call the plumber tomorrow",
                 segments: tuple[Segment, ...] | None = None) -> Conversation:
    start = T0 + timedelta(hours=n)
    return Conversation(f"omi:AA:BB:CC:DD:EE:FF:{start:%Y%m%dT%H%M%SZ}", "omi", start,
                        start + timedelta(minutes=5), "en",
                        segments or (Segment(text, 0.5, 3.0),), device="pendant")


def send(convs: list[Conversation], cfg: Config, clock: FakeClock, **kw: object) -> tuple[int, str]:
    out = io.StringIO()
    code = send_conversations(convs, cfg, out, clock=clock, sleep=kw.pop("sleep", clock.sleep), **kw)
    return code, out.getvalue()


def items(cfg: Config, now: float = 1e12) -> list[dict[str, object]]:
    """``outbox list --json`` as of ``now`` (default: far ahead, so nothing shows as waiting)."""
    outbox = Outbox.open(cfg.storage.path)
    try:
        return [i.as_json(now, outbox.pause() is not None) for i in outbox.items()]
    finally:
        outbox.close()


def test_server_errors_are_retried_and_create_exactly_one_conversation(tmp_path: Path,
                                                                       sim: OmiApiSim) -> None:
    sim.inject(500, times=2)
    sim.inject(503)
    clock = FakeClock()
    code, out = send([conversation()], config(tmp_path, sim), clock)
    assert code == EXIT_SENT, out
    assert [r.status for r in sim.requests()] == [500, 500, 503, 200]
    assert len({r.body for r in sim.requests()}) == 1, "every retry sends identical bytes"
    stored, = sim.conversations()
    assert stored.transcript == "remember to call the plumber tomorrow"
    assert f"→ {stored.id}" in out
    # Handing the same conversation again (a restart of the speech stage) sends nothing new.
    assert send([conversation()], config(tmp_path, sim), clock)[0] == EXIT_SENT
    assert len(sim.requests()) == 4


def test_a_timed_out_post_is_retried_with_the_same_id_and_not_duplicated(tmp_path: Path,
                                                                         sim: OmiApiSim) -> None:
    sim.slow_next(1.0)
    clock = FakeClock()

    def sleep_after_server_done(seconds: float) -> None:
        # The back-off outlasts the server's slow pipeline; on the fake clock we wait for it.
        assert sim.wait_until(lambda: sim.in_flight == 0, TIMEOUT)
        clock.sleep(seconds)

    code, out = send([conversation()], config(tmp_path, sim, timeout_seconds=0.2), clock,
                     sleep=sleep_after_server_done)
    assert code == EXIT_SENT, out
    assert len(sim.conversations()) == 1
    assert items(config(tmp_path, sim))[0]["attempts"] == 2


def test_a_repeat_while_the_server_still_processes_is_confirmed_later(tmp_path: Path,
                                                                      sim: OmiApiSim) -> None:
    sim.slow_next(1.0)
    clock = FakeClock()
    cfg = config(tmp_path, sim, timeout_seconds=0.2)
    code, out = send([conversation()], cfg, clock)
    # Timed out, retried at once: the server answers "processing" (our first attempt's claim).
    assert code == EXIT_WAITING, out
    item, = items(cfg, clock())
    assert item["state"] == "waiting" and item["server_id"] is not None
    assert sim.wait_until(lambda: len(sim.conversations()) == 1, TIMEOUT)
    clock.sleep(600)
    code, out = send([conversation()], cfg, clock)
    assert code == EXIT_SENT, out
    assert len(sim.conversations()) == 1
    assert items(cfg)[0]["server_id"] == sim.conversations()[0].id


def test_429_reschedules_per_retry_after_without_hammering_or_blocking_others(tmp_path: Path,
                                                                              sim: OmiApiSim) -> None:
    sim.inject(429, retry_after=600)
    clock = FakeClock()
    cfg = config(tmp_path, sim)
    convs = [conversation(1), conversation(2), conversation(3)]
    t_send = clock()
    code, out = send(convs, cfg, clock)
    assert code == EXIT_WAITING, out
    assert [r.status for r in sim.requests()] == [429], "no more posts while the server said wait"
    first = items(cfg, clock())[0]
    assert first["state"] == "waiting"
    assert first["next_attempt_at"] == datetime.fromtimestamp(t_send + 600, UTC).isoformat(
        timespec="seconds")
    clock.sleep(601)
    code, out = send(convs, cfg, clock)
    assert code == EXIT_SENT, out
    # The rate-limited item did not hold its place: the others went first.
    assert [r.client_session_id for r in sim.requests()[1:]] == [
        convs[1].client_session_id, convs[2].client_session_id, convs[0].client_session_id]
    assert len(sim.conversations()) == 3


def test_the_hourly_budget_survives_a_restart(tmp_path: Path, sim: OmiApiSim) -> None:
    clock = FakeClock()
    cfg = config(tmp_path, sim, writes_per_hour=2)
    code, out = send([conversation(1), conversation(2), conversation(3)], cfg, clock)
    assert code == EXIT_WAITING, out
    assert [r.status for r in sim.requests()] == [200, 200], "the client budget stops before a 429"
    # A "restart": fresh objects on the same files, 10 minutes later.
    clock.sleep(600)
    outbox = Outbox.open(cfg.storage.path)
    sender = Sender(outbox, cfg.api, clock=clock)
    status = sender.status()
    assert status["writes_last_hour"] == 2 and status["counts"]["waiting"] == 1
    sender.deliver(max_wait=0)
    assert len(sim.requests()) == 2
    clock.sleep(3000)
    sender.deliver(max_wait=0)
    outbox.close()
    assert [r.status for r in sim.requests()] == [200, 200, 200]
    assert [i["state"] for i in items(cfg)] == ["sent", "sent", "sent"]


def test_a_key_without_write_scope_pauses_everything_until_the_key_changes(
        tmp_path: Path, sim: OmiApiSim, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    clock = FakeClock()
    cfg = config(tmp_path, sim, key=READONLY_KEY)
    convs = [conversation(1), conversation(2)]
    code, out = send(convs, cfg, clock)
    assert code == EXIT_PAUSED
    assert "conversations:write" in out and "Settings → Developer" in out and "api_key_file" in out
    assert len(sim.requests()) == 1, "one refusal is enough to stop"
    assert [i["state"] for i in items(cfg)] == ["paused", "paused"]
    assert caplog.text.count("delivery paused") == 1
    # Still paused on the next run with the same key: no new request.
    assert send(convs, cfg, clock)[0] == EXIT_PAUSED
    assert len(sim.requests()) == 1
    # The operator fixes the key ($OMI_API_KEY wins over the config): everything goes out.
    monkeypatch.setenv("OMI_API_KEY", KEY)
    code, out = send(convs, cfg, clock)
    assert code == EXIT_SENT, out
    assert len(sim.conversations()) == 2
    assert KEY not in caplog.text + out and READONLY_KEY not in caplog.text + out


def test_an_unknown_key_and_a_missing_key_pause_with_what_to_fix(tmp_path: Path, sim: OmiApiSim) -> None:
    clock = FakeClock()
    code, out = send([conversation()], config(tmp_path, sim, key="omi_dev_typo"), clock)
    assert code == EXIT_PAUSED and "401 Invalid API Key" in out
    code, out = send([conversation()], config(tmp_path, sim, key=""), clock)
    assert code == EXIT_PAUSED and "no Omi API key is configured" in out and "OMI_API_KEY" in out
    assert items(config(tmp_path, sim))[0]["state"] == "paused"
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    cfg = config(tmp_path, sim, key="", api_key_file=str(key_file))
    outbox = Outbox.open(cfg.storage.path)
    Sender(outbox, cfg.api, clock=clock).deliver(max_wait=0)
    outbox.close()
    assert items(cfg)[0]["state"] == "sent"


def test_plain_http_is_refused_except_to_loopback(tmp_path: Path, sim: OmiApiSim) -> None:
    for ok in ("https://api.omi.me", "http://127.0.0.1:8080", "http://[::1]:8080", "http://localhost"):
        check_base_url(ok)
    with pytest.raises(BridgeError, match=r"\[api\] base_url"):
        check_base_url("http://api.omi.me")
    cfg = Config(api=ApiOptions(base_url="http://api.omi.me", api_key=KEY),
                 storage=StorageOptions(dir=str(tmp_path / "state")))
    code, out = send([conversation()], cfg, FakeClock())
    assert code == EXIT_PAUSED and "[api] base_url" in out and KEY not in out
    assert KEY not in repr(Credentials("https://api.omi.me", KEY))


def test_a_rejected_body_is_dead_lettered_with_the_servers_reason(tmp_path: Path, sim: OmiApiSim) -> None:
    clock = FakeClock()
    cfg = config(tmp_path, sim)
    outbox = Outbox.open(cfg.storage.path)
    bad = {"transcript_segments": [{"text": " ", "start": 0, "end": 1}], "client_session_id": "imported:1",
           "started_at": "2026-03-01T09:00:00+00:00", "finished_at": "2026-03-01T09:01:00+00:00"}
    outbox.enqueue_bodies([bad], clock(), conversation_id="imported:1")
    sender = Sender(outbox, cfg.api, clock=clock)
    sender.deliver(max_wait=60, sleep=clock.sleep)
    item, = items(cfg)
    assert item["state"] == "dead" and item["error"] == "422 Segment 0: text cannot be empty"
    assert sender.status()["writes_last_hour"] == 1, "a 422 still used the budget"
    outbox.close()
    code, out = send([conversation()], cfg, clock)
    assert code == EXIT_SENT, out  # a dead item does not block the others


def test_over_500_segments_arrive_as_valid_conversations(tmp_path: Path, sim: OmiApiSim) -> None:
    clock = FakeClock()
    close = tuple(Segment(f"w{i}", i * 1.0, i * 1.0 + 0.6) for i in range(700))
    apart = tuple(Segment(f"v{i}", i * 5.0, i * 5.0 + 1.0) for i in range(1100))
    code, out = send([conversation(1, segments=close), conversation(2, segments=apart)],
                     config(tmp_path, sim), clock)
    assert code == EXIT_SENT, out
    merged, *parts = sim.conversations()
    assert merged.transcript.split() == [f"w{i}" for i in range(700)]
    assert [len(p.body["transcript_segments"]) for p in parts] == [500, 500, 100]
    assert [p.client_session_id.rsplit(":", 1)[1] for p in parts] == ["part-1", "part-2", "part-3"]


async def test_the_daemon_task_sends_what_is_enqueued_when_woken(tmp_path: Path, sim: OmiApiSim) -> None:
    cfg = config(tmp_path, sim)
    outbox = Outbox.open(cfg.storage.path)
    sender = Sender(outbox, cfg.api)
    answered = asyncio.Event()
    sender.on_outcome = lambda item, outcome: answered.set()
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop))
    outbox.enqueue(conversation(), cfg.location, sender.clock())
    sender.wake()
    await asyncio.wait_for(answered.wait(), TIMEOUT)
    status = sender.status()
    stop.set()
    await asyncio.wait_for(task, TIMEOUT)
    outbox.close()
    assert status["counts"]["sent"] == 1 and status["paused"] is None and status["next_send_at"] is None


_SEND_SCRIPT = textwrap.dedent("""
    import sys
    from datetime import UTC, datetime, timedelta
    from bridge.config import ApiOptions, Config, StorageOptions
    from bridge.core.records import Conversation, Segment
    from bridge.cli.outbox import send_conversations

    url, state_dir, key = sys.argv[1:4]
    start = datetime(2026, 3, 1, 9, tzinfo=UTC)
    conv = Conversation("omi:kill9", "omi", start, start + timedelta(minutes=5), "en",
                        (Segment("the meeting moved to thursday", 0.5, 3.0),))
    cfg = Config(api=ApiOptions(base_url=url, api_key=key), storage=StorageOptions(dir=state_dir))
    sys.exit(send_conversations([conv], cfg))
""")


def test_kill_9_during_a_send_then_restart_gives_exactly_one_conversation(tmp_path: Path,
                                                                          sim: OmiApiSim) -> None:
    sim.slow_next(1.0)
    state = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _SEND_SCRIPT, sim.url, str(state), KEY], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert sim.wait_until(lambda: sim.in_flight == 1, TIMEOUT), "the post never arrived"
        proc.send_signal(signal.SIGKILL)
        proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    # The server finishes what it started; the client never heard the answer.
    assert sim.wait_until(lambda: len(sim.conversations()) == 1, TIMEOUT)
    item, = items(config(tmp_path, sim))
    assert item["state"] == "queued" and item["attempts"] == 1
    restart = subprocess.run([sys.executable, "-c", _SEND_SCRIPT, sim.url, str(state), KEY], env=env,
                             capture_output=True, text=True, timeout=60)
    assert restart.returncode == EXIT_SENT, restart.stdout + restart.stderr
    assert len(sim.conversations()) == 1
    first, second = sim.requests()[0], sim.requests()[1]
    assert first.body == second.body
    item, = items(config(tmp_path, sim))
    assert item["state"] == "sent" and item["server_id"] == sim.conversations()[0].id


def test_status_summary_names_the_pause_and_the_next_send(tmp_path: Path, sim: OmiApiSim) -> None:
    clock = FakeClock()
    cfg = config(tmp_path, sim, key=READONLY_KEY)
    send([conversation()], cfg, clock)
    outbox = Outbox.open(cfg.storage.path)
    status = outbox_status(outbox, cfg.api, clock())
    outbox.close()
    assert status["counts"]["paused"] == 1
    assert "conversations:write" in status["paused"]["reason"]
    assert json.dumps(status)  # serialisable for `omi-bridge status --json`


def test_while_the_daemon_delivers_the_cli_only_queues(tmp_path: Path, sim: OmiApiSim) -> None:
    cfg = config(tmp_path, sim)
    daemon_lock = DeliveryLock(cfg.storage.path)
    assert daemon_lock.try_acquire()
    try:
        code, out = send([conversation()], cfg, FakeClock())
    finally:
        daemon_lock.release()
    assert code == EXIT_WAITING and "daemon" in out
    assert sim.requests() == [] and items(cfg)[0]["state"] == "queued"


async def test_stopping_the_daemon_mid_post_keeps_the_item_for_the_next_start(tmp_path: Path,
                                                                              sim: OmiApiSim) -> None:
    sim.slow_next(1.0)
    cfg = config(tmp_path, sim)
    outbox = Outbox.open(cfg.storage.path)
    outbox.enqueue(conversation(), cfg.location, 0.0)
    sender = Sender(outbox, cfg.api)
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop))
    assert await asyncio.to_thread(sim.wait_until, lambda: sim.in_flight == 1, TIMEOUT)
    stop.set()
    await asyncio.wait_for(task, TIMEOUT)
    item, = items(cfg)
    assert item["state"] == "queued" and item["attempts"] == 1
    # Next start: the same body again; the server answers from what it stored.
    assert await asyncio.to_thread(sim.wait_until, lambda: len(sim.conversations()) == 1, TIMEOUT)
    stop = asyncio.Event()
    restarted = Sender(outbox, cfg.api)
    answered = asyncio.Event()
    restarted.on_outcome = lambda item, outcome: answered.set()
    task = asyncio.create_task(restarted.run(stop))
    await asyncio.wait_for(answered.wait(), TIMEOUT)
    stop.set()
    await asyncio.wait_for(task, TIMEOUT)
    outbox.close()
    assert items(cfg)[0]["state"] == "sent" and len(sim.conversations()) == 1


def test_a_conversation_the_server_rejects_is_reported_and_kept_as_dead(tmp_path: Path,
                                                                          sim: OmiApiSim) -> None:
    sim.inject(422, detail="Segment 0: text too exotic")
    clock = FakeClock()
    code, out = send([conversation(1), conversation(2)], config(tmp_path, sim), clock)
    assert code == EXIT_REJECTED
    assert "rejected" in out and "Segment 0: text too exotic" in out
    assert [i["state"] for i in items(config(tmp_path, sim))] == ["dead", "sent"]
    assert [r.status for r in sim.requests()] == [422, 200], "a 422 is never retried"
