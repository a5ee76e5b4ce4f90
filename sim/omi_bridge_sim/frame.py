"""Simulated Brilliant Labs Frame glasses: whatever Lua the bridge writes runs in a real Lua 5.4 VM.

Frame has no audio characteristic: the host makes Lua code run on the glasses (frame.md §1).
To test that code for real, this model hosts a ``lupa`` Lua 5.4 VM (the firmware embeds Lua
5.4.6) on a thread of its own, the way the firmware runs Lua beside its Bluetooth stack, with an
emulated ``frame`` API:

- writes to …0002: ``0x01`` raw data → ``frame.bluetooth.receive_callback``; ``0x03`` break
  (a count hook raises ``"break signal"`` in the running script); ``0x04`` reset (only noticed
  by the idle REPL: the VM restarts and runs ``main.lua``); anything else is a Lua chunk the idle
  REPL runs (frame.md §3). One buffer each, no queue: a second write overwrites the first.
- ``frame.bluetooth.send`` (``0x01`` added, payload ≤ ``max_length()`` = MTU − 4, ``"bluetooth is
  busy"`` while the single notification slot is occupied or no host is connected) and ``print``
  (text, dropped when the slot is busy or it is longer than MTU − 3), frame.md §4–§5.
- ``frame.microphone`` fed in real time from a 16 kHz int16 source with the firmware's formats,
  ~2 s FIFO that silently wraps, ``""``/``nil`` semantics and errors (frame.md §6).
- The firmware's Lua environment and nothing more (luaport.c, file.c; frame.md §15):
  the base, coroutine, table, string, math, utf8 and debug libraries; no
  ``package``, ``io`` or ``os``; ``require(NAME)`` runs ``NAME.lua`` from Frame's filesystem on
  every call (no cache); REPL errors read ``[string "<chunk>"]:N: …`` as ``luaL_dostring``'s do;
  a VM start runs ``frame.stay_awake(false); require('main')`` and prints its error.
- ``frame.file`` on an in-memory filesystem that survives resets and reconnects;
  ``frame.battery_level()`` (a float), ``frame.time.utc()``, ``frame.sleep(s)``,
  ``frame.FIRMWARE_VERSION``, ``frame.HARDWARE_VERSION``.
- Bonding (frame.md §11): encrypted characteristics; ``bonded_elsewhere=True`` makes ``Pair``
  fail the way a Frame bonded to a phone does.

Fault injection: ``loss_rate`` (notifications accepted by ``send`` but never delivered) and the
fake's ``drop_link()``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import threading
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omi_bridge_sim.model import CharacteristicSpec, DeviceContext, DeviceModel, ServiceSpec

_LOGGER = logging.getLogger(__name__)

FRAME_SERVICE = "7a230001-5475-a6a4-654c-8431f6ad49c4"
FRAME_RX = "7a230002-5475-a6a4-654c-8431f6ad49c4"
"""Host → Frame: write + write-without-response, encrypted (frame.md §2)."""
FRAME_TX = "7a230003-5475-a6a4-654c-8431f6ad49c4"
"""Frame → host: notify, encrypted (frame.md §2)."""

DATA_PREFIX = 0x01
BREAK = 0x03
RESET = 0x04
"""First byte of a host write (frame.md §3, firmware bluetooth.c)."""

NOTIFY_SLOT_SECONDS = 0.004
"""How long the depth-1 notification queue stays busy per notification. Frame reaches ~60–70
kB/s at MTU 247 (frame.md §7, commits f9ba6bf/1271c82), i.e. one 243-byte packet per ~3.5 ms."""

MIC_RATE = 16_000
"""The PDM mic always samples 16 kHz int16; 8 kHz takes every other sample (frame.md §6)."""
MIC_FIFO_SAMPLES = 32_768
"""FIFO of raw 16 kHz samples, ≈ 2.05 s; overrun wraps silently (frame.md §6)."""

HOOK_INSTRUCTIONS = 1000
"""Count hook period: how often a running script notices a break or receives raw data."""

SECURITY_FAILURE_SECONDS = 1.0
"""How long a Frame bonded elsewhere keeps an unencrypted link before dropping it [derived: the
security request fails after a few connection events; not measured]."""

BOOT_CHUNK = b"frame.stay_awake(false); require('main')"
"""What the firmware runs when its Lua VM starts (luaport.c run_lua)."""
BOOT_QUIET_ERROR = b"[string \"require('main')\"]:1: cannot open file: main.lua"
"""The one boot error the firmware means not to print (no main.lua). Since fw v24.267 the boot
chunk has a different text, so this never matches and the glasses print
``[string "frame.stay_awake(false); require('main')"]:1: cannot open file: main.lua`` after every
reset without main.lua (frame.md §15) [derived]. Kept so the emulation stays as
exact as the firmware is."""

DEFAULT_FIRMWARE = "v25.278.1113"
"""Latest tagged firmware (frame.md sources, F1)."""

# The Lua side of the emulation: builds `frame` on top of the Python functions in `_py`, so
# errors are real Lua errors with the firmware's texts, and files behave like Lua objects.
_PRELUDE = rb"""
local py = ...
local rx_callback = nil

