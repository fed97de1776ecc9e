"""A peer cannot forge log lines or drive the operator's terminal through the strings it sends."""

from __future__ import annotations

import sys

from lab import Host, Lab, metric_value, wait_until

FORGED = "2030-01-01 00:00:00,000 WARNING weft.agent: FORGED secret rotated"
# A nickname that ends a log line, starts a believable one, and clears the screen.
EVIL = f"evil\n{FORGED}\r\x1b[2J\x1b]0;owned\x07"

# A peer speaking the real handshake with a hostile nickname, then gossiping a third peer whose nickname
# is hostile too; it holds the connection so the other side's status can be read.
PEER = r"""
import asyncio, sys
from weft.mesh.codec import pack
from weft.mesh.handshake import frame, handshake
from weft.mesh.peer import PeerInfo

async def main(host, nick, gossip_nick):
    reader, writer = await asyncio.open_connection(host, 6783)
    await handshake(reader, writer, outbound=True, ourself=PeerInfo(0x020000000099, nick, 4242),
                    secrets=[], port=6783, advertise=None)
    links = [[0x020000000001, "10.99.0.11:6783", True, True], [0x020000000098, "10.99.0.13:6783", False, True]]
    ours = [0x020000000099, nick, 4242, 5, links]
    third = [0x020000000098, gossip_nick, 777, 5, [[0x020000000099, "10.99.0.12:6783", True, True]]]
    writer.write(frame(pack({"t": "g", "ch": "topology", "d": pack([ours, third])})))
    await writer.drain()
    print("sent", flush=True)
    await asyncio.sleep(60)

asyncio.run(main(*sys.argv[1:]))
"""


def forged(text: str) -> list[str]:
    """Lines that start with the forged text, and any escape or bell characters that reached the output."""
    bad = [line for line in text.splitlines() if line.startswith(FORGED)]
    return bad + [f"control character {c!r}" for c in ("\x1b", "\x07", "\r") if c in text]


def run_peer(h2: Host, h1: Host, nick: str, gossip_nick: str) -> None:
    proc = h2.popen(sys.executable, "-c", PEER, h1.ip, nick, gossip_nick)
    wait_until(lambda: proc.poll() is not None or "sent" in proc.read_log(), timeout=15)


def weft_log(host: Host) -> str:
    """The agent's own log lines (without the netlink library's debug output), for failure messages."""
    return "\n".join(line for line in host.agent_log().splitlines() if "pyroute2" not in line)[-3000:]


def test_a_hostile_nickname_in_the_handshake_forges_nothing(lab: Lab) -> None:
    h1, h2 = lab(2)
    h1.start_agent()
    h1.wait_ready()
    run_peer(h2, h1, EVIL, "quiet")
    wait_until(
        lambda: (
            metric_value(h1.metrics(), "weft_handshake_failures", reason="malformed_intro") >= 1
            or len(h1.status()["peers"]) > 1
        ),
        timeout=10,
        message=lambda: f"the hostile peer neither joined nor was refused:\n{weft_log(h1)}",
    )
    assert not forged(h1.agent_log()), weft_log(h1)
    for section in ("peers", "connections"):
        out = h1.cli("status", section).stdout
        assert not forged(out), out
    assert metric_value(h1.metrics(), "weft_handshake_failures", reason="malformed_intro") == 1
    assert "nickname contains a control character" in h1.agent_log()


def test_a_hostile_nickname_in_topology_gossip_forges_nothing(lab: Lab) -> None:
    h1, h2 = lab(2)
    h1.start_agent()
    h1.wait_ready()
    run_peer(h2, h1, "h2", EVIL)
    wait_until(
        lambda: metric_value(h1.metrics(), "weft_decode_errors", kind="topology") >= 1 or len(h1.status()["peers"]) > 2,
        timeout=10,
        message=lambda: f"the hostile gossip was neither merged nor refused:\n{weft_log(h1)}",
    )
    assert not forged(h1.agent_log()), weft_log(h1)
    out = h1.cli("status", "peers").stdout
    assert not forged(out), out
    assert "evil" not in out
    assert metric_value(h1.metrics(), "weft_decode_errors", kind="topology") >= 1
