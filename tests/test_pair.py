"""Pairing writes the device into the user's config file without disturbing anything else."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from bridge.config import load_config
from bridge.devices.pair import add_device
from bridge.errors import BridgeError

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
