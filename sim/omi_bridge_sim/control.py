"""Remote control of a running simulator over its private bus.

A simulator in another process (``python -m omi_bridge_sim``) is steered by tests and the demo
through ``org.omibridge.Sim`` at ``/org/omibridge/Sim`` (bluez-for-tests.md §8 suggests exactly
this for out-of-process tests). Methods:

- ``DropLink(s address)``: link loss, as ``FakeDevice.drop_link``.
- ``SetInRange(s address, b in_range)``: out of range stops advertising and drops the link.
- ``Press(s address, i event)``: a button event (Omi).
- ``SetBattery(s address, y percent)``.
- ``Stats(s address) -> s``: JSON of the link and model counters ("" address: all devices).
- ``FrameLog(s address) -> s``: JSON ``{"frame_samples": N, "runs": [[first, last, status, due],
  ...]}``, what became of each microphone frame (Omi: "sent", "lost", "offline", ...), as runs of
  frame numbers, ``due`` the first frame's time on the monotonic clock: which audio a host can
  have heard, and when.
- ``Quit()``: the simulator process exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from omi_bridge_sim.bluez import (
    DBUS_NAME_FLAG_DO_NOT_QUEUE,
    DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER,
    FakeBluez,
    FakeDevice,
)

_LOGGER = logging.getLogger(__name__)

CONTROL_NAME = "org.omibridge.Sim"
CONTROL_PATH = "/org/omibridge/Sim"
CONTROL_IFACE = "org.omibridge.Sim"
ERR_NO_DEVICE = "org.omibridge.Sim.Error.NoSuchDevice"
ERR_FAILED = "org.omibridge.Sim.Error.Failed"


def device_stats(dev: FakeDevice) -> dict[str, Any]:
    """Link counters plus whatever the model reports (``stats_dict``)."""
    out: dict[str, Any] = {"address": dev.address, "connected": dev.connected, "present": dev.present,
                           "paired": dev.paired, "in_range": dev.in_range, **dev.stats}
    out["model"] = dev.model.stats_dict()
    return out


def frame_runs(model: Any) -> dict[str, Any]:
    """The model's ``frame_log`` as runs of consecutive frames with the same status."""
    runs: list[list[Any]] = []
    for n, due, _first, status in list(getattr(model, "frame_log", ())):
        if runs and runs[-1][2] == status and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n, status, due])
    return {"frame_samples": getattr(model, "frame_samples", 0), "runs": runs}


class SimControl:
    """Serves ``org.omibridge.Sim`` for one ``FakeBluez`` on its loop."""

    def __init__(self, fake: FakeBluez, on_quit: Callable[[], None] | None = None) -> None:
        self.fake = fake
        self._on_quit = on_quit
        self._bus: MessageBus | None = None

    async def start(self) -> SimControl:
        bus = MessageBus(bus_address=self.fake.bus_address, bus_type=BusType.SYSTEM)
        await bus.connect()
        bus.add_message_handler(self._on_message)
        reply = await bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="RequestName", signature="su",
            body=[CONTROL_NAME, DBUS_NAME_FLAG_DO_NOT_QUEUE]))
        if (reply is None or reply.message_type == MessageType.ERROR
                or reply.body[0] != DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER):
            raise RuntimeError(f"cannot own {CONTROL_NAME}")
        self._bus = bus
        return self

    async def stop(self) -> None:
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None

    def _on_message(self, msg: Message) -> bool | None:
        if (msg.message_type != MessageType.METHOD_CALL or msg.path != CONTROL_PATH
                or msg.interface != CONTROL_IFACE):
            return None
        asyncio.get_running_loop().create_task(self._handle(msg))
        return True

    async def _handle(self, msg: Message) -> None:
        assert self._bus is not None
        try:
            signature, body = await self._dispatch(msg.member or "", list(msg.body))
            reply = Message.new_method_return(msg, signature, body)
        except KeyError as e:
            reply = Message.new_error(msg, ERR_NO_DEVICE, f"no simulated device {e}")
        except Exception as e:
            _LOGGER.exception("sim control %s failed", msg.member)
            reply = Message.new_error(msg, ERR_FAILED, str(e))
        await self._bus.send(reply)
        if msg.member == "Quit" and self._on_quit is not None:
            self._on_quit()

    async def _dispatch(self, member: str, args: list[Any]) -> tuple[str, list[Any]]:
        fake = self.fake
        if member == "DropLink":
            fake.device(args[0]).drop_link()
        elif member == "SetInRange":
            fake.device(args[0]).set_in_range(bool(args[1]))
        elif member == "Press":
            press = getattr(fake.device(args[0]).model, "press", None)
            if press is None:
                raise RuntimeError("this device has no button")
            await press(int(args[1]))
        elif member == "SetBattery":
            set_battery = getattr(fake.device(args[0]).model, "set_battery", None)
            if set_battery is None:
                raise RuntimeError("this device has no battery model")
            await set_battery(int(args[1]))
        elif member == "Stats":
            if args[0]:
                data: Any = device_stats(fake.device(args[0]))
            else:
                data = [device_stats(d) for d in fake.devices.values()]
            return "s", [json.dumps(data)]
        elif member == "FrameLog":
            return "s", [json.dumps(frame_runs(fake.device(args[0]).model))]
        elif member == "Quit":
            pass
        else:
            raise RuntimeError(f"unknown method {member}")
        return "", []


class SimControlClient:
    """Async client for ``org.omibridge.Sim`` (for tests driving a simulator subprocess)."""

    def __init__(self, bus_address: str) -> None:
        self.bus_address = bus_address
        self._bus: MessageBus | None = None

    async def __aenter__(self) -> SimControlClient:
        self._bus = await MessageBus(bus_address=self.bus_address, bus_type=BusType.SYSTEM).connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None

    async def _call(self, member: str, signature: str = "", body: list[Any] | None = None) -> list[Any]:
        assert self._bus is not None, "use `async with SimControlClient(address) as sim:`"
        reply = await self._bus.call(Message(
            destination=CONTROL_NAME, path=CONTROL_PATH, interface=CONTROL_IFACE, member=member,
            signature=signature, body=body or []))
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            raise RuntimeError(f"sim {member}: {reply.error_name}: {reply.body}")
        return list(reply.body)

    async def drop_link(self, address: str) -> None:
        await self._call("DropLink", "s", [address])

    async def set_in_range(self, address: str, in_range: bool) -> None:
        await self._call("SetInRange", "sb", [address, in_range])

    async def press(self, address: str, event: int) -> None:
        await self._call("Press", "si", [address, event])

    async def set_battery(self, address: str, percent: int) -> None:
        await self._call("SetBattery", "sy", [address, percent])

    async def stats(self, address: str = "") -> Any:
        return json.loads((await self._call("Stats", "s", [address]))[0])

    async def frame_log(self, address: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((await self._call("FrameLog", "s", [address]))[0])
        return data

    async def quit(self) -> None:
        await self._call("Quit")
