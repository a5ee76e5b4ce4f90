"""systemd's watchdog is fed only while transcription really works: a dead or stuck Whisper
worker must get the bridge restarted (its spool is recovered then), not kept alive by a loop
that merely turns."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from bridge.app.daemon import Daemon
from bridge.app.systemd import Notifier
from bridge.config import Config, StorageOptions
from bridge.speech.asr.worker import AsrWorker

TIMEOUT = 10.0
WATCHDOG_USEC = 200_000
"""A ping every 0.1 s, so the test sees several ticks quickly."""
QUIET_WINDOW = 0.6
"""After the worker dies, this long (six ping intervals) must pass without a single ping."""


async def next_message(sock: socket.socket, timeout: float) -> dict[str, str]:
    data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), timeout)
    return dict(line.split("=", 1) for line in data.decode().splitlines())


async def test_watchdog_stops_when_the_transcription_worker_dies(
        tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    sock.setblocking(False)  # read with loop.sock_recv
    config = Config(storage=StorageOptions(dir=str(tmp_path)))
    daemon = Daemon(config, notifier=Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}),
                    state_dir=tmp_path)
    # A real worker thread; the model is never called because nothing is submitted.
    daemon.worker = AsrWorker(config.asr, model=object())
    daemon.worker.start()
    stop = asyncio.Event()
    task = asyncio.create_task(daemon._housekeeping(stop))
    try:
        pings = 0
        while pings < 2:
            if (await next_message(sock, TIMEOUT)).get("WATCHDOG") == "1":
                pings += 1

        await asyncio.to_thread(daemon.worker.stop, TIMEOUT)
        while "STUCK" not in (msg := await next_message(sock, TIMEOUT)).get("STATUS", ""):
            pass
        assert "WATCHDOG" not in msg
        with pytest.raises(TimeoutError):
            while True:
                assert "WATCHDOG" not in await next_message(sock, QUIET_WINDOW)
    finally:
        stop.set()
        await task
