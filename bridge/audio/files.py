"""Audio files → the bridge's PCM format (16 kHz mono int16), for imports and simulators."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bridge.core.errors import BridgeError
from bridge.core.pcm import SAMPLE_RATE


def decode_file(path: str | Path) -> np.ndarray:
    """Any file PyAV (ffmpeg) reads → int16 16 kHz mono; several channels are mixed down."""
    import av

    try:
        container = av.open(str(path))
    except (OSError, av.error.FFmpegError) as exc:
        raise BridgeError(f"cannot read audio from {path}: {exc}",
                          "pass an audio file ffmpeg understands (wav, flac, mp3, ogg, m4a ...)") from exc
    with container:
        if not container.streams.audio:
            raise BridgeError(f"{path} has no audio stream", "pass an audio file")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        chunks: list[np.ndarray] = []
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    if not chunks:
        return np.zeros(0, dtype=np.int16)
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.int16)
