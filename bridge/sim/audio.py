"""Audio sources for the simulated devices: any file PyAV reads, as 16 kHz mono int16."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from bridge.devices.base import SAMPLE_RATE


def demo_speech_path() -> Path:
    """The speech clip bundled with the package (used by the demo and the tests)."""
    return Path(str(resources.files("bridge") / "assets" / "demo_speech.flac"))


def load_pcm16k(path: str | Path) -> np.ndarray:
    """Decode ``path`` and resample to 16 kHz mono int16 (what a device microphone gives)."""
    import av

    chunks: list[np.ndarray] = []
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    if not chunks:
        return np.zeros(0, dtype=np.int16)
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.int16)
