"""Home Assistant over MQTT: the bridge and each wearable as devices, found without any YAML.

Off unless ``[mqtt] enabled``. One task (``MqttPublisher.run``) owns the broker connection; what
it sends (entities, topics, messages) is built in ``bridge/app/ha_discovery.py``, and the Home
Assistant side is summarised, with sources, in docs/reference/home-assistant-mqtt.md.

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
import socket
import ssl
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import aiomqtt

from bridge.app.events import BridgeEvent
from bridge.app.ha_discovery import (
    CONNECTED,
    LAST_AUDIO,
    OFFLINE,
    ONLINE,
    QOS,
    UNKNOWN,
    Topics,
    discovery,
    event_message,
    states,
)
from bridge.config import MqttOptions
from bridge.core.errors import BridgeError
from bridge.core.health import HealthSnapshot

_LOGGER = logging.getLogger(__name__)

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
