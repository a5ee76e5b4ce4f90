"""Bluetooth LE with bleak: scanning, batched notifications, and the reconnect supervisor."""
