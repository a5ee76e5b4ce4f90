"""``omi-bridge listen ADDRESS``: record a device's audio timeline and show how the link did.

How a user checks a pairing: it runs the daemon's own link code (``DeviceLink``: reconnects,
concealment, outage silence), records until ``--seconds`` of wall-clock time have passed since
the first audio, writes the timeline as a 16 kHz mono 16-bit WAV and prints the link stats.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np

from bridge.audio.codecs import CODEC_NAMES
from bridge.config import ADDRESS_RE, Config, DeviceConfig, load_config
from bridge.core.errors import BridgeError
from bridge.core.kinds import DeviceKind
from bridge.core.pcm import SAMPLE_RATE
from bridge.core.stats import LinkStats
from bridge.devices.link import DeviceLink
from bridge.link.scan import async_detect_kind, bluetooth_errors

_LOGGER = logging.getLogger(__name__)

FIRST_AUDIO_TIMEOUT = 60.0
"""Seconds to wait for the first audio before giving up: several scan/back-off rounds, enough
to walk to a device or wake it, short enough that a broken setup is reported."""


class WavSink:
    """Keeps the whole timeline in memory (tests and short checks)."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.samples = 0
        self.first_audio = asyncio.Event()

    def write(self, pcm: np.ndarray, /) -> None:
        self.parts.append(np.asarray(pcm, dtype=np.int16).copy())
        self.samples += len(pcm)
        self.first_audio.set()

    def pcm(self, limit: int | None = None) -> np.ndarray:
        pcm = np.concatenate(self.parts) if self.parts else np.zeros(0, np.int16)
        return pcm[:limit] if limit is not None else pcm


class WavFileSink:
    """Streams the first ``limit`` samples of the timeline into a WAV file (or only counts them
    without a path), so a long recording does not sit in memory."""

    def __init__(self, path: Path | None, limit: int) -> None:
        self.limit = limit
        self.samples = 0
        self.first_audio = asyncio.Event()
        self._wav: Any = None
        if path is not None:
            try:
                self._wav = wave.open(str(path), "wb")  # noqa: SIM115 (closed by close())
            except OSError as exc:
                raise BridgeError(f"cannot write {path}: {exc.strerror}",
                                  "choose another --wav path") from None
            self._wav.setnchannels(1)
            self._wav.setsampwidth(2)
            self._wav.setframerate(SAMPLE_RATE)

    def write(self, pcm: np.ndarray, /) -> None:
        self.first_audio.set()
        take = pcm[: max(0, self.limit - self.samples)]
        if len(take) and self._wav is not None:
            self._wav.writeframes(np.asarray(take, dtype="<i2").tobytes())
        self.samples += len(take)

    def close(self) -> None:
        if self._wav is not None:
            self._wav.close()
            self._wav = None


async def async_listen(device: DeviceConfig, config: Config, seconds: float,
                       wav: Path | None = None) -> dict[str, Any]:
    """Record ``seconds`` of ``device``'s timeline; returns the stats object ``--json`` prints."""
    sink = WavFileSink(wav, round(seconds * SAMPLE_RATE))
    try:
        return await _async_record(sink, device, config, seconds, wav)
    finally:
        sink.close()


async def _async_record(sink: WavFileSink, device: DeviceConfig, config: Config, seconds: float,
                        wav: Path | None) -> dict[str, Any]:
    link = DeviceLink(device, config.link, sink, extra={"frame": config.frame}, raise_errors=True)
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    try:
        first = asyncio.ensure_future(sink.first_audio.wait())
        done, _ = await asyncio.wait({first, task}, timeout=FIRST_AUDIO_TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)
        first.cancel()
        if task in done:
            task.result()  # raises the session's BridgeError (e.g. unknown codec)
        if not sink.first_audio.is_set():
            raise _no_audio_error(device, link.stats, connected=link.stats.connected_since is not None)
        assert link.timeline.anchor is not None
        deadline = link.timeline.anchor + seconds
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - time.monotonic()))
        if task.done():
            task.result()
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # Outage silence up to the deadline, so a drop near the end still yields the full length.
    link.timeline.finish(deadline)
    s = link.stats
    return {
        "address": device.address,
        "kind": device.kind,
        "codec": s.codec,
        "format": audio_format(device, config, s.codec),
        "seconds": round(sink.samples / SAMPLE_RATE, 3),
        "packets": s.packets,
        "frames": s.frames,
        "lost_frames": s.lost_frames,
        "duplicates": s.duplicates,
        "malformed": s.malformed,
        "reconnects": s.reconnects,
        "battery": s.battery,
        "firmware": s.firmware,
        "wav": str(wav) if wav else None,
    }


