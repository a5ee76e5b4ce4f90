"""Errors a user can act on.

Every error the CLI prints is a ``BridgeError``: a message that says what went wrong and a hint
that says what to do (which key, which device, which command). Anything else escaping to the CLI
is a bug and is printed with a traceback.
"""

from __future__ import annotations


class BridgeError(Exception):
    """A problem the user can fix; ``hint`` says how."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  → {self.hint}" if self.hint else self.message


class ConfigError(BridgeError):
    """The configuration file is missing, unreadable or invalid."""

    def __init__(self, problems: list[str], path: str = "") -> None:
        self.problems = problems
        self.path = path
        where = f" in {path}" if path else ""
        text = f"invalid configuration{where}:\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__(text)

    def __str__(self) -> str:
        return self.message


class UnknownCodecError(BridgeError):
    """The device reported a codec byte we cannot decode."""


class DeviceNotFoundError(BridgeError):
    """No matching device was seen."""
