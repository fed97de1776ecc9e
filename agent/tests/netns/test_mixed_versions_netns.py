"""A rolling upgrade's mixed mesh: this tree's agent and the previous release's, side by side.

The previous release is the commit before the version bump to 0.3.0 (agent 0.2.0). Its ``agent/`` is
exported with ``git archive`` and installed, with the dependencies it declares (aiohttp, pydantic and
prometheus-client, which this tree no longer uses), into a venv of its own, ``.venv-previous`` at the top of the
checkout, kept between runs for the same commit. Its CLI drives its own agent. See "Compatibility between
versions" in docs/protocol.md for the rule tested here.
"""

from __future__ import annotations

import io
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from lab import AGENT_SRC, THIS_TREE, Container, Host, Lab, Release, metric_value, wait_until
from test_datapath_netns import all_ping, datapaths, transfer, wait_paths

from weft import __version__

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[3]
PREVIOUS_RELEASE = "7810e1c^"  # the parent of "Agent 0.3.0"
PREVIOUS_VERSION = "0.2.0"
SECRET = "mixed-versions-secret"
MB = 1024 * 1024
# Handshake failures that would mean the versions disagree (not a dial racing another, which ends as "io").
REFUSALS = (
    "bad_magic",
    "version_mismatch",
    "malformed_hello",
    "malformed_intro",
    "encryption_mismatch",
    "secret_mismatch",
)


@pytest.fixture(scope="session")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    """The previous release, exported from git and installed with its own dependencies into ``.venv-previous``."""
    if shutil.which("git") is None:
        pytest.skip("the previous release comes from git, and git is not installed")
    if not (REPO / ".git").exists():
        pytest.skip(f"the previous release comes from git, and {REPO} has no .git (an exported tree?)")
    commit = _git("rev-parse", f"{PREVIOUS_RELEASE}^{{commit}}").decode().strip()
    dest = tmp_path_factory.mktemp("previous-release")
    with tarfile.open(fileobj=io.BytesIO(_git("archive", "--format=tar", commit, "agent"))) as tar:
        tar.extractall(dest, filter="data")
    src = dest / "agent" / "src"
    found = re.search(r'__version__ = "([^"]+)"', (src / "weft" / "__init__.py").read_text())
    assert found and found.group(1) == PREVIOUS_VERSION, f"{PREVIOUS_RELEASE} is not agent {PREVIOUS_VERSION}"
    assert __version__ != PREVIOUS_VERSION, "this tree still has the previous release's version"
    return Release(src, str(_previous_venv(commit, dest / "agent")))


def _git(*args: str) -> bytes:
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, check=False, timeout=60)
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip()
        pytest.skip(f"cannot read {PREVIOUS_RELEASE} from git (a shallow clone?): {reason}")
    return done.stdout


def _previous_venv(commit: str, project: Path) -> Path:
    """``.venv-previous/bin/python`` with ``project`` installed; made once per commit (pip needs the index)."""
    venv = REPO / ".venv-previous"
    python = venv / "bin" / "python"
    stamp = venv / ".weft-release"
    if stamp.exists() and stamp.read_text().strip() == commit and python.exists():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", str(project)],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False, timeout=600)
        assert done.returncode == 0, f"cannot install the previous release ({' '.join(step)}):\n{done.stderr}"
    stamp.write_text(commit + "\n")
    return python


def mixed_mesh(
    lab: Lab, old_release: Release, old: set[int], *, secret: bool, trusted: dict[int, list[str]] | None = None
) -> tuple[list[Host], list[Container]]:
    """Three hosts, each told of the others; those in ``old`` (indexes 1..3) run the previous release.

    Each host gets one container, 10.32.<host>.1/16, attached by that host's own CLI.
    """
    hosts = lab(3)
    for h in hosts:
        if h.index in old:
            h.use_release(old_release)
    for h in hosts:
        args = [arg for subnet in (trusted or {}).get(h.index, []) for arg in ("--trusted-subnet", subnet)]
        if h.index in old:
            args += ["--log-level", "info"]  # 0.2.0 logs every netlink message at debug, burying the rest
        h.start_agent(*args, peers=[o for o in hosts if o is not h], secrets=[SECRET] if secret else [])
    for h in hosts:
        status = h.wait_ready()
        assert status["version"] == (PREVIOUS_VERSION if h.index in old else __version__), h.name
    wait_until(lambda: whole(hosts), timeout=20, message=lambda: f"no full mesh: {views(hosts)}")
    containers = [h.add_container(f"10.32.{h.index}.1/16") for h in hosts]
    return hosts, containers


def whole(hosts: list[Host]) -> bool:
    """Every host sees every peer, and every peer reports an established connection to each other one."""
    names = {h.name for h in hosts}
    for h in hosts:
        status = h.status()
        if {p["nickname"] for p in status["peers"]} != names:
            return False
        for p in status["peers"]:
            if {c["nickname"] for c in p["connections"] if c["established"]} != names - {p["nickname"]}:
                return False
        if {c["nickname"] for c in status["connections"] if c["state"] == "established"} != names - {h.name}:
            return False
    return True


def views(hosts: list[Host]) -> dict[str, object]:
    return {h.name: h.status()["connections"] for h in hosts}


