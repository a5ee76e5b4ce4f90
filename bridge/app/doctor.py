"""``omi-bridge doctor``: what breaks on a Raspberry Pi, checked on the running system.

check-config (``bridge.app.preflight``) judges the config file; the doctor runs those same checks
and then asks the system what a file cannot tell: the BlueZ version and adapter state (rfkill),
whether this user may talk to BlueZ over D-Bus, whether the configured devices are known and
bonded, whether the Omi API accepts the key, free disk in the state directory, whether the clock
is synchronised, whether the ASR model loads (or the Wyoming server answers), and free memory.

Every finding is ``ok``, ``warn`` or ``fail`` with a one-line fix; a ``fail`` blocks the daemon
(or its delivery), so ``omi-bridge doctor`` exits non-zero when there is one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import importlib.util
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.app import preflight
from bridge.config import Config, DeviceConfig
from bridge.core.errors import BridgeError

MIN_BLUEZ = (5, 55)
"""bleak refuses to connect below BlueZ 5.55, judged by ``bluetoothctl --version``
(docs/reference/bluez-for-tests.md §3)."""
BLUEZ_SERVICE = "org.bluez"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"
ADAPTER_IFACE = "org.bluez.Adapter1"
DEVICE_IFACE = "org.bluez.Device1"
POWER_STATE_BLOCKED = "off-blocked"
"""Adapter1.PowerState while rfkill blocks the radio (BlueZ org.bluez.Adapter.rst)."""
DBUS_ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
DBUS_NO_SERVICE = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner")
COMMAND_TIMEOUT = 5.0
"""One external command or D-Bus round trip; a hung one must not hang the doctor."""
API_PROBE_TIMEOUT = 15.0
"""Connect + read for the key probe (a POST the server rejects before any processing)."""
API_PROBE_BODY = b"{}"
"""An empty body: the API authenticates the key and checks its scope before it validates the
body, and then answers 422 without storing anything (docs/reference/omi-api.md §2, §3). It costs
one of the key's 25 writes per hour (§3: the limit is checked before validation)."""
STATUS_UNPROCESSABLE = 422
STATUS_RATE_LIMITED = 429
DISK_FAIL_BYTES = 100 * 1024**2
DISK_WARN_BYTES = 1024**3
SPOOL_BYTES_PER_HOUR = 16000 * 2 * 3600
"""16 kHz int16 mono: what one hour of spooled speech takes before it is transcribed."""
MEM_NEED_LOCAL = 300 * 1024**2
"""Daemon peak RSS with tiny.en and one pendant: 278 MB (bench/results.md, peak RSS row)."""
MEM_NEED_REMOTE = 120 * 1024**2
"""Without the Whisper model in the process (Wyoming ASR): peak RSS 91 MB with the Silero VAD, 59 MB
without the local-asr extra (bench/results.md, remote ASR row), with room for a second device."""
RFKILL_CLASS = "sys/class/rfkill"


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Finding:
    """One check's outcome; ``fix`` is the one line that tells the user what to do."""

    check: str
    status: Status
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status.value, "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True)
class System:
    """Where the doctor looks; tests point these at their own processes and files."""

    root: Path = Path("/")
    """Prefix for /proc, /sys and /run paths."""
    bluetoothctl: str = "bluetoothctl"
    timedatectl: str = "timedatectl"

    def path(self, rel: str) -> Path:
        return self.root / rel


def blocking(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.status is Status.FAIL]


# --------------------------------------------------------------------------------------------
# The config (preflight's rules, not repeated here)


def check_config(cli_path: str | None) -> tuple[Config, list[Finding], set[str]]:
    """preflight.check as findings; the config to go on with (defaults when unreadable) and the
    keys preflight found problems with, so later checks do not report them twice."""
    config, problems = preflight.check(cli_path)
    findings = [Finding("config", Status.WARN if p.warning else Status.FAIL, f"{p.key}: {p.message}",
                        p.hint) for p in problems]
    if config is None:
        return Config(), findings, {p.key for p in problems} | {"*"}
    if not findings:
        where = config.path or "built-in defaults"
        findings.append(Finding("config", Status.OK, f"{where}: valid"))
    return config, findings, {p.key for p in problems if not p.warning}


# --------------------------------------------------------------------------------------------
# BlueZ


