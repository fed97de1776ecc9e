# -*- coding: utf-8 -*-
# Copyright: (c) 2026, Weft engineers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""What identifies one build of the agent: a digest of everything that goes into its wheelhouse.

The role keys the controller's wheelhouse cache and the host's install directory by version *and* this digest,
so an agent changed without a version bump is noticed (rebuilt, installed beside, restarted), and an unchanged
one is neither rebuilt nor copied. Filters run on the controller, where the agent's source is.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import os

from ansible.errors import AnsibleFilterError

# What the wheel and its dependencies are made from; tests, caches and build leftovers are not.
TOP_FILES = ("pyproject.toml", "constraints.txt", "README.md", "setup.cfg", "setup.py")
SKIP_DIRS = ("__pycache__", "build", "dist")
SKIP_SUFFIXES = (".pyc", ".pyo")
DIGEST_LENGTH = 12


def _source_files(source):
    for name in TOP_FILES:
        path = os.path.join(source, name)
        if os.path.isfile(path):
            yield name, path
    top = os.path.join(source, "src")
    for root, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            if name.endswith(SKIP_SUFFIXES):
                continue
            path = os.path.join(root, name)
            yield os.path.relpath(path, source), path


def source_digest(source):
    """The first 12 hex digits of a SHA-256 over the agent source's build inputs (names and contents)."""
    source = str(source)
    if not os.path.isfile(os.path.join(source, "pyproject.toml")):
        raise AnsibleFilterError(
            "no pyproject.toml in %s: weft_agent_source must be the agent's source directory (agent/)" % source
        )
    digest = hashlib.sha256()
    for rel, path in _source_files(source):
        with open(path, "rb") as f:
            data = f.read()
        digest.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return digest.hexdigest()[:DIGEST_LENGTH]


def source_ipam(source):
    """Whether the agent source knows the IPAM settings (``ipalloc_range``...): the role writes them only for a
    build that does, since the agent's parser refuses keys it does not know."""
    try:
        with open(os.path.join(str(source), "src", "weft", "config.py"), encoding="utf-8") as f:
            return "ipalloc_range" in f.read()
    except OSError:
        return False


def source_dns(source):
    """Whether the agent source knows the DNS settings (``dns_domain``...): written only for a build that does, like
    the IPAM ones."""
    try:
        with open(os.path.join(str(source), "src", "weft", "config.py"), encoding="utf-8") as f:
            return "dns_domain" in f.read()
    except OSError:
        return False


def _newest_first(builds):
    return sorted(builds, key=lambda b: (b.get("installed_at") or 0, b["dir"]), reverse=True)


def build_plan(
    probe, version, source_version, digest, install_dir, keep=2, source_has_ipam=False, source_has_dns=False
):
    """Which build a host should run, whether it must be installed, and which old builds go.

    ``probe`` is what probe_host.py printed on the host. The source's own version is installed (or found) as
    ``<install_dir>/<version>-<digest>``; any other version must be on the host already: that is a rollback,
    and it needs no build. Kept: the target, the build ``current`` points at (the way back until the restart
    has passed its gate) and the newest others, ``keep`` in all. The target says whether it has IPAM (``ipam``):
    the source's build when ``source_has_ipam``, an installed one as the probe found it; and DNS (``dns``) the same
    way. Returns ``error`` instead when the version cannot be had.
    """
    builds = list(probe.get("builds") or [])
    current = probe.get("current")
    if str(version) == str(source_version):
        target = {"version": str(version), "build": digest, "dir": "%s/%s-%s" % (install_dir, version, digest)}
        target["ipam"] = bool(source_has_ipam)
        target["dns"] = bool(source_has_dns)
        installed = any(b["dir"] == target["dir"] for b in builds)
    else:
        found = [b for b in builds if str(b.get("version")) == str(version)]
        if not found:
            have = sorted({str(b.get("version")) for b in builds}) or ["none"]
            return {
                "error": "weft %s is not installed on this host (installed: %s) and the agent source is version %s: "
                "to roll back, pick an installed version; to install %s, point weft_agent_source at its source"
                % (version, ", ".join(have), source_version, version)
            }
        running = [b for b in found if b["dir"] == current]
        target = dict((running or _newest_first(found))[0])
        installed = True
    previous = next((b for b in builds if b["dir"] == current), None)
    kept = {target["dir"]} | ({current} if current else set())
    remove = []
    for b in _newest_first(builds):
        if b["dir"] in kept:
            continue
        if len(kept) < max(int(keep), 1):
            kept.add(b["dir"])
        else:
            remove.append(b["dir"])
    return {
        "target": {
            "version": target["version"],
            "build": target.get("build") or "",
            "dir": target["dir"],
            "ipam": bool(target.get("ipam")),
            "dns": bool(target.get("dns")),
        },
        "install": not installed,
        "current": current,
        "previous": (
            {"version": str(previous["version"]), "build": previous.get("build") or "", "dir": previous["dir"]}
            if previous
            else None
        ),
        "switch": current != target["dir"],
        "remove": sorted(remove),
    }


def secret_file_digests(secrets):
    """The SHA-1 of each secret file the role writes (the secret and a newline), in order: compared with the
    host's files, so that unchanged secrets are not sent again. Digests only; the caller hides them too."""
    return [hashlib.sha1((str(secret) + "\n").encode()).hexdigest() for secret in secrets or []]


class FilterModule(object):
    def filters(self):
        return {
            "source_digest": source_digest,
            "source_ipam": source_ipam,
            "source_dns": source_dns,
            "build_plan": build_plan,
            "secret_file_digests": secret_file_digests,
        }
