"""``omi-bridge doctor`` against our bluetoothd (fake BlueZ on a private bus) and the Omi API
simulator: a good setup passes, and each broken piece fails with the line that fixes it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from omi_bridge_sim.bluez import FakeBluez
from omi_bridge_sim.bus import PrivateBus
from omi_bridge_sim.frame import FrameModel
from omi_bridge_sim.omi import OmiModel
from omi_bridge_sim.omi_api import DEFAULT_SCOPES, ApiKey, OmiApiSim

from bridge.cli import main

PENDANT = "AA:BB:CC:DD:EE:01"
GLASSES = "AA:BB:CC:DD:EE:02"
GOOD_KEY = "omi_dev_good"
READ_ONLY_KEY = "omi_dev_read_only"


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMI_API_KEY", raising=False)


@pytest.fixture
def api() -> Iterator[OmiApiSim]:
    with OmiApiSim({GOOD_KEY: ApiKey(), READ_ONLY_KEY: ApiKey(scopes=DEFAULT_SCOPES)}) as sim:
        yield sim


def write_config(tmp_path: Path, api: OmiApiSim, *, key: str = GOOD_KEY, frame: bool = False) -> Path:
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    text = f'[[devices]]\nkind = "omi"\naddress = "{PENDANT}"\nname = "pendant"\n\n'
    if frame:
        text += f'[[devices]]\nkind = "frame"\naddress = "{GLASSES}"\nname = "glasses"\n\n'
    text += (f'[api]\nbase_url = "{api.url}"\napi_key_file = "{key_file}"\n\n'
             f'[storage]\ndir = "{tmp_path / "state"}"\n')
    path = tmp_path / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


async def doctor(path: Path, capsys: pytest.CaptureFixture[str], *, as_json: bool = False
                 ) -> tuple[int, str]:
    # The doctor runs its own event loop (as the CLI does); the fake BlueZ runs on the test's.
    argv = ["doctor", "--config", str(path)] + (["--json"] if as_json else [])
    code = await asyncio.to_thread(main, argv)
    return code, capsys.readouterr().out


def line(out: str, check: str) -> str:
    found = [ln for ln in out.splitlines() if ln[6:].split("  ")[0].strip() == check]
    assert len(found) == 1, f"no single {check!r} line in:\n{out}"
    return found[0]


@pytest.mark.asr
async def test_a_good_setup_passes_and_json_says_the_same(
        tmp_path: Path, fake_bluez: FakeBluez, api: OmiApiSim, capsys: pytest.CaptureFixture[str]) -> None:
    await fake_bluez.add_device(OmiModel(address=PENDANT, audio=np.zeros(16000, np.int16)), paired=True)
    path = write_config(tmp_path, api)
    code, out = await doctor(path, capsys)
    assert code == 0, out
    assert line(out, "config").startswith("ok")
    assert line(out, "bluez").startswith("ok") and "BlueZ 5." in line(out, "bluez")
    assert line(out, "dbus").startswith("ok")
    assert line(out, "adapter").startswith("ok") and "powered" in line(out, "adapter")
    assert line(out, "device pendant").startswith("ok")
    assert line(out, "api key").startswith("ok") and "conversations:write" in line(out, "api key")
    assert line(out, "disk").startswith("ok")
    assert line(out, "asr").startswith("ok") and "tiny.en" in line(out, "asr")
    assert "FAIL" not in out and out.rstrip().endswith(("Nothing blocks the bridge.", "warning(s) above)."))
    # The key probe stored nothing: the server rejected the empty body after accepting the key.
    assert api.conversations() == [] and [r.status for r in api.requests()] == [422]

    code, out = await doctor(path, capsys, as_json=True)
    report = json.loads(out)
    assert code == 0 and report["ok"] is True
    assert {c["check"] for c in report["checks"]} >= {"config", "bluez", "dbus", "adapter", "api key",
                                                       "disk", "clock", "memory", "asr"}
    assert all(c["status"] in ("ok", "warn") for c in report["checks"])


async def test_a_wrong_key_and_a_read_only_key_fail_with_the_fix(
        tmp_path: Path, fake_bluez: FakeBluez, api: OmiApiSim, capsys: pytest.CaptureFixture[str]) -> None:
    await fake_bluez.add_device(OmiModel(address=PENDANT, audio=np.zeros(16000, np.int16)), paired=True)
    code, out = await doctor(write_config(tmp_path, api, key="omi_dev_wrong"), capsys)
    assert code == 1
    bad = line(out, "api key")
    assert bad.startswith("FAIL") and "rejected the API key" in bad
    assert "→ create a key with the conversations:write scope in the Omi app" in bad
    assert "omi_dev_wrong" not in out  # the key itself is never printed

    code, out = await doctor(write_config(tmp_path, api, key=READ_ONLY_KEY), capsys, as_json=True)
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    key = next(c for c in report["checks"] if c["check"] == "api key")
    assert key["status"] == "fail" and "lacks the conversations:write scope" in key["detail"]
    assert "Settings → Developer" in key["fix"]


async def test_missing_devices_name_the_pair_command(
        tmp_path: Path, fake_bluez: FakeBluez, api: OmiApiSim, capsys: pytest.CaptureFixture[str]) -> None:
    # Neither device known to BlueZ: Frame cannot stream without its bond, Omi needs none.
    code, out = await doctor(write_config(tmp_path, api, frame=True), capsys)
    assert code == 1
    glasses = line(out, "device glasses")
    assert glasses.startswith("FAIL") and "not known to BlueZ" in glasses
    assert f"→ wake the glasses near this machine and run: sudo omi-bridge pair {GLASSES} --kind frame" \
        in glasses
    pendant = line(out, "device pendant")
    assert pendant.startswith("warn") and f"omi-bridge listen {PENDANT}" in pendant

    await fake_bluez.add_device(FrameModel(address=GLASSES), paired=True)
    await fake_bluez.add_device(OmiModel(address=PENDANT, audio=np.zeros(16000, np.int16)), paired=True)
    code, out = await doctor(write_config(tmp_path, api, frame=True), capsys)
    assert line(out, "device glasses").startswith("ok") and "bonded" in line(out, "device glasses")
    assert line(out, "device pendant").startswith("ok")


async def test_a_powered_off_adapter_fails_with_power_on(
        tmp_path: Path, fake_bluez: FakeBluez, api: OmiApiSim, capsys: pytest.CaptureFixture[str]) -> None:
    fake_bluez.set_powered(False)
    code, out = await doctor(write_config(tmp_path, api), capsys)
    assert code == 1
    adapter = line(out, "adapter")
    assert adapter.startswith("FAIL") and "powered off" in adapter and "bluetoothctl power on" in adapter


async def test_no_bluetoothd_on_the_bus_says_how_to_start_it(
        tmp_path: Path, private_bus: PrivateBus, api: OmiApiSim, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = await doctor(write_config(tmp_path, api), capsys)
    assert code == 1
    dbus = line(out, "dbus")
    assert dbus.startswith("FAIL") and "bluetoothd is not running" in dbus
    assert "systemctl enable --now bluetooth" in dbus


async def test_clock_and_memory_are_reported_plainly(
        tmp_path: Path, fake_bluez: FakeBluez, api: OmiApiSim, capsys: pytest.CaptureFixture[str]) -> None:
    _code, out = await doctor(write_config(tmp_path, api), capsys)
    clock = line(out, "clock")
    # Here (no systemd as PID 1) the state is unknown, and the doctor says so rather than guess.
    assert clock.startswith(("ok", "warn"))
    if clock.startswith("warn"):
        assert "synchronised" in clock and "timedatectl set-ntp true" in clock
    memory = line(out, "memory")
    assert "MB available" in memory and "the daemon needs" in memory
