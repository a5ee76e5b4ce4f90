"""Omi audio notifications → whole codec frames, with loss accounting.

Wire format (omi-device.md §5.1, firmware ``transport.c`` ``push_to_gatt()``)::

    [idx_lo][idx_hi][sub][payload...]

``idx`` counts *notifications* (not frames), uint16 LE, wrapping 65535→0 and never reset on
reconnect. ``sub`` numbers the fragments of one codec frame (0 = first). Frames are never packed
together, so a notification carries a slice of exactly one frame.

Continuity (omi-device.md §6.1, app ``ble_packet_continuity.dart``), per notification, against the
previous one on this connection (``delta = idx - last_idx mod 65536``):

- first notification: accepted;
- ``delta == 1``: contiguous (this includes the wrap 65535 → 0);
- ``2 <= delta < 0x8000``: gap, ``delta - 1`` notifications missing;
- ``delta == 0`` (or an index seen in the last ``_RECENT`` notifications) with the same bytes:
  duplicate, dropped and counted;
- same index with different bytes, or a backward jump (``delta >= 0x8000``): reset — the
  device restarted its counter; the partial frame is dropped and nothing is counted as lost
  (we cannot know how much, and a reset inside one connection means the device rebooted);
- fewer than 3 bytes: malformed, dropped and counted (it cannot carry a header).

Reassembly (omi-device.md §5.4, app ``wav_bytes.dart`` ``storeFramePacket``): a notification
continues the pending frame only if ``idx == last + 1`` and ``sub == last_sub + 1``. Any other
``sub != 0`` is a broken fragment: the partial frame is dropped (counted lost and malformed) and
we resync at the next ``sub == 0``.

**When is a frame complete (latency)?** The firmware slices a frame into fragments of the largest
size a notification allows, so only the *last* fragment of a frame can be shorter than that. A
fragment whose payload is shorter than ``max_fragment`` (derived from the ATT MTU) therefore ends
its frame and the frame is emitted at once: with an MTU ≥ ~170 every Opus frame of the shipping
CV1 arrives whole in one notification and is emitted with zero added latency. Only a fragment of
full size may have a continuation; that frame is held until the next notification tells (its
``sub == 0`` closes the frame, ``sub == last+1`` extends it). Because the firmware arithmetic
about the exact slice size is unclear (omi-device.md §5.1 [?]: ``mtu - 3`` or ``mtu - 6``), we
treat any fragment within ``_SLICE_SLACK`` bytes of the maximum as "full". Without a known MTU
every frame is held until the next notification (the legacy app's rule; one frame of latency).
``flush()`` releases a held frame when the connection ends.

**Lost frames from an index gap.** The index counts notifications, so with fragmentation a gap
of ``m`` notifications hides an uncertain number of frames. We estimate it from the notifications
per frame observed on this connection (``npf``, 1.0 until a frame completes): the notifications
that belonged to destroyed frames — the held partial frame's ``k`` fragments plus the ``m``
missing ones, minus the ``s`` leading fragments of the next frame when we land on ``sub == s >
0`` — divided by ``npf`` and rounded, at least one per destroyed frame we know of. Without
fragmentation (``npf == 1``) this is exact: ``m`` missing notifications are ``m`` lost frames.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

HEADER_BYTES = 3
"""``[idx_lo][idx_hi][sub]`` (omi-device.md §5.1, firmware ``transport.c``)."""

INDEX_MODULO = 1 << 16
"""The packet index is a uint16 that wraps 65535 → 0 (omi-device.md §5.1)."""

BACKWARD_JUMP = 0x8000
"""A delta at or above this is a backward jump, i.e. a counter reset (omi-device.md §6.1,
app ``ble_packet_continuity.dart``)."""

ATT_NOTIFY_OVERHEAD = 3
"""An ATT notification carries at most MTU − 3 bytes (opcode + handle; Bluetooth Core Vol 3 Part F)."""

_SLICE_SLACK = 3
"""Fragments within this many bytes of the largest possible slice count as full: the firmware may
slice at ``mtu − 3`` or ``mtu − 6`` payload bytes (omi-device.md §5.1 [?])."""

_RECENT = 32
"""Notifications remembered for duplicate detection; BlueZ re-delivers a value at most a few
notifications late (bluez-for-tests.md §9.4), 32 covers that with room to spare."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One whole encoded codec frame."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Lost:
    """``frames`` codec frames the device sent but we did not get (to be concealed)."""

    frames: int


Event = Frame | Lost


def max_fragment_for_mtu(mtu: int | None) -> int | None:
    """Largest payload one notification can carry at this ATT MTU, or None when unknown."""
    if mtu is None or mtu <= ATT_NOTIFY_OVERHEAD + HEADER_BYTES:
        return None
    return mtu - ATT_NOTIFY_OVERHEAD - HEADER_BYTES


