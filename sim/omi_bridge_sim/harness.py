"""The whole simulator (private bus, fake bluetoothd, devices) on a background thread.

For synchronous callers: ``omi-bridge demo`` and tests that run the product in a subprocess.
The simulator gets its own event loop, so it keeps producing audio at the real rate no matter
what the caller's thread does. Touch simulator objects only through ``run``/``call`` (they
execute on the simulator's loop). The loop's clock is ``time.monotonic()``, so model ground
truth such as ``OmiModel.samples_produced_between(t0, t1)`` takes monotonic times from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

from omi_bridge_sim.bluez import DEFAULT_TEMPORARY_TIMEOUT_S, FakeBluez
from omi_bridge_sim.bus import PrivateBus
from omi_bridge_sim.control import SimControl, device_stats
from omi_bridge_sim.model import DeviceModel

T = TypeVar("T")

# Bound for start/stop and control calls; all of them take milliseconds on a healthy machine.
CALL_TIMEOUT_S = 10.0


class SimHarness:
    """``with SimHarness([OmiModel(...)]) as sim:`` → ``sim.env()`` for the product process,
    ``sim.drop_link(addr)``, ``sim.stats(addr)``..."""

    def __init__(self, models: Iterable[DeviceModel] = (), *, bus_address: str | None = None,
                 paired: Iterable[str] = (), control: bool = True,
                 temporary_timeout: float = DEFAULT_TEMPORARY_TIMEOUT_S) -> None:
        self._models = list(models)
        self._paired = {a.upper() for a in paired}
        self._bus_address = bus_address
        self._control_wanted = control
        self._temporary_timeout = temporary_timeout
        self.bus: PrivateBus | None = None
        self.fake: FakeBluez | None = None
        self._control: SimControl | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.quit_requested = threading.Event()
        """Set when a client called the control interface's Quit()."""

    @property
    def address(self) -> str:
        """The bus address (DBUS_SYSTEM_BUS_ADDRESS for the product)."""
        assert self.fake is not None, "start() first"
        return self.fake.bus_address

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a process that must see the simulator as the system's BlueZ."""
        if self.bus is not None:
            return self.bus.env(base)
        import os

        out = dict(os.environ if base is None else base)
        out["DBUS_SYSTEM_BUS_ADDRESS"] = self.address
        return out

    def start(self) -> SimHarness:
        if self._thread is not None:
            return self
        if self._bus_address is None:
            self.bus = PrivateBus().start()
            self._bus_address = self.bus.address
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="omi-bridge-sim", daemon=True)
        self._thread.start()
        try:
            self._submit(self._setup())
        except BaseException:
            self.stop()
            raise
        return self

    async def _setup(self) -> None:
        assert self._bus_address is not None
        self.fake = FakeBluez(self._bus_address, temporary_timeout=self._temporary_timeout)
        await self.fake.start()
        for model in self._models:
            await self.fake.add_device(model, paired=model.address in self._paired)
        if self._control_wanted:
            self._control = await SimControl(self.fake, on_quit=self.quit_requested.set).start()
        assert self.fake._bus is not None
        watcher = asyncio.get_running_loop().create_task(self.fake._bus.wait_for_disconnect())
        # The bus is gone (its owner died): nobody can reach the simulator any more.
        watcher.add_done_callback(lambda _t: self.quit_requested.set())
        self._watcher = watcher

    async def _teardown(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._control is not None:
            await self._control.stop()
        if self.fake is not None:
            await self.fake.stop()

    def _submit(self, coro: Awaitable[T], timeout: float = CALL_TIMEOUT_S) -> T:
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return fut.result(timeout)

    def run(self, fn: Callable[[FakeBluez], T], timeout: float = CALL_TIMEOUT_S) -> T:
        """Run ``fn(fake)`` on the simulator's loop and return its result."""
        assert self.fake is not None

        async def wrapper() -> T:
            assert self.fake is not None
            return fn(self.fake)

        return self._submit(wrapper(), timeout)

    def call(self, fn: Callable[[FakeBluez], Awaitable[T]], timeout: float = CALL_TIMEOUT_S) -> T:
        """Await ``fn(fake)`` on the simulator's loop and return its result."""
        assert self.fake is not None
        return self._submit(fn(self.fake), timeout)  # type: ignore[arg-type]

    def add_device(self, model: DeviceModel, *, paired: bool = False) -> None:
        self.call(lambda fake: fake.add_device(model, paired=paired))

    def drop_link(self, address: str) -> None:
        self.run(lambda fake: fake.device(address).drop_link())

    def set_in_range(self, address: str, in_range: bool) -> None:
        self.run(lambda fake: fake.device(address).set_in_range(in_range))

    def model(self, address: str) -> DeviceModel:
        """The device model (read its counters freely; change it only through ``run``)."""
        return self.run(lambda fake: fake.device(address).model)

    def press(self, address: str, event: int) -> None:
        """Omi button event (1 tap, 2 double tap, 3 long press, 4 press, 5 release)."""
        self.call(lambda fake: fake.device(address).model.press(event))  # type: ignore[attr-defined]

    def stats(self, address: str = "") -> Any:
        """Link and model counters of one device (or a list for all)."""
        if address:
            return self.run(lambda fake: device_stats(fake.device(address)))
        return self.run(lambda fake: [device_stats(d) for d in fake.devices.values()])

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            if self._loop.is_running():
                with contextlib.suppress(Exception):  # best effort on shutdown
                    self._submit(self._teardown())
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CALL_TIMEOUT_S)
            self._loop.close()
        self._loop = None
        self._thread = None
        if self.bus is not None:
            self.bus.stop()
            self.bus = None

    def __enter__(self) -> SimHarness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
