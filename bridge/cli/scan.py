"""``omi-bridge scan``: list the Omi and Frame devices nearby."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict

from bridge.config import load_config
from bridge.link.scan import async_scan, bluetooth_errors


def cmd_scan(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    adapter = config.link.adapter
    with bluetooth_errors(adapter):
        devices = asyncio.run(async_scan(config, timeout=args.timeout))
    if args.json:
        print(json.dumps([asdict(d) for d in devices], indent=2))
        return 0
    if not devices:
        print(f"No Omi or Frame devices seen in {args.timeout:g} s. Is the device on, charged, "
              "and not connected to a phone?")
        return 0
    print(f"{'ADDRESS':<19}{'KIND':<7}{'RSSI':>6}  NAME")
    for d in devices:
        rssi = "conn." if d.rssi is None else f"{d.rssi}"
        print(f"{d.address:<19}{d.kind:<7}{rssi:>6}  {d.name or ''}")
    print("\nPair one with: omi-bridge pair ADDRESS   Check its audio with: omi-bridge listen ADDRESS")
    return 0
