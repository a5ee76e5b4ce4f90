"""What ``omi-bridge doctor`` reports: findings with a one-line fix, and where it looks."""

from __future__ import annotations

import enum
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

COMMAND_TIMEOUT = 5.0
"""One external command or D-Bus round trip; a hung one must not hang the doctor."""


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Finding:
    """One check's outcome; ``fix`` is the one line that tells the user what to do."""

    check: str
    status: Status
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status.value, "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True)
class System:
    """Where the doctor looks; tests point these at their own processes and files."""

    root: Path = Path("/")
    """Prefix for /proc, /sys and /run paths."""
    bluetoothctl: str = "bluetoothctl"
    timedatectl: str = "timedatectl"

    def path(self, rel: str) -> Path:
        return self.root / rel


def blocking(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.status is Status.FAIL]


def run_command(argv: list[str]) -> tuple[int, str] | None:
    """(exit code, stdout+stderr) or None when the program is not there."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except FileNotFoundError:
        return None
    except subprocess.TimeoutExpired:
        return 124, f"{argv[0]} timed out after {COMMAND_TIMEOUT:g} s"
    return done.returncode, (done.stdout + done.stderr).strip()
