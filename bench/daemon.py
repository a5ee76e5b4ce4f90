"""The daemon as users run it: idle CPU while a pendant streams silence, and peak memory.

``omi-bridge run`` in its own process (real bleak, the real link, speech pipeline, worker and
outbox), ``python -m omi_bridge_sim`` in another (our fake bluetoothd on a private D-Bus, simulated
pendants streaming firmware-encoded Opus at the real rate), and the simulated Omi API on
loopback. Each pendant says one clip after a lead-in, then streams encoded digital silence.

- **Idle CPU**: once the conversation has reached the API (the gap has closed it), the daemon's
  CPU time (``/proc/PID/stat`` utime + stime, all its threads) over a window of wall time while
  the pendant keeps streaming silence. The simulator and dbus-daemon stand in for the radio and
  BlueZ and are not counted.
- **Peak RSS**: the daemon process's peak resident set (``VmHWM``, read just before SIGTERM; see
  ``peak_rss_mb`` for why not ``ru_maxrss``) with one pendant and with four, each transcribing a
  clip; each extra device = the difference / 3.
- **Peak RSS with remote ASR** (the Pi Zero 2 W's 512 MB, or 32-bit Pi OS): one pendant with
  ``[asr] backend = "wyoming"`` and a real ``wyoming-faster-whisper`` on loopback (its own process,
  not counted), so tiny.en is never loaded in the daemon. Twice: with the ``local-asr`` extra
  installed (Silero VAD through onnxruntime is still loaded) and as installed without it
  (onnxruntime, faster-whisper and ctranslate2 hidden from the daemon: the level VAD instead).

Where the one-pendant peak goes (VmRSS after each step of the daemon's own start, tiny.en int8,
one arena; this x86 VM, MB): interpreter 11, numpy +15, onnxruntime +20, ctranslate2 +12,
tokenizers +3, bleak + dbus-fast + the bridge +5 (66); the model +75 (141; its load peaks 100 above
that: CTranslate2 widens the float16 file to float32 before quantising it to int8), the Silero
session +9 (150). Each Whisper call then adds ≈ 100 MB for the length of its encoder pass, whatever
the audio's length: the 30 s window's self-attention holds scores and softmax as two float32
arrays of 6 heads × 1500² (54 MB each). So the peak is ≈ 150 + 100; about half of the 150 is
file-backed (the libraries' code). PyAV (+17) is not loaded (bridge/speech/asr/local.py), and one
malloc arena lets the encoder reuse what the model load freed (bridge/app/memory.py): 278–289 →
253–259 MB. Below 200 needs a smaller encoder transient (a window shorter than 30 s, which
changes Whisper's words) or a VAD without onnxruntime.

    python -m bench daemon [--quick]
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
from omi_bridge_sim.bus import PrivateBus
from omi_bridge_sim.omi_api import ApiKey, OmiApiSim

from bench.common import Results, load_corpus, median, part_main, pi4_cpu, silence, spread
from bridge.core.pcm import SAMPLE_RATE

KEY = "omi_dev_bench_key"
LEAD_SECONDS = 6.0
"""Silence before the pendant speaks: the daemon loads its model, finds the adapter, scans and
connects meanwhile (audio produced before that is lost, as with a real pendant)."""
GAP_SECONDS = 3.0
START_TIMEOUT = 60.0
CONVERSATION_TIMEOUT = 120.0
STOP_TIMEOUT = 20.0
POLL = 0.2
IDLE_GOAL_PERCENT = 0.3
RSS_GOAL_MB = 200.0
"""Issue 17: a Pi Zero 2 W has 512 MB."""
EXTRA_GOAL_MB = 20.0
LOCAL_ASR_MODULES = ("onnxruntime", "faster_whisper", "ctranslate2")
"""What the ``local-asr`` extra installs (pyproject.toml); hidden for the run "without local-asr"."""
WITHOUT_LOCAL_ASR = (
    "import sys\n"
    f"for name in {LOCAL_ASR_MODULES!r}:\n"
    # None in sys.modules: importing fails and find_spec says "not installed", as on armv7.
    "    sys.modules[name] = None\n"
    "from bridge.cli import main\n"
    "sys.exit(main())\n")
"""The daemon's entry point as it runs where the ``local-asr`` extra is not installed."""
ADDRESSES = ("C0:FF:EE:00:BE:01", "C0:FF:EE:00:BE:02", "C0:FF:EE:00:BE:03", "C0:FF:EE:00:BE:04")


