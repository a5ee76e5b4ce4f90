"""GATT UUIDs and protocol numbers of the devices we talk to (one place, each with its source)."""

from __future__ import annotations

_OMI_SUFFIX = "-e8f2-537e-4f6c-d104768a1214"
"""Shared suffix of Omi's 19B1xxxx vendor UUIDs (omi-device.md §2, firmware ``transport.c``)."""

OMI_AUDIO_SERVICE = "19b10000" + _OMI_SUFFIX
"""Omi audio service; advertised in the primary advertisement, so scans match on it rather than
on the user-changeable name (omi-device.md §1, §10; app ``BtDevice.isOmiDevice``)."""
OMI_AUDIO_DATA = "19b10001" + _OMI_SUFFIX
"""Audio notifications ``[idx_lo][idx_hi][sub][payload]`` (omi-device.md §5.1)."""
OMI_CODEC = "19b10002" + _OMI_SUFFIX
"""1-byte codec id, read on every connect (omi-device.md §3)."""
OMI_TIME_SYNC = "19b10031" + _OMI_SUFFIX
"""Write exactly 4 bytes, uint32 LE Unix seconds, after every connect (omi-device.md §7)."""

BATTERY_LEVEL = "00002a19-0000-1000-8000-00805f9b34fb"
"""SIG Battery Level (service 0x180F): uint8 percent, READ + NOTIFY (omi-device.md §2)."""
FIRMWARE_REVISION = "00002a26-0000-1000-8000-00805f9b34fb"
"""SIG Firmware Revision String (service 0x180A), UTF-8 (omi-device.md §2, §7)."""

OMI_BUTTON_EVENT = "23ba7925-0000-1000-7450-346eac492e92"
"""Button event: 8 bytes = 2 × int32 LE, the first is the event (omi-device.md §8, ``button_service.c``)."""
BUTTON_EVENTS = {1: "single tap", 2: "double tap", 3: "long press", 4: "press", 5: "release"}
"""Meaning of the first int32 (omi-device.md §8; long press varies by firmware, so only logged)."""

OMI_MIN_MTU = 100
"""The firmware sends no audio below this ATT MTU (omi-device.md §5.2, ``MINIMAL_PACKET_SIZE``)."""

FRAME_SERVICE = "7a230001-5475-a6a4-654c-8431f6ad49c4"
"""Brilliant Labs Frame's Bluetooth service (frame.md)."""
FRAME_NAME_PREFIX = "Frame"
"""Frame advertises as "Frame XX" (frame.md); the DFU bootloader advertises as "Frame Update"."""
FRAME_UPDATE_PREFIX = "Frame Update"
