"""``omi-bridge check-config``: validate the configuration before the daemon needs it."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from bridge.app.preflight import check, errors
from bridge.config import resolve_config_path


def cmd_check_config(args: argparse.Namespace) -> int:
    config, problems = check(args.config, with_adapter=True)
    path = resolve_config_path(args.config)
    bad = errors(problems)
    if getattr(args, "json", False):
        print(json.dumps({"config": str(path), "ok": not bad,
                          "problems": [asdict(p) for p in problems]}, indent=2))
        return 1 if bad else 0
    for p in problems:
        print(p)
    if bad:
        print(f"{path}: {len(bad)} problem(s); the daemon will not start until they are fixed")
        return 1
    assert config is not None
    devices = ", ".join(f"{d.label} ({d.kind})" for d in config.devices)
    print(f"{path}: OK — devices: {devices}; storage: {config.storage.path}; model: {config.asr.model}")
    return 0
