#!/usr/bin/env bash
# `sudo make install` / `sudo scripts/install-pi.sh`: install omi-bridge as a system service on
# Raspberry Pi OS / Debian, once; run it again to upgrade (it changes only what differs).
#
#   - Debian packages: bluez (bluetoothd), libopus0, python3-venv, dbus
#   - a system user "omi-bridge" in the "bluetooth" group (Debian's D-Bus policy for org.bluez,
#     /etc/dbus-1/system.d/bluetooth.conf, admits that group)
#   - a venv in /opt/omi-bridge/.venv with this checkout installed, /usr/local/bin/omi-bridge
#   - /etc/omi-bridge/config.toml, mode 0600, owner omi-bridge, from config.example.toml when
#     absent (never overwritten)
#   - the systemd unit, enabled (it starts at boot), restarted if it was running
#   - finally `omi-bridge doctor`, as the service user
#
# Options:
#   --uninstall       remove the service, the venv and the command; keep config and state
#   --purge           with --uninstall: also remove /etc/omi-bridge, /var/lib/omi-bridge, the user
#   --root DIR        install into DIR instead of / (a staging or test root): no apt, no running
#                     systemd, users created with useradd --root, no doctor
#   --extras LIST     pip extras (default local-asr; "" on 32-bit Pi OS, with [asr] backend = "wyoming")
#   --pip-args ARGS   extra arguments for pip install (e.g. "--no-deps" or an --index-url)
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"

ROOT=""
ACTION=install
PURGE=no
EXTRAS=__auto__
PIP_ARGS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --uninstall) ACTION=uninstall ;;
        --purge) PURGE=yes ;;
        --root) ROOT="${2:?--root needs a directory}"; shift ;;
        --root=*) ROOT="${1#--root=}" ;;
        --extras) EXTRAS="${2?--extras needs a list}"; shift ;;
        --extras=*) EXTRAS="${1#--extras=}" ;;
        --pip-args) PIP_ARGS="${2?--pip-args needs arguments}"; shift ;;
        --pip-args=*) PIP_ARGS="${1#--pip-args=}" ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT="$(cd "$ROOT" && pwd)"
    [ "$ROOT" = / ] && ROOT=""
fi

PREFIX=/opt/omi-bridge
CONF_DIR=/etc/omi-bridge
UNIT_DIR=/etc/systemd/system
BIN_DIR=/usr/local/bin
STATE_DIR=/var/lib/omi-bridge
UNIT=omi-bridge.service
SERVICE_USER=omi-bridge
BT_GROUP=bluetooth
PYTHON="${PYTHON:-python3}"
APT_PACKAGES=(bluez libopus0 python3-venv dbus)

say() { printf 'install: %s\n' "$*"; }
R() { printf '%s%s' "$ROOT" "$1"; }   # a path inside the target root

if [ "$(id -u)" != 0 ]; then
    say "run as root:  sudo $0 $*" >&2
    exit 1
fi

# systemd is "live" only when we install into / on a machine it booted.
LIVE_SYSTEMD=no
[ -z "$ROOT" ] && [ -d /run/systemd/system ] && LIVE_SYSTEMD=yes
systemctl_() {
    if [ "$LIVE_SYSTEMD" = yes ]; then systemctl "$@"; else systemctl --root="${ROOT:-/}" "$@"; fi
}
user_opt=()
[ -n "$ROOT" ] && user_opt=(--root "$ROOT")

# uid/gid as the target root's own files say (the host may not know the user at all).
uid_of() { awk -F: -v n="$1" '$1 == n { print $3; f = 1 } END { exit !f }' "$(R /etc/passwd)"; }
gid_of() { awk -F: -v n="$1" '$1 == n { print $3; f = 1 } END { exit !f }' "$(R /etc/group)"; }
in_group() {  # in_group USER GROUP: USER is a supplementary member of GROUP
    awk -F: -v u="$1" -v g="$2" '$1 == g { n = split($4, m, ","); for (i = 1; i <= n; i++) if (m[i] == u) f = 1 }
                                 END { exit !f }' "$(R /etc/group)"
}

# Copy SRC to DEST with MODE, only when the content differs (a second run leaves it untouched).
install_file() {
    local src="$1" dest="$2" mode="$3"
    if ! cmp -s "$src" "$dest"; then
        install -D -m "$mode" "$src" "$dest"
        say "wrote ${dest#"$ROOT"}"
    elif [ "$(stat -c %a "$dest")" != "${mode#0}" ]; then
        chmod "$mode" "$dest"
    fi
}

