"""The libnftables runner the agent drives the container port guard with, on a kernel (root)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import threading

import pytest

from weft.datapath.netdev import enter_netns
from weft.datapath.portguard import InProcessNft, NftError, PortGuard, remove_table

P1, P2 = "vwe00000001", "vwe00000002"
M1, M2 = "02:00:00:00:00:01", "02:00:00:00:00:02"


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nft")
def test_libnftables_in_process_does_what_the_nft_program_does() -> None:
    """The agent's runner: the guard's table made, changed, listed as JSON and refused, as `nft` would, in a
    throwaway namespace that the runner's thread enters (its netlink socket opens there)."""
    runner = InProcessNft.load()
    if runner is None:
        pytest.skip("libnftables is not installed")
    netns = f"wtpg{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    outcome: dict[str, object] = {}

    def in_namespace() -> None:
        try:
            enter_netns(netns)
            guard = PortGuard(runner)
            guard.start({P1: {M1}})
            guard.sync({P1: {M1}, P2: {M2}})
            outcome["listed"] = subprocess.run(
                ["nft", "list", "set", "bridge", "weft_portguard", "allowed"], capture_output=True, text=True
            ).stdout
            outcome["json"] = json.loads(runner(["-j", "list", "table", "bridge", "weft_portguard"], None))
            guard.poll()
            outcome["text"] = runner(["list", "table", "bridge", "weft_portguard"], None)
            with pytest.raises(NftError, match=r"^nft: Error: "):
                runner(["delete", "table", "bridge", "no_such_table"], None)
            outcome["removed"] = remove_table(runner) and not remove_table(runner)
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            runner.close()

    try:
        thread = threading.Thread(target=in_namespace)
        thread.start()
        thread.join(30)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    assert f'"{P1}" . {M1}' in outcome["listed"] and f'"{P2}" . {M2}' in outcome["listed"]  # type: ignore[operator]
    assert any("set" in o and o["set"]["name"] == "allowed" for o in outcome["json"]["nftables"])  # type: ignore[index]
    assert "table bridge weft_portguard" in outcome["text"] and outcome["removed"]  # type: ignore[operator]