local function service()
    while true do
        local kind, data = py.poll()
        if kind == nil then return end
        if kind == 1 then error("break signal", 0) end
        if rx_callback then rx_callback(data) end
    end
end
debug.sethook(service, "", py.hook_count)

frame = {}
frame.FIRMWARE_VERSION = py.firmware
frame.HARDWARE_VERSION = py.hardware

frame.bluetooth = {}
function frame.bluetooth.send(data)
    if type(data) ~= "string" then error("bad argument #1 to 'send' (string expected)", 2) end
    local err = py.send(data)
    if err then error(err, 2) end
end
function frame.bluetooth.max_length() return py.max_length() end
function frame.bluetooth.is_connected() return py.is_connected() end
function frame.bluetooth.receive_callback(fn) rx_callback = fn end

frame.microphone = {}
function frame.microphone.start(opts)
    opts = opts or {}
    local err = py.mic_start(opts.sample_rate or 8000, opts.bit_depth or 8)
    if err then error(err, 2) end
end
function frame.microphone.stop() py.mic_stop() end
function frame.microphone.read(n)
    if math.type(n) ~= "integer" then error("bad argument #1 to 'read' (integer expected)", 2) end
    local data, err = py.mic_read(n)
    if err then error(err, 2) end
    return data
end

function frame.battery_level() return py.battery() end
frame.time = {}
function frame.time.utc() return py.utc() end

function frame.sleep(seconds)
    if seconds == nil then error("deep sleep (frame.sleep()) is not emulated", 2) end
    local deadline = py.clock() + seconds
    while true do
        service()
        local left = deadline - py.clock()
        if left <= 0 then return end
        py.wait(left)
    end
end

local File = {}
File.__index = File
function File:read(n)
    local data, err = py.fread(self.id, n)
    if err then error(err, 2) end
    return data
end
function File:write(s)
    local err = py.fwrite(self.id, tostring(s))
    if err then error(err, 2) end
end
function File:close() py.fclose(self.id) end
frame.file = {}
function frame.file.open(name, mode)
    local id, err = py.fopen(name, mode or "read")
    if err then error(err, 2) end
    return setmetatable({ id = id }, File)
end
function frame.file.remove(name)
    local err = py.fremove(name)
    if err then error(err, 2) end
end
function frame.file.rename(old, new)
    local err = py.frename(old, new)
    if err then error(err, 2) end
end

function print(...)
    for i = 1, select("#", ...) do
        if i > 1 then py.print("\t") end
        py.print(tostring((select(i, ...))))
    end
end

local stay_awake = false
function frame.stay_awake(enable)
    if enable ~= nil then stay_awake = enable and true or false end
    return stay_awake
end

-- The firmware's own require (file.c lua_file_require): NAME.lua from Frame's filesystem, read
-- and run again on every call (no package.loaded cache), the module's last return value (or
-- the file name when it returns nothing), errors worded as the firmware words them.
function require(name)
    local kind = type(name)
    if kind ~= "string" and kind ~= "number" then
        error("bad argument #1 to 'require' (string expected, got " .. kind .. ")", 2)
    end
    local filename = name .. ".lua"
    local src = py.fs_get(filename)
    if src == nil then error("cannot open file: " .. filename, 2) end
    local chunk, err = load(src, filename)
    if chunk == nil then
        error(string.format("exiting module '%s': %s", name, err), 2)
    end
    local res = table.pack(pcall(chunk))
    if not res[1] then
        error(string.format("exiting module '%s': %s", name, tostring(res[2])), 2)
    end
    if res.n == 1 then return filename end
    return res[res.n]
end

