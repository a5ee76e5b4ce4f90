"""Never lose a word, never say one twice: the daemon killed with SIGKILL again and again while
transcription, the API, the disk and the Bluetooth link fail under it.

``omi-bridge run`` runs as a subprocess (through ``python -m omi_bridge_sim.faults``, which fails a
share of transcription windows on purpose) over the fake BlueZ, with a simulated pendant looping
real recorded speech and the fake Omi API in this process. Meanwhile the test kills the daemon at
random moments and starts it again, makes the API answer 503 and hang past the client's timeout,
drops the link, and fills the state directory (a real tmpfs) for a while.

At the end every sentence the pendant sent while the daemon was listening must be in Omi (word
recall against the reference transcripts), nothing twice (no two posted segments of the pendant
cover the same moment), no text where the pendant played silence (a posted segment's time lies on
a sentence), and few words beyond what was heard and what tiny.en hears in the same clips with no
fault (its mishearings where a cut fell).

The short form (in ``make test``) kills 10 times and makes every kind of fault happen at least
once; the long form (marked ``chaos``: ``make chaos``) kills 100 times and writes its figures
(``OMI_BRIDGE_CHAOS_KILLS``, ``OMI_BRIDGE_CHAOS_FIGURES``, ``OMI_BRIDGE_CHAOS_SEED``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omi_bridge_sim.bus import PrivateBus
from omi_bridge_sim.control import SimControlClient
from omi_bridge_sim.faults import FAIL_FIRST_ENV, FAIL_RATE_ENV, FAULT_LOG_ENV
from omi_bridge_sim.omi_api import ApiKey, OmiApiSim

from bridge.audio.files import decode_file
from bridge.config import AsrOptions
from bridge.core.pcm import SAMPLE_RATE
from bridge.speech.asr.local import load_model, transcribe_window

pytestmark = pytest.mark.asr

KILLS = int(os.environ.get("OMI_BRIDGE_CHAOS_KILLS", "100"))
SHORT_KILLS = 10
"""The short form: one early kill, one with the disk full, and two with the API and link faults.
Ten kills (the issue's figure) passed 3 runs of 4 and once posted 16 words beyond 186 heard, over
the 8 % bound: too close to it for every `make test`."""
SEED = int(os.environ.get("OMI_BRIDGE_CHAOS_SEED", "12"))
FIGURES = os.environ.get("OMI_BRIDGE_CHAOS_FIGURES", "")
API_KEY = "omi_dev_chaos"
PENDANT = "C0:FF:EE:00:00:21"
DATA = Path(__file__).resolve().parent / "data"
CLIPS = ["jfk.flac", "ljspeech/LJ001-0002.wav", "ljspeech/LJ001-0004.wav",
         "ljspeech/LJ001-0006.wav", "ljspeech/LJ001-0008.wav", "ljspeech/LJ001-0013.wav"]
PAUSE_SECONDS = 1.5
"""Between sentences: one conversation per pass through the clips."""
END_SILENCE_SECONDS = 7.0
"""After the last sentence, longer than the gap: the conversation closes."""
GAP_SECONDS = 5.0
ASR_FAIL_RATE = 0.2
API_TIMEOUT_SECONDS = 3.0
MAX_ATTEMPTS = 8
"""At a 20 % failure rate, 8 failures in a row of one utterance (0.2^8) does not happen."""
DISK_SIZE = "48m"
UPTIME_SECONDS = (2.0, 9.0)
"""How long the daemon runs with audio flowing before the next kill (uniform)."""
EARLY_KILL_SHARE = 0.2
"""Kills that come while the daemon is still starting (model, recovery, connecting)."""
FINAL_LISTEN_MARGIN_SECONDS = 12.0
"""Listening undisturbed at the end, before the pendant leaves: one pass through the clips and
the longest clip more, so every sentence is heard from start to end at least once."""
AUDIO_TIMEOUT = 90.0
"""From a (re)start to audio flowing again: process start, model load, scan, connect."""
DRAIN_TIMEOUT = 240.0
RECALL_MIN = 0.85
"""Share of the words of fully heard sentences that must reach Omi (tiny.en mishears a few)."""
EXCESS_MAX = 0.08
"""Posted words not in what was heard (nor in what tiny.en hears in the same clips undisturbed,
``Program.tolerated``), as a share of the words of every sentence heard in full or in part: the
mishearings where a kill or a drop cut a sentence ("three can do for you" for "your country can
do for you"). The share is of all that was heard, because the
cut sentences, where most mishearings are, carry text too; duplicates are judged by time
(``duplicate_segments``), text on silence by ``hallucinated_segments``."""
REPEATED_MAX = 0.03
"""Words said but posted more often than heard, as a share of the words heard: a mishearing
rarely repeats a word; a window posted twice (10 to 20 words) would exceed it."""
OVERLAP_SECONDS = 0.3
ALIGN_SECONDS = 1.0
"""Posted segment times against the pendant's clock: Whisper's word times and the daemon's
anchor are off by a fraction of a second; the program's pauses between sentences are longer."""
FULLY_HEARD_MIN = len(CLIPS)
"""The final undisturbed listen alone hears each sentence from start to end."""


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()


def reference(name: str) -> str:
    manifest = json.loads((DATA / "manifest.json").read_text())
    return str(next(c["reference"] for c in manifest["clips"] if c["file"] == name))


@dataclass
class Program:
    """What the pendant's microphone plays, looped: each sentence's place and words."""

    pcm: np.ndarray
    sentences: list[tuple[int, int, list[str]]]
    """(first sample, end sample, reference words) within one pass."""
    tolerated: list[list[str]] = field(default_factory=list)
    """Per sentence: its reference words and the words tiny.en hears in it with no fault at all
    (the clip alone, and the clips in one window as the daemon packs them when it lags), so
    the model's own mishearings ("mentioning" for "mention in") are not counted as excess."""


def build_program(path: Path) -> Program:
    parts: list[np.ndarray] = [np.zeros(int(1.0 * SAMPLE_RATE), np.int16)]
    sentences = []
    at = len(parts[0])
    for name in CLIPS:
        audio = decode_file(DATA / name)
        sentences.append((at, at + len(audio), words(reference(name))))
        pause = np.zeros(int(PAUSE_SECONDS * SAMPLE_RATE), np.int16)
        parts += [audio, pause]
        at += len(audio) + len(pause)
    parts.append(np.zeros(int(END_SILENCE_SECONDS * SAMPLE_RATE), np.int16))
    pcm = np.concatenate(parts)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    program = Program(pcm, sentences)
    clips = [decode_file(DATA / name) for name in CLIPS]
    options = AsrOptions()
    model = load_model(options)
    alone = [transcribe_window(model, options, [clip])[0][0] for clip in clips]
    packed, _ = transcribe_window(model, options, clips)
    for (_, _, ref), one, many in zip(sentences, alone, packed, strict=True):
        said = collections.Counter(ref)
        for segs in (one, many):
            said |= collections.Counter(w for seg in segs for w in words(seg.text))
        program.tolerated.append(list(said.elements()))
    return program


@dataclass
class Figures:
    kills: int = 0
    early_kills: int = 0
    daemon_starts: int = 0
    asr_faults: int = 0
    api_503: int = 0
    api_timeouts: int = 0
    link_drops: int = 0
    disk_full_episodes: int = 0
    disk_full_seconds: float = 0.0
    sentences_fully_heard: int = 0
    sentences_partly_heard: int = 0
    words_spoken: int = 0
    """Reference words of the sentences the daemon heard in full."""
    words_heard: int = 0
    """Reference words of the sentences heard in full or in part."""
    words_posted: int = 0
    words_recalled: int = 0
    words_excess: int = 0
    """Posted words beyond the reference words of everything heard (mishearings)."""
    words_repeated: int = 0
    """Of those, words that were said but are posted more often than they were heard."""
    duplicate_segments: int = 0
    hallucinated_segments: int = 0
    """Posted segments at a moment the pendant played silence."""
    worst_alignment_seconds: float = 0.0
    """The furthest a posted segment lies from any sentence played (0: each overlaps one)."""
    conversations: int = 0
    reposts: int = 0
    """Posts of a conversation Omi already had (answered from its idempotency record)."""
    quarantined: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- the parts


@pytest.fixture
def state_disk(tmp_path: Path) -> Iterator[Path]:
    """The state directory on a small tmpfs, so the test can fill it for real."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE},mode=0755", "tmpfs", str(mnt)],
                   check=True, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


class Simulator:
    """``python -m omi_bridge_sim`` with one pendant looping ``wav``."""

    def __init__(self, bus: PrivateBus, wav: Path, log: Path) -> None:
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "omi_bridge_sim", "--bus", bus.address, "--omi", f"{PENDANT}:{wav}",
             "--after-clip", "loop"],
            env=bus.env(), stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline(), f"simulator did not start: {log.read_text()[-2000:]}"
        self.bus = bus

    def _call(self, fn: Callable[[SimControlClient], Any]) -> Any:
        async def go() -> Any:
            async with SimControlClient(self.bus.address) as client:
                return await fn(client)

        return asyncio.run(go())

    def frames_sent(self) -> int:
        return int(self._call(lambda c: c.stats(PENDANT))["model"]["frames_sent"])

    def drop_link(self) -> None:
        self._call(lambda c: c.drop_link(PENDANT))

    def set_in_range(self, in_range: bool) -> None:
        self._call(lambda c: c.set_in_range(PENDANT, in_range))

    def frame_log(self) -> dict[str, Any]:
        return dict(self._call(lambda c: c.frame_log(PENDANT)))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Daemon:
    """``omi-bridge run`` with injected transcription faults, restarted after every kill."""

    def __init__(self, config: Path, env: dict[str, str], log: Path) -> None:
        self.config, self.env, self.log = config, env, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with self.log.open("ab") as fh:
            fh.write(f"\n===== start {self.starts + 1}\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "omi_bridge_sim.faults", "run", "--config", str(self.config)],
                env=self.env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.starts += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


def write_config(tmp_path: Path, storage: Path, api_url: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"""[[devices]]
kind = "omi"
address = "{PENDANT}"
name = "pendant"

[conversation]
gap_seconds = {GAP_SECONDS}

[link]
scan_timeout_seconds = 2.0
reconnect_max_seconds = 1.0

[asr]
max_attempts = {MAX_ATTEMPTS}

[api]
base_url = "{api_url}"
api_key = "{API_KEY}"
timeout_seconds = {API_TIMEOUT_SECONDS}
writes_per_hour = 100000

[storage]
dir = "{storage}"
""")
    path.chmod(0o600)
    return path


def closed(run_dir: Path) -> bool:
    """The daemon is up, the pendant's conversation closed and every window transcribed."""
    st = read_state(run_dir)
    devs = st.get("devices") or [{}]
    tr = st.get("transcription") or {}
    return bool(st.get("ready") and not devs[0].get("conversation_open")
                and tr.get("backlog_seconds") == 0 and not tr.get("utterances_waiting"))


def retry_waiting(config: Path, env: dict[str, str]) -> None:
    """``omi-bridge outbox retry ID`` for every item waiting on a back-off."""
    cli = [sys.executable, "-m", "bridge", "outbox"]
    listed = subprocess.run([*cli, "list", "--json", "--config", str(config)], env=env,
                            capture_output=True, text=True, check=True)
    for item in json.loads(listed.stdout):
        if item["state"] == "waiting":
            subprocess.run([*cli, "retry", str(item["id"]), "--config", str(config)], env=env,
                           capture_output=True, text=True, check=False)


def read_state(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                                 + log.read_text(errors="replace")[-6000:])
        time.sleep(0.1)
    return value


def fill(disk: Path) -> Path:
    ballast = disk / "ballast"
    with open(ballast, "ab", buffering=0) as f:
        try:
            while True:
                f.write(bytes(256 * 1024))
        except OSError:
            pass
    return ballast


# ---------------------------------------------------------------- the judgement


@dataclass
class Hearing:
    """What the daemon could have heard of the program, from the pendant's frame log."""

    full: list[list[str]]
    """Sentences whose every frame reached the host while it could record."""
    part: list[list[str]]
    """Sentences of which only some frames did (cut by a kill, a drop, the full disk, the end of
    the run), or whose start fell out of the pendant's bounded frame log."""
    spoken: list[tuple[float, float]]
    """Monotonic (start, end) of every sentence the pendant played during the log."""
    tolerated: collections.Counter[str] = field(default_factory=collections.Counter)
    """``Program.tolerated`` of every sentence heard in full or in part."""


def heard(program: Program, log: dict[str, Any], deaf: list[tuple[float, float]]) -> Hearing:
    """``deaf``: monotonic periods around a full disk, when capture pauses by design: a sentence
    played in one is heard at most in part (its words may be posted, none must be)."""
    fs = int(log["frame_samples"])
    runs = log["runs"]
    last = max((r[1] for r in runs), default=-1)
    logged_from = min((r[0] for r in runs), default=0)
    # 0 not sent, 1 sent, 2 sent while the disk was full: the daemon pauses capture at its first
    # failed write and resumes at a probe write, both between the test's marks, which the
    # published state (a 2 s tick) shows late, so what it heard around them is uncertain.
    status = np.zeros(last + 1, dtype=np.int8)
    for first, end, st, _due in runs:
        if st == "sent":
            status[first:end + 1] = 1
    frame_seconds = fs / SAMPLE_RATE
    first, _end, _st, due = runs[0]
    clock_start = due - (first + 1) * frame_seconds
    for t0, t1 in deaf:
        a = max(0, int((t0 - clock_start) / frame_seconds))
        b = min(last + 1, int((t1 - clock_start) / frame_seconds) + 1)
        status[a:b] = np.where(status[a:b] == 1, 2, 0)
    total = len(program.pcm)
    hearing = Hearing([], [], [])
    for loop in range((last + 1) * fs // total + 1):
        for (start, end, ref), tolerated in zip(program.sentences, program.tolerated, strict=True):
            a, b = (loop * total + start) // fs, (loop * total + end - 1) // fs
            if a > last:
                continue
            hearing.spoken.append((clock_start + a * frame_seconds, clock_start + (b + 1) * frame_seconds))
            sent = status[a:b + 1]
            if b <= last and a >= logged_from and (sent == 1).all():
                hearing.full.append(ref)
                hearing.tolerated.update(tolerated)
            elif sent.any() or a < logged_from:
                hearing.part.append(ref)
                hearing.tolerated.update(tolerated)
    return hearing


def judge(program: Program, log: dict[str, Any], deaf: list[tuple[float, float]], api: OmiApiSim,
          fig: Figures, wall_minus_monotonic: float, record: Path) -> None:
    """``record``: what was heard and what was posted, for a person to read after a failure."""
    hearing = heard(program, log, deaf)
    full, part = hearing.full, hearing.part
    convs = api.conversations()
    record.write_text(json.dumps({
        "fully_heard": [" ".join(r) for r in full], "partly_heard": [" ".join(r) for r in part],
        "posted": [{"started_at": c.body["started_at"],
                    "segments": [[s["start"], s["end"], s["text"]] for s in c.body["transcript_segments"]]}
                   for c in convs]}, indent=1))
    fig.sentences_fully_heard, fig.sentences_partly_heard = len(full), len(part)
    spoken = collections.Counter(w for ref in full for w in ref)
    allowed = spoken + collections.Counter(w for ref in part for w in ref)
    fig.conversations = len(convs)
    posted: collections.Counter[str] = collections.Counter()
    spans: list[tuple[datetime, datetime, str]] = []
    for conv in convs:
        started = datetime.fromisoformat(conv.body["started_at"])
        for seg in conv.body["transcript_segments"]:
            posted.update(words(seg["text"]))
            spans.append((started + timedelta(seconds=seg["start"]),
                          started + timedelta(seconds=seg["end"]), seg["text"]))
    spans.sort()
    dupes = 0
    reach: tuple[datetime, datetime, str] | None = None  # the span reaching furthest so far
    for span in spans:
        if reach is not None and (min(reach[1], span[1]) - span[0]).total_seconds() > OVERLAP_SECONDS:
            dupes += 1
            fig.notes.append(f"overlap: {reach[2]!r} / {span[2]!r}")
        if reach is None or span[1] > reach[1]:
            reach = span
        t0, t1 = (t.timestamp() - wall_minus_monotonic for t in span[:2])
        off = min((max(a - t1, t0 - b, 0.0) for a, b in hearing.spoken), default=float("inf"))
        fig.worst_alignment_seconds = max(fig.worst_alignment_seconds, round(off, 2))
        if off >= ALIGN_SECONDS:
            fig.hallucinated_segments += 1
            fig.notes.append(f"text where nothing was said: {span[2]!r}")
    fig.duplicate_segments = dupes
    fig.words_spoken = sum(spoken.values())
    fig.words_heard = sum(allowed.values())
    fig.words_posted = sum(posted.values())
    fig.words_recalled = sum((posted & spoken).values())
    tolerated = hearing.tolerated
    fig.words_excess = sum((posted - tolerated).values())
    fig.words_repeated = sum(n for w, n in (posted - tolerated).items() if allowed[w])
    if fig.words_excess:
        fig.notes.append(f"excess: {dict(posted - tolerated)}")
    ok_posts = [r for r in api.requests() if r.status == 200 and r.client_session_id]
    fig.reposts = len(ok_posts) - len({r.client_session_id for r in ok_posts})


# ---------------------------------------------------------------- the test


def test_ten_kills_and_every_fault_lose_no_word_and_post_none_twice(
        tmp_path: Path, state_disk: Path) -> None:
    fig, summary = chaos(tmp_path, state_disk, SHORT_KILLS, SEED, "")
    assert shortfalls(fig, SHORT_KILLS) == [], summary
    assert shutil.disk_usage(state_disk).free > 0


@pytest.mark.chaos
def test_sigkills_and_faults_lose_no_word_and_post_none_twice(
        tmp_path: Path, state_disk: Path) -> None:
    fig, summary = chaos(tmp_path, state_disk, KILLS, SEED, FIGURES)
    assert shortfalls(fig, KILLS) == [], summary
    assert shutil.disk_usage(state_disk).free > 0


def shortfalls(fig: Figures, kills: int) -> list[str]:
    """What a user would notice in the run's figures: a fault kind that never came, a word lost,
    posted twice or on silence, more mishearings than tiny.en makes."""
    checks = {
        "every kill happened, one before audio and one with the disk full":
            fig.kills == kills and fig.early_kills > 0 and fig.disk_full_episodes > 0,
        "every fault kind came": bool(fig.asr_faults > 0 and fig.api_503 and fig.api_timeouts
                                      and fig.link_drops),
        "enough sentences heard in full": fig.sentences_fully_heard >= FULLY_HEARD_MIN,
        "no segment posted twice": fig.duplicate_segments == 0,
        "no text where nothing was said": fig.hallucinated_segments == 0,
        "nothing quarantined": fig.quarantined == 0,
        "words recalled": fig.words_recalled >= RECALL_MIN * fig.words_spoken,
        "words beyond what was heard": fig.words_excess <= EXCESS_MAX * fig.words_heard,
        "words posted more often than heard": fig.words_repeated <= REPEATED_MAX * fig.words_heard,
    }
    return [name for name, ok in checks.items() if not ok]


def chaos(tmp_path: Path, state_disk: Path, kills: int, seed: int, figures: str) -> tuple[Figures, str]:
    """``kills`` SIGKILLs; each kind of fault comes at least once (ASR: the first window of every
    start fails), more at random."""
    rng = random.Random(seed)
    fig = Figures()
    t0 = time.monotonic()
    wall_minus_monotonic = time.time() - t0  # the simulator's frame clock is this machine's monotonic
    program = build_program(tmp_path / "program.wav")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fault_log = tmp_path / "asr-faults.log"
    dlog, slog = tmp_path / "daemon.log", tmp_path / "sim.log"
    with PrivateBus() as bus, OmiApiSim({API_KEY: ApiKey()}, limit=1_000_000) as api:
        config = write_config(tmp_path, state_disk / "state", api.url)
        env = bus.env()
        for name in ("STATE_DIRECTORY", "INVOCATION_ID", "JOURNAL_STREAM", "NOTIFY_SOCKET",
                     "WATCHDOG_USEC", "WATCHDOG_PID", "OMI_API_KEY", "OMI_BRIDGE_CONFIG"):
            env.pop(name, None)
        env.update({"RUNTIME_DIRECTORY": str(run_dir), FAIL_RATE_ENV: str(ASR_FAIL_RATE),
                    FAULT_LOG_ENV: str(fault_log), FAIL_FIRST_ENV: "1"})
        daemon = Daemon(config, env, dlog)
        sim: Simulator | None = None
        deaf: list[tuple[float, float]] = []
        try:
            daemon.start()
            sim = Simulator(bus, tmp_path / "program.wav", slog)
            disk_episode_at = {kills // 2} | set(range(kills // 2 + 25, kills, 25))
            forced = ["503", "timeout", "drop"]  # each once, in the first runs with audio
            for kill in range(kills):
                if kill not in disk_episode_at and (kill == 1 or rng.random() < EARLY_KILL_SHARE):
                    # Killed while starting: loading the model, recovering the spool, connecting.
                    time.sleep(rng.uniform(0.3, 4.0))
                    assert daemon.alive(), dlog.read_text(errors="replace")[-4000:]
                    daemon.kill()
                    fig.kills += 1
                    fig.early_kills += 1
                    daemon.start()
                    continue
                before = sim.frames_sent()

                def flowing(b: int = before) -> bool:
                    return sim.frames_sent() > b + 50

                wait_for(flowing, AUDIO_TIMEOUT, "audio to flow to the daemon", dlog)
                if kill in disk_episode_at:
                    fill_for = rng.uniform(3.0, 6.0)
                    deaf_from = time.monotonic()
                    ballast = fill(state_disk)
                    paused = wait_for(lambda: any(d.get("capture_paused") for d in
                                                  read_state(run_dir).get("devices", [])) or None,
                                      30, "status to say capture is paused", dlog)
                    assert paused
                    time.sleep(fill_for)  # the full disk lasts a while (schedule, not sync)
                    ballast.unlink()
                    fig.disk_full_episodes += 1
                    fig.disk_full_seconds += fill_for
                    wait_for(lambda: not any(d.get("capture_paused") for d in
                                             read_state(run_dir).get("devices", [])),
                             30, "capture to resume by itself", dlog)
                    deaf.append((deaf_from, time.monotonic() + 1.0))
                deadline = time.monotonic() + rng.uniform(*UPTIME_SECONDS)
                while time.monotonic() < deadline:  # faults while it runs (schedule, not sync)
                    roll = rng.random()
                    api_busy = api.faults_pending > 0
                    if forced and kill not in disk_episode_at and not (api_busy and forced[0] != "drop"):
                        roll = {"503": 0.0, "timeout": 0.1, "drop": 0.14}[forced.pop(0)]
                        api_busy = False
                    if roll < 0.12 and api_busy:
                        # One API fault waits at a time, so each figure counts a failed request:
                        # queued faults would fail every POST for the rest of a long run.
                        roll = 1.0
                    if roll < 0.08:
                        api.inject(503)
                        fig.api_503 += 1
                    elif roll < 0.12:
                        api.slow_next(API_TIMEOUT_SECONDS + 1.0)
                        fig.api_timeouts += 1
                    elif roll < 0.16:
                        sim.drop_link()
                        fig.link_drops += 1
                    time.sleep(0.5)
                assert daemon.alive(), dlog.read_text(errors="replace")[-4000:]
                daemon.kill()
                fig.kills += 1
                daemon.start()
            # The end: the pendant walks out of range, its last conversation closes on the gap,
            # and everything spooled, transcribed and queued reaches Omi.
            before = sim.frames_sent()
            wait_for(lambda: sim.frames_sent() > before + 50, AUDIO_TIMEOUT, "audio", dlog)
            time.sleep(len(program.pcm) / SAMPLE_RATE + FINAL_LISTEN_MARGIN_SECONDS)
            sim.set_in_range(False)
            log = sim.frame_log()

            def drained() -> bool:
                st = read_state(run_dir)
                if not st.get("ready"):
                    return False
                devs = st.get("devices") or [{}]
                tr = st.get("transcription") or {}
                ob = st.get("outbox") or {}
                return (not devs[0].get("conversation_open") and tr.get("backlog_seconds") == 0
                        and not tr.get("utterances_waiting")
                        and ob.get("queued", 0) + ob.get("waiting", 0) == 0)

            wait_for(lambda: closed(run_dir), DRAIN_TIMEOUT, "the last conversation to close", dlog)
            # A long outage leaves items on a back-off of up to half an hour; once the faults end
            # the user asks for them now, as the journal suggests.
            retry_waiting(config, env)
            wait_for(drained, DRAIN_TIMEOUT, "every conversation to reach Omi", dlog)
            final = read_state(run_dir)
            fig.quarantined = int((final.get("transcription") or {}).get("quarantined") or 0)
            assert daemon.terminate() == 0, dlog.read_text(errors="replace")[-4000:]
        finally:
            daemon.kill()
            if sim is not None:
                sim.stop()
        fig.daemon_starts = daemon.starts
        fig.asr_faults = len(fault_log.read_text().splitlines()) if fault_log.exists() else 0
        judge(program, log, deaf, api, fig, wall_minus_monotonic,
              tmp_path / "heard-and-posted.json")
    fig.seconds = round(time.monotonic() - t0, 1)
    summary = json.dumps(fig.__dict__, indent=2)
    print(summary)
    if figures:
        Path(figures).write_text(summary + "\n")
    return fig, summary
