"""`make demo` is the first thing a newcomer runs: it must end with a conversation in "Omi"."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

DEMO_TIMEOUT = 240.0


@pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon")
def test_demo_delivers_the_spoken_conversation_and_exits_0() -> None:
    done = subprocess.run([sys.executable, "-m", "bridge", "demo"], capture_output=True, text=True,
                          timeout=DEMO_TIMEOUT, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    out = done.stdout
    assert "server id:" in out and "source:            omi" in out
    transcript = out.split("transcript:", 1)[1].lower()
    assert all(word in transcript for word in ("milk", "thursday", "budget")), out
    # The daemon's own log is the progress report: connect, conversation, delivery.
    assert "connected" in done.stderr and "queued for Omi" in done.stderr
