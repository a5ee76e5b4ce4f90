"""A private D-Bus "system" bus for the simulated Bluetooth stack.

Tests and ``omi-bridge demo`` run real bleak against our fake bluetoothd; both must live on a bus
of their own so nothing touches the machine's real BlueZ and no root is needed. Facts behind the
choices below: bluez-for-tests.md §2 (config, start, AF_UNIX limit, daemon leaks) and §3 (the
``bluetoothctl --version`` probe).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Mapping

from bridge.core.errors import BridgeError

_LOGGER = logging.getLogger(__name__)

# bleak runs `bluetoothctl --version` and refuses BlueZ < 5.55 (bluez-for-tests.md §3); an old real
# binary on a CI host would make bleak refuse even our fake, so ours shadows it on PATH.
FAKE_BLUEZ_VERSION = "5.72"

# Linux prctl option: deliver a signal to the child when the parent dies (prctl(2)), so a
# SIGKILLed test run does not leak dbus-daemon processes (bluez-for-tests.md §2).
_PR_SET_PDEATHSIG = 1

# dbus-daemon prints its address on the first stdout line (measured 4–6 ms, bluez-for-tests.md
# §2); this bounds a hung start on an overloaded machine.
_START_TIMEOUT_S = 10.0

# Minimal system-type bus: EXTERNAL auth (same uid), everyone may own/send/receive. The distro's
# system.conf forbids owning org.bluez and wants a messagebus user (bluez-for-tests.md §2).
_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
  </policy>
</busconfig>
"""

_FAKE_BLUETOOTHCTL = """#!/bin/sh
# Written by omi_bridge_sim.bus: bleak only asks for the version (bluez-for-tests.md §3).
if [ "$1" = "--version" ]; then
    echo "bluetoothctl: {version}"
    exit 0
fi
echo "fake bluetoothctl (omi-bridge simulator): only --version is supported" >&2
exit 1
"""


def _set_pdeathsig() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class PrivateBus:
    """A ``dbus-daemon`` of type system on a socket in a fresh short temporary directory.

    Use as a context manager or call ``start()``/``stop()``. ``address`` is the bus address;
    ``env()`` gives an environment for code (or a child process) that must use this bus.
    """

    def __init__(self, *, bluetoothctl_version: str = FAKE_BLUEZ_VERSION) -> None:
        self._version = bluetoothctl_version
        self._proc: subprocess.Popen[bytes] | None = None
        self.dir = ""
        self.address = ""

    @property
    def bin_dir(self) -> str:
        """Directory holding the fake ``bluetoothctl``; put it first on PATH."""
        return os.path.join(self.dir, "bin")

    def start(self) -> PrivateBus:
        if self._proc is not None:
            return self
        daemon = shutil.which("dbus-daemon")
        if daemon is None:
            raise BridgeError(
                "dbus-daemon is not installed; the Bluetooth simulator needs it",
                "sudo apt-get install dbus-daemon   (package 'dbus' on Debian 11 / Ubuntu 22.04)")
        # A short prefix straight in the temp dir: AF_UNIX paths are limited to ~107 bytes and
        # pytest's tmp_path is too long (bluez-for-tests.md §2).
        self.dir = tempfile.mkdtemp(prefix="ob-")
        socket_path = os.path.join(self.dir, "bus")
        config_path = os.path.join(self.dir, "bus.conf")
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(_CONFIG.format(socket=socket_path))
        os.mkdir(self.bin_dir)
        ctl = os.path.join(self.bin_dir, "bluetoothctl")
        with open(ctl, "w", encoding="utf-8") as f:
            f.write(_FAKE_BLUETOOTHCTL.format(version=self._version))
        os.chmod(ctl, 0o755)

        # stderr to a file: a pipe nobody reads could fill up and stall the daemon.
        log_path = os.path.join(self.dir, "daemon.log")
        with open(log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [daemon, f"--config-file={config_path}", "--nofork", "--nopidfile",
                 "--print-address=1"],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                # The death signal fires when the *thread* that forked exits, so only use it
                # from the main thread; atexit covers the rest.
                preexec_fn=_set_pdeathsig if threading.current_thread() is threading.main_thread()
                else None)
        atexit.register(self.stop)
        assert self._proc.stdout is not None
        line = self._read_address_line()
        if not line:
            with contextlib.suppress(Exception):
                self._proc.kill()
                self._proc.wait(timeout=2)
            self._proc = None
            with open(log_path, "rb") as f:
                err = f.read()
            raise BridgeError(
                f"dbus-daemon did not start: {err.decode(errors='replace').strip()}",
                "check that dbus-daemon runs: dbus-daemon --version")
        self.address = line
        _LOGGER.debug("private bus at %s (pid %s)", self.address, self._proc.pid)
        return self

    def _read_address_line(self) -> str:
        import selectors

        assert self._proc is not None and self._proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self._proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(_START_TIMEOUT_S):
                return ""
            return self._proc.stdout.readline().decode().strip()
        finally:
            sel.close()

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: os.environ) with this bus as the system bus and the fake
        ``bluetoothctl`` first on PATH."""
        out = dict(os.environ if base is None else base)
        out["DBUS_SYSTEM_BUS_ADDRESS"] = self.address
        out["PATH"] = self.bin_dir + os.pathsep + out.get("PATH", os.defpath)
        return out

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
            with contextlib.suppress(Exception):
                atexit.unregister(self.stop)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""

    def __enter__(self) -> PrivateBus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
