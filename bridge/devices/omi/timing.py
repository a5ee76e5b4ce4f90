"""True times for stored records: each ring record's own UTC stamp, corrected by the clock offset
measured at time sync; a jump between stamps is a recording pause, and a new run when it
exceeds the conversation gap (omi-storage.md §3.1, §6.2, §6.3; the module doc of sync.py).
"""

from __future__ import annotations

import time

from bridge.devices.omi import storage as st
from bridge.devices.omi.chunks import ChunkMeta

STAMP_CENTRE = 0.5
"""Record stamps are whole UTC seconds of the first frame (omi-storage.md §3.1, §6.3): the frame
lies in [stamp, stamp + 1), so its best estimate is the middle."""
CONTINUITY_SECONDS = 2.0
"""A record whose stamp is within this of where the previous records end continues them; more
is a recording pause (omi-storage.md §6.3: "larger than ~2 s means a pause in recording")."""


class TimePlacer:
    """Gives each record its wall-clock start and says where runs begin (see the module doc)."""

    def __init__(self, gap_seconds: float) -> None:
        self.gap_seconds = gap_seconds
        self.expected: float | None = None
        """Where the previous record's audio ends (UTC), None outside a run."""
        self.source: str | None = None
        self.estimated = False
        self._uptime_base: tuple[int, float] | None = None

    def close_run(self) -> None:
        self.expected = None

    def place(self, record: st.Record, meta: ChunkMeta) -> tuple[float, bool, bool]:
        """(start UTC, estimated, starts a new run)."""
        kind = record.stamp_kind
        clock = meta.clock
        new_run = self.expected is None or meta.source != self.source
        if kind is st.StampKind.UTC:
            t = self.correct(record.stamp, clock) + STAMP_CENTRE
            estimated = False
        else:
            estimated = True
            if kind is st.StampKind.UPTIME:
                uptime = record.stamp & ~st.UPTIME_FLAG
                if (self._uptime_base is None or new_run or not self.estimated
                        or uptime < self._uptime_base[0]):
                    base = self.expected if (self.expected is not None and self.estimated
                                             and not new_run) else _estimate_start(clock)
                    self._uptime_base = (uptime, base)
                t = self._uptime_base[1] + (uptime - self._uptime_base[0])
            else:
                t = self.expected if (self.expected is not None and self.estimated
                                      and not new_run) else _estimate_start(clock)
        if not new_run and estimated != self.estimated:
            new_run = True
        if not new_run and self.expected is not None:
            jump = t - self.expected
            if jump > self.gap_seconds or jump < -CONTINUITY_SECONDS:
                new_run = True
            elif jump <= CONTINUITY_SECONDS:
                t = self.expected  # the same recording: frames follow frames
        self.source = meta.source
        self.estimated = estimated
        return t, estimated, new_run

    @staticmethod
    def correct(stamp: int, clock: dict[str, float | None]) -> float:
        """Pendant UTC → bridge UTC: the offset measured at this connection's time sync, spread
        linearly over the time since the previous sync (drift accrues with time)."""
        offset = clock.get("offset")
        if not offset:
            return float(stamp)
        now, last = clock.get("pendant_now"), clock.get("last_time_sync")
        share = 1.0
        if now is not None and last is not None and now > last:
            share = min(1.0, max(0.0, (stamp - last) / (now - last)))
        return stamp + offset * share


def _estimate_start(clock: dict[str, float | None]) -> float:
    est = clock.get("estimate_start")
    if est is not None:
        return est
    received = clock.get("received_at")
    return received if received is not None else time.time()
