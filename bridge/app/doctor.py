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
import importlib.util
import re
import shutil
import time
from pathlib import Path
from typing import Any

from bridge.app import preflight
from bridge.app.doctor_bluetooth import check_bluetooth, check_bluez_version
from bridge.app.findings import COMMAND_TIMEOUT, Finding, Status, System, run_command
from bridge.config import Config
from bridge.core.errors import BridgeError

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
    out = run_command([system.timedatectl, "show", "-p", "NTPSynchronized", "--value"])
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
