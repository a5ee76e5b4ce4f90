"""``omi-bridge``: the command line.

Parsing only; each subcommand lives in its own module under ``bridge.cli`` and is imported
only when it runs, so ``omi-bridge scan`` never pays for loading Whisper. Every command takes
``--config PATH``; ``--json`` output is for scripts, plain text for people.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from bridge.core.errors import BridgeError
from bridge.core.kinds import EXTERNAL_SOURCE, KIND_NAMES, DeviceKind
from bridge.core.records import SOURCES

EXIT_USAGE = 2


def _common(p: argparse.ArgumentParser, *, json: bool = True) -> None:
    p.add_argument("--config", metavar="PATH",
                   help="config file (default: $OMI_BRIDGE_CONFIG, else /etc/omi-bridge/config.toml)")
    if json:
        p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omi-bridge",
        description="Bridge an Omi pendant or Frame glasses to Omi, transcribing on this machine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("scan", help="list Omi and Frame devices nearby")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds to scan")
    _common(p)

    p = sub.add_parser("listen", help="record a device's audio to a WAV and print link stats")
    p.add_argument("address", metavar="ADDRESS", help="device address, e.g. AA:BB:CC:DD:EE:FF")
    p.add_argument("--seconds", type=float, default=10.0, metavar="N",
                   help="wall-clock seconds to record after the first audio (default 10)")
    p.add_argument("--wav", metavar="PATH", help="write the audio timeline here")
    p.add_argument("--kind", choices=KIND_NAMES,
                   help="device kind (default: from the config, else detected)")
    _common(p)

    p = sub.add_parser("pair", help="add a device to the config file")
    p.add_argument("address", nargs="?", metavar="ADDRESS", help="device address (default: scan)")
    p.add_argument("--kind", choices=KIND_NAMES, help="device kind (default: detected)")
    p.add_argument("--name", help="name for logs and status")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds to scan")
    _common(p, json=False)

    p = sub.add_parser("transcribe", help="transcribe audio files into conversations")
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files (anything PyAV reads)")
    p.add_argument("--send", action="store_true", help="deliver the conversations to Omi")
    p.add_argument("--started-at", metavar="ISO8601",
                   help="wall-clock start of the (first) file (default: its mtime minus duration)")
    p.add_argument("--source", default=EXTERNAL_SOURCE,
                   choices=SOURCES,
                   help="conversation source (default external_integration)")
    _common(p)

    p = sub.add_parser("outbox", help="show or act on queued conversations")
    p.add_argument("action", nargs="?", default="list",
                   choices=("list", "show", "retry", "purge-sent"))
    p.add_argument("id", nargs="?", type=int, help="outbox item id (show, retry)")
    _common(p)

    p = sub.add_parser("sync", help="fetch what a pendant recorded out of range, now (daemon stopped)")
    p.add_argument("device", nargs="?", metavar="DEVICE",
                   help="paired pendant's name or address (default: the only one)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="give up when the pendant is out of reach this long (default 60)")
    _common(p)

    p = sub.add_parser("run", help="run the bridge daemon (what systemd starts)")
    _common(p, json=False)

    p = sub.add_parser("check-config", help="validate the configuration")
    _common(p)

    p = sub.add_parser("status", help="what the running daemon is doing")
    _common(p)

    p = sub.add_parser("doctor", help="check this machine for what keeps the bridge from working")
    _common(p)

    p = sub.add_parser("demo", help="the whole bridge with a simulated device and a local API")
    p.add_argument("--kind", choices=KIND_NAMES, default=DeviceKind.OMI.value,
                   help="simulated device kind (default omi)")
    _common(p)
    return parser


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# One function per subcommand: each imports its module only when that command runs.
def _scan(args: argparse.Namespace) -> int:
    from bridge.cli.scan import cmd_scan
    return cmd_scan(args)


def _listen(args: argparse.Namespace) -> int:
    from bridge.cli.listen import cmd_listen
    return cmd_listen(args)


def _pair(args: argparse.Namespace) -> int:
    from bridge.cli.pair import cmd_pair
    return cmd_pair(args)


def _transcribe(args: argparse.Namespace) -> int:
    from bridge.cli.transcribe import cmd_transcribe
    return cmd_transcribe(args)


def _outbox(args: argparse.Namespace) -> int:
    from bridge.cli.outbox import cmd_outbox
    return cmd_outbox(args)


def _sync(args: argparse.Namespace) -> int:
    from bridge.cli.sync import cmd_sync
    return cmd_sync(args)


def _run(args: argparse.Namespace) -> int:
    from bridge.cli.run import cmd_run
    return cmd_run(args)


def _check_config(args: argparse.Namespace) -> int:
    from bridge.cli.check_config import cmd_check_config
    return cmd_check_config(args)


def _doctor(args: argparse.Namespace) -> int:
    from bridge.cli.doctor import cmd_doctor
    return cmd_doctor(args)


def _status(args: argparse.Namespace) -> int:
    from bridge.cli.status import cmd_status
    return cmd_status(args)


def _demo(args: argparse.Namespace) -> int:
    from bridge.cli.demo import cmd_demo
    return cmd_demo(args)


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "scan": _scan, "listen": _listen, "pair": _pair, "transcribe": _transcribe, "outbox": _outbox,
    "run": _run, "check-config": _check_config, "status": _status, "demo": _demo,
    "doctor": _doctor, "sync": _sync,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "run":  # the daemon configures logging from its config file
        setup_logging(getattr(args, "verbose", False))
    func = _COMMANDS[args.command]
    try:
        return int(func(args) or 0)
    except BridgeError as exc:
        print(f"omi-bridge {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
