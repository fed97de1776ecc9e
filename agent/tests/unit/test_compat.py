"""What a later version may send reaches the real parsing code and is let through, never a reason to hang up.

A scripted "future" peer speaks to a real control transport and router over TCP on 127.0.0.1: a wider version
range, extra keys in its hello, introduction and messages, message types and gossip channels this version does
not have. The rule is in docs/protocol.md, "Compatibility between versions".
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets as pysecrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from weft.datapath.paths import PathState
from weft.mesh.clock import AsyncioScheduler
from weft.mesh.codec import pack, unpack
from weft.mesh.connection import ConnectionSettings
from weft.mesh.crypto import EphemeralKey, Opener, Sealer, derive_session_keys, secret_id
from weft.mesh.handshake import MAGIC, PROTOCOL_MAX, frame, read_frame
from weft.mesh.peer import PeerInfo
from weft.mesh.router import Router
from weft.mesh.transport import ControlTransport
from weft.metrics import Metrics

SECRET = b"compatibility test secret"
AGENT = PeerInfo(0x020000000001, "agent", 1001)
NEWER_MAX = 9  # a version range reaching past ours, as a later release's would


@dataclass
class Agent:
    router: Router
    metrics: Metrics
    port: int

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def running_agent(secrets: list[bytes]) -> AsyncIterator[Agent]:
    """This version's transport and router, listening on an ephemeral port of 127.0.0.1."""
    metrics = Metrics()
    router = Router(AGENT, AsyncioScheduler(asyncio.get_running_loop()), metrics, update_delay=0.01)
    settings = ConnectionSettings(heartbeat_interval=0.2, read_timeout=5.0)
    transport = ControlTransport(router, metrics, settings, lambda: secrets, listen=("127.0.0.1", 0), advertise=None)
    await transport.start()
    router.start()
    assert transport._server is not None
    port = transport._server.sockets[0].getsockname()[1]
    try:
        yield Agent(router, metrics, port)
    finally:
        router.stop()
        await transport.stop()
        transport._server.close()
        await transport._server.wait_closed()


class FuturePeer:
    """A peer of a later version: it adds what the rule allows a later version to add."""

    def __init__(self, name: int, nickname: str) -> None:
        self.info = PeerInfo(name, nickname, pysecrets.randbits(63) + 1)
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None

    async def connect(self, port: int, secret: bytes | None) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.writer.write(MAGIC + bytes([1, NEWER_MAX]))
        assert await self.reader.readexactly(6) == MAGIC + bytes([1, PROTOCOL_MAX])
        key = EphemeralKey() if secret else None
        hello: dict = {"enc": key is not None, "kem": "x-wing", "caps": ["zstd", "ipam"]}
        if key is not None and secret is not None:
            hello.update(pub=key.public, ids=[secret_id(secret, key.public)])
        self.writer.write(frame(pack(hello)))
        theirs = unpack(await read_frame(self.reader, 4096), "hello")
        if key is not None and secret is not None:
            keys = derive_session_keys(key.exchange(theirs["pub"]), secret, key.public, theirs["pub"], True)
            self._sealer, self._opener = Sealer(keys.control.send), Opener(keys.control.receive)
        intro = {
            "name": self.info.name,
            "nick": self.info.nickname,
            "uid": self.info.uid,
            "conn_id": pysecrets.randbits(64),
            "port": 6783,
            "advertise": None,
            "site": "dc9",  # a field this version does not know
            "features": {"datapath": [1, 2]},
        }
        self.send_raw(pack(intro))
        their_intro = await self.recv()
        assert their_intro["name"] == AGENT.name

    def send_raw(self, body: bytes) -> None:
        self.writer.write(frame(self._sealer.seal(body) if self._sealer else body))

    def send(self, msg: dict) -> None:
        self.send_raw(pack(msg))

    async def recv(self) -> dict:
        body = await read_frame(self.reader, 1 << 24)
        return unpack(self._opener.open(body) if self._opener else body, "message")

    async def recv_until(self, match: Callable[[dict], bool], timeout: float = 5.0) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.recv()
                if match(msg):
                    return msg

    def topology(self, version: int, *peers: int) -> dict:
        """Gossip of our own topology entry, connected to ``peers``."""
        entry = [self.info.name, self.info.nickname, self.info.uid, version, [[p, "", False, True] for p in peers]]
        return {"t": "g", "ch": "topology", "d": pack([entry])}

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


def test_a_newer_peer_joins_at_our_version_and_its_extra_fields_are_ignored() -> None:
    for secret in (SECRET, None):

        async def main(secret: bytes | None = secret) -> None:
            async with running_agent([secret] if secret else []) as agent:
                peer = FuturePeer(0x020000000002, "future")
                await peer.connect(agent.port, secret)
                await until(lambda: peer.info.name in agent.router.connections)
                conn = agent.router.connections[peer.info.name]
                assert conn.info.startswith(f"protocol v{PROTOCOL_MAX},")  # type: ignore[attr-defined]
                assert conn.encrypted == (secret is not None)
                # A heartbeat and a gossip message, each with a field this version does not know.
                peer.send({"t": "hb", "load": 0.5})
                msg = peer.topology(7, AGENT.name)
                peer.send({**msg, "zip": "zstd", "seq": 1})
                await until(lambda: agent.router.topology.peers.get(peer.info.name, None) is not None)
                assert agent.router.topology.peers[peer.info.name].version == 7
                assert agent.sample("weft_decode_errors_total", kind="message") == 0
                assert agent.sample("weft_handshake_failures_total", reason="malformed_intro") == 0
                await peer.close()

        run(main)


