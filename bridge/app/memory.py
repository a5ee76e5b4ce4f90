"""Process-wide allocator settings for the daemon, applied before any thread starts.

glibc gives each thread that calls malloc its own arena (up to 8 per core), and memory freed in
one arena is reused only by threads allocating from it. The daemon frees about 100 MB in the
thread that loads the Whisper model (CTranslate2 widens the float16 weights to float32 before
quantising them to int8), then transcribes in CTranslate2's own worker thread, whose 30 s encoder
window needs about 110 MB more of transient buffers; with separate arenas the second comes on
top of the first. One arena lets the encoder reuse what loading left free: measured with
``python -m bench daemon`` (one pendant, tiny.en), peak RSS 277–289 MB → 253–259 MB, with the
CPU-seconds per Whisper call unchanged within noise (the bridge's threads allocate rarely next
to the GIL, so the one arena lock is not contended).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

_LOGGER = logging.getLogger(__name__)

M_ARENA_MAX = -8
"""mallopt(3) parameter number of M_ARENA_MAX in glibc's <malloc.h>."""
ARENAS = 1
ARENA_ENV = "MALLOC_ARENA_MAX"
"""glibc's own tunable (mallopt(3)); when the environment sets it, it is left as given."""


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas; True when applied. A no-op on other C libraries (musl has one
    arena anyway) and when ``MALLOC_ARENA_MAX`` is set. Call before starting threads: arenas a
    thread already holds stay."""
    if ARENA_ENV in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        applied = bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False
    if not applied:
        _LOGGER.debug("mallopt(M_ARENA_MAX, %d) refused", arenas)
    return applied
