"""The daemon: device tasks, preflight checks, published state, systemd integration."""