def _run(argv: list[str]) -> tuple[int, str] | None:
    """(exit code, stdout+stderr) or None when the program is not there."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except FileNotFoundError:
        return None
    except subprocess.TimeoutExpired:
        return 124, f"{argv[0]} timed out after {COMMAND_TIMEOUT:g} s"
    return done.returncode, (done.stdout + done.stderr).strip()


def check_bluez_version(system: System) -> Finding:
    out = _run([system.bluetoothctl, "--version"])
    if out is None:
        return Finding("bluez", Status.FAIL, "bluetoothctl is not installed, so BlueZ is missing",
                       "sudo apt-get install bluez")
    m = re.search(r"(\d+)\.(\d+)", out[1])
    if out[0] != 0 or m is None:
        return Finding("bluez", Status.WARN, f"cannot read the BlueZ version ({out[1][:80]!r})",
                       "check that `bluetoothctl --version` works")
    version = (int(m.group(1)), int(m.group(2)))
    text = f"{version[0]}.{version[1]}"
    if version < MIN_BLUEZ:
        return Finding("bluez", Status.FAIL, f"BlueZ {text} is older than 5.55, which bleak needs",
                       "upgrade to Raspberry Pi OS Bookworm (BlueZ 5.66) or newer")
    return Finding("bluez", Status.OK, f"BlueZ {text}")


async def _managed_objects() -> tuple[dict[str, Any] | None, Finding | None]:
    """BlueZ's objects, or the finding that says why they could not be had."""
    from dbus_fast import BusType, Message, MessageType
    from dbus_fast.aio import MessageBus

    fix_bus = "sudo systemctl start dbus (the system bus)"
    try:
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    except Exception as exc:
        return None, Finding("dbus", Status.FAIL, f"cannot connect to the system D-Bus: {exc}", fix_bus)
    try:
        reply = await bus.call(Message(destination=BLUEZ_SERVICE, path="/", interface=OBJECT_MANAGER_IFACE,
                                       member="GetManagedObjects"))
    finally:
        bus.disconnect()
    if reply is None:
        return None, Finding("dbus", Status.FAIL, "no answer from org.bluez",
                             "sudo systemctl restart bluetooth")
    if reply.message_type == MessageType.ERROR:
        text = str(reply.body[0]) if reply.body else ""
        if reply.error_name == DBUS_ACCESS_DENIED:
            user = _user_name()
            return None, Finding("dbus", Status.FAIL,
                                 f"user {user} may not talk to BlueZ over D-Bus ({text})",
                                 f"sudo usermod -aG bluetooth {user}, then log in again "
                                 "(the service user gets it from install-pi.sh)")
        if reply.error_name in DBUS_NO_SERVICE:
            return None, Finding("dbus", Status.FAIL, "bluetoothd is not running (no org.bluez on the bus)",
                                 "sudo apt-get install bluez && sudo systemctl enable --now bluetooth")
        return None, Finding("dbus", Status.FAIL, f"org.bluez answered {reply.error_name}: {text}",
                             "sudo systemctl restart bluetooth")
    objects: dict[str, Any] = reply.body[0]
    return objects, None


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def rfkill_blocked(system: System) -> str | None:
    """"soft" / "hard" when a Bluetooth rfkill switch blocks the radio, else None."""
    base = system.path(RFKILL_CLASS)
    if not base.is_dir():
        return None
    for switch in sorted(base.iterdir()):
        try:
            if (switch / "type").read_text().strip() != "bluetooth":
                continue
            if (switch / "hard").read_text().strip() == "1":
                return "hard"
            if (switch / "soft").read_text().strip() == "1":
                return "soft"
        except OSError:
            continue
    return None


async def _adapter_finding(adapter: str, objects: dict[str, Any], system: System) -> Finding:
    props = objects.get(f"/org/bluez/{adapter}", {}).get(ADAPTER_IFACE)
    block = rfkill_blocked(system)
    state = props.get("PowerState").value if props and props.get("PowerState") else ""
    if block == "hard":
        return Finding("adapter", Status.FAIL,
                       f"Bluetooth is blocked by a hardware switch (rfkill, {adapter})",
                       "turn Bluetooth on at its switch or in firmware, then: sudo rfkill unblock bluetooth")
    if block == "soft" or state == POWER_STATE_BLOCKED:
        return Finding("adapter", Status.FAIL, f"Bluetooth adapter {adapter} is blocked by rfkill",
                       "sudo rfkill unblock bluetooth && bluetoothctl power on")
    # preflight owns the rule for "present and powered" (and its wording).
    try:
        problem = await asyncio.wait_for(preflight.async_adapter_problem(adapter), COMMAND_TIMEOUT)
    except Exception as exc:
        problem = f"cannot ask BlueZ ({type(exc).__name__}: {exc})"
    if problem is not None:
        text, _, fix = problem.partition(": ")
        return Finding("adapter", Status.FAIL, text, fix or "check `bluetoothctl show`")
    address = props.get("Address").value if props and props.get("Address") else "?"
    return Finding("adapter", Status.OK, f"{adapter} ({address}) powered, not blocked")


def device_path(adapter: str, address: str) -> str:
    return f"/org/bluez/{adapter}/dev_{address.upper().replace(':', '_')}"