# A fingerprint of what pip would install, so an unchanged checkout is not reinstalled.
source_stamp() {
    (cd "$SRC" && find pyproject.toml bridge -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 |
        LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
    printf 'extras=%s pip-args=%s\n' "$EXTRAS" "$PIP_ARGS"
}

uninstall() {
    say "stopping and disabling $UNIT"
    if [ "$LIVE_SYSTEMD" = yes ]; then
        systemctl disable --now "$UNIT" 2>/dev/null || true
    elif [ -e "$(R "$UNIT_DIR/$UNIT")" ]; then
        systemctl_ disable "$UNIT" >/dev/null 2>&1 || true
    fi
    rm -f "$(R "$UNIT_DIR/$UNIT")"
    [ "$LIVE_SYSTEMD" = yes ] && systemctl daemon-reload
    if [ "$(readlink "$(R "$BIN_DIR/omi-bridge")" 2>/dev/null)" = "$PREFIX/.venv/bin/omi-bridge" ]; then
        rm -f "$(R "$BIN_DIR/omi-bridge")"
    fi
    rm -rf "$(R "$PREFIX")"
    if [ "$PURGE" = yes ]; then
        say "purging $CONF_DIR, $STATE_DIR and the user $SERVICE_USER"
        rm -rf "$(R "$CONF_DIR")" "$(R "$STATE_DIR")" "$(R /var/cache/omi-bridge)"
        if uid_of "$SERVICE_USER" >/dev/null 2>&1; then
            userdel "${user_opt[@]}" "$SERVICE_USER" 2>/dev/null || true
        fi
        if gid_of "$SERVICE_USER" >/dev/null 2>&1; then
            groupdel "${user_opt[@]}" "$SERVICE_USER" 2>/dev/null || true
        fi
        say "omi-bridge removed, with its configuration and state"
    else
        say "omi-bridge removed; kept $CONF_DIR and $STATE_DIR (--uninstall --purge removes them)"
    fi
}

if [ "$ACTION" = uninstall ]; then
    uninstall
    exit 0
fi

if [ "$EXTRAS" = __auto__ ]; then
    # ctranslate2 and onnxruntime publish no 32-bit ARM wheels: there, ASR runs on a Wyoming server.
    case "$(uname -m)" in
        armv7l|armv6l)
            EXTRAS=""
            say "32-bit ARM: installing without local ASR (set [asr] backend = \"wyoming\")"
            # numpy, soxr and dbus-fast publish no armv7 wheels on PyPI: pip may build them.
            APT_PACKAGES+=(build-essential cmake python3-dev) ;;
        *) EXTRAS=local-asr ;;
    esac
fi

# --- Debian packages -------------------------------------------------------------------------
if [ -z "$ROOT" ]; then
    missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        say "Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 "${missing[@]}" >/dev/null
    fi
else
    say "--root: skipping apt (the target system needs: ${APT_PACKAGES[*]})"
fi

# --- service user ----------------------------------------------------------------------------
if ! gid_of "$BT_GROUP" >/dev/null 2>&1; then
    groupadd "${user_opt[@]}" --system "$BT_GROUP"
    say "created the group $BT_GROUP"
fi
if ! uid_of "$SERVICE_USER" >/dev/null 2>&1; then
    useradd "${user_opt[@]}" --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "omi-bridge daemon" "$SERVICE_USER" 2>/dev/null
    say "created the system user $SERVICE_USER"
fi
if ! in_group "$SERVICE_USER" "$BT_GROUP"; then
    usermod "${user_opt[@]}" -a -G "$BT_GROUP" "$SERVICE_USER"
    say "added $SERVICE_USER to the group $BT_GROUP (BlueZ over D-Bus)"
fi
SVC_UID="$(uid_of "$SERVICE_USER")"
SVC_GID="$(gid_of "$SERVICE_USER")"

# --- Python environment ----------------------------------------------------------------------
venv="$(R "$PREFIX/.venv")"
if [ ! -x "$venv/bin/python" ]; then
    say "creating the venv $PREFIX/.venv"
    mkdir -p "$(R "$PREFIX")"
    "$PYTHON" -m venv "$venv"
fi
stamp_file="$(R "$PREFIX/.installed-source")"
want_stamp="$(source_stamp)"
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$want_stamp" ]; then
    say "installing omi-bridge${EXTRAS:+[$EXTRAS]} into the venv (a few minutes on a Pi)"
    # shellcheck disable=SC2086  # PIP_ARGS is a list of words by design
    "$venv/bin/python" -m pip install -q --disable-pip-version-check $PIP_ARGS \
        "$SRC${EXTRAS:+[$EXTRAS]}"
    printf '%s\n' "$want_stamp" >"$stamp_file"
    upgraded=yes
