"""``omi-bridge run``: the daemon systemd starts."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from bridge.app.daemon import EXIT_CONFIG, StartupError, async_main
from bridge.app.logs import setup_logging
from bridge.app.memory import limit_malloc_arenas
from bridge.app.preflight import require_valid
from bridge.core.errors import BridgeError

_LOGGER = logging.getLogger("bridge.app.daemon")


def cmd_run(args: argparse.Namespace) -> int:
    limit_malloc_arenas()  # before the model loads and before any thread starts (bridge/app/memory.py)
    # Logging first at the default level, so config problems reach journald in our format.
    setup_logging("info", verbose=getattr(args, "verbose", False))
    try:
        config = require_valid(args.config)
    except BridgeError as exc:
        print(f"omi-bridge run: error: {exc}", file=sys.stderr)
        # systemd does not restart on this code (RestartPreventExitStatus): retrying cannot fix it.
        return EXIT_CONFIG
    setup_logging(config.log.level, verbose=getattr(args, "verbose", False))
    _LOGGER.info("omi-bridge starting with %s (%d device(s), storage %s)", config.path,
                 len(config.devices), config.storage.path)
    try:
        asyncio.run(async_main(config))
    except StartupError as exc:
        print(f"omi-bridge run: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG  # a restart would fail the same way
    return 0
