"""Frame glasses end to end: real bleak → our fake bluetoothd → a Frame model that runs the Lua
the bridge uploads in a real Lua 5.4 VM, through the same supervisor the daemon uses."""

from __future__ import annotations

import asyncio
import time
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from omi_bridge_sim.frame import BOOT_CHUNK, FrameModel, load_wav_16k

from bridge.cli.listen import async_listen
from bridge.config import Config, DeviceConfig, FrameOptions, LinkOptions
from bridge.core.errors import BridgeError
from bridge.devices.frame import session as frame_session
from bridge.devices.frame.session import APP_MODULE, CMD_STOP, MSG_AUDIO, async_bond, is_lua_error
from bridge.devices.link import DeviceLink

pytest.importorskip("lupa")

ADDRESS = "4F:A1:B2:C3:D4:E5"
TIMEOUT = 20.0
"""Upper bound for any wait below (connect + app upload take ~1 s on an idle machine)."""
PACKET = 240
"""PCM bytes per packet at MTU 247 (max_length 243 − 3-byte header, capped at 240): 240 samples
of the 16 kHz timeline at 16 kHz / 8-bit and at 8 kHz / 16-bit (120 samples, resampled ×2)."""
POP = 3200
"""Samples muted at the start of each recording (0.2 s)."""
FAST_LINK = LinkOptions(scan_timeout_seconds=5.0, reconnect_min_seconds=0.1, reconnect_max_seconds=1.0)


class Sink:
    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.samples = 0

    def write(self, pcm: np.ndarray, /) -> None:
        self.parts.append(np.array(pcm, dtype=np.int16))
        self.samples += len(pcm)

    def pcm(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, np.int16)


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def fixture_wav(tmp_path: Path, demo_audio: np.ndarray) -> np.ndarray:
    """The mic's source comes from a WAV file, as a user's fixture would."""
    path = tmp_path / "speech.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(demo_audio[: 16_000 * 8].astype("<i2").tobytes())
    return load_wav_16k(path)


async def start_link(fake_bluez, model: FrameModel, *, paired: bool = True,
                     options: FrameOptions | None = None, raise_errors: bool = False):
    await fake_bluez.add_device(model, paired=paired)
    sink = Sink()
    link = DeviceLink(DeviceConfig(kind="frame", address=ADDRESS, name="glasses"), FAST_LINK, sink,
                      extra={"frame": options or FrameOptions()}, raise_errors=raise_errors)
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    return link, sink, stop, task


async def finish(stop: asyncio.Event, task: asyncio.Task) -> None:
    stop.set()
    await asyncio.wait_for(task, TIMEOUT)


BOOT_ERROR = f'[string "{BOOT_CHUNK.decode()}"]:1: cannot open file: main.lua'
"""What the firmware prints after a reset when there is no main.lua: its own, not ours."""


def lua_errors(model: FrameModel) -> list[str]:
    """Lua errors the glasses printed, other than the firmware's own boot message."""
    return [t for t in model.printed if is_lua_error(t) and t != BOOT_ERROR]


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n].astype(float), b[:n].astype(float))[0, 1])


@pytest.mark.parametrize(("rate", "bits", "min_corr"), [
    (8_000, 16, 0.9),   # the default: narrowband (no anti-aliasing on the glasses) but full depth
    (16_000, 8, 0.98),  # what the Omi app streams: full band, high byte only
])
async def test_uploaded_app_streams_the_glasses_audio_into_the_timeline(fake_bluez, fixture_wav, rate,
                                                                         bits, min_corr):
    model = FrameModel(address=ADDRESS, source=fixture_wav)
    options = FrameOptions(sample_rate=rate, bit_depth=bits)
    link, sink, stop, task = await start_link(fake_bluez, model, paired=False, options=options)
    await wait_for(lambda: sink.samples >= 3 * 16_000, "3 s of audio")
    await finish(stop, task)

    out = sink.pcm()
    stats = link.stats
    # An unbonded Frame got bonded on the way (frame.md §11), and the app was uploaded once.
    assert fake_bluez.device(ADDRESS).paired
    assert model.file_writes == {f"{APP_MODULE}.lua": 1}
    assert model.writes_overwritten == 0  # every chunk waited for Frame's reply
    assert stats.firmware == model.firmware
    assert stats.battery == 87
    # The timeline is exactly the packets the glasses sent (240 bytes = 240 samples at 16 kHz in
    # both formats), nothing lost on a clean link; the resampler adds at most a sample.
    assert stats.lost_frames == 0 and stats.malformed == 0
    assert abs(len(out) - stats.packets * PACKET) <= 2
    # It is the glasses' audio: the source in the chosen format, minus the muted start pop.
    assert not out[:POP].any()
    assert correlation(out[POP:], fixture_wav[POP:len(out)]) > min_corr
    # The app keeps up with the microphone: its 2 s FIFO never wrapped.
    assert model.mic_overruns == 0
    # The app paused the mic when we said goodbye (CMD_STOP).
    await wait_for(lambda: not model.mic_running, "the mic to stop")
    # Everything the bridge ran fits the firmware's Lua (no package, io or os there).
    assert lua_errors(model) == []