def audio_format(device: DeviceConfig, config: Config, codec: int | None) -> str:
    """What the device streams, for people: Omi's codec byte, or Frame's configured PCM (Frame
    has no codec byte: its format is what we asked for, frame.md)."""
    if device.kind == DeviceKind.FRAME:
        return f"pcm {config.frame.bit_depth}-bit {config.frame.sample_rate / 1000:g} kHz (Frame)"
    if codec is None:
        return "?"
    return f"{codec} ({CODEC_NAMES.get(codec, '?')})"


def _no_audio_error(device: DeviceConfig, stats: LinkStats, *, connected: bool) -> BridgeError:
    """``connected``: a connection was made (and set up) at least once. Not the codec byte:
    Frame has none, so a Frame that connected but sent nothing was reported as unreachable."""
    if not connected:
        return BridgeError(
            f"could not connect to {device.address} in {FIRST_AUDIO_TIMEOUT:g} s"
            + (f" ({stats.last_error})" if stats.last_error else ""),
            "is it on, in range and not connected to a phone (Omi takes one connection)? "
            "`omi-bridge scan` lists what is nearby")
    if device.kind == DeviceKind.FRAME:
        return BridgeError(
            f"{device.address} connected but sent no audio in {FIRST_AUDIO_TIMEOUT:g} s",
            "check the glasses are awake and not running another app; run with -v to see "
            "what the Frame answered")
    return BridgeError(
        f"{device.address} connected but sent no audio in {FIRST_AUDIO_TIMEOUT:g} s",
        "a low ATT MTU (< 100) makes Omi send nothing; run with -v to see the MTU, and "
        "check the device is not muted or recording to its SD card only")


def _print_text(r: dict[str, Any]) -> None:
    print(f"{r['address']} ({r['kind']}): {r['seconds']:.2f} s of audio"
          + (f" written to {r['wav']}" if r["wav"] else ""))
    label = "format" if r["kind"] == DeviceKind.FRAME else "codec"
    print(f"  {label} {r['format']}, firmware {r['firmware'] or '?'}, battery "
          + (f"{r['battery']} %" if r["battery"] is not None else "?"))
    print(f"  packets {r['packets']}, frames {r['frames']}, lost {r['lost_frames']} (concealed), "
          f"duplicates {r['duplicates']}, malformed {r['malformed']}, reconnects {r['reconnects']}")


def cmd_listen(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if not ADDRESS_RE.match(args.address):
        raise BridgeError(f"{args.address!r} is not a Bluetooth address",
                          "give it as AA:BB:CC:DD:EE:FF (see `omi-bridge scan`)")
    if args.seconds <= 0:
        raise BridgeError("--seconds must be greater than 0", "e.g. --seconds 10")
    address = args.address.upper()
    paired = next((d for d in config.devices if d.address == address), None)
    kind = getattr(args, "kind", None) or (paired.kind if paired else None)
    wav = Path(args.wav) if args.wav else None

    async def run() -> dict[str, Any]:
        nonlocal kind
        if kind is None:
            kind = await async_detect_kind(address, config.link.scan_timeout_seconds, config.link.adapter)
        device = DeviceConfig(kind=DeviceKind.parse(kind, "--kind"), address=address,
                              name=paired.name if paired else "")
        return await async_listen(device, config, args.seconds, wav)

    with bluetooth_errors(config.link.adapter):
        result = asyncio.run(run())
    if args.json:
        print(json.dumps(result))
    else:
        _print_text(result)
    return 0
