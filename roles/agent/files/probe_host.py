# Copyright: (c) 2026, Weft engineers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Everything the agent role needs to know about a host, in one round trip (run with `python3 -c`).

Prints one JSON object: the Python and platform the wheelhouse must match (facts do not give the C library
version the manylinux tags depend on), the agent builds installed under the install directory (a build counts
only once its weft-build.json is written, the last step of an install; each says whether it has IPAM, which
decides the settings the role may write for it), what `current` points at, and what the role would otherwise ask
with a task each: the configuration file, the secret files (as SHA-1 digests of their contents: the task that
runs this hides its output), the unit file and whether the service is enabled and active, and the other files the
role writes (the CNI plugin and network: their text, None when absent or not text). On a run with nothing
to change, this is the only round trip the role makes before the readiness check.
"""

import glob
import hashlib
import json
import os
import platform
import subprocess
import sys

install_dir, config_dir, unit_path = sys.argv[1:4]
extra_files = sys.argv[4:]  # files the role writes outside its own directories (the CNI plugin and network)


def read(path, binary=False):
    try:
        with open(path, "rb" if binary else "r") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def has_ipam(build_dir):
    """Whether the agent installed in ``build_dir`` knows the IPAM settings (its parser refuses keys it does not
    know, so the role writes them only for a build that has them)."""
    for path in glob.glob(os.path.join(build_dir, "lib", "python3*", "site-packages", "weft", "config.py")):
        text = read(path)
        if text is not None and "ipalloc_range" in text:
            return True
    return False


def has_dns(build_dir):
    """Whether the agent installed in ``build_dir`` knows the DNS settings (written only for a build that has them)."""
    for path in glob.glob(os.path.join(build_dir, "lib", "python3*", "site-packages", "weft", "config.py")):
        text = read(path)
        if text is not None and "dns_domain" in text:
            return True
    return False


def systemctl(verb):
    try:
        done = subprocess.run(["systemctl", verb, "weft.service"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except OSError:
        return "unknown"
    return done.stdout.decode(errors="replace").strip() or "unknown"


secrets = {}
if os.path.isdir(config_dir):
    for name in sorted(os.listdir(config_dir)):
        if name.startswith("secret-"):
            data = read(os.path.join(config_dir, name), binary=True)
            secrets[os.path.join(config_dir, name)] = hashlib.sha1(data).hexdigest() if data is not None else None

builds = []
if os.path.isdir(install_dir):
    for name in sorted(os.listdir(install_dir)):
        path = os.path.join(install_dir, name)
        marker = os.path.join(path, "weft-build.json")
        if name in ("current", "wheelhouse") or os.path.islink(path):
            continue
        if os.path.isfile(marker):
            try:
                with open(marker) as f:
                    build = json.load(f)
            except (OSError, ValueError):
                continue
        elif os.path.exists(os.path.join(path, "bin", "weft")) and name[:1].isdigit():
            # Installed by a role before builds were keyed by content: /opt/weft/<version>.
            build, marker = {"version": name, "build": ""}, os.path.join(path, "bin", "weft")
        else:
            continue
        build["dir"] = path
        build["ipam"] = has_ipam(path)
        build["dns"] = has_dns(path)
        build["installed_at"] = os.stat(marker).st_mtime
        builds.append(build)
current = os.path.join(install_dir, "current")
print(
    json.dumps(
        {
            "python": "%d.%d" % sys.version_info[:2],
            "implementation": sys.implementation.name,
            "machine": platform.machine(),
            "libc": platform.libc_ver(),
            "builds": builds,
            "current": os.path.realpath(current) if os.path.islink(current) else None,
            "config_dir": os.path.isdir(config_dir),
            "config": read(os.path.join(config_dir, "weft.yaml")),
            "secrets": secrets,
            "unit": read(unit_path),
            "enabled": systemctl("is-enabled"),
            "active": systemctl("is-active"),
            "files": {path: read(path) for path in extra_files},
        }
    )
)
