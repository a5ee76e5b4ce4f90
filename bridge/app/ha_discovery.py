"""Home Assistant MQTT discovery: which entities the bridge and each wearable have, on which
topics, and the retained config, state and event messages for them.

Pure functions of the health snapshot: ``bridge/app/mqtt.py`` owns the broker connection and
sends what these build. The Home Assistant side is summarised, with sources, in
docs/reference/home-assistant-mqtt.md (§ numbers below).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bridge.app.events import BridgeEvent, ButtonPressed, ConversationPosted
from bridge.config import MqttOptions
from bridge.core.gatt import BUTTON_EVENTS
from bridge.core.health import DeviceHealth, HealthSnapshot
from bridge.core.kinds import DeviceKind
from bridge.core.times import iso_seconds

QOS = 1
"""At least once: a retained state or config is never lost to a dropped packet."""
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
    return iso_seconds(when) or UNKNOWN


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
