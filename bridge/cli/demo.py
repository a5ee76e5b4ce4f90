"""``omi-bridge demo``: the whole bridge against a simulated device and a local Omi API.

The simulators are a separate package (``omi_bridge_sim``, in ``sim/`` of the source tree) that
the wheel does not ship; ``make demo`` installs it.
"""

from __future__ import annotations

import argparse

from bridge.core.errors import BridgeError


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from omi_bridge_sim.demo import cmd_demo as run_demo
    except ImportError as exc:
        raise BridgeError(f"the demo needs the simulator package omi_bridge_sim ({exc})",
                          "run `make demo` from a source checkout, or `pip install -e sim/`") from None
    return int(run_demo(args))
