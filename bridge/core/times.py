"""Wall-clock times as the bridge writes them for people and files: UTC ISO 8601 to the second.

One format everywhere a time is shown or stored outside the API (state.json, the outbox, the
offline-sync state, status, Home Assistant), so they compare and sort as text. The API's own
format (milliseconds) is ``bridge/outbox/payload.py``'s.
"""

from __future__ import annotations

from datetime import UTC, datetime


def iso_seconds(when: float | datetime | None) -> str | None:
    """``when`` (a Unix time or an aware datetime) as UTC ISO 8601 to the second; None stays None."""
    if when is None:
        return None
    if not isinstance(when, datetime):
        when = datetime.fromtimestamp(when, UTC)
    return when.astimezone(UTC).isoformat(timespec="seconds")


def now_iso() -> str:
    """The current time, as ``iso_seconds`` writes it."""
    return datetime.now(UTC).isoformat(timespec="seconds")
