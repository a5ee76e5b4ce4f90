"""``python -m bench [NAME] [ARGS]``: run one benchmark (default: all).

Benchmarks are modules in this package with a ``main(argv) -> int``.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ["link"]
"""Module names under bench/, in the order ``python -m bench`` runs them."""


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\navailable: " + ", ".join(BENCHMARKS))
        return 0
    names = [argv.pop(0)] if argv and not argv[0].startswith("-") else list(BENCHMARKS)
    status = 0
    for name in names:
        if name not in BENCHMARKS:
            print(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
        print(f"== {name} ==")
        status |= importlib.import_module(f"bench.{name}").main(argv)
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
