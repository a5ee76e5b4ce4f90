"""Real bleak 3.1 against our fake bluetoothd and simulated Omi: the test bed every BLE test
relies on must behave like BlueZ + the pendant (bluez-for-tests.md, omi-device.md)."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import struct
import subprocess
import sys
import textwrap

import numpy as np
import opuslib
import pytest
from bleak import BleakAdapter, BleakClient, BleakScanner
from bleak.exc import BleakError, BleakGATTProtocolError
from omi_bridge_sim.bluez import FakeBluez
from omi_bridge_sim.model import CharacteristicSpec, DeviceModel, ServiceSpec
from omi_bridge_sim.omi import (
    AUDIO_DATA_UUID,
    AUDIO_SERVICE_UUID,
    CODEC_TYPE_UUID,
    DIS_FIRMWARE_UUID,
    TIME_SYNC_WRITE_UUID,
    OmiModel,
)

WAIT_S = 5.0
"""Upper bound for any awaited event; the events themselves take milliseconds."""
OMI = "C0:FF:EE:00:00:01"


class Collector:
    """Notifications as they arrive, with a way to wait for the n-th."""

    def __init__(self) -> None:
        self.packets: list[bytes] = []
        self._cond = asyncio.Condition()

    def __call__(self, _char: object, data: bytearray) -> None:
        self.packets.append(bytes(data))
        asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def wait_for(self, n: int, timeout: float = WAIT_S) -> list[bytes]:
        async with self._cond:
            await asyncio.wait_for(self._cond.wait_for(lambda: len(self.packets) >= n), timeout)
        return self.packets[:n]


def indices(packets: list[bytes]) -> list[int]:
    return [struct.unpack_from("<H", p)[0] for p in packets]


async def find_omi(timeout: float = WAIT_S):  # type: ignore[no-untyped-def]
    device = await BleakScanner.find_device_by_filter(
        lambda _d, _a: True, timeout=timeout, service_uuids=[AUDIO_SERVICE_UUID])
    assert device is not None, "the simulated Omi was not found by its service UUID"
    return device


def best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 200) -> float:
    """Largest normalised correlation of ``a`` against ``b`` shifted by 0..max_lag samples
    (Opus adds a few ms of algorithmic delay)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    best = 0.0
    for lag in range(max_lag):
        x, y = a[lag:], b[:len(a) - lag]
        n = min(len(x), len(y))
        x, y = x[:n], y[:n]
        den = np.sqrt((x * x).sum() * (y * y).sum())
        if den:
            best = max(best, float((x * y).sum() / den))
    return best


async def test_scan_finds_omi_by_service_uuid_and_not_other_devices(fake_bluez: FakeBluez) -> None:
    await fake_bluez.add_device(OmiModel(address=OMI, name="Renamed pendant"))
    other = DeviceModel("11:22:33:44:55:66", "Thermometer", ["181a"],
                        [ServiceSpec("181a", (CharacteristicSpec("2a6e", ("read",), b"\x00\x00"),))])
    await fake_bluez.add_device(other)
    found = await BleakScanner.discover(timeout=0.5, service_uuids=[AUDIO_SERVICE_UUID])
    assert [d.address for d in found] == [OMI]
    assert found[0].name == "Renamed pendant"


async def test_stream_is_firmware_framed_opus_of_the_source_audio(
        fake_bluez: FakeBluez, demo_audio: np.ndarray) -> None:
    omi = OmiModel(address=OMI, audio=demo_audio, start_index=65530)
    await fake_bluez.add_device(omi)
    got = Collector()
    async with BleakClient(await find_omi()) as client:
        assert (await client.read_gatt_char(CODEC_TYPE_UUID))[0] == 21
        assert bytes(await client.read_gatt_char(DIS_FIRMWARE_UUID)) == b"3.0.9"
        assert bytes(await client.read_gatt_char(AUDIO_DATA_UUID)) == b""
        await client.start_notify(AUDIO_DATA_UUID, got)
        packets = await got.wait_for(40)
    idx = indices(packets)
    # One index per notification, wrapping 65535 → 0; at MTU 247 each frame is one notification.
    assert idx[:8] == [65530, 65531, 65532, 65533, 65534, 65535, 0, 1]
    assert all(b - a == 1 for a, b in itertools.pairwise(idx) if a != 65535)
    assert {p[2] for p in packets} == {0}
    decoder = opuslib.Decoder(16_000, 1)
    pcm = np.concatenate([np.frombuffer(decoder.decode(p[3:], 320), np.int16) for p in packets])
    assert len(pcm) == 40 * 320
    first_frame = next(n for n, _t, i, _s in omi.frame_log if i == 65530)
    source = np.concatenate([omi.frame_audio(first_frame + k) for k in range(40)])
    assert best_correlation(pcm, source) > 0.6


