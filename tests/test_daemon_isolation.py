"""One broken device pipeline never takes the others down: it restarts itself and says why."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from omi_bridge_sim.bluez import FakeBluez
from omi_bridge_sim.omi import OmiModel

from bridge.app.daemon import Daemon
from bridge.app.systemd import Notifier
from bridge.config import Config, DeviceConfig, LinkOptions, StorageOptions

TIMEOUT = 30.0
PENDANT = "C0:FF:EE:00:00:01"
BROKEN = "C0:FF:EE:00:00:0B"


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)
    assert predicate(), what


async def test_a_failing_device_task_leaves_the_other_device_running(
        tmp_path: Path, fake_bluez: FakeBluez, caplog: pytest.LogCaptureFixture) -> None:
    await fake_bluez.add_device(OmiModel(address=PENDANT, audio=np.zeros(16000, np.int16)))
    # A kind no session exists for: building its link fails every time (as a bug would).
    broken = DeviceConfig(kind="walkie-talkie", address=BROKEN, name="broken")
    config = Config(devices=[broken, DeviceConfig(kind="omi", address=PENDANT, name="pendant")],
                    link=LinkOptions(scan_timeout_seconds=2.0),
                    storage=StorageOptions(dir=str(tmp_path / "state")))
    daemon = Daemon(config, notifier=Notifier({}), state_dir=tmp_path / "run")
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await wait_for(lambda: len(daemon.devices) == 2 and daemon.devices[1].stats.connected, TIMEOUT,
                       "the pendant to connect")
        bad, good = daemon.devices
        await wait_for(lambda: bad.task_error is not None, TIMEOUT, "the broken device to fail")
        assert "walkie-talkie" in bad.task_error
        assert good.stats.connected and good.task_error is None
        state = daemon.state()
        assert [d["connected"] for d in state["devices"]] == [False, True]
        assert "walkie-talkie" in state["devices"][0]["task_error"]
        assert any("broken" in r.getMessage() and "retrying" in r.getMessage() for r in caplog.records)
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)
