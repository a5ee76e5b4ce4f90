"""What a previous run left on disk is delivered on the next start, before any device or even the
Bluetooth adapter is back — also for a device the user has since removed from the config."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from omi_bridge_sim.omi_api import ApiKey, OmiApiSim

from bridge.app.daemon import Daemon
from bridge.app.systemd import Notifier
from bridge.config import ApiOptions, Config, ConversationOptions, DeviceConfig, StorageOptions
from bridge.speech.asr.worker import AsrWorker
from bridge.speech.pipeline import SpeechPipeline

TIMEOUT = 60.0
KEY = "omi_dev_recovery"
UNPAIRED = "C0:FF:EE:00:00:07"


def interrupted_conversation(config: Config, audio: np.ndarray) -> None:
    """A run that heard the clip and died before transcribing or closing anything."""
    never_started = AsrWorker(config.asr, model=object())  # queues windows, transcribes nothing
    pipeline = SpeechPipeline(UNPAIRED, config, never_started, lambda conv: None, source="omi",
                              label="old pendant")
    for i in range(0, len(audio), 1600):
        pipeline.write(audio[i:i + 1600])
    assert pipeline.in_conversation


@pytest.mark.asr
async def test_a_removed_devices_interrupted_conversation_is_still_delivered(
        tmp_path: Path, demo_audio: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    # No system bus at all: the daemon waits for Bluetooth, but delivers what it already has.
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    with OmiApiSim({KEY: ApiKey()}) as api:
        base = Config(storage=StorageOptions(dir=str(tmp_path / "state")),
                      conversation=ConversationOptions(gap_seconds=60.0),
                      api=ApiOptions(base_url=api.url, api_key=KEY))
        interrupted_conversation(base, demo_audio)
        # Since then the user unpaired it and paired another one.
        config = Config(devices=[DeviceConfig(kind="omi", address="C0:FF:EE:00:00:08")],
                        storage=base.storage, conversation=base.conversation, api=base.api)
        daemon = Daemon(config, notifier=Notifier({}), state_dir=tmp_path / "run")
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        try:
            arrived = await asyncio.to_thread(api.wait_until, lambda: bool(api.conversations()), TIMEOUT)
            assert arrived
            assert not daemon.ready and "Bluetooth" in daemon.phase
        finally:
            stop.set()
            await asyncio.wait_for(task, TIMEOUT)
        conv = api.conversations()[0]
        assert conv.body["source"] == "omi" and UNPAIRED in conv.client_session_id
        assert all(w in conv.transcript.lower() for w in ("milk", "sarah", "budget")), conv.transcript
