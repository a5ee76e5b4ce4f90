"""Audio sources for the simulated devices: any file PyAV reads, as 16 kHz mono int16."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from bridge.audio.files import decode_file


def demo_speech_path() -> Path:
    """The speech clip bundled with the package (used by the demo and the tests)."""
    return Path(str(resources.files("omi_bridge_sim") / "assets" / "demo_speech.flac"))


def load_pcm16k(path: str | Path) -> np.ndarray:
    """Decode ``path`` and resample to 16 kHz mono int16 (what a device microphone gives)."""
    return decode_file(path)
