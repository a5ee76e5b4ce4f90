"""The daemon's log: one line per event, with journald's priority when journald reads it."""

from __future__ import annotations

import logging
import sys

from bridge.app.systemd import under_journald

NOISY_LOGGERS = ("bleak", "dbus_fast", "httpx", "httpcore", "faster_whisper")
"""Libraries whose info-level chatter would drown our one-line-per-event log."""

# journald reads a "<N>" syslog priority prefix on each line (SyslogLevelPrefix=yes default).
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                    logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return f"<{prio}>" + super().format(record)


def setup_logging(level: str, *, verbose: bool = False) -> None:
    """One line per event; no timestamp under journald (it adds its own)."""
    handler = logging.StreamHandler(sys.stderr)
    if under_journald():
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    numeric = logging.DEBUG if verbose else getattr(logging, level.upper(), logging.INFO)
    root.setLevel(numeric)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