-- dofile/loadfile are in the firmware's base library but go through C stdio, which has no
-- file system behind it on the glasses (frame.md section 15) [derived].
function loadfile(name)
    return nil, "cannot open " .. tostring(name)
end
function dofile(name)
    error("cannot open " .. tostring(name), 2)
end

-- Exactly the globals the firmware opens (luaport.c run_lua: base, coroutine, table, string,
-- math, utf8, debug, then frame and require): no package, io, os, nor lupa's python.
local firmware_globals = {}
for name in string.gmatch([[
    _G _VERSION assert collectgarbage dofile error getmetatable ipairs load loadfile next
    pairs pcall print rawequal rawget rawlen rawset select setmetatable tonumber tostring
    type warn xpcall coroutine table string math utf8 debug frame require]], "%S+") do
    firmware_globals[name] = true
end
local extra = {}
for name in pairs(_G) do
    if not firmware_globals[name] then extra[#extra + 1] = name end
end
for _, name in ipairs(extra) do _G[name] = nil end
local loaded = debug.getregistry()._LOADED
for _, name in ipairs({ "package", "io", "os", "python" }) do loaded[name] = nil end

-- luaL_dostring: the chunk's name is its own text, so errors read [string "..."]:N: ...
return function(src)
    local chunk, err = load(src)
    if not chunk then return err end
    local ok, e = pcall(chunk)
    if not ok then return tostring(e) end
    return nil
end
"""


def load_wav_16k(path: str | Path) -> np.ndarray:
    """A 16 kHz mono 16-bit WAV as int16 (the mic's native format)."""
    with wave.open(str(path), "rb") as w:
        if w.getframerate() != MIC_RATE or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{path}: need 16 kHz mono 16-bit, got {w.getframerate()} Hz, "
                             f"{w.getnchannels()} ch, {8 * w.getsampwidth()} bit")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)


