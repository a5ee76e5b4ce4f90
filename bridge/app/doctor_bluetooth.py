"""The doctor's Bluetooth checks: BlueZ's version, this user's access to it over D-Bus, the
adapter (present, powered, not blocked by rfkill) and each paired device (known, bonded)."""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

from bridge.app import preflight
from bridge.app.findings import COMMAND_TIMEOUT, Finding, Status, System, run_command
from bridge.config import Config, DeviceConfig
from bridge.core.kinds import DeviceKind

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
RFKILL_CLASS = "sys/class/rfkill"


def check_bluez_version(system: System) -> Finding:
    out = run_command([system.bluetoothctl, "--version"])
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
    if dev.kind == DeviceKind.FRAME:
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
