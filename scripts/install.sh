#!/usr/bin/env bash
# `make install`: install omi-bridge as a system service on Debian / Raspberry Pi OS (run as root).
#   - Debian packages: bluez (bluetoothd), libopus0, python3-venv
#   - a system user "omi-bridge" in the "bluetooth" group (Debian's D-Bus policy for org.bluez)
#   - a venv under /opt/omi-bridge with this checkout installed, /usr/local/bin/omi-bridge
#   - the systemd unit, and /etc/omi-bridge/config.toml (mode 0640) from config.example.toml
#   - the service enabled (started once you have paired a device and set the API key)
# Safe to run again (upgrades the code, keeps the config).
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"

PREFIX="${PREFIX:-/opt/omi-bridge}"
CONF_DIR="${CONF_DIR:-/etc/omi-bridge}"
UNIT_DIR="${UNIT_DIR:-/etc/systemd/system}"
BIN_DIR="${BIN_DIR:-/usr/local/bin}"
STATE_DIR=/var/lib/omi-bridge
SERVICE_USER=omi-bridge
PYTHON="${PYTHON:-python3}"

if [ "$(id -u)" != 0 ]; then
    echo "install: run as root:  sudo make install" >&2
    exit 1
fi

echo "install: Debian packages"
missing=()
for pkg in bluez libopus0 python3-venv dbus; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 "${missing[@]}" >/dev/null
fi

echo "install: service user $SERVICE_USER"
if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "omi-bridge daemon" "$SERVICE_USER"
fi
getent group bluetooth >/dev/null || groupadd --system bluetooth
usermod -a -G bluetooth "$SERVICE_USER"

echo "install: Python environment in $PREFIX/.venv (this takes a few minutes on a Pi)"
mkdir -p "$PREFIX"
[ -x "$PREFIX/.venv/bin/python" ] || "$PYTHON" -m venv "$PREFIX/.venv"
"$PREFIX/.venv/bin/python" -m pip install -q --upgrade pip
"$PREFIX/.venv/bin/python" -m pip install -q --upgrade "$SRC"
mkdir -p "$BIN_DIR"
ln -sf "$PREFIX/.venv/bin/omi-bridge" "$BIN_DIR/omi-bridge"

echo "install: configuration in $CONF_DIR"
install -d -m 0750 -o root -g "$SERVICE_USER" "$CONF_DIR"
if [ ! -e "$CONF_DIR/config.toml" ]; then
    # The example documents every key; point the key file and storage at their installed places.
    sed -e "s|^# api_key_file = \"\"|api_key_file = \"$CONF_DIR/api_key\"|" \
        -e "s|^# dir = \"\"|dir = \"$STATE_DIR\"|" \
        "$SRC/config.example.toml" > "$CONF_DIR/config.toml.new"
    chown root:"$SERVICE_USER" "$CONF_DIR/config.toml.new"
    chmod 0640 "$CONF_DIR/config.toml.new"
    mv "$CONF_DIR/config.toml.new" "$CONF_DIR/config.toml"
    echo "install: wrote $CONF_DIR/config.toml"
else
    echo "install: kept the existing $CONF_DIR/config.toml"
fi

echo "install: systemd unit"
mkdir -p "$UNIT_DIR"
install -m 0644 "$SRC/systemd/omi-bridge.service" "$UNIT_DIR/omi-bridge.service"
enabled="installed"
if [ -d /run/systemd/system ] && [ "$UNIT_DIR" = /etc/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable omi-bridge.service
    enabled="installed and enabled (it starts at boot)"
    # Pick up the new code if it was already running.
    if systemctl is-active --quiet omi-bridge.service; then
        systemctl restart omi-bridge.service
    fi
else
    echo "install: systemd is not running here; enable it later with: systemctl enable omi-bridge"
fi

cat <<EOF

omi-bridge is $enabled. Next steps:

  1. Create an API key in the Omi app (Settings → Developer → Create key) WITH the
     "conversations:write" scope, and store it readable by the service only:
        sudo install -m 600 -o $SERVICE_USER -g $SERVICE_USER /dev/null $CONF_DIR/api_key
        sudoedit $CONF_DIR/api_key          # paste omi_dev_...

  2. Wake your Omi pendant (or Frame glasses), keep it close, and pair it:
        sudo omi-bridge pair --name pendant

  3. Check everything, then start the service:
        sudo omi-bridge check-config
        sudo systemctl start omi-bridge

  4. Watch it work:
        omi-bridge status
        journalctl -u omi-bridge -f
EOF