def write_wav(path: Path, pcm: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.astype("<i2").tobytes())


def write_config(tmp: Path, addresses: list[str], api_url: str, asr_uri: str | None = None) -> Path:
    text = "".join(f'[[devices]]\nkind = "omi"\naddress = "{a}"\nname = "bench-{i}"\n\n'
                   for i, a in enumerate(addresses))
    text += f"""[conversation]
gap_seconds = {GAP_SECONDS}

[link]
scan_timeout_seconds = 2.0
reconnect_max_seconds = 2.0

[api]
base_url = "{api_url}"
api_key = "{KEY}"

[storage]
dir = "{tmp / 'state'}"
"""
    if asr_uri is not None:
        text += f'\n[asr]\nbackend = "wyoming"\nuri = "{asr_uri}"\n'
    path = tmp / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def proc_cpu(pid: int) -> float:
    """utime + stime of a live process, all threads, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    """VmHWM, the process's own peak resident set. Not ``ru_maxrss`` from ``wait4``: on Linux
    exec keeps the forking parent's high-water mark there, so a daemon started from this bench
    (which holds the model and the corpus) would report the bench's memory, not its own."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/PID/status")


def sim_frames(bus: str, address: str) -> int:
    from omi_bridge_sim.control import SimControlClient

    async def get() -> Any:
        async with SimControlClient(bus) as client:
            return await client.stats(address)

    data = asyncio.run(get())
    data = data if isinstance(data, dict) else json.loads(data)
    model = data.get("model", data)
    return int(model.get("frames_sent", 0))


