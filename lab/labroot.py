"""The machines' root filesystems: one cached debootstrapped Debian 12 root (read-only lower layer) and one
overlayfs per machine whose upper layer carries what makes the machine itself (hostname, keys, machine-id)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path

from labplan import CACHE_DIR, MACHINES, SSH_KEY, Machine
from labsys import changed, log, run, write_file

SUITE = "bookworm"
# Bump RECIPE_VERSION (or change anything below) to rebuild the cached root on the next `up`.
RECIPE_VERSION = 1
PACKAGES = [
    "systemd",
    "systemd-sysv",
    "dbus",
    "libpam-systemd",
    "openssh-server",
    "python3",
    "python3-venv",
    "python3-apt",
    "iproute2",
    "nftables",
    "iputils-ping",
    "procps",
    "sudo",
    "tcpdump",
    "less",
]
# Installed by apt in the new root after debootstrap (debootstrap's own resolver lists some of their dependencies
# twice and then fails to extract them): podman with its CNI backend for the demo's containers, and crun, the one
# runtime that runs containers without cgroups (CONTAINERS_CONF below).
APT_PACKAGES = ["podman", "crun", "containernetworking-plugins"]
# podman inside an nspawn machine (lab/README.md, "Containers"): nspawn mounts the cgroup v1 controllers read-only,
# so containers get no cgroups (which only crun can do); nspawn's seccomp filter refuses keyctl, so no session
# keyring; /proc/sys is read-only, so no default sysctls (podman sets net.ipv4.ping_group_range); and the machine's
# root is an overlayfs, on which overlay layers cannot be made, so podman keeps its storage on the tmpfs /run (the
# demo's containers are gone at the machine's stop anyway).
CONTAINERS_CONF = """# weft lab: podman inside a systemd-nspawn machine (lab/README.md, "Containers")
[containers]
cgroups = "disabled"
keyring = false
default_sysctls = []

[engine]
runtime = "crun"
cgroup_manager = "cgroupfs"
network_backend = "cni"
"""
STORAGE_CONF = """# weft lab: the machine's root is an overlayfs, which cannot carry overlay layers; /run is a tmpfs
[storage]
driver = "overlay"
runroot = "/run/containers/storage"
graphroot = "/run/containers/graph"
"""
# Units that only cost boot time or wake up to reach a network that is not there.
MASKED_UNITS = [
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "dpkg-db-backup.timer",
    "systemd-networkd-wait-online.service",
    # podman's API service and its helpers: nothing here uses them
    "podman.service",
    "podman.socket",
    "podman-restart.service",
    "podman-auto-update.service",
    "podman-auto-update.timer",
]
SSHD_CONFIG = """# weft lab: root logs in with the lab key only.
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
"""


def recipe() -> dict:
    """Everything that determines the cached root's content; its hash names the cache directory."""
    return {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "variant": "minbase",
        "packages": PACKAGES,
        "apt_packages": APT_PACKAGES,
        "masked": MASKED_UNITS,
        "sshd": SSHD_CONFIG,
        "containers": [CONTAINERS_CONF, STORAGE_CONF],
    }


def recipe_id() -> str:
    """A short stable hash of the recipe."""
    return hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()[:12]


def base_dir() -> Path:
    """Where the current recipe's root lives (rootfs/ plus recipe.json once complete)."""
    return CACHE_DIR / f"{SUITE}-{recipe_id()}"


def base_root() -> Path:
    return base_dir() / "rootfs"