def no_bad_input(hosts: list[Host]) -> None:
    """Neither version found anything to refuse in what the other sent. An older release counts and drops the
    channels it does not have (the ipam channel, new in 0.5.0), as docs/protocol.md promises; a new one drops none."""
    for h in hosts:
        metrics = h.metrics()
        assert metric_value(metrics, "weft_decode_errors_total") == 0, f"{h.name}:\n{metrics}"
        for reason in REFUSALS:
            assert metric_value(metrics, "weft_handshake_failures_total", reason=reason) == 0, f"{h.name}: {reason}"
        if h.agent_src == AGENT_SRC:
            assert metric_value(metrics, "weft_gossip_dropped_total", reason="unknown_channel") == 0, h.name


def traffic_crosses(containers: list[Container], old: set[int]) -> None:
    """Every container pings every other, and TCP carries data intact from old to new and back."""
    all_ping(containers)
    old_c = next(c for c in containers if c.host.index in old)
    new_c = next(c for c in containers if c.host.index not in old)
    transfer(old_c, new_c, 20 * MB, port=5001)
    transfer(new_c, old_c, 20 * MB, port=5002)


MIXES = {"two new, one old": {3}, "one new, two old": {2, 3}}


@pytest.mark.parametrize("old", MIXES.values(), ids=MIXES.keys())
def test_old_and_new_agents_form_an_encrypted_mesh_and_carry_traffic(
    lab: Lab, previous_release: Release, old: set[int]
) -> None:
    hosts, containers = mixed_mesh(lab, previous_release, old, secret=True)
    for h in hosts:
        status = h.status()
        assert status["encryption"] == "enabled", h.name
        assert all(c["encrypted"] for c in status["connections"]), f"{h.name}: {status['connections']}"
        wait_paths(h, {o.name: "sleeve" for o in hosts if o is not h})
        assert all(row["encrypted"] for row in datapaths(h).values()), f"{h.name}: {datapaths(h)}"
    traffic_crosses(containers, old)
    no_bad_input(hosts)


@pytest.mark.parametrize("old", MIXES.values(), ids=MIXES.keys())
def test_old_and_new_agents_take_the_fast_path_without_a_secret(
    lab: Lab, previous_release: Release, old: set[int]
) -> None:
    hosts, containers = mixed_mesh(lab, previous_release, old, secret=False)
    for h in hosts:
        assert not any(c["encrypted"] for c in h.status()["connections"]), h.name
        wait_paths(h, {o.name: "fast" for o in hosts if o is not h})
    traffic_crosses(containers, old)
    no_bad_input(hosts)


def test_an_old_and_a_new_agent_on_a_trusted_subnet_take_the_fast_path(lab: Lab, previous_release: Release) -> None:
    """With a secret, h1 (new) and h3 (old) trust each other's address: plaintext fast path between them only."""
    pair = ["10.99.0.11/32", "10.99.0.13/32"]
    hosts, containers = mixed_mesh(lab, previous_release, {3}, secret=True, trusted={1: pair, 3: pair})
    h1, h2, h3 = hosts
    for h in hosts:
        assert all(c["encrypted"] for c in h.status()["connections"]), h.name  # the control channel always is
    wait_paths(h1, {"h2": "sleeve", "h3": "fast"})
    wait_paths(h3, {"h1": "fast", "h2": "sleeve"})
    wait_paths(h2, {"h1": "sleeve", "h3": "sleeve"})
    assert "10.99.0.12 is not in a trusted subnet" in datapaths(h1)["h2"]["reason"]
    assert not datapaths(h3)["h1"]["encrypted"] and datapaths(h3)["h2"]["encrypted"]
    traffic_crosses(containers, {3})
    transfer(containers[2], containers[1], 20 * MB, port=5003)  # old -> new over the sleeve as well
    no_bad_input(hosts)


def test_a_rolling_upgrade_one_host_at_a_time_then_a_rollback(lab: Lab, previous_release: Release) -> None:
    """Three old hosts become new one by one, each keeping its state dir and containers; then one goes back.

    After every step the mesh is whole and every container reaches every other: the new agent reads what the
    old one left in the state dir, and (on the way back) the old agent reads what the new one left.
    """
    hosts, containers = mixed_mesh(lab, previous_release, {1, 2, 3}, secret=True)
    all_ping(containers)

    def restart(h: Host, release: Release, version: str) -> None:
        h.kill_agent(signal.SIGTERM)
        h.use_release(release)
        args = ["--log-level", "info"] if release == previous_release else []
        h.start_agent(*args, peers=[o for o in hosts if o is not h], secrets=[SECRET], resume=True)
        assert h.wait_ready()["version"] == version, h.name
        wait_until(lambda: whole(hosts), timeout=20, message=lambda: f"{h.name}: no full mesh: {views(hosts)}")
        for other in hosts:
            if other is not h:
                wait_paths(h, {other.name: "sleeve"})
        all_ping(containers)

    for h in hosts:
        restart(h, THIS_TREE, __version__)
    transfer(containers[0], containers[2], 20 * MB)
    restart(hosts[2], previous_release, PREVIOUS_VERSION)
    transfer(containers[2], containers[0], 20 * MB, port=5002)
    no_bad_input(hosts)
