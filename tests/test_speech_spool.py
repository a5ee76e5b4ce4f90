"""The spool's promise to a power cut: at most FSYNC_SECONDS of an utterance in progress is lost."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bridge.core.pcm import SAMPLE_RATE
from bridge.speech import spool

FRAME = 512


def test_a_long_utterance_is_made_durable_every_second_not_only_at_its_end(tmp_path: Path) -> None:
    writer = spool.PcmWriter(tmp_path / "u000001.pcm")
    frame = np.full(FRAME, 1000, dtype=np.int16)
    try:
        for _ in range(int(20 * SAMPLE_RATE / FRAME)):  # 20 s of speech, no end in sight
            writer.write(frame)
            assert writer.samples - writer.synced_samples < spool.FSYNC_SAMPLES
        assert writer.synced_samples >= 19 * SAMPLE_RATE
    finally:
        writer.finish(writer.samples)
    assert writer.synced_samples == writer.samples
    assert spool.pcm_samples(tmp_path / "u000001.pcm") == writer.samples