class Depacketizer:
    """Turns one connection's notifications into ``Frame``/``Lost`` events.

    Make a new one per connection: the device's index keeps running across reconnects, and the
    time between connections is accounted by wall clock, not by the index.
    """

    def __init__(self, max_fragment: int | None = None) -> None:
        self.max_fragment = max_fragment
        """Largest payload one notification can carry (``max_fragment_for_mtu``); None = unknown."""
        self.packets = 0
        self.duplicates = 0
        self.malformed = 0
        self.resets = 0
        self.lost_frames = 0
        self.frames = 0
        self._last_idx: int | None = None
        self._recent: OrderedDict[int, bytes] = OrderedDict()
        self._pending: list[bytes] = []  # fragments of the frame being assembled
        self._last_sub = 0
        self._synced = False  # False while waiting for a sub == 0 to start a frame
        self._frame_notifs = 0  # notifications in completed frames (for npf)

    @property
    def notifications_per_frame(self) -> float:
        if self.frames == 0:
            return 1.0
        return max(1.0, self._frame_notifs / self.frames)

    def push(self, packet: bytes | bytearray) -> list[Event]:
        """Feed one notification; returns the events it completes (usually zero or one)."""
        self.packets += 1
        if len(packet) < HEADER_BYTES:
            self.malformed += 1
            return []
        packet = bytes(packet)
        idx = packet[0] | (packet[1] << 8)
        sub = packet[2]
        payload = packet[HEADER_BYTES:]
        out: list[Event] = []

        if self._last_idx is not None:
            delta = (idx - self._last_idx) % INDEX_MODULO
            seen = self._recent.get(idx)
            if seen is not None and (delta == 0 or delta >= BACKWARD_JUMP):
                if seen == packet:
                    self.duplicates += 1
                    return []
                self._reset(out)
            elif delta >= BACKWARD_JUMP or delta == 0:
                self._reset(out)
            elif delta > 1:
                self._gap(delta - 1, sub, out)
            # delta == 1: contiguous
        self._last_idx = idx
        self._remember(idx, packet)

        if sub == 0:
            if self._pending:
                self._complete(out)
            self._synced = True
            self._pending = [payload]
            self._last_sub = 0
        elif self._synced and self._pending and sub == self._last_sub + 1:
            self._pending.append(payload)
            self._last_sub = sub
        else:
            if self._synced and self._pending:
                # A broken fragment chain: the frame being assembled cannot be decoded.
                self.malformed += 1
                self._lose(1, out)
            # else: an orphan continuation (before the first sub == 0, or of a frame already
            # counted lost); it belongs to a frame we cannot decode.
            self._pending = []
            self._synced = False
            return out

        if not self._may_continue(payload):
            self._complete(out)
        return out

    def flush(self) -> list[Event]:
        """The connection ended: release a held frame (it is most likely whole)."""
        out: list[Event] = []
        if self._pending:
            self._complete(out)
        self._synced = False
        return out

    # ------------------------------------------------------------------------------------

    def _may_continue(self, payload: bytes) -> bool:
        if self.max_fragment is None:
            return True
        return len(payload) >= self.max_fragment - _SLICE_SLACK

    def _complete(self, out: list[Event]) -> None:
        self._frame_notifs += len(self._pending)
        self.frames += 1
        out.append(Frame(b"".join(self._pending)))
        self._pending = []

    def _lose(self, n: int, out: list[Event]) -> None:
        if n <= 0:
            return
        self.lost_frames += n
        if out and isinstance(out[-1], Lost):
            out[-1] = Lost(out[-1].frames + n)
        else:
            out.append(Lost(n))

    def _gap(self, missing: int, sub: int, out: list[Event]) -> None:
        held = len(self._pending) if self._synced else 0
        if held and sub == self._last_sub + missing + 1:
            # The missing notifications were the middle of the held frame: only it is lost.
            self._pending = []
            self._synced = False
            self._lose(1, out)
            return
        known = 1 if held else 0  # the held frame may have lost its tail in the gap
        span = held + missing - sub  # notifications of frames destroyed before this one
        if sub > 0:
            # This notification continues a frame whose start is in the gap: that frame is lost
            # too, and counted here (its fragments are then dropped as orphans).
            known += 1
            estimate = round(max(0, span) / self.notifications_per_frame) + 1
            if held:
                estimate = max(estimate, 2)
        else:
            estimate = max(1, round(span / self.notifications_per_frame))
        self._pending = []
        self._synced = False
        self._lose(max(known, estimate), out)

    def _reset(self, out: list[Event]) -> None:
        self.resets += 1
        self._pending = []
        self._synced = False
        self._recent.clear()

    def _remember(self, idx: int, packet: bytes) -> None:
        self._recent[idx] = packet
        self._recent.move_to_end(idx)
        if len(self._recent) > _RECENT:
            self._recent.popitem(last=False)