def session(n_devices: int, tmp: Path, *, speech: np.ndarray | None, idle_seconds: float,
            idle_slices: int = 4, link_only: bool = False, asr_uri: str | None = None,
            local_asr: bool = True) -> dict[str, Any]:
    """One daemon run; returns peak RSS (MB), idle CPU % per slice, frames streamed meanwhile."""
    addresses = list(ADDRESSES[:n_devices])
    wav = tmp / "pendant.wav"
    pcm = silence(LEAD_SECONDS) if speech is None else np.concatenate([silence(LEAD_SECONDS), speech])
    write_wav(wav, pcm)
    out: dict[str, Any] = {"devices": n_devices}
    bus = PrivateBus().start()
    api = OmiApiSim({KEY: ApiKey()}).start()
    sim = daemon = None
    log = (tmp / "daemon.log").open("ab")
    slog = (tmp / "sim.log").open("ab")
    try:
        env = bus.env()
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "OMI_API_KEY", "OMI_BRIDGE_CONFIG",
                     "STATE_DIRECTORY", "RUNTIME_DIRECTORY", "INVOCATION_ID", "JOURNAL_STREAM"):
            env.pop(name, None)
        config = write_config(tmp, addresses, api.url, asr_uri)
        entry = ["-m", "bridge"] if local_asr else ["-c", WITHOUT_LOCAL_ASR]
        daemon = subprocess.Popen([sys.executable, *entry, "run", "--config", str(config)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        args = [sys.executable, "-m", "omi_bridge_sim", "--bus", bus.address]
        for a in addresses:
            args += ["--omi", f"{a}:{wav}"]
        sim = subprocess.Popen(args, env=bus.env(), stdout=subprocess.PIPE, stderr=slog,
                               stdin=subprocess.DEVNULL, text=True)
        assert sim.stdout is not None
        if not sim.stdout.readline():
            raise RuntimeError(f"simulator did not start; see {tmp / 'sim.log'}")
        deadline = time.monotonic() + START_TIMEOUT
        while not all(sim_frames(bus.address, a) > 0 for a in addresses):
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise RuntimeError(f"daemon never streamed from every pendant: {_tail(tmp / 'daemon.log')}")
            time.sleep(POLL)  # polling another process's counters
        if speech is not None:
            if not api.wait_until(lambda: len(api.conversations()) >= n_devices, CONVERSATION_TIMEOUT):
                raise RuntimeError(f"conversations never reached the API: {_tail(tmp / 'daemon.log')}")
            out["conversations"] = len(api.conversations())
        if idle_seconds:
            slices = []
            frames0 = sim_frames(bus.address, addresses[0])
            for _ in range(idle_slices):
                cpu0, wall0 = proc_cpu(daemon.pid), time.monotonic()
                time.sleep(idle_seconds / idle_slices)  # the measured window of wall time
                slices.append((proc_cpu(daemon.pid) - cpu0) / (time.monotonic() - wall0) * 100)
            out["idle"] = slices
            out["idle_frames"] = sim_frames(bus.address, addresses[0]) - frames0
            out["idle_seconds"] = idle_seconds
        out["rss_mb"] = peak_rss_mb(daemon.pid)  # the high-water mark: as late as possible
        daemon.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while True:
            pid, status, usage = os.wait4(daemon.pid, os.WNOHANG)
            if pid:
                daemon.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                daemon.kill()
                pid, status, usage = os.wait4(daemon.pid, 0)
                daemon.returncode = os.waitstatus_to_exitcode(status)
                break
            time.sleep(POLL)
        out["ru_maxrss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux; see peak_rss_mb
        out["exit"] = daemon.returncode
        if idle_seconds and link_only:
            out["link_only"] = listen_cpu(bus.address, env, addresses[0], idle_seconds, tmp)
    finally:
        if daemon is not None and daemon.returncode is None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if sim is not None and sim.poll() is None:
            sim.terminate()
            try:
                sim.wait(10)
            except subprocess.TimeoutExpired:
                sim.kill()
                sim.wait()
        api.stop()
        bus.stop()
        log.close()
        slog.close()
    return out


def listen_cpu(bus: str, env: dict[str, str], address: str, seconds: float, tmp: Path) -> float:
    """CPU % of ``omi-bridge listen`` (the link alone: bleak, D-Bus, reassembly, Opus, timeline,
    WAV writing; no VAD, no daemon) on the same silent pendant: where the daemon's idle CPU goes."""
    before = sim_frames(bus, address)
    with (tmp / "listen.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bridge", "listen", address, "--kind", "omi",
                                 "--seconds", str(seconds + START_TIMEOUT), "--wav", str(tmp / "listen.wav")],
                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while sim_frames(bus, address) <= before + 50:  # connected and a second of audio in
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"listen never streamed: {_tail(tmp / 'listen.log')}")
                time.sleep(POLL)
            cpu0, wall0 = proc_cpu(proc.pid), time.monotonic()
            time.sleep(seconds)  # the measured window of wall time
            return (proc_cpu(proc.pid) - cpu0) / (time.monotonic() - wall0) * 100
        finally:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def run(res: Results) -> None:
    clips = {c.name: c.pcm for c in load_corpus()}
    speech = clips.get("jfk.flac")
    if speech is None:
        from omi_bridge_sim.audio import demo_speech_path, load_pcm16k

        speech = load_pcm16k(demo_speech_path())
    with tempfile.TemporaryDirectory(prefix="omi-bench-d1-") as tmp:
        if res.quick:
            one = session(1, Path(tmp), speech=None, idle_seconds=1.0, idle_slices=1)
        else:
            one = session(1, Path(tmp), speech=speech, idle_seconds=20.0, link_only=True)
    idle = median(one["idle"])
    rate = one["idle_frames"] / one["idle_seconds"]
    res.add("idle_cpu", f"{idle:.2f} % of a core", ok=idle <= IDLE_GOAL_PERCENT,
            ratio=idle / IDLE_GOAL_PERCENT, pi4=pi4_cpu(idle),
            note=f"daemon process, {one['idle_seconds']:g} s while the pendant streamed {rate:.0f} Opus "
                 f"frames/s of silence; median of {len(one['idle'])} slices ({spread(one['idle'])} %)")
    if "link_only" in one:
        res.rows["idle_cpu"].note += (f"; `omi-bridge listen` on the same pendant (link alone, no VAD, no "
                                      f"daemon) {one['link_only']:.2f} %")
    print(f"idle: {idle:.2f} %  slices {one['idle']}  link only {one.get('link_only')}")
    if res.quick:
        res.add("rss", f"{one['rss_mb']:.0f} MB / not measured (--quick)",
                note="quick: one silent pendant, no transcription")
        remote_rss(res, one, None)
        return
    with tempfile.TemporaryDirectory(prefix="omi-bench-d4-") as tmp:
        four = session(4, Path(tmp), speech=speech, idle_seconds=0.0)
    extra = (four["rss_mb"] - one["rss_mb"]) / 3
    ok = one["rss_mb"] <= RSS_GOAL_MB and extra <= EXTRA_GOAL_MB
    res.add("rss", f"{one['rss_mb']:.0f} MB / {extra:+.1f} MB", ok=ok,
            ratio=max(one["rss_mb"] / RSS_GOAL_MB, extra / EXTRA_GOAL_MB),
            pi4=f"≈ {one['rss_mb']:.0f} MB (the same libraries and model on aarch64; not scaled)",
            note=f"daemon VmHWM: 1 pendant {one['rss_mb']:.0f} MB, 4 pendants {four['rss_mb']:.0f} MB, "
                 "each transcribing one clip; (4 − 1) / 3 per extra device")
    res.plots["rss"] = {"1 device": one["rss_mb"], "4 devices": four["rss_mb"]}
    print(f"rss: one {one['rss_mb']:.0f} MB, four {four['rss_mb']:.0f} MB")
    remote_rss(res, one, speech)


def remote_rss(res: Results, local: dict[str, Any], speech: np.ndarray | None) -> None:
    """The ``rss_remote`` row: one pendant with ``backend = "wyoming"``, with and without the
    local-asr extra, next to ``local`` (the same pendant transcribed by tiny.en in the daemon)."""
    from omi_bridge_sim.wyoming import FakeWyomingServer, WyomingServer

    runs = {}
    with tempfile.TemporaryDirectory(prefix="omi-bench-dw-") as tmp:
        # The quick run's pendant is silent: nothing reaches the server, a stand-in will do.
        server = FakeWyomingServer([]) if speech is None else WyomingServer(Path(tmp))
        with server:
            for extra in (True, False):
                work = Path(tmp) / ("with" if extra else "without")
                work.mkdir()
                runs[extra] = session(1, work, speech=speech, idle_seconds=0.0, asr_uri=server.uri,
                                      local_asr=extra)
                if not extra and "Silero VAD is not installed" not in _tail(work / "daemon.log", 20_000):
                    raise RuntimeError("the daemon without local-asr did not fall back to the level VAD")
    with_, without = runs[True]["rss_mb"], runs[False]["rss_mb"]
    what = "one silent pendant (--quick)" if speech is None else "one pendant transcribing one clip"
    server_what = "a stand-in server" if speech is None else "wyoming-faster-whisper in its own process"
    res.add("rss_remote", f"{with_:.0f} MB / {without:.0f} MB",
            note=f"daemon VmHWM, {what}, backend = \"wyoming\" ({server_what}, not counted): "
                 f"with local-asr installed (Silero VAD loaded) {with_:.0f} MB, "
                 f"without it (level VAD; 32-bit Pi OS) {without:.0f} MB; tiny.en in the daemon: "
                 f"{local['rss_mb']:.0f} MB")
    res.plots["rss"] = {**res.plots.get("rss", {}), "wyoming + Silero": with_,
                        "wyoming, no local-asr": without}
    print(f"rss remote: with local-asr {with_:.0f} MB, without {without:.0f} MB")


def main(argv: list[str] | None = None) -> int:
    return part_main("daemon", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
