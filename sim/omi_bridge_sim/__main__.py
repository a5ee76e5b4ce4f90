"""``python -m omi_bridge_sim``: the Bluetooth simulator as a process of its own.

Starts a private bus (or joins ``--bus``), our fake bluetoothd and the devices given, prints
one JSON line when ready, then runs until SIGINT/SIGTERM or the control interface's ``Quit()``
(``omi_bridge_sim.control``). The JSON line::

    {"bus": "unix:path=...", "env": {"DBUS_SYSTEM_BUS_ADDRESS": ..., "PATH": ...},
     "devices": [{"kind": "omi", "address": "C0:FF:EE:00:00:01", "name": "Omi"}], "pid": 1234}

Run the product with ``env`` merged into its environment and it sees the devices as real.

Examples::

    python -m omi_bridge_sim --omi C0:FF:EE:00:00:01
    python -m omi_bridge_sim --omi C0:FF:EE:00:00:01:/path/speech.wav --codec 20 --loss 0.02 --mtu 64
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence

from bridge.core.errors import BridgeError
from omi_bridge_sim.audio import load_pcm16k
from omi_bridge_sim.model import DeviceModel

_ADDRESS = re.compile(r"^([0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5})(?::(.+))?$")


def _split(spec: str) -> tuple[str, str | None]:
    """"AA:BB:CC:DD:EE:FF[:path]" → (address, path or None)."""
    m = _ADDRESS.match(spec)
    if not m:
        raise argparse.ArgumentTypeError(f"expected ADDRESS[:AUDIO_FILE], got {spec!r}")
    return m.group(1).upper(), m.group(2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m omi_bridge_sim",
                                description="Simulated BlueZ with Omi / Frame devices on a private bus.")
    p.add_argument("--bus", metavar="ADDRESS", help="join this bus instead of starting a private one")
    p.add_argument("--omi", action="append", default=[], type=_split, metavar="ADDRESS[:AUDIO]",
                   help="add a simulated Omi (repeatable); AUDIO: any file PyAV reads (default: demo clip)")
    p.add_argument("--frame", action="append", default=[], type=_split, metavar="ADDRESS[:AUDIO]",
                   help="add simulated Frame glasses (repeatable)")
    p.add_argument("--codec", type=int, default=21, help="Omi codec byte (21, 20, 0, 1, 10, 11, or any)")
    p.add_argument("--mtu", type=int, default=247, help="ATT MTU of the devices")
    p.add_argument("--min-mtu", type=int, default=100, help="Omi: no audio below this MTU (firmware: 100)")
    p.add_argument("--loss", type=float, default=0.0, help="probability a notification is lost in the air")
    p.add_argument("--duplicate", type=float, default=0.0, help="probability a notification arrives twice")
    p.add_argument("--start-index", type=int, default=0, help="Omi: first packet index (e.g. 65500)")
    p.add_argument("--after-clip", choices=("silence", "loop", "stop"), default="silence")
    p.add_argument("--link-drop-at", type=float, action="append", default=[], metavar="S",
                   help="Omi: drop the link S seconds after start (repeatable)")
    p.add_argument("--out-of-range", action="append", default=[], metavar="T0:T1",
                   help="Omi: out of range from T0 to T1 seconds after start (repeatable)")
    p.add_argument("--hold-while-unsubscribed", action="store_true",
                   help="Omi: the clip advances only while a central is subscribed to audio")
    p.add_argument("--paired", action="store_true", help="devices start bonded (known to BlueZ)")
    p.add_argument("--temporary-timeout", type=float, default=30.0, metavar="S",
                   help="forget unpaired devices S seconds after last seen (BlueZ default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def make_models(args: argparse.Namespace) -> list[tuple[str, DeviceModel]]:
    from omi_bridge_sim.omi import OmiModel

    out: list[tuple[str, DeviceModel]] = []
    ranges = []
    for r in args.out_of_range:
        t0, _, t1 = r.partition(":")
        ranges.append((float(t0), float(t1)))
    for i, (address, path) in enumerate(args.omi):
        audio = load_pcm16k(path) if path else None
        out.append(("omi", OmiModel(
            address=address, codec=args.codec, audio=audio, mtu=args.mtu, min_mtu=args.min_mtu,
            loss=args.loss, duplicate=args.duplicate, start_index=args.start_index,
            after_clip=args.after_clip, seed=args.seed + i, link_drop_at=tuple(args.link_drop_at),
            out_of_range=tuple(ranges), hold_while_unsubscribed=args.hold_while_unsubscribed)))
    for i, (address, path) in enumerate(args.frame):
        from omi_bridge_sim.frame import FrameModel

        kwargs = {"source": load_pcm16k(path)} if path else {}
        out.append(("frame", FrameModel(address=address, mtu=args.mtu, loss_rate=args.loss,
                                        seed=args.seed + i, **kwargs)))
    return out


def _exit_with_parent() -> None:
    """A simulator is always someone's helper: end with the process that started it, so a
    crashed test run leaves no simulator behind (prctl(2) PR_SET_PDEATHSIG)."""
    import ctypes

    from omi_bridge_sim.bus import _PR_SET_PDEATHSIG

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _exit_with_parent()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s sim %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from omi_bridge_sim.harness import SimHarness

    try:
        models = make_models(args)
        harness = SimHarness([m for _, m in models], bus_address=args.bus,
                             paired=[m.address for _, m in models] if args.paired else (),
                             temporary_timeout=args.temporary_timeout)
        harness.start()
    except BridgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: harness.quit_requested.set())
    env = harness.env()
    ready = {
        "bus": harness.address,
        "env": {k: env[k] for k in ("DBUS_SYSTEM_BUS_ADDRESS", "PATH") if k in env},
        "devices": [{"kind": kind, "address": m.address, "name": m.name} for kind, m in models],
        "pid": os.getpid(),
    }
    print(json.dumps(ready), flush=True)
    try:
        harness.quit_requested.wait()
    finally:
        harness.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
