"""systemd integration: sd_notify datagrams on a real socket, and a unit file systemd accepts."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from bridge.app.systemd import Notifier

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "omi-bridge.service"
TIMEOUT = 5.0


def received(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def test_ready_status_and_watchdog_reach_systemd(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000000"})
    assert notifier.enabled
    assert notifier.watchdog_interval == 30.0

    assert notifier.ready("1/1 devices connected")
    msg = received(sock)
    assert msg["READY"] == "1"
    assert msg["MAINPID"] == str(os.getpid())
    assert msg["STATUS"] == "1/1 devices connected"

    assert notifier.watchdog()
    assert received(sock) == {"WATCHDOG": "1"}

    assert notifier.status("pendant: connected,\nbattery 80%")
    assert received(sock) == {"STATUS": "pendant: connected, battery 80%"}

    assert notifier.stopping()
    assert received(sock) == {"STOPPING": "1"}
    notifier.close()


def test_abstract_namespace_socket() -> None:
    name = f"omi-bridge-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(TIMEOUT)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert received(sock)["READY"] == "1"
    finally:
        sock.close()


def test_outside_systemd_everything_is_a_quiet_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.ready("x")
    assert not notifier.watchdog()


def test_watchdog_meant_for_another_process_is_ignored() -> None:
    notifier = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000",
                         "WATCHDOG_PID": str(os.getpid() + 1)})
    assert notifier.watchdog_interval is None


def test_a_vanished_socket_does_not_crash_the_daemon() -> None:
    notifier = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify"})
    assert notifier.enabled
    assert not notifier.watchdog()
    assert not notifier.watchdog()


def test_status_is_one_short_line(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    Notifier({"NOTIFY_SOCKET": path}).status("x" * 1000)
    status = received(sock)["STATUS"]
    assert len(status) <= 200 and "\n" not in status


def test_unit_file_declares_what_the_daemon_relies_on() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "NotifyAccess=main", "Restart=on-failure", "StateDirectory=omi-bridge",
                 "ConfigurationDirectory=omi-bridge", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ProtectHome=yes", "PrivateTmp=yes",
                 "ExecStart=/opt/omi-bridge/.venv/bin/omi-bridge run --config /etc/omi-bridge/config.toml"):
        assert line in text.splitlines(), line
    assert any(line.startswith("WatchdogSec=") for line in text.splitlines())
    # BlueZ is reached over the system bus, an AF_UNIX socket: it must stay allowed.
    families = next(line for line in text.splitlines() if line.startswith("RestrictAddressFamilies="))
    assert "AF_UNIX" in families


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (apt-get install systemd to run this check)")
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    # verify also checks that ExecStart exists; point it at a stand-in so the check is about the unit.
    fake_bin = tmp_path / "omi-bridge"
    fake_bin.write_text("#!/bin/sh\n")
    fake_bin.chmod(0o755)
    unit = tmp_path / "omi-bridge.service"
    unit.write_text(UNIT.read_text().replace("/opt/omi-bridge/.venv/bin/omi-bridge", str(fake_bin)))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    # Complaints about other units on the host (or missing PID 1 in a container) are not ours.
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "omi-bridge" in line]
    assert not ours, "\n".join(ours)
