"""What every device driver gives the rest of the bridge.

A driver keeps one device's link alive forever and writes the device's audio, as 16 kHz mono
int16 on an exact timeline, into a ``PcmSink``. Lost frames are concealed, and while the link is
down the driver writes silence of the wall-clock length, so sample ``n`` of the stream is always
``n / 16000`` seconds after the stream's first sample.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

SAMPLE_RATE = 16_000
"""Every stage after the decoder works at 16 kHz mono int16 (what Whisper and Silero expect)."""


class PcmSink(Protocol):
    """Receives a device's audio timeline."""

    def write(self, pcm: np.ndarray, /) -> None:
        """``pcm``: int16 samples at 16 kHz mono, continuing the timeline. Must not block."""
        ...
