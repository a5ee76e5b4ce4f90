"""``omi-bridge outbox``: what is queued, sent, waiting, paused or dead, and acting on it."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from omi_bridge_sim.omi_api import DEFAULT_SCOPES, ApiKey, OmiApiSim

from bridge.cli import main
from bridge.cli.outbox import EXIT_PAUSED, EXIT_SENT, send_conversations
from bridge.config import load_config
from bridge.core.records import Conversation, Segment
from bridge.outbox.store import Outbox

KEY = "omi_dev_CLISECRET"
READONLY = "omi_dev_CLIREADONLY"
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
JSON_KEYS = {"id", "client_session_id", "state", "attempts", "next_attempt_at", "server_id", "discarded",
             "error"}


@pytest.fixture
def sim() -> Iterator[OmiApiSim]:
    with OmiApiSim({KEY: ApiKey(), READONLY: ApiKey(scopes=DEFAULT_SCOPES)}) as s:
        yield s


@pytest.fixture(autouse=True)
def no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMI_API_KEY", raising=False)


def write_config(tmp_path: Path, sim: OmiApiSim, key: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(f'[api]\nbase_url = "{sim.url}"\napi_key = "{key}"\n\n'
                    f'[storage]\ndir = "{tmp_path / "state"}"\n')
    return str(path)


def conversation(n: int) -> Conversation:
    start = T0 + timedelta(hours=n)
    return Conversation(f"frame:11:22:33:44:55:66:{n}", "frame", start, start + timedelta(minutes=2), "en",
                        (Segment(f"note number {n} about the budget review", 0.0, 2.5),))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_list_json_shows_sent_and_paused_items(tmp_path: Path, sim: OmiApiSim,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    good = write_config(tmp_path, sim, KEY)
    assert send_conversations([conversation(1)], load_config(good), io.StringIO()) == EXIT_SENT
    bad = write_config(tmp_path, sim, READONLY)
    assert send_conversations([conversation(2)], load_config(bad), io.StringIO()) == EXIT_PAUSED
    code, out = run(capsys, "outbox", "list", "--json", "--config", bad)
    assert code == 0
    rows = json.loads(out)
    assert [set(r) for r in rows] == [JSON_KEYS, JSON_KEYS]
    sent, paused = rows
    assert sent["state"] == "sent" and sent["server_id"] == sim.conversations()[0].id
    assert sent["discarded"] is False and sent["next_attempt_at"] is None and sent["attempts"] == 1
    assert paused["state"] == "paused" and paused["server_id"] is None
    assert paused["client_session_id"] == "frame:11:22:33:44:55:66:2"
    code, out = run(capsys, "outbox", "list", "--config", bad)
    assert "paused" in out and "conversations:write" in out and "Settings → Developer" in out


def test_retry_after_fixing_the_key_sends_now_and_purge_removes_sent(
        tmp_path: Path, sim: OmiApiSim, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_config(tmp_path, sim, READONLY)
    assert send_conversations([conversation(3)], load_config(bad), io.StringIO()) == EXIT_PAUSED
    item_id = json.loads(run(capsys, "outbox", "list", "--json", "--config", bad)[1])[0]["id"]
    code, out = run(capsys, "outbox", "show", str(item_id), "--config", bad)
    assert code == 0 and "note number 3 about the budget review" in out
    good = write_config(tmp_path, sim, KEY)
    code, out = run(capsys, "outbox", "retry", str(item_id), "--config", good)
    assert code == EXIT_SENT, out
    assert f"→ {sim.conversations()[0].id}" in out
    code, out = run(capsys, "outbox", "purge-sent", "--json", "--config", good)
    assert json.loads(out) == {"purged": 1}
    assert json.loads(run(capsys, "outbox", "list", "--json", "--config", good)[1]) == []


def test_unknown_item_is_a_clear_error(tmp_path: Path, sim: OmiApiSim,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, sim, KEY)
    Outbox.open(tmp_path / "state").close()
    assert main(["outbox", "show", "42", "--config", path]) == 1
    assert "no outbox item 42" in capsys.readouterr().err
