"""A SIGKILL in the middle of a sentence leaves no trace in what Omi receives.

Two pendants in one simulator play the same monologue to two daemons (``omi-bridge run``, real
bleak over the fake bluetoothd, each with its own local Omi API). One daemon runs undisturbed; the
other is SIGKILLed at random moments inside speech and started again at once. The pendants hold
their clip while no one is subscribed, so every word reaches a daemon; what differs is only that
the killed daemon's conversation spans the restarts.
"""

from __future__ import annotations

import random
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omi_bridge_sim.bus import PrivateBus
from omi_bridge_sim.omi_api import ApiKey, OmiApiSim
from test_daemon_e2e import API_KEY, Daemon, Simulator, daemon_env, logs, status_json, wait_for, write_config

from bench.common import wer
from bridge.audio.files import decode_file
from bridge.core.pcm import SAMPLE_RATE

pytestmark = pytest.mark.asr

DATA = Path(__file__).resolve().parent / "data"
CALM = "C0:FF:EE:00:00:21"
KILLED = "C0:FF:EE:00:00:22"
KILLS = 5
GAP_SECONDS = 8.0
"""Longer than the monologue's pauses: with no kills it is one conversation."""
LEAD_IN = 3.0
TIMEOUT = 240.0
WER_SLACK = 0.06
"""What the kills may cost in WER against the undisturbed run (171 words: 0.006 a word). Over 7
runs of 5 kills: +0.000, +0.000, +0.006, +0.009, +0.012, +0.035, +0.047 (median +0.009), the words
at the cuts ("challenges" → "changes", "library" → "Slabury"). Each SIGKILL destroys what was in
flight: notifications still in the AcquireNotify socket (read every 0.3 s, bridge/link/notify.py,
measured at 0.2 s; reading every 0.04 s made no difference over 2 runs) and the pendant's frame
that met the closed socket. The audio waiting for the VAD is kept (``.tail``) and the halves of
the cut word are joined end to end; before that, the halves split by the downtime as silence
gave +0.023, with the VAD's batch lost too +0.04 to +0.05, and closing each restart's conversation
6 conversations."""


@pytest.fixture
def monologue(tmp_path: Path) -> tuple[Path, np.ndarray, str]:
    import json

    manifest = json.loads((DATA / "manifest.json").read_text())
    clip = next(c for c in manifest["clips"] if c["file"] == "monologue.wav")
    pcm = np.concatenate([np.zeros(int(LEAD_IN * SAMPLE_RATE), np.int16), decode_file(DATA / clip["file"])])
    path = tmp_path / "monologue.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    return path, pcm, clip["reference"]


@pytest.fixture
def bus() -> Iterator[PrivateBus]:
    with PrivateBus() as b:
        yield b


@pytest.fixture
def apis() -> Iterator[tuple[OmiApiSim, OmiApiSim]]:
    with OmiApiSim({API_KEY: ApiKey()}) as a, OmiApiSim({API_KEY: ApiKey()}) as b:
        yield a, b


