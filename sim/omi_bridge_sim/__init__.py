"""Simulators used by the tests and by `omi-bridge demo`: a fake bluetoothd on a private D-Bus
bus, Omi and Frame device models that speak the real protocols, and a local Omi API stand-in."""