def apt_mirror() -> tuple[str, str | None]:
    """The Debian mirror (and keyring) apt already uses: the lab must fetch from nowhere else."""
    candidates: list[tuple[str, str | None]] = []
    for path in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")):
        candidates += _deb822_entries(path.read_text())
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt").glob("sources.list.d/*.list"))]:
        if path.exists():
            candidates += _one_line_entries(path.read_text())
    for uri, keyring in candidates:
        if "security" not in uri:
            return uri.rstrip("/"), keyring
    raise SystemExit(f"weftlab: no Debian {SUITE} main mirror found in /etc/apt/sources.list*")


def _deb822_entries(text: str) -> list[tuple[str, str | None]]:
    """(uri, keyring) of deb822 stanzas that carry SUITE/main."""
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields = {}
        for line in stanza.splitlines():
            if ":" in line and not line.lstrip().startswith("#"):
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
        if (
            "deb" in fields.get("types", "").split()
            and SUITE in fields.get("suites", "").split()
            and "main" in fields.get("components", "").split()
            and fields.get("enabled", "yes") != "no"
        ):
            out += [(uri, fields.get("signed-by")) for uri in fields.get("uris", "").split()]
    return out


def _one_line_entries(text: str) -> list[tuple[str, str | None]]:
    """(uri, keyring) of one-line `deb [opts] URI SUITE main...` entries."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^\s*deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)$", line)
        if m and m.group(3) == SUITE and "main" in m.group(4).split():
            opts = m.group(1) or ""
            key = re.search(r"signed-by=(\S+?)[\s\]]", opts)
            out.append((m.group(2), key.group(1) if key else None))
    return out


def ensure_base() -> Path:
    """Build the cached root once (debootstrap from apt's mirror), reused until the recipe changes."""
    root = base_root()
    if (base_dir() / "recipe.json").exists() and root.is_dir():
        return root
    mirror, keyring = apt_mirror()
    tmp = base_dir() / "rootfs.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    log(f"building the Debian {SUITE} root with debootstrap from {mirror} (a few minutes, done once)")
    started = time.monotonic()
    cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", "--components=main"]
    if keyring and Path(keyring).exists():
        cmd.append(f"--keyring={keyring}")
    logfile = base_dir() / "debootstrap.log"
    with open(logfile, "w") as out:
        rc = subprocess.run([*cmd, SUITE, str(tmp), mirror], stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"weftlab: debootstrap failed ({rc}); see {logfile}")
    apt_install(tmp, APT_PACKAGES, logfile)
    customize_base(tmp)
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    write_file(base_dir() / "recipe.json", json.dumps(recipe(), indent=2) + "\n")
    changed(f"built {root} in {time.monotonic() - started:.0f}s")
    prune_old_bases()
    return root


def apt_install(root: Path, packages: list[str], logfile: Path) -> None:
    """apt-get install (no recommends) in the new root, from the mirror debootstrap wrote into its sources."""
    if not packages:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    with open(logfile, "a") as out:
        for cmd in (
            ["chroot", str(root), "apt-get", "update", "-q"],
            ["chroot", str(root), "apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        ):
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
            if rc != 0:
                raise SystemExit(f"weftlab: {' '.join(cmd[2:])} in the new root failed ({rc}); see {logfile}")
    run(["chroot", str(root), "apt-get", "clean"])


def customize_base(root: Path) -> None:
    """Make the root machine-neutral: no machine-id, host keys or DNS of its own; sshd config; quiet units."""
    (root / "etc/machine-id").write_text("")
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").write_text("# weft lab: no DNS; machines are in /etc/hosts\n")
    write_file(root / "etc/ssh/sshd_config.d/weftlab.conf", SSHD_CONFIG)
    write_file(root / "etc/containers/containers.conf", CONTAINERS_CONF)
    write_file(root / "etc/containers/storage.conf", STORAGE_CONF)
    for unit in MASKED_UNITS:
        target = root / "etc/systemd/system" / unit
        target.unlink(missing_ok=True)
        target.symlink_to("/dev/null")
    (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


def prune_old_bases() -> None:
    """Drop cached roots of older recipes that no mounted overlay still uses."""
    mounted = Path("/proc/self/mounts").read_text()
    for d in CACHE_DIR.iterdir():
        if d.is_dir() and d != base_dir() and str(d) not in mounted:
            shutil.rmtree(d)
            changed(f"removed old cached root {d}")


# --- per machine ---------------------------------------------------------------------------------------------


def merged(m: Machine) -> Path:
    """The machine's root as nspawn sees it (the overlay mount point)."""
    return m.state_dir / "root"


def ensure_overlay(m: Machine, lower: Path) -> None:
    """Mount the machine's overlay; an upper layer built on another cached root is started afresh."""
    target = merged(m)
    if os.path.ismount(target):
        return
    upper, work = m.state_dir / "upper", m.state_dir / "work"
    stamp = m.state_dir / "lower"
    if stamp.exists() and stamp.read_text().strip() != str(lower):
        for d in (upper, work):
            if d.exists():
                shutil.rmtree(d)
    for d in (upper, work, target):
        d.mkdir(parents=True, exist_ok=True)
    write_file(stamp, f"{lower}\n")
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    run(["mount", "-t", "overlay", f"weftlab-{m.name}", "-o", opts, str(target)])
    changed(f"mounted overlay {target}")


def umount_overlay(m: Machine) -> None:
    """Unmount the machine's overlay (lazily if something still holds it)."""
    target = merged(m)
    if not os.path.ismount(target):
        return
    if run(["umount", str(target)], check=False).returncode != 0:
        run(["umount", "-l", str(target)])
    changed(f"unmounted {target}")


def hosts_file(m: Machine) -> str:
    """/etc/hosts: the machine itself plus every lab machine at its underlay address."""
    lines = ["127.0.0.1\tlocalhost", f"127.0.1.1\t{m.name}", "::1\tlocalhost ip6-localhost ip6-loopback", ""]
    lines += [f"{o.underlay_ip}\t{o.name}" for o in MACHINES if o.name != m.name]
    return "\n".join(lines) + "\n"


def personalize(m: Machine) -> None:
    """Write what makes the machine itself into its upper layer: name, hosts, machine-id, host keys, root's key."""
    root = merged(m)
    changes = [
        write_file(root / "etc/hostname", f"{m.name}\n"),
        write_file(root / "etc/hosts", hosts_file(m)),
        write_file(root / "root/.ssh/authorized_keys", Path(f"{SSH_KEY}.pub").read_text(), 0o600),
    ]
    os.chmod(root / "root/.ssh", 0o700)
    if not (root / "etc/machine-id").read_text().strip():
        (root / "etc/machine-id").write_text(secrets.token_hex(16) + "\n")
        changes.append(True)
    if not (root / "etc/ssh/ssh_host_ed25519_key").exists():
        run(["ssh-keygen", "-A", "-f", str(root)])
        changes.append(True)
    if any(changes):
        changed(f"personalized {m.name}")