async def test_desktop_lua_in_a_set_up_chunk_fails_that_step_with_the_glasses_error(
        fake_bluez, fixture_wav, monkeypatch):
    # The close chunk as it once was: fine on a desktop Lua, an error on the glasses.
    upload = frame_session.FrameSession._upload

    async def upload_with_desktop_close(self, source):
        await upload(self, source)
        await self._lua(f'package.loaded["{APP_MODULE}"]=nil print("omib:c")',
                        step="closing the app file", reply=lambda t: t == "omib:c")

    monkeypatch.setattr(frame_session.FrameSession, "_upload", upload_with_desktop_close)
    model = FrameModel(address=ADDRESS, source=fixture_wav)
    _link, sink, _stop, task = await start_link(fake_bluez, model, raise_errors=True)
    with pytest.raises(BridgeError) as failed:
        await asyncio.wait_for(task, TIMEOUT)
    message = str(failed.value)
    assert "closing the app file failed on the glasses" in message
    assert "attempt to index a nil value (global 'package')" in message
    assert "firmware" in failed.value.hint
    assert sink.samples == 0


async def test_lost_packets_are_counted_and_become_silence_of_their_length(fake_bluez, fixture_wav):
    model = FrameModel(address=ADDRESS, source=fixture_wav, loss_rate=0.05, seed=7)
    # 16 kHz / 8-bit: no resampler, so every lost packet's exact span can be checked.
    options = FrameOptions(sample_rate=16_000, bit_depth=8)
    link, sink, stop, task = await start_link(fake_bluez, model, options=options)
    await wait_for(lambda: sink.samples >= 3 * 16_000 and link.stats.lost_frames >= 3, "lossy audio")
    await finish(stop, task)

    out = sink.pcm()
    stats = link.stats
    heard = stats.packets + stats.lost_frames  # packets up to the last one received
    lost_seqs = [h[1] | h[2] << 8 for h in model.lost_heads if h[0] == MSG_AUDIO]
    expected = sorted(s for s in lost_seqs if s < heard)
    assert stats.lost_frames == len(expected) > 0
    assert len(out) == heard * PACKET
    for seq in expected:
        assert not out[seq * PACKET:(seq + 1) * PACKET].any()
    kept = np.ones(len(out), bool)
    kept[:POP] = False
    for seq in expected:
        kept[seq * PACKET:(seq + 1) * PACKET] = False
    assert correlation(out[kept], fixture_wav[: len(out)][kept]) > 0.98


async def test_dropped_link_recovers_and_reuses_the_stored_app(fake_bluez, fixture_wav):
    model = FrameModel(address=ADDRESS, source=fixture_wav)
    link, sink, stop, task = await start_link(fake_bluez, model)
    await wait_for(lambda: sink.samples >= 16_000, "first audio")
    runs_before = model.chunks_run

    fake_bluez.device(ADDRESS).drop_link()
    await wait_for(lambda: link.stats.reconnects >= 1 and link.stats.connected, "reconnect")
    after = sink.samples
    await wait_for(lambda: sink.samples >= after + 16_000, "audio after the reconnect")
    await finish(stop, task)

    # The app was uploaded once: the reconnect found its hash on the glasses and just ran it.
    assert model.file_writes == {f"{APP_MODULE}.lua": 1}
    assert model.chunks_run > runs_before
    # Outage silence keeps the timeline on wall-clock time across the drop.
    assert link.timeline.silence_samples > 0
    assert link.stats.lost_frames == 0


async def test_app_pauses_the_mic_when_heartbeats_stop(fake_bluez, fixture_wav):
    model = FrameModel(address=ADDRESS, source=fixture_wav)
    options = FrameOptions(heartbeat_seconds=0.3)
    _link, sink, stop, task = await start_link(fake_bluez, model, options=options)
    await wait_for(lambda: sink.samples > 0, "first audio")
    # The bridge vanishes without a goodbye: the glasses go out of our reach.
    fake_bluez.device(ADDRESS).set_in_range(False)
    await wait_for(lambda: not model.mic_running, "the mic to pause without heartbeats")
    await finish(stop, task)
    assert not model.mic_running, "the glasses kept recording with nobody listening"


async def test_frame_bonded_elsewhere_says_exactly_what_to_do(fake_bluez):
    model = FrameModel(address=ADDRESS, bonded_elsewhere=True)
    _link, _sink, stop, task = await start_link(fake_bluez, model, paired=False, raise_errors=True)
    with pytest.raises(BridgeError) as err:
        await asyncio.wait_for(task, TIMEOUT)
    text = str(err.value)
    assert "cradle" in text
    assert f"bluetoothctl remove {ADDRESS}" in text
    assert f"omi-bridge pair {ADDRESS} --kind frame" in text
    stop.set()


