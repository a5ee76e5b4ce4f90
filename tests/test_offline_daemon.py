"""An hour away, in miniature: the daemon (``omi-bridge run``, real bleak over the fake bluetoothd)
meets a pendant whose storage holds speech recorded out of range at known wall-clock times, with a
pause in recording inside one conversation and a long absence between two. Omi (the local API)
must get both conversations, transcribed as well as live audio, at the times the words were said,
each once, even though the daemon is SIGKILLed in the middle of the transfer and started again.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omi_bridge_sim.harness import SimHarness
from omi_bridge_sim.omi import FrameEncoder, OmiModel
from omi_bridge_sim.omi_api import ApiKey, OmiApiSim
from omi_bridge_sim.omi_storage import RECORD_BYTES, PendantStorage
from test_daemon_e2e import API_KEY, Daemon, daemon_env, logs, status_json, wait_for, write_config
from test_speech_pipeline import WER_FACTOR, WER_SLACK

from bench.common import wer
from bridge.audio.files import decode_file
from bridge.core.pcm import SAMPLE_RATE
from bridge.devices.omi.chunks import Spool, pendant_dir
from bridge.devices.omi.transfers import CHECKPOINT_RECORDS

pytestmark = [pytest.mark.asr,
              pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon")]

DATA = Path(__file__).resolve().parent / "data"
PENDANT = "C0:FF:EE:00:00:31"
GAP_SECONDS = 20.0
SPOKEN_AT = 1_780_000_000.0
"""When the wearer started talking, away from the Pi (2026-05-28 20:26:40 UTC)."""
PAUSE = 8.0
"""A pause in recording inside the first conversation: longer than a record's continuity (2 s),
shorter than the gap, so it stays one conversation and later words keep their true time."""
AWAY = 300.0
"""From the first clip's start to the second conversation: far more than ``GAP_SECONDS``."""
RATE = 32_000.0
"""The pendant's read rate: a CV1's ~32 kB/s (omi-storage.md §8), so the ~110 kB transfer takes
~3.5 s and a kill lands inside it."""
TIME_TOLERANCE = 2.0
"""Issue 13: offline conversations' times within ±2 s of when the words were spoken."""
TIMEOUT = 180.0
SPEECH_RMS = 300.0
"""20 ms frames louder than this (≈ −40 dBFS) are speech (as in test_speech_pipeline.py)."""


