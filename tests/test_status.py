"""status: says clearly whether a daemon runs, and what it is doing when it does."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bridge.app.state import EXIT_NOT_RUNNING, DaemonLock, write_state
from bridge.cli import main
from bridge.core.errors import BridgeError


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    path = tmp_path / "config.toml"
    path.write_text(f'[storage]\ndir = "{tmp_path / "state"}"\n')
    return path


def test_no_daemon_says_how_to_start_one(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["status", "--config", str(config)])
    out = capsys.readouterr().out
    assert code == EXIT_NOT_RUNNING
    assert "no daemon is running" in out and "systemctl start omi-bridge" in out


def test_a_dead_daemons_leftovers_do_not_look_alive(config: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    state_dir = tmp_path / "state"
    lock = DaemonLock(state_dir)
    lock.acquire()
    write_state(state_dir, {"pid": 999999, "devices": []})
    lock.release()  # what the kernel does when the daemon dies, even by kill -9
    code = main(["status", "--json", "--config", str(config)])
    assert code == EXIT_NOT_RUNNING
    assert json.loads(capsys.readouterr().out)["running"] is False


def test_running_daemon_is_described(config: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    state_dir = tmp_path / "state"
    lock = DaemonLock(state_dir)
    lock.acquire()
    now = datetime.now(UTC)
    try:
        write_state(state_dir, {
            "pid": os.getpid(), "started_at": (now - timedelta(minutes=5)).isoformat(), "ready": True,
            "devices": [
                {"name": "pendant", "kind": "omi", "address": "AA:BB:CC:DD:EE:01", "connected": True,
                 "connected_since": (now - timedelta(minutes=4)).isoformat(), "battery": 81,
                 "firmware": "2.0.10", "last_audio_at": now.isoformat(), "conversation_open": True,
                 "conversation_started_at": (now - timedelta(minutes=1)).isoformat()},
                {"name": "glasses", "kind": "frame", "address": "AA:BB:CC:DD:EE:02", "connected": False,
                 "last_error": "device not found", "conversation_open": False},
            ],
            "transcription": {"backlog_seconds": 4.5},
            "last_conversation": {"device": "pendant", "started_at": (now - timedelta(minutes=3)).isoformat(),
                                  "queued_at": (now - timedelta(minutes=2)).isoformat(), "words": 36},
            "outbox": {"queued": 1, "waiting": 0, "paused": 0, "sent": 3, "dead": 0,
                       "next_attempt_at": (now + timedelta(minutes=2)).isoformat()},
        })
        code = main(["status", "--config", str(config)])
        out = capsys.readouterr().out
        assert code == 0
        assert f"running (pid {os.getpid()}" in out
        assert "pendant (omi, AA:BB:CC:DD:EE:01): connected since" in out
        assert "battery 81%" in out and "firmware 2.0.10" in out and "conversation open since" in out
        assert "glasses (frame, AA:BB:CC:DD:EE:02): not connected" in out
        assert "last error: device not found" in out
        assert "4.5 s of speech waiting" in out
        assert "last conversation: pendant, started" in out and "36 words" in out
        assert "1 queued" in out and "3 sent" in out and "next send" in out

        assert main(["status", "--json", "--config", str(config)]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["running"] and not info["stale"]
        assert info["devices"][0]["battery"] == 81
    finally:
        lock.release()


def test_a_second_daemon_on_the_same_storage_is_refused(tmp_path: Path) -> None:
    first = DaemonLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(BridgeError, match="already running") as err:
            DaemonLock(tmp_path).acquire()
        assert str(os.getpid()) in str(err.value)
    finally:
        first.release()


def test_offline_sync_is_described_per_pendant(config: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    state_dir = tmp_path / "state"
    lock = DaemonLock(state_dir)
    lock.acquire()
    now = datetime.now(UTC)
    syncing = {"protocol": "ring", "state": "syncing", "waiting_bytes": 1_320_000,
               "waiting_audio_seconds": 300.0, "fetched_bytes": 440_000, "total_bytes": 1_760_000,
               "rate_bytes_per_second": 32_000.0, "progress": 0.25,
               "last_sync_at": (now - timedelta(hours=2)).isoformat(), "last_sync_bytes": 2_400_000,
               "conversations": 3, "estimated_conversations": 1,
               "fetched_not_transcribed_seconds": 12.0, "last_error": None}
    done = {"protocol": "multi-file", "state": "done", "waiting_bytes": 0, "fetched_bytes": 0,
            "total_bytes": 0, "rate_bytes_per_second": 0.0, "progress": None,
            "last_sync_at": None, "last_sync_bytes": None, "conversations": 0}
    failed = {"protocol": "legacy", "state": "failed", "waiting_bytes": 88_000,
              "waiting_audio_seconds": 20.0, "last_sync_at": None, "conversations": 0,
              "last_error": "the file ended after 4400 of 88000 bytes (truncated)"}
    pendants = [("pendant", "AA:BB:CC:DD:EE:01", syncing), ("spare", "AA:BB:CC:DD:EE:03", done),
                ("old", "AA:BB:CC:DD:EE:04", failed)]
    try:
        write_state(state_dir, {
            "pid": os.getpid(), "started_at": now.isoformat(), "ready": True,
            "devices": [{"name": name, "kind": "omi", "address": addr, "connected": True,
                         "connected_since": now.isoformat(), "offline": off}
                        for name, addr, off in pendants]})
        assert main(["status", "--config", str(config)]) == 0
        out = capsys.readouterr().out
        assert ("offline recordings (ring buffer storage): 1.3 MB waiting on the pendant "
                "(≈ 5m 00s of audio)") in out
        # 1.32 MB left at 32 kB/s: 41 s.
        assert "syncing: 440 kB of 1.8 MB (25%), 32 kB/s, about 41s left" in out
        assert "last sync" in out and "(2h 00m ago): 2.4 MB fetched" in out
        assert "3 offline conversations queued since start, 1 with ESTIMATED times" in out
        assert "≈ 12s of fetched audio not transcribed yet" in out
        assert "offline recordings (multi-file storage): nothing waiting on the pendant" in out
        assert "last sync: never" in out
        assert "offline recordings (legacy single file storage): 88 kB waiting" in out
        assert "last sync stopped: the file ended after 4400 of 88000 bytes (truncated)" in out
    finally:
        lock.release()
