"""The gossip contract every replicated piece of state (topology, IPAM, DNS) plugs into.

A channel's gossiper gives its full state, merges what arrives and returns only what was new to it;
the router moves that delta on. Per connection, pending gossip is merged rather than queued, so a slow
link carries the latest state instead of a backlog.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol


class GossipData(Protocol):
    def merge(self, other: Any) -> None: ...

    def encode(self) -> bytes: ...


class Gossiper(Protocol):
    """One channel's state. Decoders raise DecodeError on bad input; they never crash the agent."""

    def gossip(self) -> GossipData | None:
        """Full state, sent to new connections and to random neighbours on a timer."""

    def on_gossip(self, payload: bytes) -> GossipData | None:
        """Merge state from a neighbour; return what was new (to broadcast on), or None."""

    def on_gossip_broadcast(self, source: int, payload: bytes) -> GossipData | None:
        """Merge a broadcast from ``source``; return what was new (relayed down the tree), or None."""

    def on_gossip_unicast(self, source: int, payload: bytes) -> None:
        """A message addressed to us alone."""


class Digester(Protocol):
    """A channel that repairs a neighbour from a summary of what it holds rather than from its full state: in a
    settled mesh, anti-entropy then costs the summary (a few bytes a peer) instead of the whole state."""

    def digest(self) -> bytes:
        """A summary of everything we hold, for a neighbour to compare with its own."""

    def compare(self, payload: bytes) -> tuple[GossipData | None, bool]:
        """A neighbour's digest against what we hold: what we have that it lacks (None if nothing), and whether it
        has something we lack. Raises DecodeError on a malformed digest."""


# Wire message types (the "t" field of a control message).
GOSSIP = "g"
BROADCAST = "gb"
UNICAST = "gu"
DIGEST = "gd"  # only to a neighbour whose handshake named DIGEST_CAPABILITY
DIGEST_CAPABILITY = "digest"


REPAIR = 1  # the third part of a repair's key in GossipSender (a full state's is 0)


class GossipSender:
    """Pending gossip for one connection. Data for the same channel (and source) merges in place; the bytes
    of a broadcast on a channel we do not have cannot, and wait once per distinct payload."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._pending: dict[tuple, GossipData | bytes] = {}
        self._unicast_seq = 0

    def send(self, channel: str, data: GossipData) -> None:
        self._put((GOSSIP, channel, 0), data)

    def send_repair(self, channel: str, data: GossipData) -> None:
        """Gossip sent without taking the neighbour for new (what its digest showed it lacks, or anti-entropy's full
        state): it merges it as any, but does not answer with its own full state."""
        self._put((GOSSIP, channel, REPAIR), data)

    def send_digest(self, channel: str, digest: bytes, *, reply: bool) -> None:
        """Our digest (the latest replaces one still pending). ``reply``: an answer to the neighbour's, which it
        answers with what we lack and nothing more."""
        self._pending[(DIGEST, channel, reply)] = digest
        self._wake()

    def send_broadcast(self, channel: str, source: int, data: GossipData | bytes) -> None:
        """``bytes``: a broadcast on a channel we do not have, passed on as it came."""
        if isinstance(data, bytes):
            self._pending.setdefault((BROADCAST, channel, source, data), data)
            self._wake()
        else:
            self._put((BROADCAST, channel, source), data)

    def send_unicast(self, channel: str, source: int, dest: int, payload: bytes) -> None:
        self._unicast_seq += 1
        self._pending[(UNICAST, channel, source, dest, self._unicast_seq)] = payload
        self._wake()

    def _put(self, key: tuple, data: GossipData) -> None:
        current = self._pending.get(key)
        if current is None:
            # Copy-on-merge: the caller may hand the same object to several senders.
            self._pending[key] = _fresh(data)
            self._wake()
        else:
            current.merge(data)  # type: ignore[union-attr]

    def take(self) -> list[dict]:
        """Everything pending, as wire messages; the sender is empty afterwards."""
        pending, self._pending = self._pending, {}
        messages = []
        for key, data in pending.items():
            kind, channel = key[0], key[1]
            if kind == GOSSIP:
                message = {"t": GOSSIP, "ch": channel, "d": data.encode()}  # type: ignore[union-attr]
                if key[2] == REPAIR:
                    message["rp"] = True
                messages.append(message)
            elif kind == DIGEST:
                messages.append({"t": DIGEST, "ch": channel, "d": data, "re": key[2]})
            elif kind == BROADCAST:
                payload = data if isinstance(data, bytes) else data.encode()
                messages.append({"t": BROADCAST, "ch": channel, "src": key[2], "d": payload})
            else:
                messages.append({"t": UNICAST, "ch": channel, "src": key[2], "dst": key[3], "d": data})
        return messages


def _fresh(data: GossipData) -> GossipData:
    """An empty object of the same type merged with ``data``, so later merges never touch the original."""
    copy = type(data)()  # type: ignore[call-arg]
    copy.merge(data)
    return copy


class SeenPayloads:
    """The broadcasts on channels we do not have that we passed on lately.

    A peer relays a channel's broadcast only when it was news to it, which is what ends a flood while
    broadcast trees are recomputed or disagree. A peer without the channel cannot merge, but it can tell
    the very same payload from the very same source coming round again, and relay it only the first time.
    """

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def first_time(self, channel: str, source: int, payload: bytes) -> bool:
        """True once per (channel, source, payload) among the last ``size`` remembered."""
        name = channel.encode("utf-8", "surrogatepass")
        h = hashlib.blake2b(len(name).to_bytes(2, "big") + name + source.to_bytes(8, "big"), digest_size=16)
        h.update(payload)
        digest = h.digest()
        if digest in self._seen:
            self._seen.move_to_end(digest)
            return False
        self._seen[digest] = None
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return True


class Relay(Protocol):
    """How a channel's own messages leave this peer (the router is one; a test can be another)."""

    def broadcast(self, channel: str, data: GossipData) -> None:
        """Send a local change to every peer, once each, along our broadcast tree."""

    def unicast(self, channel: str, dest: int, payload: bytes) -> bool:
        """Send to one peer by the unicast route; False if it is unreachable now."""


class GossipChannel:
    """A named channel: how a gossiper sends. Receiving is the router's job."""

    def __init__(self, name: str, relay: Relay, gossiper: Gossiper, digester: Digester | None = None) -> None:
        self.name = name
        self.gossiper = gossiper
        self.digester = digester  # None: anti-entropy sends the full state
        self._relay = relay

    def broadcast(self, data: GossipData) -> None:
        """Send a local change to every peer, once each, along our broadcast tree."""
        self._relay.broadcast(self.name, data)

    def unicast(self, dest: int, payload: bytes) -> bool:
        """Send to one peer by the unicast route; False if it is unreachable now."""
        return self._relay.unicast(self.name, dest, payload)
