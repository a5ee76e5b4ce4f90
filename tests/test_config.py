"""The config file: every mistake is named with its key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import example_toml, load_config
from bridge.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def test_example_file_is_current_and_valid() -> None:
    assert (ROOT / "config.example.toml").read_text() == example_toml(), (
        "config.example.toml is stale: run `make example-config`")
    config = load_config(str(ROOT / "config.example.toml"))
    assert config.devices == []


def test_devices_are_read_and_addresses_upper_cased(tmp_path: Path) -> None:
    path = write(tmp_path, """
[[devices]]
kind = "omi"
address = "aa:bb:cc:dd:ee:01"
name = "pendant"

[[devices]]
kind = "frame"
address = "AA:BB:CC:DD:EE:02"
""")
    config = load_config(path)
    assert [(d.kind, d.address, d.label) for d in config.devices] == [
        ("omi", "AA:BB:CC:DD:EE:01", "pendant"),
        ("frame", "AA:BB:CC:DD:EE:02", "AA:BB:CC:DD:EE:02"),
    ]


def test_typo_names_the_key_the_file_and_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "[conversation]\ngap_secnds = 30\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert path in text
    assert "'gap_secnds' in [conversation]" in text
    assert "did you mean 'gap_seconds'" in text


def test_wrong_types_and_ranges_are_all_reported(tmp_path: Path) -> None:
    path = write(tmp_path, """
[asr]
beam_size = "five"
[vad]
threshold = 1.5
[[devices]]
kind = "airpods"
address = "not-an-address"
""")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert any("[asr].beam_size must be an integer" in p for p in problems)
    assert any("[vad].threshold must be at most 1" in p for p in problems)
    assert any("kind in [[devices]] #1 must be one of 'omi', 'frame'" in p for p in problems)
    assert any("must look like \"AA:BB:CC:DD:EE:FF\"" in p for p in problems)


def test_missing_explicit_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "nope.toml"))
    assert "copy config.example.toml" in str(info.value)


def test_broken_toml_is_reported_with_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[api\nbase_url = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "not valid TOML" in str(info.value) and path in str(info.value)