async def test_small_mtu_fragments_frames_into_subindexed_notifications(fake_bluez: FakeBluez) -> None:
    omi = OmiModel(address=OMI, codec=20, mtu=23, min_mtu=23)
    await fake_bluez.add_device(omi)
    got = Collector()
    async with BleakClient(await find_omi()) as client:
        await client.start_notify(AUDIO_DATA_UUID, got)
        packets = await got.wait_for(60)
    assert max(len(p) for p in packets) <= 23 - 3
    # Reassemble: a frame starts at sub 0 and continues with sub + 1 on index + 1.
    frames: list[bytes] = []
    start = next(i for i, p in enumerate(packets) if p[2] == 0)
    for p in packets[start:]:
        if p[2] == 0:
            frames.append(p[3:])
        else:
            frames[-1] += p[3:]
    assert max(p[2] for p in packets) >= 1
    decoder = opuslib.Decoder(16_000, 1)
    for frame in frames[:-1]:
        assert len(np.frombuffer(decoder.decode(frame, 160), np.int16)) == 160


async def test_acquire_notify_path_delivers_the_same_stream(fake_bluez: FakeBluez) -> None:
    await fake_bluez.add_device(OmiModel(address=OMI))
    got = Collector()
    async with BleakClient(await find_omi()) as client:
        await client.start_notify(AUDIO_DATA_UUID, got, bluez={"use_start_notify": False})
        packets = await got.wait_for(10)
        # bleak's private MTU probe uses AcquireNotify/AcquireWrite too (bluez-for-tests.md §7).
        await client.stop_notify(AUDIO_DATA_UUID)
        await client._backend._acquire_mtu()  # type: ignore[attr-defined]
        assert client.mtu_size == 247
    idx = indices(packets)
    assert idx == list(range(idx[0], idx[0] + 10))


async def test_link_loss_fires_disconnected_callback_and_device_advertises_again(
        fake_bluez: FakeBluez) -> None:
    omi = OmiModel(address=OMI)
    dev = await fake_bluez.add_device(omi)
    lost = asyncio.Event()
    client = BleakClient(await find_omi(), disconnected_callback=lambda _c: lost.set())
    await client.connect()
    dev.drop_link()
    await asyncio.wait_for(lost.wait(), WAIT_S)
    assert not client.is_connected
    # Reconnect by address (re-scans): the pendant advertises again after the link loss.
    async with BleakClient(OMI, timeout=WAIT_S) as again:
        assert again.is_connected
    assert dev.link_losses == 1 and dev.connects == 2


async def test_index_continues_across_reconnect_with_a_jump(fake_bluez: FakeBluez) -> None:
    omi = OmiModel(address=OMI)
    await fake_bluez.add_device(omi)
    device = await find_omi()
    first, second = Collector(), Collector()
    async with BleakClient(device) as client:
        await client.start_notify(AUDIO_DATA_UUID, first)
        await first.wait_for(5)
    async with BleakClient(OMI, timeout=WAIT_S) as client:
        await client.start_notify(AUDIO_DATA_UUID, second)
        await second.wait_for(5)
    last_before = indices(first.packets)[-1]
    first_after = indices(second.packets)[0]
    assert first_after > last_before  # never reset on reconnect (omi-device.md §5.1)
    assert omi.stats.frames_offline + omi.stats.frames_unsubscribed > 0


