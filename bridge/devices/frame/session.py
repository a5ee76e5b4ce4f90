"""Brilliant Labs Frame: microphone audio over BLE through our own Lua app.

Frame has no audio characteristic (frame.md §1). On every connection ``FrameSession``:

1. makes sure the link is bonded (Frame refuses unencrypted access and holds one bond only,
   frame.md §11), then subscribes to …0003;
2. stops whatever runs on the glasses: break, reset, break, and a ``print`` round trip that
   proves the REPL is ours (frame.md §3);
3. asks for ``max_length()``, firmware, battery and the hash of the stored app (``require`` of
   the app file has no side effects); uploads ``app.lua`` only when the hash differs,
   in chunks that each wait for Frame's printed reply (one 247-byte REPL buffer, no queue);
4. runs the app, waits for its ``omib:ready <chunk>`` print, and from then on turns numbered
   PCM packets into the 16 kHz timeline (``bridge.audio.frame_pcm``) and sends a heartbeat every
   ``[frame] heartbeat_seconds`` so the glasses pause the mic when the bridge is gone.

The message bytes below mirror the constants in ``app.lua``; both sides must agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import operator
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import numpy as np

from bridge.audio.frame_pcm import FramePcmDecoder
from bridge.config import FrameOptions
from bridge.core.errors import BridgeError
from bridge.core.gatt import FRAME_SERVICE
from bridge.devices.frame.lua import lua_quote, quoted_pieces
from bridge.link.adapter import client_args, scanner_args
from bridge.link.supervisor import SessionContext

_LOGGER = logging.getLogger(__name__)

# --- GATT (frame.md §2; firmware bluetooth.c); the service UUID lives in bridge.core.gatt -------
FRAME_WRITE = "7a230002-5475-a6a4-654c-8431f6ad49c4"
"""Host → Frame (Brilliant's docs call it "RX"): Lua chunks, raw data, break/reset."""
FRAME_NOTIFY = "7a230003-5475-a6a4-654c-8431f6ad49c4"
"""Frame → host ("TX" in Brilliant's docs): print text and ``bluetooth.send`` data."""

# --- First byte of a write / notification (frame.md §3, §4) --------------------------------------
DATA_PREFIX = 0x01
"""Write: raw data for ``receive_callback``. Notification: ``bluetooth.send`` output."""
BREAK = b"\x03"
"""Raises "break signal" in the running script."""
RESET = b"\x04"
"""Restarts the Lua VM (runs main.lua); only the idle REPL notices it, so break first."""

# --- Our app's messages (app.lua; type bytes chosen clear of frame.md §8) -------------------
MSG_AUDIO = 0xB1
"""``B1 | seq lo | seq hi | PCM``: one fixed-size packet of microphone PCM."""
MSG_BATTERY = 0xB2
"""``B2 | percent``: ``floor(frame.battery_level())`` every few seconds."""
MSG_MIC = 0xB3
"""``B3 | 1/0``: the app resumed / paused the mic (heartbeat watchdog)."""
MSG_ERROR = 0xB4
"""``B4 | text``: the app is ending with this Lua error (sent with retries, unlike a print)."""
CMD_HEARTBEAT = bytes([DATA_PREFIX, 0xB8])
"""Host is alive; the app pauses the mic after ``HEARTBEAT_MISSES`` intervals without one."""
CMD_STOP = bytes([DATA_PREFIX, 0xB9])
"""Host is leaving on purpose: pause the mic now instead of waiting for the watchdog."""
AUDIO_HEADER_BYTES = 3

APP_MODULE = "omi_bridge_app"
"""Module (file ``omi_bridge_app.lua``) the app is stored as on Frame's filesystem."""
APP_RESOURCE = "app.lua"
READY_PREFIX = "omib:ready "
HEARTBEAT_MISSES = 3
"""The app stops the mic after this many heartbeat intervals without one."""

# --- Timing -----------------------------------------------------------------------------------------
CONTROL_GAP_SECONDS = 0.2
"""Pause after break/reset: the firmware handles them between REPL polls; frame-ble and frame-sdk
wait ~200 ms (frame.md §3)."""
REPLY_TIMEOUT_SECONDS = 3.0
"""One Lua round trip (write + printed reply) over a live link takes tens of ms."""
SYNC_ATTEMPTS = 3
"""Break can be swallowed by a script's pcall loop: retry it (frame.md §3)."""
READY_TIMEOUT_SECONDS = 10.0
"""From ``run()`` to the app's ready print (mic start includes a 0.2 s stop→start gap)."""
MIN_LUA_CHUNK = 20
"""Below this ``max_length()`` Frame never learned the MTU (frame.md §5): give up."""

# --- Lua errors as the glasses print them (frame.md §4, §15) --------------------------------
LUA_ERROR = re.compile(r'\[string ".*"\]:\d+: |stack traceback:|^break signal$|'
                       r"attempt to (index|call|perform|concatenate|compare) ")
"""The REPL prints a failed chunk's error as text: ``luaL_dostring`` names a chunk by its own
text, so its errors (and a ``require``d file's) read ``[string "…"]:N: …``; a break reads
``break signal``; ``debug.traceback`` output holds ``stack traceback:``."""
LUA_ERROR_HINT = ("the Lua the bridge sends does not run on this firmware; update Frame's firmware "
                  "(the bridge follows the Lua of frame-codebase v24.267 and later) and report "
                  "this error")


def app_source() -> tuple[str, str]:
    """(hash, Lua text) of the app we upload; the hash is of the template, so it changes exactly
    when the app does."""
    template = resources.files("bridge.devices.frame").joinpath(APP_RESOURCE).read_text(encoding="utf-8")
    digest = hashlib.sha256(template.encode()).hexdigest()[:16]
    # Full-line comments and blank lines stay on the host: ~20 % fewer paced upload round trips.
    lines = [ln.rstrip() for ln in template.splitlines()
             if ln.strip() and not ln.lstrip().startswith("--")]
    return digest, "\n".join(lines).replace("@APP_HASH@", digest) + "\n"


def not_bonded_error(label: str, address: str, detail: str = "") -> BridgeError:
    """What the user must do when Frame will not bond with us (frame.md §11)."""
    why = f" ({detail})" if detail else ""
    return BridgeError(
        f"{label}: Frame refused to pair with this computer{why}; it is probably still bonded "
        "to another phone or computer (Frame keeps one bond only)",
        "put Frame on its charging cradle, hold the pinhole button ~3 s until it shows "
        f"\"Ready to Pair\", then run `bluetoothctl remove {address}` and "
        f"`omi-bridge pair {address} --kind frame` (if pairing still fails, pair once in "
        f"`bluetoothctl`: `agent NoInputNoOutput`, `default-agent`, `pair {address}`, "
        f"`trust {address}`)")


async def async_bond(address: str, config: Any) -> None:
    """Bond with Frame once (``omi-bridge pair ADDRESS --kind frame``): connect, pair (Just
    Works, frame.md §11), prove the encrypted link by subscribing, disconnect. BlueZ keeps the
    key, so the daemon later reconnects without pairing again."""
    from bleak import BleakClient, BleakScanner
    from bleak.exc import BleakError

    from bridge.core.errors import DeviceNotFoundError

    link = config.link
    device = await BleakScanner.find_device_by_address(address, timeout=link.scan_timeout_seconds,
                                                       bluez=scanner_args(link.adapter))
    if device is None:
        raise DeviceNotFoundError(f"Frame {address} was not seen",
                                  "take Frame off the cradle, tap it awake and keep it close")
    async with BleakClient(device, timeout=link.connect_timeout_seconds,
                          bluez=client_args(link.adapter)) as client:
        try:
            await client.pair()
            await client.start_notify(FRAME_NOTIFY, lambda _c, _d: None)
            await client.stop_notify(FRAME_NOTIFY)
        except BleakError as exc:
            raise not_bonded_error(f"Frame {address}", address, str(exc)) from exc
    _LOGGER.info("Frame %s: bonded", address)


class FrameProtocolError(Exception):
    """Frame did not answer as expected; the link is remade (not a user problem)."""


class FrameLuaError(BridgeError):
    """A chunk the bridge sent raised a Lua error on the glasses: retrying at once would fail
    the same way, so the link backs off like any device problem and says what failed."""


def is_lua_error(text: str) -> bool:
    """Whether a text notification is a Lua error the glasses printed (``LUA_ERROR``)."""
    return LUA_ERROR.search(text) is not None


class FrameSession:
    """One connection to Frame glasses: a session for ``LinkSupervisor`` (see its docstring).

    ``ctx.extra["frame"]`` holds the ``FrameOptions``; audio goes into ``ctx.timeline``, counters
    into ``ctx.stats`` (a packet counts as one frame; a lost packet as one lost frame).
    """

    SERVICE_UUIDS = (FRAME_SERVICE,)
    FILL_QUIET = False  # the glasses report their mic pauses, and the gap opens on that signal

    def __init__(self, ctx: SessionContext) -> None:
        self.ctx = ctx
        self._options: FrameOptions = ctx.extra.get("frame") or FrameOptions()
        self._stats = ctx.stats
        self._label = ctx.label
        self._client: Any = None
        self._texts: asyncio.Queue[str] = asyncio.Queue()
        self._decoder: FramePcmDecoder | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._closing = False
        self.max_length = 0
        self.chunk_bytes = 0
        self.uploaded = False
        """True when this connection had to (re)upload the app."""
        self.last_activity: float | None = None
        """Monotonic time of the last audio packet (the supervisor's watchdog reads it)."""
        self.mic_on = False
        self._stored_hash = ""
        self._expect_ready = False

    # --- writes -------------------------------------------------------------------------------
    async def _write(self, data: bytes) -> None:
        await self._client.write_gatt_char(FRAME_WRITE, data, response=True)

    async def _lua(self, code: str, *, step: str, reply: Callable[[str], bool],
                   timeout: float = REPLY_TIMEOUT_SECONDS, errors_fail: bool = True) -> str:
        """Run one Lua chunk at the REPL and wait for the print ``reply`` accepts. A Lua error
        printed meanwhile fails ``step`` (unless ``errors_fail`` is off: while taking over, the
        glasses may still print what the previous program or the boot chunk raised)."""
        data = code.encode()
        if self.max_length and len(data) > self.max_length + 1:
            raise FrameProtocolError(f"Lua chunk of {len(data)} bytes exceeds the link's MTU")
        await self._write(data)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FrameProtocolError(f"no reply from Frame to {code[:40]!r}")
            try:
                text = await asyncio.wait_for(self._texts.get(), left)
            except TimeoutError:
                raise FrameProtocolError(f"no reply from Frame to {code[:40]!r}") from None
            if reply(text):
                return text
            if errors_fail and is_lua_error(text):
                raise FrameLuaError(f"{self._label}: {step} failed on the glasses: {text}",
                                    LUA_ERROR_HINT)
            _LOGGER.debug("%s: ignoring text %r while waiting", self._label, text)

    def _drain_texts(self) -> None:
        while not self._texts.empty():
            self._texts.get_nowait()

    # --- notifications ------------------------------------------------------------------------
    def _on_notify(self, _char: Any, data: bytearray) -> None:
        if not data:
            self._stats.malformed += 1
            return
        if data[0] != DATA_PREFIX:
            text = bytes(data).decode("utf-8", "replace")
            if self._decoder is not None:
                # Our app prints nothing once streaming: this is a Lua error that ended it.
                self._app_failed(text)
            if self._expect_ready and text.startswith(READY_PREFIX):
                # Start decoding right here: the first audio packet follows this print.
                self._expect_ready = False
                self._start_decoder(text)
            self._texts.put_nowait(text)
            return
        if len(data) < 2:
            self._stats.malformed += 1
            return
        kind = data[1]
        if kind == MSG_AUDIO:
            self._on_audio_packet(bytes(data[2:]))
        elif kind == MSG_BATTERY and len(data) == 3:
            self._stats.battery = int(data[2])
        elif kind == MSG_ERROR:
            if self._decoder is not None:
                self._app_failed(bytes(data[2:]).decode("utf-8", "replace"))
        elif kind == MSG_MIC and len(data) == 3:
            self.mic_on = bool(data[2])
            _LOGGER.info("%s: microphone %s", self._label, "resumed" if self.mic_on else "paused")
            if not self.mic_on and self._decoder is not None:
                self._mic_paused()
        else:
            self._stats.malformed += 1

    def _on_audio_packet(self, body: bytes) -> None:
        dec = self._decoder
        if dec is None:
            return  # left over from a run we interrupted
        if len(body) <= AUDIO_HEADER_BYTES - 1:
            self._stats.malformed += 1
            return
        seq = body[0] | body[1] << 8
        before = (dec.lost_packets, dec.duplicates, dec.malformed, dec.packets)
        pcm = dec.feed(seq, body[2:])
        self._stats.lost_frames += dec.lost_packets - before[0]
        self._stats.duplicates += dec.duplicates - before[1]
        self._stats.malformed += dec.malformed - before[2]
        self._stats.packets += 1
        self._stats.frames += dec.packets - before[3]
        self.last_activity = time.monotonic()
        self._stats.last_audio_at = datetime.now(UTC)
        if len(pcm):
            self._audio(pcm, self.last_activity, packets=1)
            self._stats.samples_written = self.ctx.timeline.samples_written

    def _audio(self, pcm: np.ndarray, at: float, *, packets: int = 0) -> None:
        """Into the timeline, in order with the link's gap fills (``SessionContext.capture``)."""
        self.ctx.capture.submit(functools.partial(self.ctx.timeline.audio, pcm, at=at),
                                packets=packets)

    # --- set-up ---------------------------------------------------------------------------------
    async def _ensure_bonded(self, address: str) -> None:
        from bleak.exc import BleakError

        try:
            await self._client.pair()
        except BleakError as exc:
            raise not_bonded_error(self._label, address, str(exc)) from exc

    async def async_start(self, client: Any) -> None:
        """Bond, take over the REPL, upload the app if needed, start streaming."""
        from bleak.exc import BleakError

        self._client = client
        address = str(getattr(client, "address", "?")).upper()
        await self._ensure_bonded(address)
        try:
            await client.start_notify(FRAME_NOTIFY, self._on_notify)
        except BleakError as exc:
            if "not paired" in str(exc).lower() or "authentication" in str(exc).lower():
                raise not_bonded_error(self._label, address, str(exc)) from exc
            raise
        await self._take_over()
        await self._query()
        digest, source = app_source()
        if self._stored_hash != digest:
            await self._upload(source)
            self.uploaded = True
        else:
            _LOGGER.info("%s: the Frame app on the glasses is current", self._label)
        await self._run_app()
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat())

    async def _take_over(self) -> None:
        for attempt in range(SYNC_ATTEMPTS):
            # break → reset → break, as frame-ble/frame-sdk do (frame.md §3).
            for control in (BREAK, RESET, BREAK):
                await self._write(control)
                await asyncio.sleep(CONTROL_GAP_SECONDS)
            self._drain_texts()
            token = f"omib:sync{attempt}"
            try:
                await self._lua(f'print("{token}")', step="taking over the REPL",
                                reply=functools.partial(operator.eq, token), errors_fail=False)
                return
            except FrameProtocolError:
                _LOGGER.info("%s: REPL did not answer, breaking again", self._label)
        raise FrameProtocolError("Frame's Lua REPL does not answer break/reset")

    async def _query(self) -> None:
        text = await self._lua("print(frame.bluetooth.max_length())", step="asking the MTU",
                               reply=str.isdigit)
        self.max_length = int(text)
        if self.max_length < MIN_LUA_CHUNK:
            raise FrameProtocolError(f"Frame reports max_length {self.max_length}: MTU not negotiated")
        info = await self._lua(
            f'local ok,m=pcall(require,"{APP_MODULE}") '
            'print("omib:i|"..frame.FIRMWARE_VERSION.."|"..math.floor(frame.battery_level()).."|"'
            '..(ok and type(m)=="table" and m.APP_HASH or "-"))',
            step="asking firmware, battery and the stored app", reply=lambda t: t.startswith("omib:i|"))
        _, firmware, battery, stored = info.split("|", 3)
        self._stats.firmware = firmware
        with contextlib.suppress(ValueError):
            self._stats.battery = int(battery)
        self._stored_hash = stored
        _LOGGER.info("%s: Frame firmware %s, battery %s%%, max_length %d", self._label, firmware,
                     battery, self.max_length)

    async def _upload(self, source: str) -> None:
        _LOGGER.info("%s: uploading the Frame app (%d bytes)", self._label, len(source))
        await self._lua(f'_omib_f=frame.file.open("{APP_MODULE}.lua","write") print("omib:o")',
                        step="opening the app file", reply=lambda t: t == "omib:o")
        budget = self.max_length + 1 - len('_omib_f:write("")print("omib:w00000")')
        for i, piece in enumerate(quoted_pieces(source, budget)):
            token = f"omib:w{i}"
            await self._lua(f'_omib_f:write({lua_quote(piece)})print("{token}")',
                            step="writing the app file", reply=functools.partial(operator.eq, token))
        # Nothing to invalidate: the firmware's require reads the file again on every call
        # (file.c; frame.md §15), and there is no `package` table to clear.
        await self._lua('_omib_f:close() _omib_f=nil print("omib:c")', step="closing the app file",
                        reply=lambda t: t == "omib:c")

    async def _run_app(self) -> None:
        opts = self._options
        timeout = HEARTBEAT_MISSES * opts.heartbeat_seconds
        self._drain_texts()
        self._expect_ready = True
        await self._write(f'require("{APP_MODULE}").run({opts.sample_rate},{opts.bit_depth},'
                          f'{timeout:g})'.encode())
        try:
            text = await asyncio.wait_for(self._texts.get(), READY_TIMEOUT_SECONDS)
        except TimeoutError:
            raise FrameProtocolError("the Frame app did not report ready") from None
        if not text.startswith(READY_PREFIX) or self._decoder is None:
            self._expect_ready = False
            if is_lua_error(text):
                raise FrameLuaError(f"{self._label}: starting the app failed on the glasses: {text}",
                                    LUA_ERROR_HINT)
            raise FrameProtocolError(f"the Frame app failed to start: {text}")
        await self._write(CMD_HEARTBEAT)
        _LOGGER.info("%s: streaming %d Hz / %d-bit, %d-byte packets", self._label,
                     opts.sample_rate, opts.bit_depth, self.chunk_bytes)

    def _start_decoder(self, ready_text: str) -> None:
        opts = self._options
        try:
            self.chunk_bytes = int(ready_text[len(READY_PREFIX):])
        except ValueError:
            return  # _run_app reports the bad reply
        self._decoder = FramePcmDecoder(opts.sample_rate, opts.bit_depth, device=self._label)
        self.mic_on = True

    def _mic_paused(self) -> None:
        """The app paused the mic (it missed our heartbeats) while the link stayed up: the
        pause becomes wall-clock silence like an outage, and the resumed recording is a new
        stream (its own start pop; sequence numbers carry on but say nothing about the pause)."""
        assert self._decoder is not None
        tail = self._decoder.flush()
        if len(tail):
            self._audio(tail, time.monotonic())
        self.ctx.capture.submit(self.ctx.timeline.link_down)
        opts = self._options
        self._decoder = FramePcmDecoder(opts.sample_rate, opts.bit_depth, device=self._label)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self._options.heartbeat_seconds)
            try:
                await self._write(CMD_HEARTBEAT)
            except Exception as exc:  # the link is going away; the supervisor notices
                _LOGGER.debug("%s: heartbeat failed: %s", self._label, exc)
                return

    # --- running / ending -------------------------------------------------------------------------
    def _app_failed(self, text: str) -> None:
        """The app on the glasses died (a Lua error was printed): have the supervisor end this
        connection on purpose, so it restarts the app now instead of waiting for the watchdog,
        and counts the disconnect as ours rather than as a lost link."""
        if self._closing:
            return
        self._closing = True
        _LOGGER.warning("%s: the Frame app stopped: %s; reconnecting", self._label, text)
        self.ctx.end_connection(f"the Frame app stopped on the glasses: {text}")

    async def async_stop(self, client: Any) -> None:
        """Our own disconnect: tell the app to pause the mic now (it would after the heartbeat
        timeout anyway)."""
        if self._decoder is not None:
            await self._write(CMD_STOP)

    def connection_lost(self) -> None:
        """Stop heartbeats; write the resampler's tail so the timeline stays exact."""
        self._closing = True
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            self._heartbeat_task = None
        if self._decoder is not None:
            tail = self._decoder.flush()
            self._decoder = None
            if len(tail):
                self._audio(tail, time.monotonic())
                self._stats.samples_written = self.ctx.timeline.samples_written
