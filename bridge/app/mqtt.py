"""Home Assistant over MQTT: the bridge and each wearable as devices, found without any YAML.

Off unless ``[mqtt] enabled``. One task (``MqttPublisher.run``) owns the broker connection:

The Home Assistant side is summarised, with sources, in docs/reference/home-assistant-mqtt.md.

- On connect it sets a last will (``<topic_prefix>/status`` = ``offline``, retained) and publishes
  ``online`` there, then one retained discovery config per entity under
  ``<discovery_prefix>/<component>/<node>/<entity>/config`` (§1–§3), then every state. Home
  Assistant restarting announces itself on ``<discovery_prefix>/status``; the configs and states
  are sent again then (§4).
- Every ``PUBLISH_SECONDS`` it reads the daemon's health snapshot and publishes the states that
  changed (retained, so Home Assistant shows them at once after its own restart).
- Button presses and delivered conversations are event entities (§5); they reach the task
  through a bounded queue that the daemon fills without waiting.
- A broker that is down, slow or refusing us only ever delays this task: it reconnects with a
  doubling back-off and nothing on the audio path awaits it.

Why aiomqtt rather than paho-mqtt directly: the daemon is one asyncio loop of supervised tasks,
and aiomqtt (a thin asyncio layer over paho-mqtt's protocol code) lets this publisher be one more
coroutine, cancelled and restarted like the others, with ``await publish(...)`` bounded by a
timeout. paho-mqtt on its own runs its network loop in a thread of its own and calls back on that
thread, which would need locks or hand-offs to the event loop for every state read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt

from bridge.app.events import BridgeEvent, ButtonPressed, ConversationPosted
from bridge.config import MqttOptions
from bridge.core.errors import BridgeError
from bridge.core.gatt import BUTTON_EVENTS
from bridge.core.health import DeviceHealth, HealthSnapshot
from bridge.core.kinds import DeviceKind

_LOGGER = logging.getLogger(__name__)

ONLINE = "online"
OFFLINE = "offline"
"""Availability payloads; Home Assistant's defaults (docs/reference/home-assistant-mqtt.md §3)."""
HA_BIRTH_SUFFIX = "status"
"""Home Assistant publishes ``online`` on ``<discovery_prefix>/status`` when it (re)starts
(docs/reference/home-assistant-mqtt.md §4)."""
STATE_ON = "ON"
STATE_OFF = "OFF"
"""binary_sensor payload_on / payload_off defaults (docs/reference/home-assistant-mqtt.md §2)."""
UNKNOWN = "None"
"""A sensor payload of ``None`` sets the state to unknown (docs/reference/home-assistant-mqtt.md §2)."""
QOS = 1
"""At least once: a retained state or config is never lost to a dropped packet."""

PUBLISH_SECONDS = 1.0
"""How often the snapshot is compared with what the broker has; only changes are sent."""
TIMESTAMP_STEP_SECONDS = 60.0
"""'Last audio' moves on with every packet; it is republished when it moved this much (or the
link went up or down), so Home Assistant's history is not written once a second."""
PUBLISH_TIMEOUT_SECONDS = 10.0
"""A broker that does not acknowledge a publish within this long is treated as gone."""
KEEPALIVE_SECONDS = 30
"""MQTT keep-alive: the broker fires our last will within 1.5 × this if the Pi vanishes."""
RECONNECT_MIN_SECONDS = 1.0
RECONNECT_MAX_SECONDS = 60.0
"""Broker reconnect back-off, doubling per failed attempt."""
EVENT_QUEUE_SIZE = 100
"""Events waiting for a broker that is down; the oldest are dropped beyond this."""

MANUFACTURERS: dict[str, tuple[str, str]] = {
    DeviceKind.OMI: ("Based Hardware", "Omi"), DeviceKind.FRAME: ("Brilliant Labs", "Frame")}
BUTTON_EVENT_TYPES = {code: name.replace(" ", "_") for code, name in BUTTON_EVENTS.items()}
"""Omi button codes (docs/reference/omi-device.md §8) as Home Assistant event types."""