def _device_finding(dev: DeviceConfig, adapter: str, objects: dict[str, Any]) -> Finding:
    name = f"device {dev.label}"
    props = objects.get(device_path(adapter, dev.address), {}).get(DEVICE_IFACE)
    bonded = bool(props and (props.get("Bonded") or props.get("Paired"))
                  and (props.get("Bonded") or props.get("Paired")).value)
    pair_cmd = f"sudo omi-bridge pair {dev.address} --kind {dev.kind}"
    if dev.kind == "frame":
        # Frame's characteristics need an encrypted link (frame.md): without a bond nothing streams.
        if props is None:
            return Finding(name, Status.FAIL, f"Frame {dev.address} is not known to BlueZ (no bond)",
                           f"wake the glasses near this machine and run: {pair_cmd}")
        if not bonded:
            return Finding(name, Status.FAIL, f"Frame {dev.address} is known to BlueZ but not bonded",
                           f"run: {pair_cmd}  (if it fails, unpair it in the Frame app first)")
        return Finding(name, Status.OK, f"Frame {dev.address} bonded")
    # Omi needs no bond (omi-device.md): BlueZ forgets an unbonded device it has not seen lately.
    if props is None:
        return Finding(name, Status.WARN, f"Omi {dev.address} has not been seen by BlueZ lately",
                       "wake the pendant near this machine (close the phone app); check with: "
                       f"omi-bridge listen {dev.address}")
    connected = bool(props.get("Connected") and props.get("Connected").value)
    return Finding(name, Status.OK, f"Omi {dev.address} known to BlueZ"
                   + (", connected" if connected else "") + (", bonded" if bonded else ""))


async def check_bluetooth(config: Config, system: System) -> list[Finding]:
    objects, problem = await _managed_objects()
    if problem is not None:
        return [problem]
    assert objects is not None
    findings = [Finding("dbus", Status.OK, f"user {_user_name()} reaches org.bluez")]
    adapter = config.link.adapter
    findings.append(await _adapter_finding(adapter, objects, system))
    findings.extend(_device_finding(dev, adapter, objects) for dev in config.devices)
    return findings


# --------------------------------------------------------------------------------------------
# The Omi API


def check_api_key(config: Config, skip: set[str],
                  transport: Any = None) -> Finding:
    from bridge.outbox.client import Credentials, Kind, OmiClient

    if skip & {"[api] api_key", "[api] api_key_file", "[api] base_url", "*"}:
        return Finding("api key", Status.WARN, "not checked until the [api] config problem above is fixed",
                       "fix the config line above")
    try:
        creds = Credentials.from_config(config.api)
    except BridgeError as exc:
        return Finding("api key", Status.FAIL, exc.message, exc.hint)
    api = dataclasses.replace(config.api, timeout_seconds=API_PROBE_TIMEOUT)
    client = OmiClient(api, creds, transport=transport)
    try:
        outcome = client.post(API_PROBE_BODY)
    finally:
        client.close()
    if outcome.status_code == STATUS_UNPROCESSABLE:
        return Finding("api key", Status.OK,
                       f"accepted by {creds.base_url} with the conversations:write scope")
    if outcome.status_code == STATUS_RATE_LIMITED:
        return Finding("api key", Status.WARN,
                       f"accepted, but its 25 writes/hour are spent ({outcome.detail})",
                       "nothing to do: queued conversations go out when the window opens")
    if outcome.kind is Kind.PAUSE:
        return Finding("api key", Status.FAIL, outcome.detail, outcome.hint)
    if outcome.kind is Kind.RETRY:
        return Finding("api key", Status.WARN, f"cannot reach {creds.base_url}: {outcome.detail}",
                       "check the network (conversations wait in the outbox meanwhile)")
    return Finding("api key", Status.WARN, f"unexpected answer from {creds.base_url}: {outcome.detail}",
                   "check [api] base_url")


# --------------------------------------------------------------------------------------------
# The machine


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mb(n: float) -> str:
    return f"{n / 1024**2:,.0f} MB"


def check_disk(config: Config) -> Finding:
    state = config.storage.path
    where = _existing_ancestor(state)
    free = shutil.disk_usage(where).free
    hours = free / SPOOL_BYTES_PER_HOUR
    text = f"{_mb(free)} free for {state} (≈ {hours:,.0f} h of spooled audio)"
    fix = "free space on that file system (sudo journalctl --vacuum-size=100M, apt-get clean)"
    if free < DISK_FAIL_BYTES:
        return Finding("disk", Status.FAIL, text, fix)
    if free < DISK_WARN_BYTES:
        return Finding("disk", Status.WARN, text, fix)
    return Finding("disk", Status.OK, text)