async def test_loss_and_duplicates_show_up_as_index_gaps_and_repeats(fake_bluez: FakeBluez) -> None:
    omi = OmiModel(address=OMI, codec=20, loss=0.1, duplicate=0.05, seed=7)
    await fake_bluez.add_device(omi)
    got = Collector()
    async with BleakClient(await find_omi()) as client:
        await client.start_notify(AUDIO_DATA_UUID, got)
        await got.wait_for(150)
        await client.stop_notify(AUDIO_DATA_UUID)
    idx = indices(got.packets)
    repeats = sum(1 for a, b in itertools.pairwise(idx) if a == b)
    missing = sum(b - a - 1 for a, b in itertools.pairwise(idx) if b > a)
    assert repeats > 0 and missing > 0
    # Everything the model counted between the first and last received index is visible.
    sent = [(i, s) for _n, _t, i, s in omi.frame_log if i is not None and idx[0] <= i <= idx[-1]]
    assert missing == sum(1 for _i, s in sent if s == "lost")


async def test_time_sync_accepts_exactly_four_bytes(fake_bluez: FakeBluez) -> None:
    omi = OmiModel(address=OMI)
    await fake_bluez.add_device(omi)
    async with BleakClient(await find_omi()) as client:
        await client.write_gatt_char(TIME_SYNC_WRITE_UUID, struct.pack("<I", 1_700_000_000), response=True)
        with pytest.raises(BleakGATTProtocolError):
            await client.write_gatt_char(TIME_SYNC_WRITE_UUID, b"\x01\x02\x03", response=True)
    assert omi.time_writes == [1_700_000_000]


async def test_encrypted_device_needs_pairing_and_pair_can_fail(fake_bluez: FakeBluez) -> None:
    dev = await fake_bluez.add_device(OmiModel(address=OMI))
    dev.requires_bond = True
    dev.pair_error = ("org.bluez.Error.AuthenticationFailed", "Authentication Failed")
    device = await find_omi()
    async with BleakClient(device) as client:
        with pytest.raises(BleakError):
            await client.read_gatt_char(CODEC_TYPE_UUID)
        with pytest.raises(BleakError, match="AuthenticationFailed"):
            await client.pair()
    dev.pair_error = None
    async with BleakClient(device, pair=True) as client:
        assert (await client.read_gatt_char(CODEC_TYPE_UUID))[0] == 21
    assert dev.paired and dev.trusted


async def test_out_of_range_connect_hangs_until_the_caller_times_out(fake_bluez: FakeBluez) -> None:
    dev = await fake_bluez.add_device(OmiModel(address=OMI))
    device = await find_omi()
    dev.set_in_range(False)
    with pytest.raises(asyncio.TimeoutError):
        await BleakClient(device, timeout=0.5).connect()
    assert not dev.connected
    dev.set_in_range(True)
    async with BleakClient(device, timeout=WAIT_S) as client:
        assert client.is_connected


async def test_forgotten_temporary_device_is_not_found_by_stale_handle(fake_bluez: FakeBluez) -> None:
    fake_bluez.temporary_timeout = 0.2
    dev = await fake_bluez.add_device(OmiModel(address=OMI))
    device = await find_omi()
    await fake_bluez.wait_until(lambda: not dev.present, WAIT_S)
    # bluez-for-tests.md §9.2: a plain BleakError, not BleakDeviceNotFoundError.
    with pytest.raises(BleakError, match="not found"):
        await BleakClient(device, timeout=1.0).connect()


_HOLDER = textwrap.dedent("""
    import asyncio, sys
    from bleak import BleakClient
    async def main():
        client = BleakClient(sys.argv[1], timeout=5.0)
        await client.connect()
        print("connected", flush=True)
        await asyncio.sleep(60)
    asyncio.run(main())
""")


async def test_reattach_to_link_bluez_kept_after_client_process_died(
        fake_bluez: FakeBluez, private_bus) -> None:  # type: ignore[no-untyped-def]
    omi = OmiModel(address=OMI)
    dev = await fake_bluez.add_device(omi)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, OMI, env=private_bus.env(), stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20.0)
        assert line.strip() == b"connected"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    # BlueZ keeps the link and a connected pendant does not advertise (bluez-for-tests.md §9.1).
    assert dev.connected
    assert await BleakScanner.discover(timeout=0.3, service_uuids=[AUDIO_SERVICE_UUID]) == []
    adapter = await BleakAdapter.get()
    devices = await adapter.get_connected_devices([AUDIO_SERVICE_UUID])
    assert [d.address for d in devices] == [OMI]
    got = Collector()
    async with BleakClient(devices[0]) as client:
        await client.start_notify(AUDIO_DATA_UUID, got)
        await got.wait_for(3)
    assert dev.connects == 1  # bleak skipped Connect: it re-attached to the live link


