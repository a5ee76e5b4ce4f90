#!/usr/bin/env bash
# One-shot set-up for a fresh Debian / Raspberry Pi OS machine: system packages, then a
# project venv in .venv with the extras asked for (default: test). Safe to run again: it
# only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS="${1:-test}"
PYTHON="${PYTHON:-python3}"

# libopus0: opuslib is a ctypes binding to the system libopus.
# dbus-daemon: the tests and the demo run a private D-Bus bus for the simulated bluetoothd.
# mosquitto: the MQTT tests start their own broker on a free loopback port (never the service).
# systemd: the installer test checks the unit with systemd-analyze (no running systemd needed).
APT_PACKAGES=(libopus0 dbus-daemon python3-venv mosquitto systemd)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if [ "$pkg" = python3-venv ] && "$PYTHON" -c "import ensurepip, venv" 2>/dev/null; then
        continue
    fi
    if [ "$pkg" = dbus-daemon ] && command -v dbus-daemon >/dev/null 2>&1; then
        continue
    fi
    if [ "$pkg" = systemd ] && command -v systemd-analyze >/dev/null 2>&1; then
        continue
    fi
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
        echo "setup: missing Debian packages: ${missing[*]}" >&2
        echo "setup: run:  sudo apt-get install -y ${missing[*]}   and then this command again" >&2
        exit 1
    fi
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PYTHON" -m venv .venv
fi

# Reinstall only when the project metadata or the extras changed.
stamp=".venv/.omi-bridge-${EXTRAS//,/-}.stamp"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ sim/pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing Python packages (.[${EXTRAS}])"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    # local-asr always: the tests, the demo and the bench transcribe on this machine.
    if [ "$EXTRAS" = base ]; then spec=".[local-asr]"; else spec=".[${EXTRAS},local-asr]"; fi
    .venv/bin/python -m pip install -q -e "$spec"
    # The simulators (fake BlueZ, devices, API) are their own package: tests and the demo need
    # them, the bridge wheel does not ship them.
    .venv/bin/python -m pip install -q -e ./sim
    touch "$stamp"
fi
