"""`make demo` is the first thing a newcomer runs: it must end with a conversation in "Omi"."""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import datetime

import pytest

DEMO_TIMEOUT = 240.0
AWAY_MINUTES = 20.0
"""How long before the live speech the demo's stored recording was said (omi_bridge_sim/demo.py)."""


@pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon")
def test_demo_delivers_the_spoken_conversation_and_exits_0() -> None:
    done = subprocess.run([sys.executable, "-m", "bridge", "demo"], capture_output=True, text=True,
                          timeout=DEMO_TIMEOUT, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    out = done.stdout
    # Two conversations: what the wearer said away from the Pi (fetched from the pendant's
    # storage as it connected, at the time it was said) and what it says now.
    assert out.count("server id:") == 2 and out.count("source:            omi") == 2, out
    starts = [datetime.fromisoformat(line.split(":", 1)[1].strip())
              for line in out.splitlines() if line.startswith("started_at:")]
    away = (starts[1] - starts[0]).total_seconds() / 60
    assert abs(away - AWAY_MINUTES) < 1.5, (starts, out)
    for transcript in out.split("transcript:")[1:]:
        assert all(word in transcript.lower() for word in ("milk", "thursday", "budget")), out
    # The daemon's own log is the progress report: connect, conversation, delivery.
    assert "connected" in done.stderr and "queued for Omi" in done.stderr
