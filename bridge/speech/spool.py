"""The on-disk spool: speech not yet transcribed and the state of open conversations.

Layout under ``[storage] dir``::

    spool/<device>/<conversation key>/conversation.json   the conversation so far (segments too)
    spool/<device>/<conversation key>/u000001.pcm         int16 16 kHz mono, written as it arrives
    spool/<device>/<conversation key>/u000001.json        where it sits in the conversation

    spool/<device>/<conversation key>/u000001.tail        audio received, not yet through the VAD

JSON files are replaced atomically (write temp, fsync, rename, fsync dir), so a kill -9 or power
cut leaves either the old or the new version. Audio is appended frame by frame (a kill -9 keeps
what the kernel already has), fsynced every ``FSYNC_SECONDS`` of audio while the utterance goes
on and once more when it ends, so a power cut loses at most the last second of speech. The VAD
takes audio in batches; what waits for the next batch (≤ 128 ms) is kept in the ``.tail`` beside
the utterance, so a kill -9 mid-word does not lose it and a restart continues the word
(``recover_tail``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from bridge.core.files import fsync_dir, write_atomic
from bridge.core.pcm import SAMPLE_RATE

SPOOL_DIR = "spool"
CONVERSATION_FILE = "conversation.json"
BYTES_PER_SAMPLE = 2
FSYNC_SECONDS = 1.0
"""Audio a power cut may lose from an utterance in progress. One fsync of a few 32 kB a second is
cheap even on a Pi's SD card, and only runs while someone is speaking."""
FSYNC_SAMPLES = int(FSYNC_SECONDS * SAMPLE_RATE)
TAIL_SUFFIX = ".tail"
TAIL_HEADER = struct.Struct("<qq")
"""Where the tail starts in the utterance file, in samples, and how many samples follow. One
``pwrite`` replaces header and audio together, so a tail is never read against the wrong file
length: a kill between appending a frame and rewriting the tail leaves a tail that starts
before the file's end, and only its part past the end is taken."""


def tail_path(pcm: Path) -> Path:
    return pcm.with_suffix(TAIL_SUFFIX)


def recover_tail(pcm: Path) -> None:
    """Append to ``pcm`` the audio its tail holds beyond the file's end (a kill -9 left it), make
    it durable, then remove the tail."""
    tail = tail_path(pcm)
    try:
        data = tail.read_bytes()
    except OSError:
        return
    if len(data) >= TAIL_HEADER.size:
        start, count = TAIL_HEADER.unpack_from(data)
        audio = data[TAIL_HEADER.size:TAIL_HEADER.size + count * BYTES_PER_SAMPLE]
        on_disk = pcm_samples(pcm)
        if start <= on_disk < start + len(audio) // BYTES_PER_SAMPLE:
            with open(pcm, "r+b") as f:
                f.truncate(on_disk * BYTES_PER_SAMPLE)  # half a sample from the kill
                f.seek(0, os.SEEK_END)
                f.write(audio[(on_disk - start) * BYTES_PER_SAMPLE:])
                f.flush()
                os.fsync(f.fileno())
    tail.unlink(missing_ok=True)


def device_dir(storage: Path, device: str) -> Path:
    """A file-system-safe folder per device (addresses contain ':')."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", device).strip("-") or "device"
    return storage / SPOOL_DIR / safe


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically and durably."""
    write_atomic(path, json.dumps(data, ensure_ascii=False).encode("utf-8"))


def read_json(path: Path) -> dict[str, Any] | None:
    """The file's object, or None when missing or unreadable (a torn temp file is never read)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_pcm(path: Path) -> np.ndarray:
    data = path.read_bytes()
    usable = len(data) - len(data) % BYTES_PER_SAMPLE  # a kill mid-write can leave half a sample
    return np.frombuffer(data[:usable], dtype=np.int16)


def pcm_samples(path: Path) -> int:
    try:
        return path.stat().st_size // BYTES_PER_SAMPLE
    except OSError:
        return 0


class PcmWriter:
    """One utterance's audio file, appended as frames arrive."""

    def __init__(self, path: Path, *, append: bool = False) -> None:
        """``append``: continue an utterance a previous run left unfinished; a sample half
        written when it died is dropped."""
        self.path = path
        self._f = open(path, "r+b" if append else "wb")  # noqa: SIM115 - stays open for the utterance
        self.samples = 0
        if append:
            self.samples = pcm_samples(path)
            self._f.truncate(self.samples * BYTES_PER_SAMPLE)
            self._f.seek(0, os.SEEK_END)
        self.synced_samples = 0
        """Samples known to be on the storage device (fsynced)."""
        self._dir_synced = False
        self._tail: int | None = None

    def write(self, pcm: np.ndarray) -> None:
        self._f.write(pcm.astype(np.int16, copy=False).tobytes())
        # Hand the bytes to the kernel now: a kill -9 of the process then loses nothing.
        self._f.flush()
        self.samples += len(pcm)
        if self.samples - self.synced_samples >= FSYNC_SAMPLES:
            self.sync()

    def keep_tail(self, pcm: np.ndarray) -> None:
        """Keep ``pcm``, the audio that follows the file and waits for the VAD, in the tail (page
        cache only: it is for a kill -9, and a power cut loses the unsynced second anyway)."""
        try:
            if self._tail is None:
                if not len(pcm):
                    return
                self._tail = os.open(tail_path(self.path), os.O_RDWR | os.O_CREAT, 0o644)
            os.pwrite(self._tail, TAIL_HEADER.pack(self.samples, len(pcm))
                      + pcm.astype(np.int16, copy=False).tobytes(), 0)
        except OSError:
            pass  # best effort: a full disk is reported by the utterance's own writes

    def _drop_tail(self) -> None:
        if self._tail is not None:
            with contextlib.suppress(OSError):
                os.close(self._tail)
            self._tail = None
        with contextlib.suppress(OSError):
            tail_path(self.path).unlink(missing_ok=True)

    def sync(self) -> None:
        """Make what was written survive a power cut (the file's name too, the first time)."""
        os.fsync(self._f.fileno())
        self.synced_samples = self.samples
        if not self._dir_synced:
            fsync_dir(self.path.parent)
            self._dir_synced = True

    def finish(self, samples: int) -> None:
        """Keep the first ``samples`` (the end is decided after some trailing silence), fsync."""
        self._f.flush()
        if samples < self.samples:
            self._f.truncate(samples * BYTES_PER_SAMPLE)
            self.samples = samples
        self.sync()
        self._f.close()
        self._drop_tail()

    def discard(self) -> None:
        self._f.close()
        self._drop_tail()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def abandon(self) -> int:
        """The disk failed (full, gone): close without deleting, whatever the disk says, and
        return how many samples the file holds; they are kept as the utterance."""
        with contextlib.suppress(OSError):
            self._f.close()  # closed even when its flush fails; the unflushed bytes are gone
        self._drop_tail()
        self.samples = pcm_samples(self.path)
        return self.samples
