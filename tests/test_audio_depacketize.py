"""The depacketizer turns the pendant's notifications into whole frames and honest loss counts."""

from __future__ import annotations

from bridge.audio.depacketize import Depacketizer, Frame, Lost, max_fragment_for_mtu


def pkt(idx: int, sub: int, payload: bytes) -> bytes:
    return bytes([idx & 0xFF, (idx >> 8) & 0xFF, sub]) + payload


def frames(events) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, Frame)]


def lost(events) -> int:
    return sum(e.frames for e in events if isinstance(e, Lost))


def feed(d: Depacketizer, packets) -> list:
    out = []
    for p in packets:
        out += d.push(p)
    return out + d.flush()


BIG = max_fragment_for_mtu(247)  # a typical negotiated MTU: every CV1 frame fits one notification


def test_whole_frames_are_emitted_immediately_at_a_large_mtu():
    d = Depacketizer(BIG)
    assert d.push(pkt(7, 0, b"a" * 80)) == [Frame(b"a" * 80)]
    assert d.push(pkt(8, 0, b"b" * 60)) == [Frame(b"b" * 60)]


def test_without_a_known_mtu_a_frame_is_released_by_the_next_one():
    d = Depacketizer(None)
    assert d.push(pkt(1, 0, b"a")) == []
    assert d.push(pkt(2, 0, b"b")) == [Frame(b"a")]
    assert d.flush() == [Frame(b"b")]


def test_index_gap_counts_each_missing_notification_as_a_lost_frame():
    d = Depacketizer(BIG)
    events = feed(d, [pkt(10, 0, b"a"), pkt(11, 0, b"b"), pkt(15, 0, b"c")])
    assert events == [Frame(b"a"), Frame(b"b"), Lost(3), Frame(b"c")]
    assert d.lost_frames == 3


def test_wrap_from_65535_to_0_is_contiguous():
    d = Depacketizer(BIG)
    events = feed(d, [pkt(65534, 0, b"a"), pkt(65535, 0, b"b"), pkt(0, 0, b"c"), pkt(1, 0, b"d")])
    assert frames(events) == [b"a", b"b", b"c", b"d"]
    assert lost(events) == 0 and d.resets == 0


def test_gap_across_the_wrap_is_measured_modulo_65536():
    d = Depacketizer(BIG)
    events = feed(d, [pkt(65534, 0, b"a"), pkt(1, 0, b"b")])
    assert lost(events) == 2


def test_duplicates_are_dropped_and_counted():
    d = Depacketizer(BIG)
    events = feed(d, [pkt(5, 0, b"a"), pkt(5, 0, b"a"), pkt(6, 0, b"b"), pkt(5, 0, b"a")])
    assert frames(events) == [b"a", b"b"]
    assert d.duplicates == 2 and lost(events) == 0


def test_same_index_with_different_bytes_is_a_reset_not_a_duplicate():
    d = Depacketizer(BIG)
    events = feed(d, [pkt(5, 0, b"a"), pkt(5, 0, b"z"), pkt(6, 0, b"y")])
    assert frames(events) == [b"a", b"z", b"y"]
    assert d.duplicates == 0 and d.resets == 1 and lost(events) == 0


def test_backward_jump_is_a_reset_without_invented_loss():
    d = Depacketizer(BIG)
    events = feed(d, [pkt(1000, 0, b"a"), pkt(3, 0, b"b"), pkt(4, 0, b"c")])
    assert frames(events) == [b"a", b"b", b"c"]
    assert d.resets == 1 and lost(events) == 0


def test_short_packets_are_malformed():
    d = Depacketizer(BIG)
    events = feed(d, [b"", b"\x01", b"\x01\x00", pkt(1, 0, b"a")])
    assert frames(events) == [b"a"] and d.malformed == 3 and d.packets == 4


def test_fragments_reassemble_into_one_frame_at_a_small_mtu():
    mf = max_fragment_for_mtu(23)  # 17 payload bytes per notification
    frame1, frame2 = bytes(range(40)), bytes(range(100, 110))
    d = Depacketizer(mf)
    out = d.push(pkt(1, 0, frame1[:17])) + d.push(pkt(2, 1, frame1[17:34]))
    assert out == []  # full-size fragments may continue
    out += d.push(pkt(3, 2, frame1[34:]))  # short slice: ends the frame, no latency
    assert out == [Frame(frame1)]
    assert d.push(pkt(4, 0, frame2)) == [Frame(frame2)]
    assert d.notifications_per_frame == 2.0


def test_a_frame_exactly_filling_its_fragments_is_released_by_the_next_frame():
    mf = max_fragment_for_mtu(23)
    whole = bytes(34)
    d = Depacketizer(mf)
    assert d.push(pkt(1, 0, whole[:17])) + d.push(pkt(2, 1, whole[17:])) == []
    assert d.push(pkt(3, 0, b"x")) == [Frame(whole), Frame(b"x")]


def test_broken_fragment_drops_the_partial_frame_and_resyncs_at_the_next_start():
    mf = max_fragment_for_mtu(23)
    d = Depacketizer(mf)
    events = feed(d, [
        pkt(1, 0, bytes(17)), pkt(2, 2, bytes(17)),  # sub jumps 0 → 2 with a contiguous index
        pkt(3, 3, bytes(5)),                          # orphan continuation: dropped silently
        pkt(4, 0, b"ok"),
    ])
    assert frames(events) == [b"ok"]
    assert d.malformed == 1 and lost(events) == 1


def test_gap_inside_a_fragmented_stream_estimates_frames_from_notifications_per_frame():
    mf = max_fragment_for_mtu(23)
    d = Depacketizer(mf)
    idx = 0
    packets = []
    for n in range(10):  # 10 frames of 2 fragments each
        packets += [pkt(idx, 0, bytes([n]) * 17), pkt(idx + 1, 1, bytes([n]) * 5)]
        idx += 2
    # lose frames 10..12 (6 notifications) and the first fragment of frame 13
    idx += 7
    packets += [pkt(idx, 1, bytes(5))]          # tail of frame 13: that frame is lost too
    packets += [pkt(idx + 1, 0, b"\x0e" * 17), pkt(idx + 2, 1, b"\x0e" * 5)]
    events = feed(d, packets)
    assert len(frames(events)) == 11
    assert lost(events) == 4


def test_gap_while_a_frame_is_held_loses_that_frame():
    mf = max_fragment_for_mtu(23)
    d = Depacketizer(mf)
    events = feed(d, [pkt(1, 0, bytes(17)), pkt(2, 1, bytes(3)),
                      pkt(3, 0, bytes(17)),          # held: may continue
                      pkt(6, 0, bytes(4))])          # 2 notifications missing = its tail + 1 more?
    assert frames(events) == [bytes(20), bytes(4)]
    assert lost(events) >= 1


def test_first_notification_mid_frame_is_skipped_quietly():
    d = Depacketizer(max_fragment_for_mtu(23))
    events = feed(d, [pkt(9, 2, b"tail"), pkt(10, 0, b"a")])
    assert frames(events) == [b"a"] and d.malformed == 0 and lost(events) == 0
