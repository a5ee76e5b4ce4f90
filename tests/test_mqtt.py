"""Home Assistant over MQTT, as a user would run it: a real mosquitto broker on a free loopback
port, ``omi-bridge run`` in its own process with ``[mqtt]`` pointed at it, a simulated pendant
on a private bus, and a subscriber reading what Home Assistant would read.

What Home Assistant needs to show a device without YAML (docs/reference/home-assistant-mqtt.md):
a retained config per entity on ``homeassistant/<component>/<node>/<object>/config`` with a
``unique_id``, a ``state_topic``, a ``device`` block with ``identifiers`` and an availability
topic that turns ``offline`` when the bridge dies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import test_daemon_e2e as e2e
from omi_bridge_sim.bus import PrivateBus
from omi_bridge_sim.omi_api import OmiApiSim
from paho.mqtt.enums import CallbackAPIVersion
from test_daemon_e2e import Daemon, Simulator, daemon_env, logs, write_config

from bridge.app.mqtt import MqttPublisher
from bridge.cli import main
from bridge.config import MqttOptions
from bridge.core.health import DeviceHealth, HealthSnapshot

START_TIMEOUT = 60.0
"""Daemon start (model load) to the first discovery message."""
EVENT_TIMEOUT = 20.0
"""A pendant change (battery, link, button) to its MQTT message: the daemon publishes within ~3 s."""
CONVERSATION_TIMEOUT = 120.0
PENDANT = "C0:FF:EE:00:00:01"
AWAY = "C0:FF:EE:00:00:09"
PREFIX = "omi-bridge"
DISCOVERY = "homeassistant"

# The e2e module's fixtures: a private bus, the fake Omi API, the demo clip after a lead-in.
bus, api, speech_wav = e2e.bus, e2e.api, e2e.speech_wav



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


BRIDGE_USER, BRIDGE_PASSWORD = "omi-bridge", "broker-pass-7f3a"
HA_USER, HA_PASSWORD = "homeassistant", "ha-pass-19c2"


class Broker:
    """``mosquitto -c conf`` on 127.0.0.1:port; stop() and start() again simulate an outage.
    With ``users`` it refuses anonymous clients, as a Home Assistant broker add-on does."""

    def __init__(self, directory: Path, users: dict[str, str] | None = None, *,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.port = free_port()
        self.users = users or {}
        self.cafile = tls[0] if tls else None
        self.conf = directory / "mosquitto.conf"
        # `user`: run as root (a CI container), mosquitto would switch to its own system user,
        # which cannot read the test's private directory.
        conf = (f"listener {self.port} 127.0.0.1\npersistence false\nlog_dest stderr\n"
                f"user {getpass.getuser()}\n")
        if self.users:
            passwords = directory / "mosquitto.passwd"
            passwords.touch(mode=0o600)
            for user, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwords), user, password], check=True,
                               capture_output=True)
            conf += f"allow_anonymous false\npassword_file {passwords}\n"
        else:
            conf += "allow_anonymous true\n"
        if tls:
            conf += f"certfile {tls[0]}\nkeyfile {tls[1]}\n"
        self.conf.write_text(conf)
        self.log = directory / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=fh,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                pass
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"mosquitto did not listen: {self.log.read_text()}"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@dataclass
class Received:
    topic: str
    payload: str
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


class Subscriber:
    """What Home Assistant reads: every message under both prefixes, kept in order."""

    def __init__(self, broker: Broker, topics: tuple[str, ...] = (f"{DISCOVERY}/#", f"{PREFIX}/#")) -> None:
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._topics = topics
        self._client = paho.Client(CallbackAPIVersion.VERSION2)
        self._client.on_message = self._on_message
        self._client.on_connect = self._on_connect
        if HA_USER in broker.users:
            self._client.username_pw_set(HA_USER, broker.users[HA_USER])
        if broker.cafile is not None:
            self._client.tls_set(ca_certs=str(broker.cafile))
        self._client.connect("127.0.0.1", broker.port)
        self._client.loop_start()

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        for topic in self._topics:
            client.subscribe(topic, qos=1)

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Received(msg.topic, msg.payload.decode(), bool(msg.retain)))
            self._cond.notify_all()

    def wait(self, predicate: Callable[[Received], bool], timeout: float, what: str,
             since: int = 0) -> Received:
        """The first message from index ``since`` on that matches, waiting up to ``timeout``."""
        found: list[Received] = []

        def check() -> bool:
            found[:] = [m for m in self.messages[since:] if predicate(m)]
            return bool(found)

        with self._cond:
            if not self._cond.wait_for(check, timeout):
                recent = [(m.topic, m.payload[:80]) for m in self.messages[-10:]]
                raise AssertionError(f"no MQTT message with {what} within {timeout:.0f} s; last: {recent}")
            return found[0]

    def state(self, topic: str, payload: str, timeout: float = EVENT_TIMEOUT, since: int = 0) -> Received:
        return self.wait(lambda m: m.topic == topic and m.payload == payload, timeout,
                         f"{topic} = {payload}", since)

    def any_on(self, topic: str, timeout: float = EVENT_TIMEOUT) -> Received:
        return self.wait(lambda m: m.topic == topic, timeout, topic)

    def mark(self) -> int:
        with self._cond:
            return len(self.messages)

    def latest(self, topic: str) -> str | None:
        with self._cond:
            return next((m.payload for m in reversed(self.messages) if m.topic == topic), None)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


@pytest.fixture
def broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Broker]:
    b = Broker(tmp_path, getattr(request, "param", None))
    b.start()
    yield b
    b.stop()


def mqtt_config(tmp_path: Path, devices: list[tuple[str, str, str]], api_url: str, broker: Broker,
                gap: float = 60.0) -> Path:
    path = write_config(tmp_path, devices, api_url, gap=gap)
    text = f'\n[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}\n'
    if BRIDGE_USER in broker.users:
        secret = tmp_path / "mqtt_password"
        secret.write_text(broker.users[BRIDGE_USER] + "\n")
        secret.chmod(0o600)
        text += f'username = "{BRIDGE_USER}"\npassword_file = "{secret}"\n'
    path.write_text(path.read_text() + text)
    return path


def control(sim: Simulator, method: str, *args: Any) -> None:
    import asyncio

    from omi_bridge_sim.control import SimControlClient

    async def call() -> None:
        async with SimControlClient(sim.bus.address) as client:
            await getattr(client, method)(*args)

    asyncio.run(call())


def addr_id(address: str) -> str:
    return address.replace(":", "").lower()


def device_topic(address: str, key: str) -> str:
    return f"{PREFIX}/devices/{addr_id(address)}/{key}"


def config_topic(component: str, address: str, key: str) -> str:
    return f"{DISCOVERY}/{component}/omi_{addr_id(address)}/{key}/config"


def check_discovery(msg: Received) -> dict[str, Any]:
    """What Home Assistant requires of a discovered entity that belongs to a device."""
    config = msg.json()
    assert config["unique_id"], msg.topic
    assert config["state_topic"].startswith(PREFIX + "/"), config
    assert config["device"]["identifiers"], config
    assert config["device"]["name"], config
    assert config["availability"] == [{"topic": f"{PREFIX}/status", "payload_available": "online",
                                       "payload_not_available": "offline"}], config
    return dict(config)


@pytest.mark.parametrize("broker", [{BRIDGE_USER: BRIDGE_PASSWORD, HA_USER: HA_PASSWORD}], indirect=True)
def test_home_assistant_gets_one_device_per_wearable_that_follows_link_battery_and_button(
        tmp_path: Path, bus: PrivateBus, api: OmiApiSim, broker: Broker, speech_wav: Path) -> None:
    ha = Subscriber(broker)
    config = mqtt_config(tmp_path, [("omi", PENDANT, "pendant"), ("omi", AWAY, "away")], api.url, broker)
    dlog, slog = tmp_path / "daemon.log", tmp_path / "sim.log"
    daemon = Daemon(config, daemon_env(bus), dlog)
    sim = None
    try:
        sim = Simulator(bus, [("omi", PENDANT)], speech_wav, slog)
        ha.state(f"{PREFIX}/status", "online", START_TIMEOUT)

        # Discovery: one HA device per wearable (identifiers = its address) and one for the bridge.
        configs: dict[str, dict[str, Any]] = {}
        expected = [config_topic(c, a, k) for a in (PENDANT, AWAY)
                    for c, k in (("binary_sensor", "connected"), ("sensor", "battery"),
                                 ("sensor", "last_audio"), ("event", "button"))]
        expected += [f"{DISCOVERY}/sensor/omi_bridge/{k}/config" for k in
                     ("conversations_queued", "last_posted", "api_budget", "asr_backlog", "errors")]
        expected.append(f"{DISCOVERY}/event/omi_bridge/conversation_posted/config")
        for topic in expected:
            configs[topic] = check_discovery(ha.any_on(topic, START_TIMEOUT))
        assert len({c["unique_id"] for c in configs.values()}) == len(configs)
        connected = configs[config_topic("binary_sensor", PENDANT, "connected")]
        assert connected["device_class"] == "connectivity"
        assert connected["device"]["identifiers"] == [PENDANT]
        assert connected["device"]["name"] == "pendant"
        battery = configs[config_topic("sensor", PENDANT, "battery")]
        assert (battery["device_class"], battery["unit_of_measurement"]) == ("battery", "%")
        assert configs[config_topic("sensor", PENDANT, "last_audio")]["device_class"] == "timestamp"
        bridge_ids = {tuple(c["device"]["identifiers"]) for t, c in configs.items() if "/omi_bridge/" in t}
        assert len(bridge_ids) == 1
        assert connected["device"]["via_device"] == next(iter(bridge_ids))[0]
        assert {c["device"]["identifiers"][0] for t, c in configs.items() if "/omi_c0ffee" in t} == {
            PENDANT, AWAY}

        # States: the pendant in range is connected with its battery; the other one is not.
        ha.state(device_topic(PENDANT, "connected"), "ON", START_TIMEOUT)
        ha.state(device_topic(PENDANT, "battery"), "87")
        ha.state(device_topic(AWAY, "connected"), "OFF")
        assert ha.wait(lambda m: m.topic == device_topic(PENDANT, "last_audio") and m.payload != "None",
                       EVENT_TIMEOUT, "a last-audio time").payload.startswith("20")
        assert ha.latest(f"{PREFIX}/bridge/api_budget") == "25"

        mark = ha.mark()
        control(sim, "set_battery", PENDANT, 55)
        ha.state(device_topic(PENDANT, "battery"), "55", since=mark)

        control(sim, "press", PENDANT, 1)
        press = ha.wait(lambda m: m.topic == device_topic(PENDANT, "button"), EVENT_TIMEOUT, "a button event",
                        mark)
        assert press.json()["event_type"] == "single_tap" and not press.retain

        mark = ha.mark()
        control(sim, "set_in_range", PENDANT, False)
        ha.state(device_topic(PENDANT, "connected"), "OFF", since=mark)
        control(sim, "set_in_range", PENDANT, True)
        ha.state(device_topic(PENDANT, "connected"), "ON", START_TIMEOUT, since=ha.mark())

        # The bridge dies without a word: the broker's last will marks every entity unavailable.
        mark = ha.mark()
        daemon.proc.kill()
        daemon.proc.wait()
        ha.state(f"{PREFIX}/status", "offline", since=mark)
        # Home Assistant starting later still finds every entity and its last state (retained:
        # the broker hands them to a new subscriber), shown unavailable.
        late = Subscriber(broker)
        try:
            assert late.state(f"{PREFIX}/status", "offline").retain
            for topic in expected:
                assert late.any_on(topic).retain, topic
            assert late.state(device_topic(PENDANT, "battery"), "55").retain
        finally:
            late.close()
    finally:
        ha.close()
        daemon.kill()
        if sim is not None:
            sim.stop()
    text = dlog.read_text()
    assert "Traceback" not in text, logs(dlog)
    assert BRIDGE_PASSWORD not in text


def test_broker_outage_never_touches_capture_and_delivery_and_is_caught_up_after(
        tmp_path: Path, bus: PrivateBus, api: OmiApiSim, broker: Broker, speech_wav: Path) -> None:
    broker.stop()  # down before the daemon starts
    config = mqtt_config(tmp_path, [("omi", PENDANT, "pendant")], api.url, broker, gap=3.0)
    dlog, slog = tmp_path / "daemon.log", tmp_path / "sim.log"
    daemon = Daemon(config, daemon_env(bus), dlog)
    sim = None
    try:
        sim = Simulator(bus, [("omi", PENDANT)], speech_wav, slog)
        # With no broker at all the pendant's speech still becomes a conversation in Omi.
        assert api.wait_until(lambda: len(api.conversations()) >= 1, CONVERSATION_TIMEOUT), logs(dlog, slog)
        assert "cannot reach the MQTT broker" in dlog.read_text()

        broker.start()
        ha = Subscriber(broker)
        try:
            ha.state(f"{PREFIX}/status", "online", START_TIMEOUT)
            posted = ha.wait(lambda m: m.topic == f"{PREFIX}/bridge/last_posted" and m.payload != "None",
                             EVENT_TIMEOUT, "the last-posted time")
            assert posted.payload.startswith("20")
            event = ha.wait(lambda m: m.topic == f"{PREFIX}/bridge/conversation_posted", EVENT_TIMEOUT,
                            "the conversation-posted event queued during the outage").json()
            conv = api.conversations()[0]
            assert event["event_type"] == "posted"
            assert event["client_session_id"] == conv.client_session_id
            ha.state(f"{PREFIX}/bridge/conversations_queued", "0")

            # The broker goes away again while the pendant streams: the link stays up and the
            # daemon reconnects by itself once the broker is back.
            broker.stop()
            control(sim, "set_battery", PENDANT, 42)
            broker.start()
            ha.close()
            ha = Subscriber(broker)
            ha.state(f"{PREFIX}/status", "online", START_TIMEOUT)
            ha.state(device_topic(PENDANT, "battery"), "42")
            ha.state(device_topic(PENDANT, "connected"), "ON")
            # A clean stop (systemctl stop) marks the entities unavailable itself; no will fires.
            mark = ha.mark()
            assert daemon.terminate() == 0, logs(dlog)
            ha.state(f"{PREFIX}/status", "offline", since=mark)
        finally:
            ha.close()
    finally:
        daemon.kill()
        if sim is not None:
            sim.stop()
    text = dlog.read_text()
    assert "Traceback" not in text, logs(dlog)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as a user's own CA-less broker would have."""
    cert, key = directory / "broker.crt", directory / "broker.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def snapshot() -> HealthSnapshot:
    now = datetime.now(UTC)
    return HealthSnapshot(taken_at=now, started_at=now, ready=True, devices=(
        DeviceHealth(name="pendant", address=PENDANT, kind="omi", connected=True, battery=64),))


