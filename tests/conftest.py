"""Shared fixtures: a private D-Bus bus and our fake bluetoothd, so tests run real bleak.

bleak keeps one BlueZ manager per event loop, bound to the bus it first connected to
(bluez-for-tests.md §2, §9.6); pytest-asyncio's function-scoped loop plus a function-scoped bus
gives every test its own. The bus address must be in the environment before bleak's first
MessageBus is created in that loop, so ``private_bus`` sets it before the test body runs.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
from omi_bridge_sim.audio import demo_speech_path, load_pcm16k
from omi_bridge_sim.bluez import FakeBluez
from omi_bridge_sim.bus import PrivateBus


@pytest.fixture
def private_bus(monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivateBus]:
    """A fresh dbus-daemon; DBUS_SYSTEM_BUS_ADDRESS and PATH (fake bluetoothctl) point at it
    for this test and are restored afterwards. ``private_bus.env()`` is for subprocesses."""
    with PrivateBus() as bus:
        env = bus.env()
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", env["DBUS_SYSTEM_BUS_ADDRESS"])
        monkeypatch.setenv("PATH", env["PATH"])
        yield bus


@pytest.fixture
async def fake_bluez(private_bus: PrivateBus) -> AsyncIterator[FakeBluez]:
    """Our bluetoothd on the private bus, on the test's event loop. Add devices with
    ``await fake_bluez.add_device(OmiModel(...))``."""
    fake = FakeBluez(private_bus.address)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture(scope="session")
def demo_audio() -> np.ndarray:
    """The bundled speech clip (sim/omi_bridge_sim/assets/demo_speech.flac) as 16 kHz mono int16."""
    return load_pcm16k(demo_speech_path())


NOTIFY_TIMEOUT = 5.0
"""Longest wait for one sd_notify datagram."""


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket to pass as $NOTIFY_SOCKET, as systemd does, and its path."""
    # A short directory: AF_UNIX paths are limited to ~107 bytes and pytest's tmp_path is long.
    tmp = tempfile.mkdtemp(prefix="ob-sd-")
    path = os.path.join(tmp, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(NOTIFY_TIMEOUT)
    yield sock, path
    sock.close()
    shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- no silent skips
# A skipped test is a test a fresh clone does not run, so `make test` fails when one is skipped,
# unless it is marked ``hardware`` (it needs a real pendant, glasses or adapter, which CI lacks).

HARDWARE_MARKER = "hardware"
_unexpected_skips: list[str] = []


def _record_skip(report: pytest.TestReport | pytest.CollectReport, allowed: bool) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and not allowed:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record_skip(report, HARDWARE_MARKER in report.keywords)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    # A whole module skipped at import time (pytest.importorskip, a module-level skip).
    _record_skip(report, False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _unexpected_skips:
        terminalreporter.section("skipped tests fail the run (mark them 'hardware' if they need a device)",
                                 sep="=", red=True, bold=True)
        for line in _unexpected_skips:
            terminalreporter.line(line)