else
    upgraded=no
fi
mkdir -p "$(R "$BIN_DIR")"
if [ "$(readlink "$(R "$BIN_DIR/omi-bridge")" 2>/dev/null)" != "$PREFIX/.venv/bin/omi-bridge" ]; then
    ln -sfn "$PREFIX/.venv/bin/omi-bridge" "$(R "$BIN_DIR/omi-bridge")"
    say "linked $BIN_DIR/omi-bridge"
fi

# --- configuration ---------------------------------------------------------------------------
# The directory is root's with the service's group; the file (it may hold the API key) belongs to
# the service user alone. `omi-bridge pair` keeps the owner and mode it finds.
conf_dir="$(R "$CONF_DIR")"
mkdir -p "$conf_dir"
[ "$(stat -c %u:%g:%a "$conf_dir")" = "0:$SVC_GID:750" ] || { chown "0:$SVC_GID" "$conf_dir"; chmod 0750 "$conf_dir"; }
conf="$conf_dir/config.toml"
if [ ! -e "$conf" ]; then
    # The example documents every key; point the key file and storage at their installed places.
    # Without local ASR the config names the remote backend, so doctor asks for its server.
    asr_backend=local
    [[ ",$EXTRAS," == *,local-asr,* ]] || asr_backend=wyoming
    sed -e "s|^# api_key_file = \"\"|api_key_file = \"$CONF_DIR/api_key\"|" \
        -e "s|^# dir = \"\"|dir = \"$STATE_DIR\"|" \
        -e "s|^# backend = \"local\"|backend = \"$asr_backend\"|" \
        "$SRC/config.example.toml" >"$conf.new"
    chown "$SVC_UID:$SVC_GID" "$conf.new"
    chmod 0600 "$conf.new"
    mv "$conf.new" "$conf"
    say "wrote $CONF_DIR/config.toml (mode 0600)"
fi

# The state directory systemd would create at the first start (StateDirectory=, mode 0700), made
# now so that doctor and check-config, run as the service user before that start, can use it.
state_dir="$(R "$STATE_DIR")"
if [ ! -d "$state_dir" ]; then
    install -d -m 0700 -o "$SVC_UID" -g "$SVC_GID" "$state_dir"
    say "created $STATE_DIR"
fi

# --- systemd unit ----------------------------------------------------------------------------
unit_path="$(R "$UNIT_DIR/$UNIT")"
unit_before="$(cat "$unit_path" 2>/dev/null || true)"
install_file "$SRC/systemd/$UNIT" "$unit_path" 0644
if [ "$LIVE_SYSTEMD" = yes ] && [ "$unit_before" != "$(cat "$unit_path")" ]; then
    systemctl daemon-reload
fi
if ! systemctl_ is-enabled --quiet "$UNIT" 2>/dev/null; then
    systemctl_ enable "$UNIT" 2>&1 | sed 's/^/install: /'
fi
if [ "$LIVE_SYSTEMD" = yes ] && [ "$upgraded" = yes ] && systemctl is-active --quiet "$UNIT"; then
    systemctl restart "$UNIT"
    say "restarted $UNIT with the new code"
fi

# --- doctor ----------------------------------------------------------------------------------
if [ -n "$ROOT" ]; then
    say "installed under $ROOT (doctor checks a live system: run it there)"
    exit 0
fi
say "omi-bridge doctor (as $SERVICE_USER)"
doctor=("$PREFIX/.venv/bin/omi-bridge" doctor --config "$CONF_DIR/config.toml")
if command -v runuser >/dev/null 2>&1; then doctor=(runuser -u "$SERVICE_USER" -- "${doctor[@]}"); fi
if "${doctor[@]}"; then
    cat <<EOF

omi-bridge is installed, enabled and ready: sudo systemctl start omi-bridge
EOF
else
    cat <<EOF

omi-bridge is installed and enabled. Until a device is paired and the API key is set, doctor
reports them (above). Next:

  1. An API key from the Omi app (Settings → Developer → Create key) WITH the
     "conversations:write" scope, readable by the service only:
        sudo install -m 600 -o $SERVICE_USER -g $SERVICE_USER /dev/null $CONF_DIR/api_key
        sudoedit $CONF_DIR/api_key          # paste omi_dev_...
  2. Wake the pendant (or glasses), keep it close, and pair it:
        sudo omi-bridge pair --name pendant
  3. sudo -u $SERVICE_USER omi-bridge doctor     # until every line is ok
     sudo systemctl start omi-bridge
     omi-bridge status; journalctl -u omi-bridge -f
EOF
fi
