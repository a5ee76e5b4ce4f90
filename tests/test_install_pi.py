"""scripts/install-pi.sh staged into a throwaway root (``--root``): the files a Pi gets, their
owners and modes, a second run that changes nothing, a unit systemd accepts, and an uninstall
that keeps the user's config unless purged."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from bridge.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install-pi.sh"
UNIT = "omi-bridge.service"
# Only the bridge itself into the staged venv: its dependencies are what make test already has,
# and a Pi install of them is what make pi-check proves.
FAST = ["--extras", "", "--pip-args", "--no-deps"]


def fresh_root(base: Path) -> Path:
    """A minimal Debian /etc (root only, no bluetooth group yet) and systemd's own units, so
    ``systemd-analyze --root`` finds the targets a service depends on."""
    root = base / "root"
    etc = root / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (etc / "gshadow").write_text("root:*::\n")
    for name in ("shadow", "gshadow"):
        (etc / name).chmod(0o640)
    shutil.copy("/etc/login.defs", etc / "login.defs")
    units = root / "usr/lib/systemd"
    units.mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", units / "system", symlinks=True)
    return root


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a user clones, frozen for this module (the script installs from its own checkout,
    and reinstalls when that changes)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "config.example.toml"):
        shutil.copy(ROOT / name, src / name)
    for name in ("bridge", "systemd", "scripts"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def install(src: Path, root: Path, *args: str) -> str:
    script = src / "scripts" / SCRIPT.name
    done = subprocess.run(["bash", str(script), "--root", str(root), *FAST, *args], capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def snapshot(root: Path) -> dict[str, tuple[int, int, int, int, int, str]]:
    """Every path under root with mode, owner, size, mtime and link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else ""
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                             st.st_mtime_ns, link)
    return out


def ids(root: Path, db: str, name: str) -> list[str]:
    for line in (root / "etc" / db).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    raise AssertionError(f"{name} not in {db}")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, checkout: Path) -> tuple[Path, str, str]:
    """One install and one re-run (shared: the install builds the bridge wheel once)."""
    root = fresh_root(tmp_path_factory.mktemp("pi"))
    first = install(checkout, root)
    before = snapshot(root)
    second = install(checkout, root)
    assert snapshot(root) == before, "the second run changed files"
    return root, first, second


def test_files_owners_and_modes_are_what_the_service_needs(installed: tuple[Path, str, str]) -> None:
    root, first, _ = installed
    user = ids(root, "passwd", "omi-bridge")
    uid, gid, home, shell = int(user[2]), int(user[3]), user[5], user[6]
    assert uid < 1000 and home == "/var/lib/omi-bridge" and shell == "/usr/sbin/nologin"
    assert "omi-bridge" in ids(root, "group", "bluetooth")[3].split(",")

    conf_dir = root / "etc/omi-bridge"
    st = conf_dir.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 0, gid)
    conf = conf_dir / "config.toml"
    st = conf.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, uid, gid)
    data = tomllib.loads(conf.read_text())
    assert data["api"]["api_key_file"] == "/etc/omi-bridge/api_key"
    assert data["storage"]["dir"] == "/var/lib/omi-bridge"
    assert data["asr"]["backend"] == "wyoming"  # installed without local-asr (FAST), as on armv7
    _config, problems = parse_config(data, str(conf))
    assert problems == []

    state = (root / "var/lib/omi-bridge").stat()  # doctor, as the service user, can use it at once
    assert (stat.S_IMODE(state.st_mode), state.st_uid, state.st_gid) == (0o700, uid, gid)
    assert os.readlink(root / "usr/local/bin/omi-bridge") == "/opt/omi-bridge/.venv/bin/omi-bridge"
    assert os.access(root / "opt/omi-bridge/.venv/bin/omi-bridge", os.X_OK)
    unit = root / "etc/systemd/system" / UNIT
    assert unit.read_bytes() == (ROOT / "systemd" / UNIT).read_bytes()  # the unit as shipped
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    wants = root / "etc/systemd/system/multi-user.target.wants" / UNIT
    assert os.readlink(wants) == f"/etc/systemd/system/{UNIT}"
    assert "created the system user omi-bridge" in first and "wrote /etc/omi-bridge/config.toml" in first


def test_the_second_run_says_it_changed_nothing(installed: tuple[Path, str, str]) -> None:
    _root, _first, second = installed
    assert not [ln for ln in second.splitlines() if any(w in ln for w in ("wrote", "created", "linked",
                                                                         "installing", "added"))]


def test_systemd_accepts_the_installed_unit(installed: tuple[Path, str, str]) -> None:
    root = installed[0]
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: scripts/setup.sh installs the systemd package")
    done = subprocess.run(["systemd-analyze", f"--root={root}", "verify", f"/etc/systemd/system/{UNIT}"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert UNIT not in done.stdout + done.stderr  # no warning about our unit either


def test_a_users_config_survives_reinstall_and_uninstall_but_not_purge(tmp_path: Path,
                                                                      checkout: Path) -> None:
    root = fresh_root(tmp_path)
    install(checkout, root)
    conf = root / "etc/omi-bridge/config.toml"
    conf.write_text(conf.read_text() + '\n[[devices]]\nkind = "omi"\naddress = "AA:BB:CC:DD:EE:01"\n')
    out = install(checkout, root)
    assert "AA:BB:CC:DD:EE:01" in conf.read_text() and "config.toml" not in out

    install(checkout, root, "--uninstall")
    assert not (root / "opt/omi-bridge").exists()
    assert not (root / "etc/systemd/system" / UNIT).exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants" / UNIT).exists()
    assert not (root / "usr/local/bin/omi-bridge").is_symlink()
    assert "AA:BB:CC:DD:EE:01" in conf.read_text()
    ids(root, "passwd", "omi-bridge")

    install(checkout, root, "--uninstall", "--purge")
    assert not (root / "etc/omi-bridge").exists()
    assert "omi-bridge:" not in (root / "etc/passwd").read_text()
