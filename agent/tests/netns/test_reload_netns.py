"""A reload at the worst moment: SIGHUP while the agent is still starting neither kills it nor is lost."""

from __future__ import annotations

import json
import signal
import time

import pytest
from lab import Lab, wait_until

pytestmark = pytest.mark.netns


def test_sighup_while_starting_is_applied_once_ready(lab: Lab) -> None:
    h1, h2 = lab(2)
    h2.start_agent()
    h2.wait_ready()
    config = h1.tmp_dir / "weft.yaml"
    config.write_text(json.dumps({"peers": []}))  # JSON is YAML
    agent = h1.start_agent("--config", str(config))
    # What an operator's `systemctl reload` right after a start does: the new peer is in the file, and the
    # signal comes while the agent sets up its state, data plane and listeners. (Before the interpreter has
    # run a line of the agent, nothing can catch a signal: the unit is Type=notify, so systemd sends reloads
    # only once the agent says it is ready.)
    wait_until(lambda: "starting weft" in h1.agent_log(), timeout=20, interval=0.005)
    config.write_text(json.dumps({"peers": [h2.listen_addr]}))
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline and agent.poll() is None:
        agent.send_signal(signal.SIGHUP)
        time.sleep(0.02)
    assert agent.poll() is None, f"SIGHUP during start killed the agent (exit {agent.returncode})\n{h1.agent_log()}"
    h1.wait_ready()
    wait_until(
        lambda: {p["nickname"] for p in h1.status()["peers"]} == {"h1", "h2"},
        timeout=20,
        message=lambda: f"the reload asked for while starting was lost: {h1.status()['targets']}",
    )
    assert "reloaded configuration" in h1.agent_log()