async def test_pair_command_bonds_a_fresh_frame_once(fake_bluez):
    await fake_bluez.add_device(FrameModel(address=ADDRESS))
    await async_bond(ADDRESS, Config(link=FAST_LINK))
    assert fake_bluez.device(ADDRESS).paired


async def test_pair_command_explains_a_frame_bonded_to_a_phone(fake_bluez):
    await fake_bluez.add_device(FrameModel(address=ADDRESS, bonded_elsewhere=True))
    with pytest.raises(BridgeError) as err:
        await async_bond(ADDRESS, Config(link=FAST_LINK))
    assert f"bluetoothctl remove {ADDRESS}" in str(err.value)
    assert not fake_bluez.device(ADDRESS).paired


async def test_listen_records_frame_glasses_to_a_wav(fake_bluez, fixture_wav, tmp_path):
    await fake_bluez.add_device(FrameModel(address=ADDRESS, source=fixture_wav), paired=True)
    wav_path = tmp_path / "frame.wav"
    device = DeviceConfig(kind="frame", address=ADDRESS)
    result = await async_listen(device, Config(link=FAST_LINK), 2.0, wav_path)
    assert result["kind"] == "frame"
    assert result["seconds"] == 2.0
    assert result["packets"] > 0 and result["lost_frames"] == 0
    assert result["firmware"] and result["battery"] == 87
    with wave.open(str(wav_path), "rb") as w:
        assert (w.getframerate(), w.getnframes()) == (16_000, 32_000)


async def test_a_stale_app_on_the_glasses_is_replaced(fake_bluez, fixture_wav):
    model = FrameModel(address=ADDRESS, source=fixture_wav)
    model.files[f"{APP_MODULE}.lua"] = b'return { APP_HASH = "an-older-version" }'
    _link, sink, stop, task = await start_link(fake_bluez, model)
    await wait_for(lambda: sink.samples > 16_000, "audio")
    await finish(stop, task)
    assert model.file_writes == {f"{APP_MODULE}.lua": 1}
    assert b"an-older-version" not in model.files[f"{APP_MODULE}.lua"]


async def test_another_apps_main_lua_is_stopped_and_kept(fake_bluez, fixture_wav):
    model = FrameModel(address=ADDRESS, source=fixture_wav)
    # Like the Omi phone app's main.lua: an endless loop that starts on every VM reset.
    model.files["main.lua"] = b"while true do frame.sleep(0.01) end"
    link, sink, stop, task = await start_link(fake_bluez, model)
    await wait_for(lambda: sink.samples > 16_000, "audio")
    await finish(stop, task)
    assert "main.lua" in model.files  # we only add our own file
    assert link.stats.lost_frames == 0


async def test_if_the_app_on_the_glasses_dies_the_bridge_restarts_it(fake_bluez, fixture_wav, caplog):
    model = FrameModel(address=ADDRESS, source=fixture_wav)
    await fake_bluez.add_device(model, paired=True)
    sink = Sink()
    # A short watchdog too, so the restart happens even if Frame's error print were dropped.
    options = LinkOptions(scan_timeout_seconds=5.0, reconnect_min_seconds=0.1,
                          reconnect_max_seconds=1.0, watchdog_seconds=3.0)
    link = DeviceLink(DeviceConfig(kind="frame", address=ADDRESS), options, sink,
                      extra={"frame": FrameOptions()})
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    await wait_for(lambda: sink.samples > 8_000, "audio")
    model.on_write("7a230002-5475-a6a4-654c-8431f6ad49c4", b"\x03", True)  # someone breaks our app
    await wait_for(lambda: link.stats.reconnects >= 1 and link.stats.connected, "a restart")
    after = sink.samples
    await wait_for(lambda: sink.samples > after + 8_000, "audio again")
    await finish(stop, task)
    assert link.stats.reconnects >= 1 and sink.samples > after + 8_000
    # The bridge ended that connection itself: it says why, and never calls it a lost link.
    messages = [r.getMessage() for r in caplog.records]
    assert any("the Frame app stopped" in m and "break signal" in m for m in messages)
    assert not any("link lost" in m for m in messages)


async def test_a_mic_pause_while_connected_becomes_silence_not_lost_time(fake_bluez, fixture_wav):
    model = FrameModel(address=ADDRESS, source=fixture_wav)
    link, sink, stop, task = await start_link(fake_bluez, model)
    await wait_for(lambda: sink.samples >= 16_000, "first audio")
    # The app pauses as when our heartbeats stall (CMD_STOP), and resumes on the next heartbeat.
    model.on_write("7a230002-5475-a6a4-654c-8431f6ad49c4", CMD_STOP, True)
    await wait_for(lambda: not model.mic_running, "the pause")
    await wait_for(lambda: model.mic_running, "the resume")
    resumed_at = sink.samples
    await wait_for(lambda: sink.samples > resumed_at + 16_000, "audio after the resume")
    await finish(stop, task)
    assert link.timeline.silence_samples > 0
    assert link.stats.reconnects == 0 and link.stats.lost_frames == 0