def inside_speech(pcm: np.ndarray, count: int, seed: int) -> list[int]:
    """Sample positions inside loud speech, one per equal share of the clip after the lead-in."""
    frame = SAMPLE_RATE // 50
    frames = pcm[: len(pcm) // frame * frame].reshape(-1, frame).astype(np.float64)
    levels = np.sqrt(np.mean(frames**2, axis=1))
    loud = levels > np.percentile(levels, 70)
    first = int(LEAD_IN * 50) + 50
    rng = random.Random(seed)
    out = []
    for k in range(count):
        lo = first + (len(levels) - first) * k // count
        hi = first + (len(levels) - first) * (k + 1) // count
        out.append(rng.choice([i for i in range(lo + 25, hi - 25) if loud[i]]) * frame)
    return out


def settled(config: Path, env: dict[str, str]) -> bool:
    """Everything heard is delivered: no conversation open, nothing to transcribe or send."""
    state: dict[str, Any] = status_json(config, env)
    if not state.get("running") or state.get("stale"):
        return False
    out = state.get("outbox", {})
    return (not any(d.get("conversation_open") for d in state.get("devices", []))
            and state.get("transcription", {}).get("backlog_seconds", 1) == 0
            and out.get("queued", 1) == 0 and out.get("waiting", 1) == 0 and out.get("sent", 0) >= 1)


def test_sigkills_mid_sentence_give_the_conversations_and_words_of_an_undisturbed_run(
        tmp_path: Path, bus: PrivateBus, apis: tuple[OmiApiSim, OmiApiSim],
        monologue: tuple[Path, np.ndarray, str]) -> None:
    wav, pcm, reference = monologue
    calm_api, killed_api = apis
    (tmp_path / "calm").mkdir()
    (tmp_path / "killed").mkdir()
    calm_cfg = write_config(tmp_path / "calm", [("omi", CALM, "calm")], calm_api.url, gap=GAP_SECONDS)
    killed_cfg = write_config(tmp_path / "killed", [("omi", KILLED, "killed")], killed_api.url,
                              gap=GAP_SECONDS)
    env = daemon_env(bus)
    calm_env = killed_env = env  # each publishes its state in its own [storage] dir
    clog, klog, slog = tmp_path / "calm.log", tmp_path / "killed.log", tmp_path / "sim.log"
    calm = Daemon(calm_cfg, calm_env, clog)
    killed = Daemon(killed_cfg, killed_env, klog)
    sim = Simulator(bus, [("omi", CALM), ("omi", KILLED)], wav, slog, extra=("--hold-while-unsubscribed",))
    try:
        frame = sim.stats(KILLED)["model"]["frame_samples"]
        for at in inside_speech(pcm, KILLS, seed=18):
            wait_for(lambda at=at: sim.stats(KILLED)["model"]["frames_produced"] * frame >= at, TIMEOUT,
                     f"the pendant to play {at / SAMPLE_RATE:.1f} s of the clip\n{logs(klog, slog)}")
            killed.kill()
            killed = Daemon(killed_cfg, killed_env, klog)
        for address in (CALM, KILLED):
            wait_for(lambda a=address: sim.stats(a)["model"]["frames_produced"] * frame >= len(pcm), TIMEOUT,
                     f"{address} to play the whole clip\n{logs(clog, klog, slog)}")
        for cfg, e in ((calm_cfg, calm_env), (killed_cfg, killed_env)):
            wait_for(lambda c=cfg, e=e: settled(c, e), TIMEOUT, f"{cfg.parent.name} to deliver\n"
                     f"{logs(clog, klog, slog)}")
    finally:
        sim.stop()
        calm.kill()
        killed.kill()

    calm_convs, killed_convs = calm_api.conversations(), killed_api.conversations()
    assert len(killed_convs) == len(calm_convs) >= 1, (
        [c.transcript for c in killed_convs], [c.transcript for c in calm_convs])
    ids = [c.client_session_id for c in killed_convs]
    assert len(ids) == len(set(ids))
    for conv in killed_convs:
        segs = conv.body["transcript_segments"]
        texts = [(s["text"], s["start"]) for s in segs]
        assert len(texts) == len(set(texts)), "a segment was posted twice"
        starts = [s["start"] for s in segs]
        assert starts == sorted(starts) and all(s["end"] > s["start"] for s in segs)
    calm_wer = wer(reference, " ".join(c.transcript for c in calm_convs))
    killed_wer = wer(reference, " ".join(c.transcript for c in killed_convs))
    assert killed_wer <= calm_wer + WER_SLACK, (killed_wer, calm_wer,
                                                      [c.transcript for c in killed_convs])
    # The time each daemon was down is a gap in the segment times, not a shift: the killed
    # conversation lasts as long as the calm one plus the downtime, never less.
    calm_span = calm_convs[-1].body["transcript_segments"][-1]["end"]
    killed_span = killed_convs[-1].body["transcript_segments"][-1]["end"]
    assert killed_span > calm_span
