"""Two pendants on one Bluetooth adapter: real bleak against the fake bluetoothd, which (like
BlueZ) refuses a second connection attempt on the adapter while the first is under way."""

from __future__ import annotations

import asyncio

from omi_bridge_sim.omi import OmiModel

from bridge.cli.listen import WavSink
from bridge.config import DeviceConfig, LinkOptions

TIMEOUT = 20.0
"""Upper bound for any wait on the fake (a connect takes ~0.1 s plus the injected delay)."""

CONNECT_DELAY = 1.5
"""LE connection set-up per connect (a pendant that advertises slowly takes this long), long
enough that two connects started together overlap although their scans end at different times."""

FAST = LinkOptions(reconnect_min_seconds=0.1, reconnect_max_seconds=1.0, scan_timeout_seconds=5.0)


async def test_two_devices_starting_together_both_connect_without_busy_failures(fake_bluez):
    from bridge.devices.link import DeviceLink

    models = [OmiModel(address="C0:FF:EE:00:00:21", name="Omi A"),
              OmiModel(address="C0:FF:EE:00:00:22", name="Omi B")]
    for model in models:
        dev = await fake_bluez.add_device(model)
        dev.connect_delay = CONNECT_DELAY
    sinks = [WavSink() for _ in models]
    links = [DeviceLink(DeviceConfig("omi", m.address), FAST, s) for m, s in zip(models, sinks, strict=True)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(link.run(stop)) for link in links]
    try:
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*(s.first_audio.wait() for s in sinks))
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    # Both streamed, and neither attempt was turned away as "InProgress" (which costs a back-off
    # of at least a second per collision and a warning in the journal).
    assert fake_bluez.connects_refused_busy == 0
    for model, link in zip(models, links, strict=True):
        assert fake_bluez.device(model.address).connects == 1
        assert link.stats.frames > 0
        assert link.stats.last_error is None
        assert link.stats.reconnects == 0
