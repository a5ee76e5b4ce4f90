"""``python -m omi_bridge_sim.faults run --config FILE``: the bridge's own ``omi-bridge`` command,
with transcription failing on purpose now and then (for crash-and-fault tests).

The real backend ``[asr] backend`` names is built as usual and wrapped: each window raises
``RuntimeError`` with probability ``$OMI_BRIDGE_SIM_ASR_FAIL_RATE`` (0–1, default 0) instead of
being transcribed, as an engine out of memory would; the first ``$OMI_BRIDGE_SIM_ASR_FAIL_FIRST``
windows of each process fail in any case (a test that must see a fault). Every injected failure
is appended as one line to ``$OMI_BRIDGE_SIM_ASR_FAULT_LOG`` (when set), so a test can count them
across restarts.
Everything else (the daemon, the worker's retry policy, the spool) is the product unchanged.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bridge.config import AsrOptions
from bridge.speech.asr.backend import AsrBackend, WindowResult

FAIL_RATE_ENV = "OMI_BRIDGE_SIM_ASR_FAIL_RATE"
FAULT_LOG_ENV = "OMI_BRIDGE_SIM_ASR_FAULT_LOG"
FAIL_FIRST_ENV = "OMI_BRIDGE_SIM_ASR_FAIL_FIRST"


class FlakyBackend:
    """A real backend that fails a random share of windows."""

    def __init__(self, inner: AsrBackend, fail_rate: float, log_path: str | None = None,
                 seed: int | None = None, fail_first: int = 0) -> None:
        self.inner = inner
        self.fail_rate = fail_rate
        self.log_path = log_path
        self.max_in_flight = inner.max_in_flight
        self.injected = 0
        self.fail_first = fail_first
        self._calls = 0
        self._rng = random.Random(seed)

    def start(self) -> None:
        self.inner.start()

    def probe(self) -> None:
        self.inner.probe()

    def transcribe(self, audios: Sequence[np.ndarray]) -> WindowResult:
        self._calls += 1
        if self._rng.random() < self.fail_rate or self._calls <= self.fail_first:
            self.injected += 1
            if self.log_path:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(f"{time.time():.3f} {len(audios)}\n")
            raise RuntimeError(f"injected ASR fault #{self.injected} ({len(audios)} utterance(s))")
        return self.inner.transcribe(audios)

    def describe(self) -> str:
        return f"{self.inner.describe()}, failing {self.fail_rate:.0%} of windows on purpose"

    def status(self) -> dict[str, Any]:
        return {**self.inner.status(), "injected_faults": self.injected}

    def close(self) -> None:
        self.inner.close()


def install() -> None:
    """Make the worker build its backend through ``FlakyBackend``."""
    from bridge.speech.asr import choose, worker

    real = choose.make_backend
    rate = float(os.environ.get(FAIL_RATE_ENV, "0") or 0)
    log_path = os.environ.get(FAULT_LOG_ENV) or None
    fail_first = int(os.environ.get(FAIL_FIRST_ENV, "0") or 0)

    def make_backend(options: AsrOptions, model: Any = None) -> AsrBackend:
        return FlakyBackend(real(options, model), rate, log_path, fail_first=fail_first)

    setattr(worker, "make_backend", make_backend)  # noqa: B010 - the name the worker calls


def main(argv: Sequence[str] | None = None) -> int:
    install()
    from bridge.cli import main as bridge_main

    return bridge_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