def _slug(text: str) -> str:
    """Characters allowed in a discovery node / object id (docs/reference/home-assistant-mqtt.md §1)."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "omi_bridge"


def _address_id(address: str) -> str:
    return address.replace(":", "").lower()


def _iso(when: datetime | None) -> str:
    return when.isoformat(timespec="seconds") if when is not None else UNKNOWN


def _number(value: float | int | None) -> str:
    return UNKNOWN if value is None else str(value)


@dataclass(frozen=True)
class Entity:
    """One Home Assistant entity: where its config and state go, and what the config says."""

    component: str
    """binary_sensor, sensor or event."""
    key: str
    name: str
    fields: dict[str, Any]
    """Discovery fields beyond the common ones (device_class, unit_of_measurement, ...)."""


# --------------------------------------------------------------------------------------------
# Entities


CONNECTED = Entity("binary_sensor", "connected", "Connected", {"device_class": "connectivity"})
BATTERY = Entity("sensor", "battery", "Battery",
                 {"device_class": "battery", "unit_of_measurement": "%", "state_class": "measurement"})
LAST_AUDIO = Entity("sensor", "last_audio", "Last audio",
                    {"device_class": "timestamp", "entity_category": "diagnostic"})
STORED_AUDIO = Entity("sensor", "stored_audio", "Audio stored on the device",
                      {"device_class": "data_size", "unit_of_measurement": "B",
                       "state_class": "measurement"})
BUTTON = Entity("event", "button", "Button",
                {"device_class": "button", "event_types": sorted(BUTTON_EVENT_TYPES.values())})

QUEUED = Entity("sensor", "conversations_queued", "Conversations queued",
                {"state_class": "measurement", "icon": "mdi:tray-full"})
LAST_POSTED = Entity("sensor", "last_posted", "Last conversation posted", {"device_class": "timestamp"})
BUDGET = Entity("sensor", "api_budget", "API writes left this hour",
                {"state_class": "measurement", "icon": "mdi:gauge", "entity_category": "diagnostic"})
BACKLOG = Entity("sensor", "asr_backlog", "Transcription backlog",
                 {"device_class": "duration", "unit_of_measurement": "s", "state_class": "measurement",
                  "entity_category": "diagnostic"})
ERRORS = Entity("sensor", "errors", "Errors", {"state_class": "total_increasing", "icon": "mdi:alert",
                                                "entity_category": "diagnostic"})
POSTED = Entity("event", "conversation_posted", "Conversation posted", {"event_types": ["posted"]})


class Topics:
    """Every topic name, from the two prefixes (docs/reference/home-assistant-mqtt.md §1)."""

    def __init__(self, options: MqttOptions) -> None:
        self.prefix = options.topic_prefix.strip("/")
        self.discovery = options.discovery_prefix.strip("/")
        self.node = _slug(self.prefix)
        self.availability = f"{self.prefix}/status"
        self.ha_birth = f"{self.discovery}/{HA_BIRTH_SUFFIX}"
        self.bridge_id = self.node

    def device_state(self, address: str, entity: Entity) -> str:
        return f"{self.prefix}/devices/{_address_id(address)}/{entity.key}"

    def bridge_state(self, entity: Entity) -> str:
        return f"{self.prefix}/bridge/{entity.key}"

    def device_config(self, address: str, entity: Entity) -> str:
        return f"{self.discovery}/{entity.component}/omi_{_address_id(address)}/{entity.key}/config"

    def bridge_config(self, entity: Entity) -> str:
        return f"{self.discovery}/{entity.component}/{self.node}/{entity.key}/config"


def device_entities(device: DeviceHealth, *, events: bool) -> list[Entity]:
    out = [CONNECTED, BATTERY, LAST_AUDIO]
    if device.stored_audio_bytes is not None:
        out.append(STORED_AUDIO)
    if events and device.kind == DeviceKind.OMI:
        out.append(BUTTON)
    return out


def bridge_entities(*, events: bool) -> list[Entity]:
    out = [QUEUED, LAST_POSTED, BUDGET, BACKLOG, ERRORS]
    if events:
        out.append(POSTED)
    return out


def _origin() -> dict[str, str]:
    from bridge import __version__

    return {"name": "omi-bridge", "sw_version": __version__}


def bridge_device(topics: Topics) -> dict[str, Any]:
    from bridge import __version__

    return {"identifiers": [topics.bridge_id], "name": "Omi bridge", "manufacturer": "omi-bridge",
            "model": f"omi-bridge on {socket.gethostname()}", "sw_version": __version__}


def wearable_device(device: DeviceHealth, topics: Topics) -> dict[str, Any]:
    manufacturer, model = MANUFACTURERS.get(device.kind, ("", device.kind))
    block: dict[str, Any] = {"identifiers": [device.address], "name": device.name,
                             "manufacturer": manufacturer, "model": model,
                             "via_device": topics.bridge_id}
    if device.firmware:
        block["sw_version"] = device.firmware
    return block


def _config(entity: Entity, unique_id: str, state_topic: str, device: dict[str, Any],
            topics: Topics) -> dict[str, Any]:
    """A discovery payload with what Home Assistant requires of a device's entity
    (docs/reference/home-assistant-mqtt.md §2)."""
    return {"name": entity.name, "unique_id": unique_id, "state_topic": state_topic,
            "availability": [{"topic": topics.availability, "payload_available": ONLINE,
                              "payload_not_available": OFFLINE}],
            "device": device, "origin": _origin(), "qos": QOS, **entity.fields}


def discovery(snapshot: HealthSnapshot, topics: Topics, *, events: bool) -> dict[str, dict[str, Any]]:
    """Config topic → discovery payload, for the bridge and every configured wearable."""
    out: dict[str, dict[str, Any]] = {}
    bridge = bridge_device(topics)
    for entity in bridge_entities(events=events):
        out[topics.bridge_config(entity)] = _config(
            entity, f"{topics.node}_{entity.key}", topics.bridge_state(entity), bridge, topics)
    for dev in snapshot.devices:
        block = wearable_device(dev, topics)
        for entity in device_entities(dev, events=events):
            out[topics.device_config(dev.address, entity)] = _config(
                entity, f"omi_{_address_id(dev.address)}_{entity.key}",
                topics.device_state(dev.address, entity), block, topics)
    return out


def device_states(dev: DeviceHealth) -> Iterator[tuple[Entity, str]]:
    yield CONNECTED, STATE_ON if dev.connected else STATE_OFF
    yield BATTERY, _number(dev.battery)
    yield LAST_AUDIO, _iso(dev.last_audio_at)
    if dev.stored_audio_bytes is not None:
        yield STORED_AUDIO, _number(dev.stored_audio_bytes)


def states(snapshot: HealthSnapshot, topics: Topics) -> dict[str, str]:
    """State topic → payload for every (non-event) entity."""
    ob = snapshot.outbox
    out = {
        topics.bridge_state(QUEUED): str(ob.queued),
        topics.bridge_state(LAST_POSTED): _iso(ob.last_posted_at),
        topics.bridge_state(BUDGET): str(ob.budget_left),
        topics.bridge_state(BACKLOG): str(round(snapshot.asr.backlog_seconds)),
        topics.bridge_state(ERRORS): str(snapshot.errors),
    }
    for dev in snapshot.devices:
        for entity, payload in device_states(dev):
            out[topics.device_state(dev.address, entity)] = payload
    return out


def event_message(event: BridgeEvent, topics: Topics) -> tuple[str, dict[str, Any]] | None:
    """An event entity's topic and payload (docs/reference/home-assistant-mqtt.md §5), or None
    for an event it has no entity for."""
    if isinstance(event, ButtonPressed):
        kind = BUTTON_EVENT_TYPES.get(event.code)
        if kind is None:
            return None
        return topics.device_state(event.address, BUTTON), {"event_type": kind, "device": event.device}
    if isinstance(event, ConversationPosted):
        payload: dict[str, Any] = {"event_type": "posted", "device": event.device,
                                   "client_session_id": event.client_session_id,
                                   "server_id": event.server_id, "discarded": event.discarded}
        if event.title:
            payload["title"] = event.title
        return topics.bridge_state(POSTED), payload
    return None


# --------------------------------------------------------------------------------------------
# The task


def read_password(options: MqttOptions) -> str | None:
    """The broker password from ``password_file`` or ``password``; None for none."""
    if options.password_file:
        path = Path(options.password_file).expanduser()
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise BridgeError(f"cannot read [mqtt] password_file {path}: {exc.strerror}",
                              "make it readable by the service user, or set [mqtt] password") from None
    return options.password or None


def tls_context(options: MqttOptions) -> ssl.SSLContext | None:
    if not options.tls:
        return None
    return ssl.create_default_context(cafile=options.tls_ca_file or None)


class MqttPublisher:
    """Publishes ``snapshot()`` to Home Assistant until stopped. ``post_event`` is safe to call
    from the event loop at any time, connected or not."""

    def __init__(self, options: MqttOptions, snapshot: Callable[[], HealthSnapshot]) -> None:
        self.options = options
        self.snapshot = snapshot
        self.topics = Topics(options)
        self.connected = False
        self._events: asyncio.Queue[BridgeEvent] = asyncio.Queue(EVENT_QUEUE_SIZE)
        self._wake = asyncio.Event()
        self._published: dict[str, str] = {}
        self._announced: set[str] = set()
        self._failing_since: str | None = None

    def post_event(self, event: BridgeEvent) -> None:
        """Queue an event for the broker; never waits. Call on the event loop."""
        if self._events.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._events.get_nowait()
        self._events.put_nowait(event)
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        delay = RECONNECT_MIN_SECONDS
        where = f"{self.options.host}:{self.options.port}"
        while not stop.is_set():
            try:
                await self._session(stop)
                return
            except (aiomqtt.MqttError, BridgeError, OSError) as exc:
                # OSError: an unreadable tls_ca_file; BridgeError: an unreadable password_file.
                # Both may be fixed while we run, so they are retried like a broker outage.
                if self.connected:
                    _LOGGER.warning("MQTT broker %s lost (%s); reconnecting", where, exc)
                    delay = RECONNECT_MIN_SECONDS
                elif self._failing_since is None:
                    _LOGGER.warning("cannot reach the MQTT broker %s (%s); retrying with back-off",
                                    where, exc)
                self._failing_since = self._failing_since or str(exc)
                self.connected = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    def _client(self) -> aiomqtt.Client:
        o = self.options
        return aiomqtt.Client(
            o.host, o.port, username=o.username or None, password=read_password(o),
            identifier=f"{self.topics.node}-{socket.gethostname()}",
            will=aiomqtt.Will(self.topics.availability, OFFLINE, QOS, retain=True),
            keepalive=KEEPALIVE_SECONDS, tls_context=tls_context(o), timeout=PUBLISH_TIMEOUT_SECONDS,
            logger=logging.getLogger("aiomqtt"))

    async def _session(self, stop: asyncio.Event) -> None:
        async with self._client() as client:
            self.connected = True
            _LOGGER.info("MQTT broker %s:%d connected%s; publishing under %s/", self.options.host,
                         self.options.port, " again" if self._failing_since else "", self.topics.prefix)
            self._failing_since = None
            self._published.clear()
            self._announced.clear()
            await client.subscribe(self.topics.ha_birth, qos=QOS)
            reader = asyncio.create_task(self._read(client))
            try:
                await self._publish(client, self.topics.availability, ONLINE)
                while not stop.is_set():
                    if reader.done():
                        reader.result()  # the broker went away: raise its MqttError
                    await self._sync(client)
                    self._wake.clear()
                    await self._drain_events(client)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(_first(stop, self._wake), PUBLISH_SECONDS)
                # A clean stop: the will only fires when the connection dies.
                await self._publish(client, self.topics.availability, OFFLINE)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await reader

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if message.topic.matches(self.topics.ha_birth) and message.payload in (ONLINE, ONLINE.encode()):
                _LOGGER.info("Home Assistant (re)started: sending discovery and states again")
                self._published.clear()
                self._announced.clear()
                self._wake.set()

    async def _sync(self, client: aiomqtt.Client) -> None:
        snap = self.snapshot()
        for topic, config in discovery(snap, self.topics, events=self.options.events).items():
            if topic not in self._announced:
                await self._publish(client, topic, json.dumps(config, sort_keys=True))
                self._announced.add(topic)
        current = states(snap, self.topics)
        previous = dict(self._published)
        for topic, payload in current.items():
            if previous.get(topic) != payload and not _too_soon(topic, previous, current):
                await self._publish(client, topic, payload)
                self._published[topic] = payload

    async def _drain_events(self, client: aiomqtt.Client) -> None:
        while not self._events.empty():
            event = self._events.get_nowait()
            message = event_message(event, self.topics)
            if message is not None:
                topic, payload = message
                await client.publish(topic, json.dumps(payload), qos=QOS, retain=False,
                                     timeout=PUBLISH_TIMEOUT_SECONDS)

    async def _publish(self, client: aiomqtt.Client, topic: str, payload: str) -> None:
        await client.publish(topic, payload, qos=QOS, retain=True, timeout=PUBLISH_TIMEOUT_SECONDS)


def _too_soon(topic: str, previous: dict[str, str], current: dict[str, str]) -> bool:
    """A 'last audio' that moved on less than a step, on a link that stayed as it was, waits."""
    if not topic.endswith("/" + LAST_AUDIO.key):
        return False
    before, now = previous.get(topic), current[topic]
    if before is None or UNKNOWN in (before, now):
        return False
    link = topic.removesuffix(LAST_AUDIO.key) + CONNECTED.key
    if previous.get(link) != current.get(link):
        return False
    step = (datetime.fromisoformat(now) - datetime.fromisoformat(before)).total_seconds()
    return 0 <= step < TIMESTAMP_STEP_SECONDS


async def _first(stop: asyncio.Event, wake: asyncio.Event) -> None:
    """Return once either event is set."""
    waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())}
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
