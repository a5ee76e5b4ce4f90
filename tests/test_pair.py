"""Pairing writes the device into the user's config file without disturbing anything else."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bridge.cli.pair import add_device
from bridge.config import load_config
from bridge.core.errors import BridgeError

HAND_WRITTEN = """\
# My bridge. Keep the key out of this file.
[api]
api_key_file = "/etc/omi-bridge/key"   # created with chmod 600

# The pendant I wear every day
[[devices]]
kind = "omi"
address = "AA:BB:CC:DD:EE:01"
name = "pendant"   # shows up in the logs

[conversation]
# shorter conversations for testing
gap_seconds = 60.0
"""


def test_adding_a_second_device_keeps_comments_and_layout(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(HAND_WRITTEN)
    path.chmod(0o640)
    created = add_device(path, "frame", "aa:bb:cc:dd:ee:02", "glasses")
    assert not created
    text = path.read_text()
    # Everything the user wrote is still there, byte for byte.
    for line in HAND_WRITTEN.splitlines():
        assert line in text.splitlines(), line
    assert text.startswith(HAND_WRITTEN.split("[conversation]")[0])
    config = load_config(str(path))
    assert [(d.kind, d.address, d.label) for d in config.devices] == [
        ("omi", "AA:BB:CC:DD:EE:01", "pendant"), ("frame", "AA:BB:CC:DD:EE:02", "glasses")]
    assert config.conversation.gap_seconds == 60.0
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_first_device_in_a_file_without_devices(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('# log quietly\n[log]\nlevel = "warning"\n')
    add_device(path, "omi", "AA:BB:CC:DD:EE:03")
    text = path.read_text()
    assert text.startswith('# log quietly\n[log]\nlevel = "warning"\n')
    config = load_config(str(path))
    assert [d.address for d in config.devices] == ["AA:BB:CC:DD:EE:03"]
    assert config.log.level == "warning"


def test_missing_file_is_created_from_the_documented_example(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "config.toml"
    assert add_device(path, "omi", "AA:BB:CC:DD:EE:04", "pendant")
    text = path.read_text()
    assert "# Check it with: omi-bridge check-config" in text  # the example's documentation
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert load_config(str(path)).devices[0].label == "pendant"


def test_pairing_the_same_device_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(HAND_WRITTEN)
    with pytest.raises(BridgeError, match="already paired") as err:
        add_device(path, "omi", "aa:bb:cc:dd:ee:01")
    assert "pendant" in str(err.value)
    assert path.read_text() == HAND_WRITTEN


def test_a_name_already_in_use_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(HAND_WRITTEN)
    with pytest.raises(BridgeError, match="already used"):
        add_device(path, "omi", "AA:BB:CC:DD:EE:09", "pendant")


def test_bad_address_is_refused_before_touching_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(HAND_WRITTEN)
    with pytest.raises(BridgeError, match="not a Bluetooth address"):
        add_device(path, "omi", "AA:BB:CC")
    assert path.read_text() == HAND_WRITTEN


def test_broken_toml_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[api\n")
    with pytest.raises(BridgeError, match="not valid TOML"):
        add_device(path, "omi", "AA:BB:CC:DD:EE:05")
    assert path.read_text() == "[api\n"


# ---------------------------------------------------------------------------------------------
# The whole command against the simulator in its own process (real bleak on a private bus).

SIM_TIMEOUT = 30.0


@pytest.fixture
def simulator() -> Iterator[Callable[..., dict[str, str]]]:
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> dict[str, str]:
        proc = subprocess.Popen([sys.executable, "-m", "omi_bridge_sim", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
        procs.append(proc)
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        env = dict(os.environ)
        env.update(info["env"])
        env.pop("OMI_BRIDGE_CONFIG", None)
        return env

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def pair(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", "pair", *args], env=env, capture_output=True,
                          text=True, timeout=SIM_TIMEOUT)


@pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon")
def test_pair_finds_the_only_pendant_nearby_and_writes_it(
        tmp_path: Path, simulator: Callable[..., dict[str, str]]) -> None:
    env = simulator("--omi", "C0:FF:EE:00:00:01")
    path = tmp_path / "config.toml"
    path.write_text(HAND_WRITTEN)
    done = pair(env, "--timeout", "1", "--name", "desk", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert "added omi C0:FF:EE:00:00:01" in done.stdout
    assert [(d.kind, d.address, d.label) for d in load_config(str(path)).devices][-1] == (
        "omi", "C0:FF:EE:00:00:01", "desk")
    again = pair(env, "C0:FF:EE:00:00:01", "--config", str(path))
    assert again.returncode == 1 and "already paired" in again.stderr


@pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon")
def test_pair_by_address_detects_frame_and_bonds(
        tmp_path: Path, simulator: Callable[..., dict[str, str]]) -> None:
    env = simulator("--frame", "C0:FF:EE:00:00:02")
    path = tmp_path / "new" / "config.toml"
    done = pair(env, "c0:ff:ee:00:00:02", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert load_config(str(path)).devices[0].kind == "frame"


@pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon")
def test_pair_with_nothing_nearby_says_what_to_do(tmp_path: Path,
                                                  simulator: Callable[..., dict[str, str]]) -> None:
    env = simulator()
    done = pair(env, "--timeout", "0.5", "--config", str(tmp_path / "config.toml"))
    assert done.returncode == 1
    assert "no Omi or Frame device found" in done.stderr and "wake the device" in done.stderr
    assert not (tmp_path / "config.toml").exists()
