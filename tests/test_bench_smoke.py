"""The bench cannot rot: ``python -m bench --quick`` runs every part and writes the full table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import ROW_ORDER, ROW_TITLES

pytestmark = pytest.mark.asr  # the quick bench still runs tiny.en

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120.0
"""Bound on the quick run (≈ 20 s; generous for a loaded shared machine)."""


def test_quick_bench_writes_every_row_and_the_plot(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DBUS_SYSTEM_BUS_ADDRESS",)}
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (tmp_path / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    for key in ROW_ORDER:
        row = next((r for r in rows if r.startswith(f"| {ROW_TITLES[key]} |")), None)
        assert row is not None, f"row {key!r} missing from results.md"
        assert "FAILED" not in row and "not run" not in row, row
    assert (tmp_path / "results.png").stat().st_size > 10_000
    # The reasons behind the figures and what they mean on a Pi come with them.
    assert "## Where the memory and a Whisper call's time go" in md
    assert "## On a Raspberry Pi 4 (estimates)" in md
