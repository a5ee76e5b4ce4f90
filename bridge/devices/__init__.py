"""Bluetooth LE: scanning, the Omi and Frame drivers, and the reconnect supervisor (bleak)."""