class _Microphone:
    """The PDM mic + FIFO, played from ``source`` in real time (world time starts at the first
    ``start``; the world keeps going while the mic is stopped)."""

    def __init__(self, source: np.ndarray, loop_source: bool, clock) -> None:
        self.source = source
        self.loop_source = loop_source
        self._clock = clock
        self.origin: float | None = None
        self.running = False
        self.rate = 8000
        self.bits = 8
        self.read_pos = 0       # next 16 kHz sample index to hand out
        self.end_pos = 0        # production stops here once stopped
        self.overruns = 0
        self.samples_read = 0   # 16 kHz samples consumed

    def _produced(self) -> int:
        if self.origin is None:
            return 0
        now = int((self._clock() - self.origin) * MIC_RATE)
        return now if self.running else min(now, self.end_pos)

    def start(self, rate: object, bits: object) -> str | None:
        if rate not in (8000, 16000):
            return "sample rate must be 8000 or 16000"
        if bits not in (8, 16):
            return "bit depth must be 8 or 16"
        if self.running:
            return "already started"
        if self.origin is None:
            self.origin = self._clock()
        self.rate, self.bits = int(rate), int(bits)  # type: ignore[call-overload]
        self.running = True
        self.read_pos = self._produced()  # the FIFO starts empty
        return None

    def stop(self) -> None:
        if self.running:
            self.end_pos = self._produced()
            self.running = False

    def read(self, n: int) -> tuple[bytes | None, str | None]:
        if n % 2:
            return None, "n must be even"
        if n <= 0:
            return None, "n must be positive"
        produced = self._produced()
        if produced - self.read_pos > MIC_FIFO_SAMPLES:
            # The ring buffer wrapped: the oldest audio is gone, nothing says so (frame.md §6).
            self.overruns += 1
            self.read_pos = produced - MIC_FIFO_SAMPLES
        step = MIC_RATE // self.rate
        available = (produced - self.read_pos) // step
        count = min(n // (self.bits // 8), available)
        if count == 0:
            return (b"" if self.running else None), None
        idx = self.read_pos + np.arange(count) * step
        self.read_pos += count * step
        self.samples_read += count * step
        if self.loop_source:
            samples = self.source[idx % len(self.source)]
        else:
            samples = np.zeros(count, np.int16)
            inside = idx < len(self.source)
            samples[inside] = self.source[idx[inside]]
        if self.bits == 8:
            return (samples >> 8).astype(np.int8).tobytes(), None  # the high byte, truncated
        return samples.astype("<i2").tobytes(), None


class _Events:
    """What the host wrote, as the firmware keeps it: one REPL buffer, one raw-data buffer,
    break and reset flags (frame.md §3)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.repl: bytes | None = None
        self.data: bytes | None = None
        self.brk = False
        self.reset = False
        self.closed = False


@dataclass
class FrameModel(DeviceModel):
    """Frame glasses for the fake bluetoothd. ``source``: 16 kHz int16 audio the mic hears."""

    source: np.ndarray = field(default_factory=lambda: np.zeros(MIC_RATE, np.int16), repr=False)
    loop_source: bool = False
    battery: float = 87.0
    firmware: str = DEFAULT_FIRMWARE
    hardware: str = "Frame"
    bonded_elsewhere: bool = False
    """Frame already holds another host's bond: it rejects pairing (frame.md §11)."""
    loss_rate: float = 0.0
    """Probability that an accepted ``bluetooth.send`` never reaches the host."""
    seed: int = 0
    notify_slot_seconds: float = NOTIFY_SLOT_SECONDS
    files: dict[str, bytes] = field(default_factory=dict, repr=False)
    """Frame's filesystem (LittleFS); survives resets and reconnects."""

    def __post_init__(self) -> None:
        if self.name is None:
            # "Frame XX": XX = first octet of the MAC as BlueZ shows it (frame.md §10).
            self.name = f"Frame {self.address[:2].upper()}"
        if not self.advertised_uuids:
            self.advertised_uuids = [FRAME_SERVICE]
        if not self.services:
            self.services = [ServiceSpec(FRAME_SERVICE, (
                CharacteristicSpec(FRAME_RX, ("write", "write-without-response"), encrypted=True),
                CharacteristicSpec(FRAME_TX, ("notify",), encrypted=True),
            ))]
        super().__post_init__()
        self._rng = random.Random(self.seed)
        self._events = _Events()
        self._booted = threading.Event()
        self._mic = _Microphone(self.source, self.loop_source, time.monotonic)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outq: asyncio.Queue[tuple[bytes, float]] | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._host_present = False
        self._slot_free_at = 0.0
        self._lock = threading.Lock()
        self._open_files: dict[int, list] = {}
        self._next_fd = 1
        self.running_script = False
        # Counters for tests.
        self.resets = 0
        self.chunks_run = 0
        self.sent = 0
        self.lost = 0
        self.lost_heads: list[bytes] = []
        """First bytes of each notification ``loss_rate`` swallowed (tests read the app's header)."""
        self.busy_refusals = 0
        self.prints_dropped = 0
        self.writes_overwritten = 0
        """Host writes that replaced one not yet consumed (the firmware has no queue): an
        unpaced host loses Lua chunks this way."""
        self.file_writes: dict[str, int] = {}
        """Times each file was (re)written and closed: shows whether an upload happened."""
        self.printed: collections.deque[str] = collections.deque(maxlen=200)
        """Recent print output (delivered or dropped), for tests and debugging."""

    # --- DeviceModel lifecycle -----------------------------------------------------------------
    def attach(self, ctx: DeviceContext) -> None:
        super().attach(ctx)
        if self.bonded_elsewhere:
            with contextlib.suppress(AttributeError):
                ctx.requires_bond = True  # type: ignore[attr-defined]
                ctx.pair_error = ("org.bluez.Error.AuthenticationFailed",  # type: ignore[attr-defined]
                                  "Authentication Failed")

    async def start(self) -> None:
        self._booted.clear()
        self._loop = asyncio.get_running_loop()
        self._outq = asyncio.Queue()
        self._pump_task = self._loop.create_task(self._pump())
        if self._thread is None:
            self._thread = threading.Thread(target=self._vm_thread, name=f"frame-lua-{self.address}",
                                            daemon=True)
            self._thread.start()
        # Frame has booted long before a host can connect: its boot print reaches no one.
        await asyncio.to_thread(self._booted.wait, 5.0)

    async def stop(self) -> None:
        if self._pump_task is not None:
            self._pump_task.cancel()
            self._pump_task = None
        with self._events.cond:
            self._events.closed = True
            self._events.brk = True
            self._events.cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, 5.0)

    async def on_connect(self, ctx: DeviceContext) -> None:
        self._host_present = True
        if self.bonded_elsewhere and not getattr(ctx, "bonded", False):
            # Frame asks for security on every connection; bonded to another host it rejects
            # ours and drops the link (frame.md §11).
            await asyncio.sleep(SECURITY_FAILURE_SECONDS)
            if ctx.connected and not getattr(ctx, "bonded", False):
                ctx.drop_link()

    def on_disconnect(self) -> None:
        self._host_present = False
        with self._events.cond:
            self._events.data = None

    def on_write(self, char_uuid: str, data: bytes, with_response: bool) -> None:
        if char_uuid.lower() != FRAME_RX or not data:
            return
        ev = self._events
        with ev.cond:
            first = data[0]
            if first == DATA_PREFIX:
                if ev.data is not None:
                    self.writes_overwritten += 1
                ev.data = bytes(data[1:])
            elif first == BREAK:
                ev.brk = True
            elif first == RESET:
                ev.reset = True
            else:
                if ev.repl is not None:
                    self.writes_overwritten += 1
                ev.repl = bytes(data)
            ev.cond.notify_all()

    # --- test helpers ----------------------------------------------------------------------------
    @property
    def mic_running(self) -> bool:
        return self._mic.running

    @property
    def mic_overruns(self) -> int:
        return self._mic.overruns

    # --- towards the host ----------------------------------------------------------------------
    def _take_slot(self) -> float | None:
        """Occupy the single notification slot (frame.md §5: queue depth 1) for one packet's
        radio time; None when busy."""
        with self._lock:
            now = time.monotonic()
            if now < self._slot_free_at:
                return None
            self._slot_free_at = now + self.notify_slot_seconds
            return now

    def _deliver(self, payload: bytes, taken_at: float) -> None:
        loop, queue = self._loop, self._outq
        if loop is None or queue is None:
            return
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            loop.call_soon_threadsafe(queue.put_nowait, (payload, taken_at))

    async def _pump(self) -> None:
        """Notifications leave in the order Lua sent them, each after its radio time, so the
        host can never answer a print before Frame's slot is free again."""
        assert self._outq is not None
        while True:
            payload, taken_at = await self._outq.get()
            delay = taken_at + self.notify_slot_seconds - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.ctx is not None:
                await self.ctx.notify(FRAME_TX, payload)

    def _subscribed(self) -> bool:
        ctx = self.ctx
        return bool(self._host_present and ctx is not None and ctx.is_notifying(FRAME_TX))

    def _py_send(self, data: bytes) -> str | None:
        if len(data) > self._max_length():
            return "payload length is too large"
        taken_at = self._take_slot() if self._subscribed() else None
        if taken_at is None:
            self.busy_refusals += 1
            return "bluetooth is busy"
        self.sent += 1
        if self.loss_rate and self._rng.random() < self.loss_rate:
            self.lost += 1  # sent over the air, never received
            self.lost_heads.append(bytes(data[:4]))
            return None
        self._deliver(bytes([DATA_PREFIX]) + data, taken_at)
        return None

    def _py_print(self, text: bytes) -> None:
        self.printed.append(text.decode("utf-8", "replace"))
        if not text:
            return
        taken_at = None
        if len(text) <= self.mtu - 3 and self._subscribed():
            taken_at = self._take_slot()
        if taken_at is None:
            self.prints_dropped += 1
            return
        self._deliver(bytes(text), taken_at)

    def _max_length(self) -> int:
        # Negotiated payload (MTU − 3) minus the 0x01 the firmware adds (frame.md §5).
        return self.mtu - 4

    # --- the Lua VM ------------------------------------------------------------------------------
    def _vm_thread(self) -> None:
        ev = self._events
        while not ev.closed:
            repl = self._new_vm()
            self._run(repl, BOOT_CHUNK, quiet=BOOT_QUIET_ERROR)
            self._booted.set()
            while True:
                with ev.cond:
                    while not (ev.closed or ev.reset or ev.repl is not None):
                        ev.cond.wait()
                    ev.brk = False  # a break at the idle prompt does nothing
                    if ev.closed:
                        return
                    if ev.reset:
                        ev.reset = False
                        ev.repl = None
                        ev.data = None
                        break
                    chunk, ev.repl = ev.repl, None
                self.chunks_run += 1
                self._run(repl, chunk)
            self.resets += 1
            self._mic.stop()
            self._mic.read_pos = self._mic.end_pos = self._mic._produced()

    def _run(self, repl, src: bytes, *, quiet: bytes | None = None) -> None:
        """Run one chunk as ``luaL_dostring`` does and print its error, unless it is ``quiet``."""
        self.running_script = True
        try:
            err = repl(src)
        except Exception as exc:  # a bug in the emulation: report it as Frame would
            err = f"simulator error: {exc}".encode()
            _LOGGER.exception("sim %s: Lua run failed", self.address)
        finally:
            self.running_script = False
            with self._events.cond:
                self._events.brk = False
        if err and err != quiet:
            # luaL_dostring failures are printed by the REPL (frame.md §4: errors are text).
            self._py_print(err if isinstance(err, bytes) else str(err).encode())

    def _new_vm(self):
        import lupa.lua54 as lupa_lua  # the simulator needs lupa (optional dependency "sim")

        lua = lupa_lua.LuaRuntime(encoding=None, unpack_returned_tuples=True)
        self._open_files.clear()
        py = lua.table_from({
            b"poll": self._py_poll,
            b"hook_count": HOOK_INSTRUCTIONS,
            b"firmware": self.firmware.encode(),
            b"hardware": self.hardware.encode(),
            b"send": self._py_send,
            b"max_length": self._max_length,
            b"is_connected": self._subscribed,
            b"mic_start": self._mic.start,
            b"mic_stop": self._mic.stop,
            b"mic_read": self._mic.read,
            b"battery": lambda: float(self.battery),
            b"utc": time.time,
            b"clock": time.monotonic,
            b"wait": self._py_wait,
            b"print": self._py_print,
            b"fopen": self._py_fopen,
            b"fread": self._py_fread,
            b"fwrite": self._py_fwrite,
            b"fclose": self._py_fclose,
            b"fremove": self._py_fremove,
            b"frename": self._py_frename,
            b"fs_get": lambda name: self.files.get(name.decode()),
        })
        return lua.execute(_PRELUDE, py)

    def _py_poll(self) -> tuple[int | None, bytes | None]:
        ev = self._events
        with ev.cond:
            if ev.brk or ev.closed:
                ev.brk = False
                return 1, None
            if ev.data is not None:
                data, ev.data = ev.data, None
                return 2, data
        return None, None

    def _py_wait(self, seconds: float) -> None:
        ev = self._events
        with ev.cond:
            if not (ev.brk or ev.closed or ev.data is not None):
                ev.cond.wait(seconds)

    # --- files -------------------------------------------------------------------------------------
    def _py_fopen(self, name: bytes, mode: bytes) -> tuple[int | None, str | None]:
        fname, m = name.decode(), mode.decode()
        if m in ("read", "r"):
            if fname not in self.files:
                return None, f"file {fname} not found"
            handle = [fname, "r", self.files[fname], 0]
        elif m in ("write", "w"):
            handle = [fname, "w", b"", 0]
        elif m in ("append", "a"):
            handle = [fname, "w", self.files.get(fname, b""), 0]
        else:
            return None, f"invalid mode {m}"
        fd, self._next_fd = self._next_fd, self._next_fd + 1
        self._open_files[fd] = handle
        return fd, None

    def _py_fread(self, fd: int, n: int | None) -> tuple[bytes | None, str | None]:
        h = self._open_files.get(fd)
        if h is None:
            return None, "file is closed"
        data, pos = h[2], h[3]
        if pos >= len(data):
            return None, None
        if n is None:  # a line, without its newline
            end = data.find(b"\n", pos)
            end = len(data) if end < 0 else end
            h[3] = end + 1
            return data[pos:end], None
        h[3] = pos + int(n)
        return data[pos:pos + int(n)], None

    def _py_fwrite(self, fd: int, s: bytes) -> str | None:
        h = self._open_files.get(fd)
        if h is None or h[1] != "w":
            return "file not open for writing"
        h[2] += s
        return None

    def _py_fclose(self, fd: int) -> None:
        h = self._open_files.pop(fd, None)
        if h is not None and h[1] == "w":
            # LittleFS commits on close; an interrupted upload leaves the old file in place.
            self.files[h[0]] = h[2]
            self.file_writes[h[0]] = self.file_writes.get(h[0], 0) + 1

    def _py_fremove(self, name: bytes) -> str | None:
        if self.files.pop(name.decode(), None) is None:
            return f"file {name.decode()} not found"
        return None

    def _py_frename(self, old: bytes, new: bytes) -> str | None:
        if old.decode() not in self.files:
            return f"file {old.decode()} not found"
        self.files[new.decode()] = self.files.pop(old.decode())
        return None
