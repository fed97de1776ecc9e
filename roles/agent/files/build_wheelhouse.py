# Copyright: (c) 2026, Weft engineers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Build a wheelhouse for the Weft agent on the controller: the agent's wheel, every dependency as a binary
wheel for the target's Python and platform, and pip itself (which installs them on a host with no network).

Run by the agent role with the controller's Python (the one running Ansible, which has pip):

    build_wheelhouse.py --source agent/ --version 0.4.0 --build 1f2e3d4c5b6a --python-version 3.11 \
        --machine x86_64 --glibc 2.36 --dest ~/.cache/weft/wheelhouse/weft-0.4.0-1f2e3d4c5b6a-cp311-...

Dependencies are pinned by the source's constraints.txt when it has one, so two builds of one source are the
same wheels. The result is one uncompressed tar (wheelhouse.tar: the wheels and wheelhouse.json) that the role
copies to a host in one transfer. Everything is built in a temporary directory next to --dest and renamed into
place at the end, so --dest either holds a complete wheelhouse (wheelhouse.json and wheelhouse.tar) or does
not exist: the role skips the build when wheelhouse.json is there.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

OLDEST_GLIBC_MINOR = 17  # manylinux2014: the oldest tag still published for our dependencies


def platforms(machine: str, glibc: str) -> list[str]:
    """pip's --platform list for a glibc host: every manylinux_2_N tag up to the host's glibc.

    pip expands manylinux2014 to 2010 and 1 itself but does not expand manylinux_2_N downwards, so name
    them all; a wheel built for an older glibc runs on a newer one.
    """
    major, minor = (int(x) for x in glibc.split(".")[:2])
    if major != 2 or minor < OLDEST_GLIBC_MINOR:
        raise SystemExit(f"glibc {glibc} is too old: the agent's dependencies need glibc 2.{OLDEST_GLIBC_MINOR}+")
    tags = [f"manylinux_2_{m}_{machine}" for m in range(minor, OLDEST_GLIBC_MINOR - 1, -1)]
    return [*tags, f"manylinux2014_{machine}"]


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout)
        raise SystemExit(f"command failed with exit code {done.returncode}: {' '.join(cmd)}")


def build(args: argparse.Namespace, work: Path) -> dict:
    wheels = work / "wheels"
    wheels.mkdir()
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    source = work / "source"
    shutil.copytree(
        args.source,
        source,
        ignore=shutil.ignore_patterns("tests", "build", "dist", "*.egg-info", "__pycache__", ".*cache"),
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args.pip_arg]
    constraints = args.source / "constraints.txt"
    pinned = ["--constraint", str(constraints)] if constraints.is_file() else []
    run([*pip, "wheel", "--no-deps", "--wheel-dir", str(wheels), str(source)])
    built = sorted(wheels.glob("weft-*.whl"))
    if len(built) != 1:
        raise SystemExit(f"expected one weft wheel from {args.source}, got {[p.name for p in built]}")
    agent = built[0]
    found = agent.name.split("-")[1]
    if found != args.version:
        raise SystemExit(
            f"{args.source} builds weft {found}, not the requested {args.version}: "
            "set weft_version to the agent's version (or leave it unset to read it from pyproject.toml)"
        )
    abi = "cp" + args.python_version.replace(".", "")
    target = ["--python-version", args.python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3"]
    target += ["--abi", "none"]
    for tag in platforms(args.machine, args.glibc):
        target += ["--platform", tag]
    # Dependencies (resolved from the agent's wheel metadata) and pip, binary only: the host builds nothing.
    run([*pip, "download", "--only-binary=:all:", *target, "--dest", str(wheels), *pinned, str(agent), "pip"])
    pip_wheels = sorted(p.name for p in wheels.glob("pip-*.whl"))
    return {
        "version": args.version,
        "build": args.build,
        "pinned": bool(pinned),
        "python": args.python_version,
        "platforms": platforms(args.machine, args.glibc),
        "agent_wheel": agent.name,
        "pip_wheel": pip_wheels[-1],
        "wheels": sorted(p.name for p in wheels.glob("*.whl")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="the agent's source (with pyproject.toml)")
    parser.add_argument("--version", required=True, help="the agent version the wheel must have")
    parser.add_argument("--build", required=True, help="the source's content digest (weft.mesh.source_digest)")
    parser.add_argument("--python-version", required=True, help="the target's Python, MAJOR.MINOR")
    parser.add_argument("--machine", required=True, help="the target's architecture, like x86_64 or aarch64")
    parser.add_argument("--glibc", required=True, help="the target's glibc version, like 2.36")
    parser.add_argument("--dest", type=Path, required=True, help="the wheelhouse directory to create")
    parser.add_argument("--pip-arg", action="append", default=[], help="extra pip option (repeatable)")
    args = parser.parse_args()
    if not re.fullmatch(r"3\.\d+", args.python_version):
        raise SystemExit(f"--python-version must be 3.N, not {args.python_version!r}")
    if args.dest.exists():
        shutil.rmtree(args.dest)  # the role asks for a rebuild only when it wants a fresh one
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=args.dest.parent))
    try:
        manifest = build(args, work)
        wheels = work / "wheels"
        (wheels / "wheelhouse.json").write_text(json.dumps(manifest, indent=2) + "\n")
        result = work / "result"
        result.mkdir()
        # Sorted names and fixed metadata: the same wheels always make the same archive.
        with tarfile.open(result / "wheelhouse.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(wheels.iterdir()):
                info = tar.gettarinfo(str(path), arcname=path.name)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mtime = 0
                info.mode = 0o644
                with path.open("rb") as f:
                    tar.addfile(info, f)
        shutil.copy(wheels / "wheelhouse.json", result / "wheelhouse.json")
        result.rename(args.dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(manifest))


if __name__ == "__main__":
    main()
