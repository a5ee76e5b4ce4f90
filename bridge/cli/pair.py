"""``omi-bridge pair``: find a wearable, make sure we can talk to it, and add it to the config file.

The config file is the user's: comments, order and layout survive (tomlkit edits it in place),
and the new ``[[devices]]`` table lands after the existing ones. A missing file is created from
the documented example. Pairing the same address twice is refused rather than silently ignored,
because two entries for one device would fight over its link.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import AoT, Table

from bridge.config import ADDRESS_RE, example_toml, parse_config, resolve_config_path
from bridge.core.errors import BridgeError
from bridge.core.files import write_atomic
from bridge.core.kinds import DeviceKind

_LOGGER = logging.getLogger(__name__)

NEW_FILE_MODE = 0o640
"""A config pair creates may hold the API key: owner read-write, group read, others nothing."""


def _device_table(kind: str, address: str, name: str) -> Table:
    table = tomlkit.table()
    table.add("kind", kind)
    table.add("address", address)
    if name:
        table.add("name", name)
    # A blank line after the entry, so a following [section] stays visually separate.
    table.add(tomlkit.nl())
    return table


def add_device(path: Path, kind: str, address: str, name: str = "") -> bool:
    """Append a ``[[devices]]`` entry to ``path`` (created if missing). Returns True if created.

    Raises BridgeError when the address is malformed or already configured, or the file is not TOML.
    """
    DeviceKind.parse(kind, "--kind")
    if not ADDRESS_RE.match(address):
        raise BridgeError(f"{address!r} is not a Bluetooth address",
                          "give it as AA:BB:CC:DD:EE:FF (see `omi-bridge scan`)")
    address = address.upper()
    created = not path.exists()
    try:
        text = example_toml() if created else path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BridgeError(f"cannot read {path}: {exc.strerror}", "run pair with sudo") from None
    try:
        doc = tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as exc:
        raise BridgeError(f"{path} is not valid TOML: {exc}", "fix it, then run pair again") from None

    existing = doc.get("devices")
    if existing is not None and not isinstance(existing, AoT | list):
        raise BridgeError(f"devices in {path} is not a list of [[devices]] tables",
                          "write each device as a [[devices]] table")
    for entry in existing or []:
        other = str(entry.get("address", "")).upper() if isinstance(entry, dict) else ""
        if other == address:
            label = entry.get("name") or other
            raise BridgeError(f"{address} is already paired in {path} (as {label!r})",
                              "remove that [[devices]] table first to pair it again")
        if name and isinstance(entry, dict) and entry.get("name") == name:
            raise BridgeError(f"the name {name!r} is already used by {other} in {path}",
                              "choose another --name")

    table = _device_table(kind, address, name)
    if existing is None:
        aot = tomlkit.aot()
        aot.append(table)
        doc.append("devices", aot)
    else:
        existing.append(table)

    new_text = tomlkit.dumps(doc)
    # Never write a file the daemon would then refuse to load.
    _config, problems = parse_config(tomlkit.parse(new_text).unwrap(), str(path))
    device_problems = [p for p in problems if "devices" in p]
    if device_problems:
        raise BridgeError(f"{path} would be invalid: {'; '.join(device_problems)}",
                          "fix the [[devices]] tables by hand")
    _write_atomically(path, new_text, created)
    return created


def _write_atomically(path: Path, text: str, created: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if created:
        write_atomic(path, text.encode("utf-8"), mode=NEW_FILE_MODE)
        return
    # Keep the owner/group/mode the installer gave it (omi-bridge, 0600).
    st = path.stat()
    owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 else None
    write_atomic(path, text.encode("utf-8"), mode=st.st_mode & 0o7777, owner=owner)


# --------------------------------------------------------------------------------------------
# Finding the device


async def _async_find(args: argparse.Namespace, config: Any) -> tuple[str, str, str, bool]:
    """(kind, address, advertised name, seen) of the device to pair."""
    from bridge.link import scan as scan_mod

    adapter = config.link.adapter
    with scan_mod.bluetooth_errors(adapter):
        if args.address:
            want = args.address.upper()
            try:
                kind = await scan_mod.async_detect_kind(want, args.timeout, adapter)
            except BridgeError as exc:
                if args.kind:
                    _LOGGER.warning("%s; adding it as %s anyway, as asked", exc.message, args.kind)
                    return args.kind, want, "", False
                raise
            if args.kind and kind != args.kind:
                raise BridgeError(f"{want} looks like a {kind}, not a {args.kind}", f"use --kind {kind}")
            return kind, want, "", True
        found = await scan_mod.async_scan(config, timeout=args.timeout)
    candidates = [d for d in found if not args.kind or d.kind == args.kind]
    if not candidates:
        raise BridgeError("no Omi or Frame device found nearby",
                          "wake the device, keep it close, close the Omi app on your phone (the "
                          "device takes one connection) and run pair again, or give its address")
    if len(candidates) > 1:
        listing = ", ".join(f"{d.address} ({d.kind}, {d.name or 'no name'})" for d in candidates)
        raise BridgeError(f"several devices found: {listing}",
                          "run pair again with the address of the one you want")
    dev = candidates[0]
    return dev.kind, dev.address.upper(), dev.name or "", True


async def _async_bond(kind: str, address: str, config: Any) -> None:
    """Frame needs a bonded link; Omi does not (omi-device.md, frame.md)."""
    if kind != DeviceKind.FRAME:
        return
    from bridge.devices.frame import session as frame_mod

    await frame_mod.async_bond(address, config)


async def _async_find_and_bond(args: argparse.Namespace, config: Any) -> tuple[str, str, str]:
    kind, address, adv_name, seen = await _async_find(args, config)
    if seen:
        await _async_bond(kind, address, config)
    return kind, address, adv_name


def cmd_pair(args: argparse.Namespace) -> int:
    path = resolve_config_path(args.config)
    # Only the parts of the config needed to scan; a half-written file must still be pairable.
    try:
        from bridge.config import load_config

        config = load_config(str(path)) if path.exists() else None
    except BridgeError:
        config = None
    if config is None:
        from bridge.config import Config

        config = Config()
    kind, address, adv_name = asyncio.run(_async_find_and_bond(args, config))
    name = args.name or ""
    created = add_device(path, kind, address, name)
    label = name or adv_name or address
    print(f"{'created' if created else 'updated'} {path}: added {kind} {address}"
          f"{f' ({label})' if label != address else ''}")
    print("next: omi-bridge check-config, then sudo systemctl restart omi-bridge")
    return 0
