"""The daemon's log: one line per event, and no timestamps of our own when journald adds them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SNIPPET = ("import logging; from bridge.app.logs import setup_logging; setup_logging('info'); "
           "logging.getLogger('bridge.link.supervisor').warning('pendant link lost; reconnecting'); "
           "logging.getLogger('bridge.app.daemon').debug('hidden at info')")


def run(tmp_path: Path, journal: bool) -> str:
    out = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID")}
    with out.open("wb") as fh:
        if journal:
            st = os.fstat(fh.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", SNIPPET], stderr=fh, env=env, check=True, timeout=60)
    return out.read_text()


def test_under_journald_lines_carry_a_priority_and_no_timestamp(tmp_path: Path) -> None:
    text = run(tmp_path, journal=True)
    assert text == "<4>bridge.link.supervisor: pendant link lost; reconnecting\n"


def test_on_a_terminal_or_file_lines_are_timestamped(tmp_path: Path) -> None:
    lines = run(tmp_path, journal=False).splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("WARNING bridge.link.supervisor: pendant link lost; reconnecting")
    assert lines[0][:4].isdigit()  # starts with the date
