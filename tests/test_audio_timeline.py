"""The timeline's quiet-spell rule with a hand-driven clock: a pendant that pauses on silence
gets silence of the pause's length, and audio that was only late is never counted twice."""

from __future__ import annotations

import numpy as np

from bridge.audio.timeline import CATCH_UP_MARGIN, QUIET_SECONDS, AudioTimeline
from bridge.cli.listen import WavSink
from bridge.core.pcm import SAMPLE_RATE

FRAME = 320  # 20 ms


def frames(n: int) -> np.ndarray:
    return np.ones(n * FRAME, dtype=np.int16)


def test_quiet_spell_is_filled_and_late_audio_is_paid_back_at_the_next_gap():
    tl = AudioTimeline(WavSink())
    tl.audio(frames(50), at=1.0)  # anchor 0.0, one second of audio
    assert tl.quiet(now=1.0 + QUIET_SECONDS / 2) == 0  # jitter, not a pause
    tl.quiet(now=3.5)
    assert tl.samples_written == round((3.5 - CATCH_UP_MARGIN) * SAMPLE_RATE)
    # A real pause: audio resumes at 4.0 and is placed at its wall-clock time.
    tl.audio(frames(1), at=4.0)
    assert tl.samples_written == 4 * SAMPLE_RATE and tl.ahead_samples == 0

    # A stall, not a pause: 1 s of late audio arrives at 7.0 after silence was filled to 6.75.
    tl.quiet(now=7.0)
    tl.audio(frames(50), at=7.0)
    ahead = tl.samples_written - round(7.0 * SAMPLE_RATE)
    assert ahead > 0 and tl.ahead_samples == ahead  # nothing dropped, the overlap is counted
    # The next gap is shortened by the overlap: the length meets wall clock again.
    tl.link_down()
    tl.catch_up(now=10.0)
    assert tl.samples_written == round((10.0 - CATCH_UP_MARGIN) * SAMPLE_RATE)
