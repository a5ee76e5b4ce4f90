"""The Omi link, end to end: real bleak against our fake bluetoothd and a simulated pendant.

Each test is a user's story: the pendant is found although it was renamed; an hour-long-style
stream with radio loss and a dropped link still yields audio of the right length with every
lost frame concealed; a bridge restarted while BlueZ keeps the link picks it up again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import numpy as np
import pytest
from omi_bridge_sim.model import DeviceModel
from omi_bridge_sim.omi import AUDIO_DATA_UUID, OmiModel

from bridge.audio.codecs import CODEC_NAMES
from bridge.cli.listen import WavSink, async_listen
from bridge.config import Config, DeviceConfig, LinkOptions
from bridge.core.errors import UnknownCodecError
from bridge.core.pcm import SAMPLE_RATE
from bridge.devices.link import DeviceLink
from bridge.link.scan import async_scan

TIMEOUT = 20.0
"""Upper bound for any wait on the fake (connects take ~0.1 s; generous for a loaded CI box)."""

LATENCY = SAMPLE_RATE // 10
"""Samples of delivery latency allowed when comparing the timeline with the wall clock: audio is
written when it arrives, and on a loaded 2-core box a notification can be ~100 ms late."""

FAST = LinkOptions(reconnect_min_seconds=0.1, reconnect_max_seconds=1.0, scan_timeout_seconds=5.0)


def detectable_losses(model: OmiModel) -> int:
    """Ground truth of what the bridge can know: frames lost in the air that are followed, on
    the same connection, by a frame that arrived (a loss at the very end of a connection
    leaves no index gap; the outage's wall-clock silence covers it)."""
    count, pending = 0, 0
    for _n, _due, _idx, status in model.frame_log:
        if status == "lost":
            pending += 1
        elif status == "sent":
            count += pending
            pending = 0
        else:
            pending = 0
    return count


class TimelineSink(WavSink):
    """Keeps the timeline and wakes waiters as it grows."""

    def __init__(self) -> None:
        super().__init__()
        self.grew = asyncio.Condition()
        self._loop = asyncio.get_running_loop()

    def write(self, pcm: np.ndarray, /) -> None:
        super().write(pcm)
        self._loop.create_task(self._notify())

    async def _notify(self) -> None:
        async with self.grew:
            self.grew.notify_all()

    async def wait_samples(self, n: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            async with self.grew:
                await self.grew.wait_for(lambda: self.samples >= n)


def seqpacket_sockets() -> int:
    """SOCK_SEQPACKET sockets this process holds (AcquireNotify fds; /proc/net/unix type 0005)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    with open("/proc/net/unix") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for r in rows if len(r) >= 7 and r[4] == "0005" and r[6] in inodes)


def outage_after_first_audio(model: OmiModel) -> int:
    """Frames the pendant produced while disconnected, after it first streamed."""
    statuses = [status for _n, _due, _idx, status in model.frame_log]
    first = statuses.index("sent")
    return sum(1 for st in statuses[first:] if st in ("offline", "unsubscribed"))


async def link_until_first_audio(model: OmiModel) -> DeviceLink:
    """Run a link to ``model`` until its first audio arrives, then stop it the way the daemon does."""
    sink = WavSink()
    link = DeviceLink(DeviceConfig("omi", model.address), FAST, sink)
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    await asyncio.wait_for(sink.first_audio.wait(), TIMEOUT)
    stop.set()
    await asyncio.wait_for(task, TIMEOUT)
    return link


async def stream(fake, model: OmiModel, until_frames: int, options: LinkOptions = FAST):
    """Run a DeviceLink until its timeline holds ``until_frames`` frames of the pendant's audio."""
    await fake.add_device(model)
    sink = TimelineSink()
    link = DeviceLink(DeviceConfig("omi", model.address), options, sink)
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    fake_dev = fake.device(model.address)
    await sink.wait_samples(until_frames * model.frame_samples,
                            TIMEOUT + until_frames * model.frame_seconds)
    await fake.wait_until(lambda: fake_dev.connected or task.done(), TIMEOUT)
    end = time.monotonic()
    written_at_end = link.timeline.samples_written
    # End with a link loss from the device side: notifications already on the bus arrive before
    # the disconnect signal, so the counts below are exact (nothing is left in flight).
    fake_dev.drop_link()
    await asyncio.wait_for(link.supervisor.disconnected_event.wait(), TIMEOUT)
    stop.set()
    await asyncio.wait_for(task, TIMEOUT)
    return link, sink, end, written_at_end


async def test_scan_finds_a_renamed_pendant_by_its_service_uuid(fake_bluez):
    await fake_bluez.add_device(OmiModel(address="C0:FF:EE:00:00:0A", name="Kitchen"))
    await fake_bluez.add_device(DeviceModel(address="11:22:33:44:55:66", name="Headphones",
                                            advertised_uuids=["0000110b-0000-1000-8000-00805f9b34fb"]))
    found = await async_scan(Config(), timeout=1.0)
    assert [(d.address, d.kind, d.name) for d in found] == [("C0:FF:EE:00:00:0A", "omi", "Kitchen")]
    assert found[0].rssi is not None


async def test_a_minute_with_radio_loss_and_a_dropped_link_keeps_length_and_counts(fake_bluez):
    model = OmiModel(loss=0.02, duplicate=0.01, seed=7, link_drop_at=(30.0,), after_clip="loop")
    link, sink, end, written = await stream(fake_bluez, model, until_frames=3000)  # 60 s of 20 ms
    s = link.stats
    tl = link.timeline
    assert s.reconnects == 1 and s.codec == 21
    # Every frame the pendant sent or lost while we listened is on the timeline...
    device_frames = model.stats.frames_sent + model.stats.frames_lost_in_air
    assert s.frames == model.stats.frames_sent
    assert s.lost_frames == detectable_losses(model) > 20
    assert s.duplicates == model.stats.duplicates > 0
    assert s.malformed == 0
    audio_samples = tl.samples_written - tl.silence_samples
    undetected = model.stats.frames_lost_in_air - s.lost_frames
    assert audio_samples == (device_frames - undetected) * model.frame_samples
    # ...and the outage is silence, so the timeline is as long as the wall clock says (±1 frame).
    assert abs(written - (end - tl.anchor) * SAMPLE_RATE) <= model.frame_samples + LATENCY
    assert tl.silence_samples > 0
    assert len(sink.pcm()) == tl.samples_written
    assert np.abs(sink.pcm()[: SAMPLE_RATE * 5]).max() > 1000  # speech, not silence
    # The pendant stayed in range, so the drop cost well under 2 s of audio.
    assert outage_after_first_audio(model) * model.frame_seconds < 2.0


@pytest.mark.parametrize("codec", [20, 21])
async def test_both_opus_codecs_stream_on_an_exact_timeline(fake_bluez, codec):
    model = OmiModel(codec=codec, loss=0.05, seed=3)
    link, _sink, _end, _written = await stream(fake_bluez, model, until_frames=150)
    s = link.stats
    assert s.codec == codec and CODEC_NAMES[codec].startswith("opus")
    assert s.frames == model.stats.frames_sent
    assert s.lost_frames == detectable_losses(model) > 0
    assert (link.timeline.samples_written
            == (s.frames + s.lost_frames) * model.frame_samples)


async def test_fragmented_frames_at_a_small_mtu_are_reassembled(fake_bluez):
    # MTU 40: 34-byte notifications, so each ~80-byte Opus frame arrives in 3 fragments.
    model = OmiModel(mtu=40, min_mtu=23, seed=5)
    link, _sink, _end, _written = await stream(fake_bluez, model, until_frames=100)
    s = link.stats
    assert s.packets > 2 * s.frames > 0
    assert s.frames == model.stats.frames_sent
    assert s.lost_frames == 0 and s.malformed == 0
    assert link.timeline.samples_written == s.frames * model.frame_samples


async def test_fragmented_stream_with_loss_estimates_lost_frames(fake_bluez):
    model = OmiModel(mtu=40, min_mtu=23, seed=11, loss=0.03)
    link, _sink, _end, _written = await stream(fake_bluez, model, until_frames=150)
    s = link.stats
    truth = detectable_losses(model)
    assert truth > 0
    assert abs(s.lost_frames - truth) <= max(3, truth // 3)  # an estimate: fragments hide frames
    assert s.frames + s.lost_frames == pytest.approx(model.stats.frames_sent + truth, abs=2)


async def test_index_wrap_at_65535_is_seamless(fake_bluez):
    model = OmiModel(codec=20, start_index=65_500)
    link, _sink, _end, _written = await stream(fake_bluez, model, until_frames=120)
    s = link.stats
    assert model.next_index < 1000  # it wrapped while we listened
    assert s.lost_frames == 0 and s.malformed == 0 and s.frames == model.stats.frames_sent


async def test_unknown_codec_is_a_clear_error_not_garbage_audio(fake_bluez):
    model = OmiModel(codec=0x42)
    await fake_bluez.add_device(model)
    with pytest.raises(UnknownCodecError) as err:
        await async_listen(DeviceConfig("omi", model.address), Config(link=FAST), 2.0)
    text = str(err.value)
    assert "codec 66 (0x42)" in text and model.address in text and "21" in err.value.hint


async def test_out_of_range_then_back_reconnects_quickly(fake_bluez):
    model = OmiModel(out_of_range=[(1.0, 3.0)], after_clip="loop")
    link, _sink, end, written = await stream(fake_bluez, model, until_frames=250)
    assert link.stats.reconnects == 1
    back = fake_bluez.device(model.address)
    assert back.connects == 2
    # Back in range at 3.0 s: audio again within ~2 s (frames offline = the outage only).
    offline_s = model.stats.frames_offline * model.frame_seconds
    assert offline_s < 2.0 + 2.0 + 1.0  # outage + reconnect budget + initial connect
    assert abs(written - (end - link.timeline.anchor) * SAMPLE_RATE) <= model.frame_samples + LATENCY


async def test_a_pendant_that_pauses_on_silence_keeps_the_timeline_on_wall_clock(fake_bluez):
    # Newer firmware stops notifying during silence but stays connected (omi-device.md §5.2): the
    # timeline must still meet wall clock (conversation times, gap timers) without a reconnect.
    pause = (2.0, 6.0)
    model = OmiModel(after_clip="loop", pause_notifications=(pause,))
    link, _sink, end, written = await stream(fake_bluez, model, until_frames=400)  # 8 s
    tl = link.timeline
    assert link.stats.reconnects == 0 and model.stats.frames_paused == 200
    assert abs(written - (end - tl.anchor) * SAMPLE_RATE) <= model.frame_samples + LATENCY
    # The pause became silence of its length, once: filled while quiet, met by the resumed audio.
    assert abs(tl.silence_samples - (pause[1] - pause[0]) * SAMPLE_RATE) <= model.frame_samples + LATENCY


@pytest.mark.parametrize("refused", [None, "org.bluez.Error.NotSupported", "org.bluez.Error.Failed"])
async def test_audio_arrives_by_acquire_notify_or_falls_back_to_start_notify(fake_bluez, refused):
    model = OmiModel(after_clip="loop")
    await fake_bluez.add_device(model)
    dev = fake_bluez.device(model.address)
    if refused:
        dev.acquire_notify_error = (refused, "refused")
    sink = TimelineSink()
    link = DeviceLink(DeviceConfig("omi", model.address), FAST, sink)
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    await sink.wait_samples(100 * model.frame_samples, TIMEOUT)
    audio = dev.chars[AUDIO_DATA_UUID].notify
    # The cheap path (one socket, read in batches) unless BlueZ refuses it; audio flows either way.
    assert (audio.sock is not None, bool(audio.clients)) == ((False, True) if refused else (True, False))
    leaked = []  # notification sockets still open in this process (ours or the fake's) when down
    for _ in range(2):
        dev.drop_link()
        await asyncio.wait_for(link.supervisor.disconnected_event.wait(), TIMEOUT)
        leaked.append(seqpacket_sockets())
        await asyncio.wait_for(link.supervisor.connected_event.wait(), TIMEOUT)
    stop.set()  # and our own disconnect
    await asyncio.wait_for(task, TIMEOUT)
    leaked.append(seqpacket_sockets())
    assert link.stats.lost_frames == 0 and link.stats.reconnects == 2
    assert leaked == [0, 0, 0]


async def test_watchdog_remakes_a_link_that_went_quiet(fake_bluez):
    # The microphone stops after 1 s of audio; the link stays up but silent.
    clip = np.zeros(SAMPLE_RATE, dtype=np.int16)
    model = OmiModel(audio=clip, after_clip="stop")
    opts = LinkOptions(reconnect_min_seconds=0.1, reconnect_max_seconds=1.0, watchdog_seconds=1.0)
    await fake_bluez.add_device(model)
    link = DeviceLink(DeviceConfig("omi", model.address), opts, WavSink())
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    dev = fake_bluez.device(model.address)
    await fake_bluez.wait_until(lambda: dev.connects >= 2, TIMEOUT)
    await asyncio.wait_for(link.supervisor.connected_event.wait(), TIMEOUT)
    stop.set()
    await asyncio.wait_for(task, TIMEOUT)
    assert link.stats.reconnects >= 1


_CHILD = """
import asyncio, sys
from bridge.config import DeviceConfig, LinkOptions
from bridge.devices.link import DeviceLink
from bridge.cli.listen import WavSink
link = DeviceLink(DeviceConfig("omi", sys.argv[1]), LinkOptions(), WavSink())
asyncio.run(link.run(asyncio.Event()))
"""


async def test_restarted_bridge_reattaches_to_the_link_bluez_kept(fake_bluez, private_bus):
    model = OmiModel(after_clip="loop")
    await fake_bluez.add_device(model)
    dev = fake_bluez.device(model.address)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, model.address, env=private_bus.env(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await fake_bluez.wait_until(lambda: dev.is_notifying(AUDIO_DATA_UUID), TIMEOUT)
    finally:
        os.kill(child.pid, signal.SIGKILL)  # a crash: no clean disconnect
        await child.wait()
    # BlueZ keeps the link (and drops the dead client's subscription); the device stops advertising.
    await fake_bluez.wait_until(lambda: not dev.is_notifying(AUDIO_DATA_UUID), TIMEOUT)
    assert dev.connected and dev.connects == 1
    link = await link_until_first_audio(model)
    assert dev.connects == 1  # no new Connect: we re-attached to the existing link
    assert link.stats.frames > 0 and link.stats.codec == 21


@pytest.mark.parametrize("codec", [0, 1, 10, 11])
async def test_pcm_and_mulaw_pendants_stream_at_16_khz(fake_bluez, codec):
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    tone = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    model = OmiModel(codec=codec, loss=0.05, seed=2, audio=tone)
    link, sink, _end, _written = await stream(fake_bluez, model, until_frames=60)
    s = link.stats
    assert s.codec == codec and s.frames == model.stats.frames_sent
    # PCM16 at 16 kHz (320-byte frames) is fragmented at MTU 247: lost frames are estimated.
    assert abs(s.lost_frames - detectable_losses(model)) <= (2 if codec == 0 else 0)
    assert link.timeline.samples_written == (s.frames + s.lost_frames) * model.frame_samples
    assert np.abs(sink.pcm()).max() > 4000  # the tone came through at its level


async def test_bluez_connect_errors_are_retried_until_the_link_is_up(fake_bluez):
    model = OmiModel()
    await fake_bluez.add_device(model)
    dev = fake_bluez.device(model.address)
    dev.connect_errors = [("org.bluez.Error.Failed", "le-connection-abort-by-local"),
                          ("org.bluez.Error.InProgress", "Operation already in progress"),
                          ("org.bluez.Error.Failed", "Software caused connection abort")]
    link = await link_until_first_audio(model)
    assert dev.connect_errors == [] and link.stats.frames > 0


async def test_scan_with_the_adapter_off_says_how_to_turn_it_on(fake_bluez):
    from bridge.core.errors import BridgeError
    from bridge.link.scan import bluetooth_errors

    fake_bluez.set_powered(False)
    with pytest.raises(BridgeError) as err, bluetooth_errors("hci0"):
        await async_scan(Config(), timeout=0.5)
    assert "powered off" in str(err.value) and "bluetoothctl power on" in err.value.hint


def test_backoff_doubles_with_jitter_and_stops_at_the_cap():
    from bridge.link.failures import TRANSIENT, backoff_seconds

    opts = LinkOptions(reconnect_min_seconds=0.25, reconnect_max_seconds=30.0)
    top = [backoff_seconds(n, opts, TRANSIENT, rand=lambda: 1.0) for n in range(1, 10)]
    assert top == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff_seconds(3, opts, TRANSIENT, rand=lambda: 0.0) == 0.5  # jitter halves at most


def test_bluez_errors_map_to_the_advice_a_user_needs():
    from bleak.exc import (
        BleakBluetoothNotAvailableError,
        BleakCharacteristicNotFoundError,
        BleakDBusError,
        BleakError,
    )

    from bridge.link.failures import (
        ADAPTER_OFF,
        AUTH,
        BUSY,
        DEVICE_MISSING,
        DEVICE_PROBLEM,
        WRONG_DEVICE,
        classify,
    )

    assert classify(BleakError("device 'dev_C0_FF' not found")) is DEVICE_MISSING  # stale BLEDevice
    assert classify(BleakDBusError("org.bluez.Error.InProgress", [])) is BUSY
    assert classify(BleakDBusError("org.bluez.Error.AuthenticationFailed", [])) is AUTH
    assert classify(BleakBluetoothNotAvailableError("off", None)) is ADAPTER_OFF
    assert classify(UnknownCodecError("codec 66", "")) is DEVICE_PROBLEM
    assert classify(BleakCharacteristicNotFoundError("7a230003")) is WRONG_DEVICE  # not "missing"
    assert "phone" in DEVICE_MISSING.advice and "bluetoothctl power on" in ADAPTER_OFF.advice


async def test_battery_firmware_clock_and_button_reach_the_bridge(fake_bluez):
    model = OmiModel()
    await fake_bluez.add_device(model)
    pressed: asyncio.Queue[int] = asyncio.Queue()
    link = DeviceLink(DeviceConfig("omi", model.address), FAST, WavSink(),
                      extra={"on_button": pressed.put_nowait})
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    await asyncio.wait_for(link.supervisor.connected_event.wait(), TIMEOUT)
    assert (link.stats.battery, link.stats.firmware) == (87, "3.0.9")
    assert len(model.time_writes) == 1 and abs(model.time_writes[0] - time.time()) < 5
    await model.set_battery(42)
    await model.press(2)  # notifications arrive in order: the battery level is in before the tap
    assert await asyncio.wait_for(pressed.get(), TIMEOUT) == 2
    assert link.stats.battery == 42
    stop.set()
    await asyncio.wait_for(task, TIMEOUT)


async def test_a_link_below_mtu_100_is_reported(fake_bluez, caplog):
    model = OmiModel(mtu=90)
    await fake_bluez.add_device(model)
    link = DeviceLink(DeviceConfig("omi", model.address), FAST, WavSink())
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    await asyncio.wait_for(link.supervisor.connected_event.wait(), TIMEOUT)
    stop.set()
    await asyncio.wait_for(task, TIMEOUT)
    assert "ATT MTU is 90; Omi sends no audio below 100" in caplog.text


async def test_pendant_forgotten_by_bluez_while_away_is_found_again(fake_bluez):
    # BlueZ forgets an unpaired device soon after it stops advertising; an old BLEDevice would
    # then fail with a plain "not found" (bluez-for-tests.md §9.2). Every attempt looks it up anew.
    fake_bluez.temporary_timeout = 0.3
    model = OmiModel(out_of_range=[(0.5, 2.0)], after_clip="loop")
    await fake_bluez.add_device(model)
    dev = fake_bluez.device(model.address)
    link = DeviceLink(DeviceConfig("omi", model.address), FAST, WavSink())
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    await fake_bluez.wait_until(lambda: not dev.in_range, TIMEOUT)
    await fake_bluez.wait_until(lambda: not dev.present, TIMEOUT)  # forgotten by BlueZ
    await fake_bluez.wait_until(lambda: dev.connects >= 2, TIMEOUT)
    await asyncio.wait_for(link.supervisor.connected_event.wait(), TIMEOUT)
    stop.set()
    await asyncio.wait_for(task, TIMEOUT)
    assert link.stats.reconnects == 1