def check_clock(system: System) -> Finding:
    fix = ("sudo timedatectl set-ntp true (a Pi has no battery clock: conversation times are wrong "
           "until network time syncs)")
    out = _run([system.timedatectl, "show", "-p", "NTPSynchronized", "--value"])
    if out is not None and out[0] == 0 and out[1] in ("yes", "no"):
        if out[1] == "yes":
            return Finding("clock", Status.OK, "synchronised (timedatectl)")
        return Finding("clock", Status.WARN, "not synchronised to network time (timedatectl)", fix)
    if system.path("run/systemd/timesync/synchronized").exists():
        return Finding("clock", Status.OK, "synchronised (systemd-timesyncd)")
    why = "timedatectl is not installed" if out is None else f"timedatectl: {' '.join(out[1].split())[:90]}"
    return Finding("clock", Status.WARN, f"unknown whether the clock is synchronised ({why}; "
                   "no /run/systemd/timesync/synchronized)", fix)


def mem_available(system: System) -> int | None:
    try:
        text = system.path("proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def _asr_backend(config: Config) -> str:
    return config.asr.backend


def check_memory(config: Config, system: System) -> Finding:
    avail = mem_available(system)
    if avail is None:
        return Finding("memory", Status.WARN, "cannot read MemAvailable from /proc/meminfo", "")
    local = _asr_backend(config) == "local"
    need = MEM_NEED_LOCAL if local else MEM_NEED_REMOTE
    text = f"{_mb(avail)} available; the daemon needs ≈ {_mb(need)}" + (
        f" with {config.asr.model}" if local else " with remote ASR")
    if avail < need:
        fix = ('set [asr] backend = "wyoming" (ASR on another machine), or free memory'
               if local else "free memory (stop other services)")
        return Finding("memory", Status.FAIL if avail < need // 2 else Status.WARN, text, fix)
    return Finding("memory", Status.OK, text)


# --------------------------------------------------------------------------------------------
# Speech recognition


def check_local_asr(config: Config, skip: set[str]) -> Finding:
    if "[asr] model" in skip or "*" in skip:
        return Finding("asr", Status.WARN, "not loaded until the [asr] model problem above is fixed",
                       "fix the config line above")
    missing = [m for m in ("faster_whisper", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        return Finding("asr", Status.FAIL, f"local ASR is not installed ({', '.join(missing)} missing)",
                       "pip install 'omi-bridge[local-asr]' (64-bit OS), or set [asr] backend = \"wyoming\"")
    from bridge.speech.asr.worker import load_model
    from bridge.speech.vad import SileroVad

    started = time.monotonic()
    try:
        load_model(config.asr)
        SileroVad()
    except BridgeError as exc:
        return Finding("asr", Status.FAIL, exc.message, exc.hint)
    except Exception as exc:  # an illegal instruction is a crash; anything else lands here
        return Finding("asr", Status.FAIL, f"loading the model failed: {type(exc).__name__}: {exc}",
                       "reinstall: pip install --force-reinstall 'omi-bridge[local-asr]'")
    took = time.monotonic() - started
    return Finding("asr", Status.OK, f"model {config.asr.model} and the Silero VAD load ({took:.1f} s)")


def check_wyoming(config: Config) -> Finding:
    """Ask the server what it runs (Wyoming ``describe``, docs/reference/wyoming.md §2)."""
    try:
        wyoming = importlib.import_module("bridge.speech.asr.wyoming")
        backend = wyoming.WyomingBackend(config.asr)
        backend.probe()
    except BridgeError as exc:
        return Finding("asr", Status.FAIL, exc.message, exc.hint or f"check [asr] uri ({config.asr.uri})")
    except ImportError as exc:
        return Finding("asr", Status.FAIL, f"the Wyoming client is not installed ({exc.name})",
                       "reinstall omi-bridge (pip install --force-reinstall omi-bridge)")
    fallback = ", local fallback" if config.asr.fallback == "local" else ""
    return Finding("asr", Status.OK, str(backend.describe()) + fallback)


def check_asr(config: Config, skip: set[str]) -> Finding:
    if _asr_backend(config) == "local":
        return check_local_asr(config, skip)
    return check_wyoming(config)


# --------------------------------------------------------------------------------------------
# All of it


def run_checks(cli_path: str | None, system: System | None = None) -> list[Finding]:
    """Every check, in the order a user fixes things: config, Bluetooth, API, machine, ASR."""
    system = system or System()
    config, findings, skip = check_config(cli_path)
    findings.append(check_bluez_version(system))
    try:
        findings.extend(asyncio.run(asyncio.wait_for(check_bluetooth(config, system), 3 * COMMAND_TIMEOUT)))
    except Exception as exc:
        findings.append(Finding("dbus", Status.FAIL, f"asking BlueZ failed: {type(exc).__name__}: {exc}",
                                "sudo systemctl restart bluetooth"))
    findings.append(check_api_key(config, skip))
    findings.append(check_disk(config))
    findings.append(check_clock(system))
    findings.append(check_memory(config, system))
    findings.append(check_asr(config, skip))
    return findings