async def test_simulator_process_announces_its_bus_and_obeys_control(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import json

    from omi_bridge_sim.control import SimControlClient

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "omi_bridge_sim", "--omi", OMI, "--codec", "20", stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 20.0))
        for key, value in ready["env"].items():
            monkeypatch.setenv(key, value)
        lost = asyncio.Event()
        async with BleakClient(OMI, timeout=WAIT_S, disconnected_callback=lambda _c: lost.set()) as client:
            assert (await client.read_gatt_char(CODEC_TYPE_UUID))[0] == 20
            async with SimControlClient(ready["bus"]) as sim:
                await sim.drop_link(OMI)
                await asyncio.wait_for(lost.wait(), WAIT_S)
                stats = await sim.stats(OMI)
                assert stats["link_losses"] == 1 and stats["model"]["codec"] == 20
                await sim.quit()
        assert await asyncio.wait_for(proc.wait(), WAIT_S) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_harness_runs_the_simulator_beside_synchronous_code(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from omi_bridge_sim.harness import SimHarness

    async def listen() -> list[bytes]:
        got = Collector()
        async with BleakClient(OMI, timeout=WAIT_S) as client:
            await client.start_notify(AUDIO_DATA_UUID, got)
            return await got.wait_for(5)

    with SimHarness([OmiModel(address=OMI)]) as sim:
        for key, value in sim.env().items():
            if key in ("DBUS_SYSTEM_BUS_ADDRESS", "PATH"):
                monkeypatch.setenv(key, value)
        packets = asyncio.run(listen())
        assert len(packets) == 5
        assert sim.stats(OMI)["model"]["notifications_sent"] >= 5


async def test_bleak_retries_le_connection_abort_by_local(fake_bluez: FakeBluez) -> None:
    from omi_bridge_sim.bluez import ERR_FAILED, LE_ABORT_BY_LOCAL

    dev = await fake_bluez.add_device(OmiModel(address=OMI))
    dev.connect_errors.append((ERR_FAILED, LE_ABORT_BY_LOCAL))
    async with BleakClient(await find_omi(), timeout=WAIT_S) as client:
        assert client.is_connected
    assert dev.connects == 1 and not dev.connect_errors


async def test_scripted_link_drop_and_out_of_range_period(fake_bluez: FakeBluez) -> None:
    omi = OmiModel(address=OMI, link_drop_at=(0.3,), out_of_range=((0.3, 0.6),))
    dev = await fake_bluez.add_device(omi)
    lost = asyncio.Event()
    client = BleakClient(await find_omi(), disconnected_callback=lambda _c: lost.set())
    await client.connect()
    await asyncio.wait_for(lost.wait(), WAIT_S)
    assert not dev.in_range
    await fake_bluez.wait_until(lambda: dev.in_range, WAIT_S)
    async with BleakClient(OMI, timeout=WAIT_S) as again:
        assert again.is_connected


async def test_discovery_sessions_are_per_client_and_end_with_the_client(
        fake_bluez: FakeBluez, private_bus) -> None:  # type: ignore[no-untyped-def]
    from dbus_fast import BusType, Message, MessageType
    from dbus_fast.aio import MessageBus

    def call(member: str) -> Message:
        return Message(destination="org.bluez", path="/org/bluez/hci0",
                       interface="org.bluez.Adapter1", member=member)

    a = await MessageBus(bus_address=private_bus.address, bus_type=BusType.SYSTEM).connect()
    b = await MessageBus(bus_address=private_bus.address, bus_type=BusType.SYSTEM).connect()
    try:
        no_session = await b.call(call("StopDiscovery"))
        assert no_session is not None and no_session.body == ["No discovery started"]
        assert (await a.call(call("StartDiscovery"))).message_type == MessageType.METHOD_RETURN  # type: ignore[union-attr]
        again = await a.call(call("StartDiscovery"))
        assert again is not None and again.error_name == "org.bluez.Error.InProgress"
        assert fake_bluez.discovering
        a.disconnect()
        await fake_bluez.wait_until(lambda: not fake_bluez.discovering, WAIT_S)
    finally:
        b.disconnect()


async def test_powered_off_adapter_is_reported_by_bleak(fake_bluez: FakeBluez) -> None:
    from bleak.exc import BleakBluetoothNotAvailableError

    fake_bluez.set_powered(False)
    with pytest.raises(BleakBluetoothNotAvailableError):
        await BleakScanner.discover(timeout=0.2)


@pytest.mark.parametrize("codec", [0, 1, 10, 11])
async def test_pcm_and_mulaw_codecs_carry_the_source_audio(
        fake_bluez: FakeBluez, demo_audio: np.ndarray, codec: int) -> None:
    from bridge.audio.codecs import make_decoder

    # Start inside speech: µ-law quantisation noise would dominate near-silence.
    omi = OmiModel(address=OMI, codec=codec, audio=demo_audio[48_000:], after_clip="loop")
    await fake_bluez.add_device(omi)
    got = Collector()
    async with BleakClient(await find_omi()) as client:
        assert (await client.read_gatt_char(CODEC_TYPE_UUID))[0] == codec
        await client.start_notify(AUDIO_DATA_UUID, got)
        packets = await got.wait_for(40)
    # Reassemble whole frames (PCM16 at 16 kHz is 320 bytes: two notifications at MTU 247).
    start = next(i for i, p in enumerate(packets) if p[2] == 0)
    frames: list[bytes] = []
    for p in packets[start:]:
        if p[2] == 0:
            frames.append(p[3:])
        else:
            frames[-1] += p[3:]
    frames = frames[:-1]
    decoder = make_decoder(codec)
    pcm = np.concatenate([decoder.decode(f) for f in frames] + [decoder.flush()])
    first = next(n for n, _t, i, _s in omi.frame_log if i == indices(packets)[start])
    source = np.concatenate([omi.frame_audio(first + k) for k in range(len(frames))])
    assert len(pcm) == len(source)
    assert best_correlation(pcm, source, max_lag=8) > 0.8


@pytest.mark.parametrize("value_on_read", [True, False])
async def test_read_while_subscribed_echoes_as_a_notification_like_bluez(
        fake_bluez: FakeBluez, value_on_read: bool) -> None:
    from omi_bridge_sim.omi import BATTERY_LEVEL_UUID

    fake_bluez.value_on_read = value_on_read
    omi = OmiModel(address=OMI, battery=64)
    await fake_bluez.add_device(omi)
    got = Collector()
    async with BleakClient(await find_omi()) as client:
        await client.start_notify(BATTERY_LEVEL_UUID, got)
        assert (await client.read_gatt_char(BATTERY_LEVEL_UUID))[0] == 64
        await omi.set_battery(63)  # a real notification, after the read
        packets = await got.wait_for(2 if value_on_read else 1)
    # bluez-for-tests.md §6.5: BlueZ signals Value after ReadValue too, so the callback sees it.
    assert packets == ([b"\x40", b"\x3f"] if value_on_read else [b"\x3f"])


def test_missing_dbus_daemon_is_a_clear_error_naming_the_package(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from omi_bridge_sim.bus import PrivateBus

    from bridge.core.errors import BridgeError

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BridgeError) as err, PrivateBus():
        pass
    assert "apt-get install dbus-daemon" in err.value.hint


async def test_acquire_write_reports_the_mtu_and_write_commands_reach_the_device(
    fake_bluez: FakeBluez,
) -> None:
    received: list[bytes] = []
    written = asyncio.Event()

    class Sink(DeviceModel):
        def on_write(self, char_uuid: str, data: bytes, with_response: bool) -> None:
            received.append(data)
            written.set()

    model = Sink("11:22:33:44:55:77", "Sink", ["aaaa"], [ServiceSpec("aaaa", (
        CharacteristicSpec("aaab", ("write-without-response",)),))], mtu=185)
    await fake_bluez.add_device(model)
    device = await BleakScanner.find_device_by_address(model.address, timeout=WAIT_S)
    assert device is not None
    async with BleakClient(device) as client:
        await client._backend._acquire_mtu()  # type: ignore[attr-defined]
        assert client.mtu_size == 185
        await client.write_gatt_char("aaab", b"hello", response=False)
        await asyncio.wait_for(written.wait(), WAIT_S)
    assert received == [b"hello"]
