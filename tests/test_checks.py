"""check-config tells the user every problem with the key it concerns and what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omi_bridge_sim.bluez import FakeBluez
from omi_bridge_sim.bus import PrivateBus

from bridge.app.preflight import check, require_valid
from bridge.cli import main
from bridge.core.errors import BridgeError

DEVICE = '[[devices]]\nkind = "omi"\naddress = "AA:BB:CC:DD:EE:01"\nname = "pendant"\n'


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMI_API_KEY", raising=False)


def write_config(tmp_path: Path, body: str, *, key: str | None = "omi_dev_secret") -> Path:
    storage = tmp_path / "state"
    text = DEVICE + body
    if key is not None and "api_key" not in body:
        key_file = tmp_path / "key"
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
        text += f'\n[api]\napi_key_file = "{key_file}"\n'
    if "[storage]" not in body:
        text += f'\n[storage]\ndir = "{storage}"\n'
    path = tmp_path / "config.toml"
    path.write_text(text)
    path.chmod(0o640)
    return path


def run_check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["check-config", "--config", str(path)])
    return code, capsys.readouterr().out


def test_a_good_config_is_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_check(write_config(tmp_path, ""), capsys)
    assert code == 0, out
    assert "OK" in out and "pendant (omi)" in out
    assert (tmp_path / "state").is_dir()  # storage was created and proven writable


def test_plain_http_to_a_remote_host_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "key"
    key.write_text("k")
    key.chmod(0o600)
    path = write_config(tmp_path, f'[api]\nbase_url = "http://api.omi.me"\napi_key_file = "{key}"\n')
    code, out = run_check(path, capsys)
    assert code == 1
    assert "[api] base_url" in out and "unencrypted" in out and "use https" in out


def test_loopback_http_is_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, '[api]\nbase_url = "http://127.0.0.1:8080"\napi_key = "k"\n')
    code, out = run_check(path, capsys)
    assert code == 0, out


def test_missing_key_file_says_where_to_put_the_key(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, f'[api]\napi_key_file = "{tmp_path / "nope"}"\n')
    code, out = run_check(path, capsys)
    assert code == 1
    assert "[api] api_key_file" in out and "does not exist" in out


def test_no_key_at_all_names_the_scope_to_create(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_check(write_config(tmp_path, "", key=None), capsys)
    assert code == 1
    assert "conversations:write" in out


def test_key_readable_by_others_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, "")
    (tmp_path / "key").chmod(0o644)
    code, out = run_check(path, capsys)
    assert code == 0
    assert "warning: [api] api_key_file" in out and "chmod 600" in out


def test_inline_key_in_a_world_readable_file_is_a_warning(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, '[api]\napi_key = "omi_dev_x"\n')
    path.chmod(0o644)
    code, out = run_check(path, capsys)
    assert code == 0
    assert "warning: [api] api_key" in out and "omi_dev_x" not in out


def test_bad_values_and_unknown_keys_are_all_listed(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, "[conversation]\ngap_seconds = -1\n[vad]\ntreshold = 0.5\n")
    code, out = run_check(path, capsys)
    assert code == 1
    assert "[conversation].gap_seconds must be greater than 0" in out
    assert "did you mean 'threshold'" in out


def test_model_directory_without_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "model").mkdir()
    path = write_config(tmp_path, f'[asr]\nmodel = "{tmp_path / "model"}"\n')
    code, out = run_check(path, capsys)
    assert code == 1
    assert "[asr] model" in out and "model.bin" in out


def test_unwritable_storage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = write_config(tmp_path, f'[storage]\ndir = "{blocker / "state"}"\n')
    code, out = run_check(path, capsys)
    assert code == 1
    assert "[storage] dir" in out and "not writable" in out


def test_no_devices_points_to_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, "")
    path.write_text(path.read_text().replace(DEVICE, ""))
    code, out = run_check(path, capsys)
    assert code == 1
    assert "[[devices]]" in out and "omi-bridge pair" in out


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_check(tmp_path / "absent.toml", capsys)
    assert code == 1
    assert "does not exist" in out


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, "[conversation]\ngap_seconds = 0\n")
    code = main(["check-config", "--json", "--config", str(path)])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["ok"] is False
    assert any("gap_seconds" in p["message"] for p in report["problems"])


def test_the_daemon_refuses_with_the_same_messages(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, "[conversation]\ngap_seconds = 0\n")
    _code, out = run_check(path, capsys)
    with pytest.raises(BridgeError) as err:
        require_valid(str(path))
    line = next(line for line in out.splitlines() if "gap_seconds" in line)
    assert line.strip() in str(err.value)
    assert "check-config" in str(err.value)


@pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon")
def test_missing_bluetooth_service_is_a_warning_naming_the_fix(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], private_bus: PrivateBus) -> None:
    # A system bus with no bluetoothd on it: the daemon would start and wait, so only a warning.
    code, out = run_check(write_config(tmp_path, ""), capsys)
    assert code == 0
    assert "warning: [link] adapter: bluetoothd is not running" in out
    assert "systemctl start bluetooth" in out


@pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon")
async def test_present_adapter_gives_no_warning(tmp_path: Path, fake_bluez: FakeBluez) -> None:
    import asyncio

    _config, problems = await asyncio.to_thread(check, str(write_config(tmp_path, "")), with_adapter=True)
    assert [p for p in problems if p.key == "[link] adapter"] == []
    fake_bluez.set_powered(False)
    _config, problems = await asyncio.to_thread(check, str(write_config(tmp_path, "")), with_adapter=True)
    assert any("powered off" in p.message and p.warning for p in problems), problems