@dataclass(frozen=True)
class Said:
    """One clip as the wearer said it."""

    name: str
    at: float
    """UTC second the clip starts."""
    pcm: np.ndarray
    reference: str

    def speech(self) -> tuple[float, float]:
        """UTC times of the first and last loud 20 ms frame."""
        frames = self.pcm[: len(self.pcm) // 320 * 320].astype(float).reshape(-1, 320)
        loud = np.nonzero(np.sqrt((frames ** 2).mean(axis=1)) > SPEECH_RMS)[0]
        return self.at + loud[0] * 0.02, self.at + (loud[-1] + 1) * 0.02


def said() -> list[Said]:
    clips = json.loads((DATA / "manifest.json").read_text())["clips"]
    manifest = {c["file"]: c.get("reference") for c in clips}
    jfk = decode_file(DATA / "jfk.flac")
    second_at = SPOKEN_AT + len(jfk) / SAMPLE_RATE + PAUSE
    return [Said("jfk.flac", SPOKEN_AT, jfk, manifest["jfk.flac"]),
            Said("ljspeech/LJ001-0004.wav", second_at, decode_file(DATA / "ljspeech/LJ001-0004.wav"),
                 manifest["ljspeech/LJ001-0004.wav"]),
            Said("ljspeech/LJ001-0006.wav", SPOKEN_AT + AWAY, decode_file(DATA / "ljspeech/LJ001-0006.wav"),
                 manifest["ljspeech/LJ001-0006.wav"])]


@pytest.fixture
def api() -> Iterator[OmiApiSim]:
    with OmiApiSim({API_KEY: ApiKey()}) as sim:
        yield sim


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def whole_file_wer(clips: list[Said]) -> float:
    """The live tests' baseline: each clip transcribed whole by Whisper, same model and settings."""
    from bench.common import model

    texts = []
    for c in clips:
        segments, _ = model().transcribe(c.pcm.astype(np.float32) / 32768.0, language="en", beam_size=1,
                                         vad_filter=True)
        texts += [s.text for s in segments]
    return wer(" ".join(c.reference for c in clips), " ".join(texts))


def settled(config: Path, env: dict[str, str]) -> bool:
    """Synced and delivered: the sync is done, nothing open, transcribing or queued."""
    state: dict[str, Any] = status_json(config, env)
    if not state.get("running") or state.get("stale") or not state.get("devices"):
        return False
    dev = state["devices"][0]
    out = state.get("outbox", {})
    return ((dev.get("offline") or {}).get("state") == "done" and not dev.get("conversation_open")
            and state.get("transcription", {}).get("backlog_seconds", 1) == 0
            and out.get("queued", 1) == 0 and out.get("waiting", 1) == 0 and out.get("sent", 0) >= 2)


def test_stored_speech_reaches_omi_once_at_its_spoken_times_across_a_sigkill(
        tmp_path: Path, api: OmiApiSim) -> None:
    clips = said()
    storage = PendantStorage(rate_bytes_per_second=RATE, clock_error=-5.0)
    enc = FrameEncoder(21)
    for c in clips:
        storage.record_clip(c.pcm, c.at, enc)
    clip_records = storage.write_seq
    state_dir = tmp_path / "state"
    spool_dir = pendant_dir(state_dir, PENDANT)
    source = f"r{storage.ring_id:016x}"
    violations: list[str] = []

    def check_durable(seq: int) -> None:
        # Called by the pendant before an ADVANCE frees anything: it must be on the Pi's disk.
        on_disk = Spool(spool_dir).fetched(source) or 0 if spool_dir.exists() else 0
        if on_disk < seq:
            violations.append(f"ADVANCE to {seq} with {on_disk} records on disk")

    storage.on_advance = check_durable
    # The microphone hears silence now: live audio keeps streaming, and nothing new is said.
    pendant = OmiModel(address=PENDANT, audio=np.zeros(SAMPLE_RATE, np.int16), after_clip="silence",
                       firmware="3.0.20", storage=storage)
    config = write_config(tmp_path, [("omi", PENDANT, "pendant")], api.url, gap=GAP_SECONDS)
    log = tmp_path / "daemon.log"
    with SimHarness([pendant]) as sim:
        env = daemon_env(sim.bus)  # type: ignore[arg-type]
        first = Daemon(config, env, log)
        second = None
        try:
            def durable_records() -> int:
                return Spool(spool_dir).fetched(source) or 0 if (spool_dir / "sync.json").exists() else 0

            # SIGKILL once a checkpoint is on disk, while the pendant is still sending.
            wait_for(lambda: durable_records() >= CHECKPOINT_RECORDS, TIMEOUT,
                     f"the first checkpoint on disk\n{logs(log)}")
            first.kill()
            sent_at_kill = sim.run(lambda _f: storage.stats.data_bytes_sent)
            assert sent_at_kill < clip_records * RECORD_BYTES, "the transfer ended before the kill"
            assert sim.run(lambda _f: list(storage.stats.advances)) == [], "freed before the batch ended"
            assert api.conversations() == []

            second = Daemon(config, env, log)
            wait_for(lambda: settled(config, env), TIMEOUT, f"the sync to be delivered\n{logs(log)}")
            assert second.terminate() == 0, logs(log)
        finally:
            first.kill()
            if second is not None:
                second.kill()
        stats = sim.run(lambda _f: (storage.stats.data_bytes_sent, storage.stats.records_written,
                                    list(storage.stats.advances), storage.stats.clears, storage.unread))

    sent, written, advances, clears, unread = stats
    # Durable before destructive: never freed ahead of the disk, never cleared, freed in the end.
    assert violations == []
    assert clears == 0 and advances and unread == 0
    # Resumed, not restarted: re-read at most what was in flight past the last checkpoint.
    assert sent - written * RECORD_BYTES <= sent_at_kill, (sent, written, sent_at_kill)

    convs = sorted(api.conversations(), key=lambda c: c.body["started_at"])
    assert len(convs) == 2, [(c.client_session_id, c.transcript) for c in convs]
    posted = [r.client_session_id for r in api.requests() if r.client_session_id]
    assert sorted(posted) == sorted(c.client_session_id for c in convs), posted
    for conv in convs:
        assert conv.body["source"] == "omi" and PENDANT in conv.client_session_id
        segs = [(s["text"], s["start"], s["end"]) for s in conv.body["transcript_segments"]]
        assert len(segs) == len(set(segs)), "a segment was posted twice"
        assert [s[1] for s in segs] == sorted(s[1] for s in segs)

    # True times (the pendant's clock ran 5 s slow until the bridge set it).
    one, two = convs
    start_one, finish_one = (datetime.fromisoformat(one.body[k]) for k in ("started_at", "finished_at"))
    start_two, finish_two = (datetime.fromisoformat(two.body[k]) for k in ("started_at", "finished_at"))
    assert abs((start_one - utc(clips[0].speech()[0])).total_seconds()) <= TIME_TOLERANCE, start_one
    assert abs((finish_one - utc(clips[1].speech()[1])).total_seconds()) <= TIME_TOLERANCE, finish_one
    assert abs((start_two - utc(clips[2].speech()[0])).total_seconds()) <= TIME_TOLERANCE, start_two
    assert abs((finish_two - utc(clips[2].speech()[1])).total_seconds()) <= TIME_TOLERANCE, finish_two
    # The pause in recording kept its length: the second clip's words start where they were said.
    after_pause = [s for s in one.body["transcript_segments"]
                   if start_one.timestamp() + s["start"] > clips[0].speech()[1] + 1.0]
    assert after_pause, one.body["transcript_segments"]
    assert abs(start_one.timestamp() + after_pause[0]["start"] - clips[1].speech()[0]) <= TIME_TOLERANCE

    # Transcribed as well as the live path is (the same bound against whole-file Whisper).
    ours = wer(" ".join(c.reference for c in clips), " ".join(c.transcript for c in convs))
    baseline = whole_file_wer(clips)
    print(f"offline WER {ours:.3f} vs whole-file {baseline:.3f}")
    assert ours <= baseline * WER_FACTOR + WER_SLACK, (ours, baseline, [c.transcript for c in convs])
