"""The simulated Frame behaves like the firmware where our app depends on it (frame.md §3–§6).

These drive the model's Lua VM directly (no D-Bus): a small stand-in link collects what the
glasses notify. The end-to-end behaviour through real bleak is in test_frame_link.py.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from omi_bridge_sim.frame import FRAME_RX, FRAME_TX, FrameModel
from omi_bridge_sim.model import call_hook

from bridge.devices.frame.session import APP_MODULE, CMD_HEARTBEAT, MSG_AUDIO, MSG_ERROR, MSG_MIC, app_source

pytest.importorskip("lupa")

TIMEOUT = 5.0


class Link:
    """The host side of the link: always connected and subscribed, records notifications."""

    connected = True
    mtu = 247

    def __init__(self) -> None:
        self.got: asyncio.Queue[bytes] = asyncio.Queue()

    def is_notifying(self, char_uuid: str) -> bool:
        return char_uuid == FRAME_TX

    async def notify(self, char_uuid: str, data: bytes) -> bool:
        self.got.put_nowait(bytes(data))
        return True


@pytest.fixture
async def glasses():
    t = np.arange(16_000 * 3) / 16_000
    tone = (9000 * np.sin(2 * np.pi * 250 * t)).astype(np.int16)
    model = FrameModel(address="4F:00:00:00:00:01", source=tone)
    link = Link()
    model.attach(link)  # type: ignore[arg-type]
    await model.start()
    await call_hook(model.on_connect(link))  # type: ignore[arg-type]
    yield model, link
    await model.stop()


async def wait_until(predicate, timeout: float = TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def repl(model: FrameModel, link: Link, code: str) -> str:
    model.on_write(FRAME_RX, code.encode(), True)
    return (await asyncio.wait_for(link.got.get(), TIMEOUT)).decode()


async def test_repl_prints_text_without_prefix_and_errors_come_back_as_text(glasses):
    model, link = glasses
    assert await repl(model, link, "print(frame.bluetooth.max_length())") == "243"
    assert await repl(model, link, "print(frame.battery_level())") == "87.0"
    assert "boom" in await repl(model, link, 'error("boom")')


async def test_break_stops_a_running_script_and_the_repl_answers_again(glasses):
    model, link = glasses
    model.on_write(FRAME_RX, b"while true do end", True)
    await wait_until(lambda: model.running_script)
    model.on_write(FRAME_RX, b"\x03", True)
    assert "break signal" in (await asyncio.wait_for(link.got.get(), TIMEOUT)).decode()
    assert await repl(model, link, "print(1)") == "1"


async def test_a_pcall_retry_loop_cannot_swallow_break_if_it_rethrows(glasses):
    model, link = glasses
    code = ('while true do local ok, e = pcall(frame.sleep, 0.01) '
            'if not ok and string.find(e, "break signal") then error(e, 0) end end')
    model.on_write(FRAME_RX, code.encode(), True)
    await wait_until(lambda: model.running_script)
    model.on_write(FRAME_RX, b"\x03", True)
    assert (await asyncio.wait_for(link.got.get(), TIMEOUT)).decode() == "break signal"


async def test_microphone_rules(glasses):
    model, link = glasses
    assert "even" in await repl(model, link, "local ok, e = pcall(frame.microphone.read, 3) print(e)")
    assert "sample rate" in await repl(
        model, link, "local ok, e = pcall(frame.microphone.start, {sample_rate=44100}) print(e)")
    assert "already started" in await repl(
        model, link, "frame.microphone.start{sample_rate=16000, bit_depth=8} "
        "local ok, e = pcall(frame.microphone.start, {}) print(e)")
    # Reading while sampling gives bytes or ""; after stop, the FIFO drains and then read is nil.
    text = await repl(model, link, (
        "frame.sleep(0.05) local got = #frame.microphone.read(64) frame.microphone.stop() "
        "local n = 0 while frame.microphone.read(64) ~= nil do n = n + 1 end "
        "print(got .. ' ' .. tostring(frame.microphone.read(64)))"))
    assert text == "64 nil"


async def test_send_has_the_size_limit_and_one_notification_slot(glasses):
    model, link = glasses
    assert "too large" in await repl(
        model, link, "local ok, e = pcall(frame.bluetooth.send, string.rep('x', 244)) print(e)")
    # Two sends back to back: the first fills the single slot, the second is refused.
    first = await repl(model, link, "frame.bluetooth.send(string.rep('x', 243)) "
                       "local ok, e = pcall(frame.bluetooth.send, 'y') frame.sleep(0.05) print(e)")
    assert first == "\x01" + "x" * 243  # the firmware adds 0x01 to data
    assert "bluetooth is busy" in (await asyncio.wait_for(link.got.get(), TIMEOUT)).decode()


async def test_reset_restarts_the_vm_runs_main_lua_and_files_survive(glasses):
    model, link = glasses
    await repl(model, link, 'local f = frame.file.open("main.lua", "write") '
               'f:write("booted = 42") f:close() x = 1 print("saved")')
    model.on_write(FRAME_RX, b"\x04", True)
    await wait_until(lambda: model.resets == 1 and not model.running_script)
    assert await repl(model, link, "print(tostring(x) .. ' ' .. tostring(booted))") == "nil 42"


async def test_require_loads_modules_from_the_glasses_filesystem_on_every_call(glasses):
    model, link = glasses
    model.files["greet.lua"] = b"return { hi = 'hello' }"
    assert await repl(model, link, 'print(require("greet").hi)') == "hello"
    # The firmware's require has no cache: a rewritten file is what the next require runs.
    model.files["greet.lua"] = b"return { hi = 'again' }"
    assert await repl(model, link, 'print(require("greet").hi)') == "again"
    assert await repl(model, link, 'local ok, e = pcall(require, "missing") print(e)') == (
        "cannot open file: missing.lua")
    model.files["broken.lua"] = b"local t = nil\nreturn t.x"
    assert await repl(model, link, 'require("broken")') == (
        '[string "require("broken")"]:1: exiting module \'broken\': '
        '[string "broken.lua"]:2: attempt to index a nil value (local \'t\')')


FIRMWARE_GLOBALS = {
    # luaport.c run_lua opens base, coroutine, table, string, math, utf8 and debug only
    "_G", "_VERSION", "assert", "collectgarbage", "dofile", "error", "getmetatable", "ipairs",
    "load", "loadfile", "next", "pairs", "pcall", "print", "rawequal", "rawget", "rawlen",
    "rawset", "select", "setmetatable", "tonumber", "tostring", "type", "warn", "xpcall",
    "coroutine", "table", "string", "math", "utf8", "debug",
    # then its own frame table and file.c's require
    "frame", "require",
}


async def test_the_glasses_have_only_the_firmwares_lua_globals(glasses):
    model, link = glasses
    names: list[str] = []
    for start in range(0, 40, 8):  # one short print per answer: long prints are dropped
        names += (await repl(model, link, (
            "local t = {} for k in pairs(_G) do t[#t + 1] = k end table.sort(t) "
            f"print(table.concat(t, ' ', {start + 1}, math.min(#t, {start + 8})))"))).split()
    assert set(names) == FIRMWARE_GLOBALS
    # Desktop-Lua code fails on the glasses with the error the glasses print.
    assert await repl(model, link, 'package.loaded["x"] = nil') == (
        '[string "package.loaded["x"] = nil"]:1: attempt to index a nil value (global \'package\')')
    assert "(global 'io')" in await repl(model, link, 'io.open("main.lua")')
    assert "(global 'os')" in await repl(model, link, "print(os.time())")
    # dofile/loadfile exist but reach no file system (they use C stdio, not Frame's files).
    model.files["main.lua"] = b"x = 1"
    assert await repl(model, link, 'print(loadfile("main.lua") == nil)') == "true"


async def next_matching(link: Link, match, timeout: float = TIMEOUT) -> bytes:
    async with asyncio.timeout(timeout):
        while True:
            data = await link.got.get()
            if match(data):
                return data


async def test_our_app_streams_numbered_packets_and_follows_the_heartbeat(glasses):
    model, link = glasses
    _digest, source = app_source()
    model.files[f"{APP_MODULE}.lua"] = source.encode()
    model.on_write(FRAME_RX, f'require("{APP_MODULE}").run(16000, 8, 0.3)'.encode(), True)
    assert await next_matching(link, lambda d: d.startswith(b"omib:ready")) == b"omib:ready 240"
    model.on_write(FRAME_RX, CMD_HEARTBEAT, True)
    audio = [await next_matching(link, lambda d: d[:2] == bytes([1, MSG_AUDIO])) for _ in range(5)]
    assert all(len(p) == 2 + 2 + 240 for p in audio)
    seqs = [p[2] | p[3] << 8 for p in audio]
    assert seqs == list(range(seqs[0], seqs[0] + 5))
    # No heartbeat for 0.3 s: the app pauses the mic, and the next heartbeat resumes it.
    assert await next_matching(link, lambda d: d[:2] == bytes([1, MSG_MIC])) == bytes([1, MSG_MIC, 0])
    assert not model.mic_running
    model.on_write(FRAME_RX, CMD_HEARTBEAT, True)
    assert await next_matching(link, lambda d: d[:2] == bytes([1, MSG_MIC])) == bytes([1, MSG_MIC, 1])
    assert model.mic_running
    # A break ends the app: it stops the mic and says why with a data message.
    model.on_write(FRAME_RX, b"\x03", True)
    end = await next_matching(link, lambda d: d[:2] == bytes([1, MSG_ERROR]))
    assert b"break signal" in end
    assert not model.mic_running


async def test_our_app_sizes_its_packets_to_an_older_firmwares_smaller_mtu(glasses):
    model, link = glasses
    model.mtu = 185  # firmware from Aug 2024 negotiated 185 (frame.md §5)
    _digest, source = app_source()
    model.files[f"{APP_MODULE}.lua"] = source.encode()
    model.on_write(FRAME_RX, f'require("{APP_MODULE}").run(8000, 16, 5)'.encode(), True)
    assert await next_matching(link, lambda d: d.startswith(b"omib:ready")) == b"omib:ready 178"
    packet = await next_matching(link, lambda d: d[:2] == bytes([1, MSG_AUDIO]))
    assert len(packet) - 1 == 181  # exactly max_length(): the largest send Frame accepts