def test_unknown_types_and_channels_are_counted_and_dropped_and_the_connection_stays() -> None:
    async def main() -> None:
        async with running_agent([SECRET]) as agent:
            peer = FuturePeer(0x020000000002, "future")
            await peer.connect(agent.port, SECRET)
            await until(lambda: peer.info.name in agent.router.connections)
            conn = agent.router.connections[peer.info.name]
            unknown_types = [
                {"t": "ping", "n": 1},  # a new type, none of the gossip fields
                {"t": "g2", "ch": "topology", "d": b"\x90"},  # a new type that names a channel we have
            ]
            unknown_channels = [
                {"t": "g", "ch": "ipam", "d": pack({"ranges": []})},
                {"t": "gu", "ch": "ipam", "src": peer.info.name, "dst": AGENT.name, "d": b"\x90"},
            ]
            # Passed on down the sender's tree, where no one is below us: neither an error nor a drop.
            passed_on = [{"t": "gb", "ch": "ipam", "src": peer.info.name, "d": b"\x90"}]
            for msg in unknown_types + unknown_channels + passed_on:
                peer.send(msg)
            peer.send(peer.topology(3, AGENT.name))  # read after all the above: once merged, they were handled
            await until(lambda: peer.info.name in agent.router.topology.peers)

            assert agent.sample("weft_decode_errors_total", kind="message") == len(unknown_types)
            assert agent.sample("weft_gossip_dropped_total", reason="unknown_channel") == len(unknown_channels)
            assert agent.sample("weft_gossip_bytes_total", channel="unknown", direction="in") > 0
            assert agent.router.connections.get(peer.info.name) is conn and conn.close_reason is None  # type: ignore[attr-defined]
            # Still talking both ways: the agent's own entry, now with its connection to us, reaches us.
            await peer.recv_until(lambda m: m.get("t") in ("g", "gb") and m.get("ch") == "topology")
            assert agent.sample("weft_connection_terminations_total") == 0
            await peer.close()

    run(main)


def test_a_unicast_on_a_channel_we_do_not_have_is_forwarded_to_its_destination() -> None:
    """Two newer peers that reach each other only through us still get their unicasts across."""

    async def main() -> None:
        async with running_agent([SECRET]) as agent:
            a, b = FuturePeer(0x020000000002, "future-a"), FuturePeer(0x020000000003, "future-b")
            for p in (a, b):
                await p.connect(agent.port, SECRET)
                p.send(p.topology(2, AGENT.name))
            await until(lambda: agent.router.routes.unicast(b.info.name) == b.info.name)
            a.send({"t": "gu", "ch": "ipam", "src": a.info.name, "dst": b.info.name, "d": b"claim 10.32.0.0/24"})
            got = await b.recv_until(lambda m: m.get("t") == "gu")
            assert got == {"t": "gu", "ch": "ipam", "src": a.info.name, "dst": b.info.name, "d": b"claim 10.32.0.0/24"}
            assert agent.sample("weft_gossip_dropped_total", reason="unknown_channel") == 0
            # The channel name is the sender's choice: it is not a label of ours.
            assert agent.sample("weft_gossip_bytes_total", channel="unknown", direction="out") > 0
            assert agent.sample("weft_gossip_bytes_total", channel="ipam", direction="out") == 0
            for p in (a, b):
                await p.close()

    run(main)


def test_a_broadcast_on_a_channel_we_do_not_have_is_passed_on_down_the_tree() -> None:
    """Two newer peers that reach each other only through us still hear each other's broadcasts, once each."""

    async def main() -> None:
        async with running_agent([SECRET]) as agent:
            a, b = FuturePeer(0x020000000002, "future-a"), FuturePeer(0x020000000003, "future-b")
            for p in (a, b):
                await p.connect(agent.port, SECRET)
                p.send(p.topology(2, AGENT.name))
            await until(lambda: agent.router.routes.broadcast(a.info.name) == [b.info.name])
            broadcast = {"t": "gb", "ch": "names", "src": a.info.name, "d": b"web-1 is 10.32.0.1"}
            a.send(broadcast)
            a.send(broadcast)  # the same payload again (as a flood would bring it): passed on once
            got = await b.recv_until(lambda m: m.get("t") == "gb" and m.get("ch") == "names")
            assert got == broadcast
            await until(lambda: agent.sample("weft_gossip_dropped_total", reason="repeat") == 1)
            assert agent.sample("weft_gossip_unknown_relayed_total", type="broadcast") == 1
            assert agent.sample("weft_gossip_dropped_total", reason="unknown_channel") == 0
            assert agent.sample("weft_gossip_bytes_total", channel="unknown", direction="out") == len(broadcast["d"])
            for p in (a, b):
                await p.close()

    run(main)


def test_a_data_path_heartbeat_with_new_fields_counts_and_an_unknown_control_type_is_ignored() -> None:
    from weft.config import AgentConfig
    from weft.datapath.plane import DataPlane
    from weft.mesh.clock import VirtualScheduler

    peer = 0x020000000002
    metrics = Metrics()
    plane = DataPlane(AgentConfig(), Router(AGENT, VirtualScheduler(), metrics), metrics)
    plane.paths[peer] = PathState(peer, "10.0.0.2", ("10.0.0.2", 6783), None, 1, False, 1500)
    addr = ("10.0.0.2", 6783)
    plane._on_control(peer, addr, pack({"t": "hb", "tr": True, "fs": 0, "mx": 0, "gso": True}), 60, 1.0)
    assert plane.paths[peer].peer_trusts and plane.paths[peer].last_heard == 1.0
    plane._on_control(peer, addr, pack({"t": "rk", "epoch": 2}), 60, 2.0)  # a control type of a later version
    assert plane.paths[peer].peer_trusts and plane.paths[peer].max_rx_size == 0
    assert metrics.registry.get_sample_value("weft_decode_errors_total", {"kind": "datapath"}) in (None, 0.0)