async def test_tls_broker_is_verified_and_an_unverifiable_one_never_holds_up_a_stop(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cert, key = self_signed(tmp_path)
    broker = Broker(tmp_path, tls=(cert, key))
    broker.start()
    ha = Subscriber(broker)
    try:
        trusted = MqttOptions(enabled=True, host="127.0.0.1", port=broker.port, tls=True,
                              tls_ca_file=str(cert))
        stop = asyncio.Event()
        task = asyncio.create_task(MqttPublisher(trusted, snapshot).run(stop))
        await asyncio.to_thread(ha.state, device_topic(PENDANT, "battery"), "64")
        stop.set()
        await asyncio.wait_for(task, 10)
        await asyncio.to_thread(ha.state, f"{PREFIX}/status", "offline")  # a clean stop says so

        # Without the broker's CA the certificate check fails: the publisher keeps retrying on
        # its own (the daemon goes on capturing) and still stops at once when asked.
        untrusted = dataclasses.replace(trusted, tls_ca_file="")
        stop = asyncio.Event()
        task = asyncio.create_task(MqttPublisher(untrusted, snapshot).run(stop))
        deadline = time.monotonic() + EVENT_TIMEOUT
        while "cannot reach the MQTT broker" not in caplog.text:
            assert not task.done() and time.monotonic() < deadline, caplog.text
            await asyncio.sleep(0.05)
        assert "CERTIFICATE_VERIFY_FAILED" in caplog.text or "certificate verify failed" in caplog.text
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        ha.close()
        broker.stop()


def test_check_config_warns_about_an_unreadable_mqtt_password_without_refusing_to_start(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMI_API_KEY", raising=False)
    config = write_config(tmp_path, [("omi", PENDANT, "pendant")], "http://127.0.0.1:9", gap=3.0)
    config.write_text(config.read_text() + '\n[mqtt]\nenabled = true\nusername = "omi-bridge"\n'
                      f'password_file = "{tmp_path / "missing"}"\n')
    assert main(["check-config", "--config", str(config)]) == 0  # capture does not depend on it
    out = capsys.readouterr().out
    assert "warning: [mqtt] password_file" in out and "cannot log in" in out

    (tmp_path / "missing").write_text("secret\n")
    (tmp_path / "missing").chmod(0o644)
    assert main(["check-config", "--config", str(config)]) == 0
    assert "chmod 600" in capsys.readouterr().out


async def test_audio_stored_on_the_pendant_is_an_entity_once_offline_sync_knows_it(
        tmp_path: Path, broker: Broker) -> None:
    ha = Subscriber(broker)
    now = datetime.now(UTC)
    pendant = DeviceHealth(name="pendant", address=PENDANT, kind="omi", stored_audio_bytes=48_000)
    unknown = DeviceHealth(name="away", address=AWAY, kind="omi")
    snap = HealthSnapshot(taken_at=now, started_at=now, ready=True, devices=(pendant, unknown))
    stop = asyncio.Event()
    options = MqttOptions(enabled=True, host="127.0.0.1", port=broker.port)
    task = asyncio.create_task(MqttPublisher(options, lambda: snap).run(stop))
    try:
        config = check_discovery(await asyncio.to_thread(
            ha.any_on, config_topic("sensor", PENDANT, "stored_audio")))
        assert (config["device_class"], config["unit_of_measurement"]) == ("data_size", "B")
        await asyncio.to_thread(ha.state, device_topic(PENDANT, "stored_audio"), "48000")
        await asyncio.to_thread(ha.state, device_topic(AWAY, "connected"), "OFF")
        # A device whose storage is not known gets no such entity (rather than a stuck 'unknown').
        assert not [m for m in ha.messages if m.topic == config_topic("sensor", AWAY, "stored_audio")]
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        ha.close()
