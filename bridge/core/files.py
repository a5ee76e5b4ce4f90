"""Replacing a file so that a kill -9 or a power cut leaves either the old or the new one whole.

The one home for the rule every durable file follows (the spool's JSON, offline chunks, the
state file, the config ``pair`` edits): write a temporary file beside it, fsync it, rename it over
the target, fsync the directory so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"
"""A leftover ``NAME.tmp`` is an interrupted write: the next write of ``NAME`` replaces it."""


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (a rename, a new file) durable."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int | None = None,
                 owner: tuple[int, int] | None = None, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` in one step.

    ``mode`` / ``owner`` (uid, gid) are set on the new file before it takes the name, so it is
    never visible with looser permissions. ``durable=False`` skips the fsyncs for files that are
    rewritten every few seconds and only ever describe the present (the state file): a power cut
    may then leave the previous version, never a torn one.
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        if owner is not None:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
