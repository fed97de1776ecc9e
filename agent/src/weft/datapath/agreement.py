"""End-to-end key agreement between two peers with no direct link: the messages and their checks, without I/O.

Two messages, carried hop by hop as data-path CONTROL maps along the route the data will take (endtoend.py sends
and passes them on; docs/protocol.md, "End-to-end keys through relays")::

    init      {"t": "ki", "s": initiator, "d": responder, "u": initiator's uid, "n": seq, "p": X25519 pub,
               "a": [tag per mesh secret], "ds": datagram size, "h": hops}
    response  {"t": "kr", "s": responder, "d": initiator, "u": responder's uid, "n": the init's seq, "p": X25519 pub,
               "i": index of the secret used in the init's "a", "a": tag, "ds": datagram size, "h": hops}

Every key pair is fresh (forward secrecy, as for a direct link); the keys come from HKDF over the X25519 result and
the mesh secret (crypto.derive_pair_keys). The tags (HMAC-SHA256 under a mesh secret) cover everything but "ds"
and "h", which relays update on the way: a peer without the secret can neither forge nor alter an agreement. An
init is taken once: its (uid, seq) must be the initiator's current run (from the topology) and newer than any
taken from it. A response is taken only for the init in flight, once.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from weft.mesh.codec import DecodeError, expect, expect_uint, field
from weft.mesh.crypto import (
    PAIR_TAG_LEN,
    PUBLIC_KEY_LEN,
    EphemeralKey,
    SessionKeys,
    derive_pair_keys,
    pair_tag,
)
from weft.mesh.peer import NAME_BITS

INIT, RESPONSE = "ki", "kr"
MAX_SECRETS = 16
MAX_HOPS = 16  # a relayed agreement message that went this many hops is in a loop: dropped
_INIT_LABEL = b"weft e2e init"
_RESPONSE_LABEL = b"weft e2e response"
KIND = "datapath"  # decode errors count as weft_decode_errors_total{kind="datapath"}


class AgreementError(Exception):
    """An agreement message refused; ``reason`` labels the metric that counts it."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class Init:
    src: int
    dst: int
    uid: int
    seq: int
    pub: bytes
    tags: list[bytes]
    ds: int  # the smallest datagram size of the hops crossed so far
    hops: int = 0

    def transcript(self) -> bytes:
        return _names(self.src, self.dst) + self.uid.to_bytes(8, "big") + self.seq.to_bytes(8, "big") + self.pub

    def encode(self) -> dict[str, Any]:
        return {
            "t": INIT,
            "s": self.src,
            "d": self.dst,
            "u": self.uid,
            "n": self.seq,
            "p": self.pub,
            "a": self.tags,
            "ds": self.ds,
            "h": self.hops,
        }


@dataclass
class Response:
    src: int
    dst: int
    uid: int
    seq: int
    pub: bytes
    index: int
    tag: bytes
    ds: int
    hops: int = 0

    def transcript(self, init: bytes) -> bytes:
        return init + _names(self.src, self.dst) + self.uid.to_bytes(8, "big") + self.pub

    def encode(self) -> dict[str, Any]:
        return {
            "t": RESPONSE,
            "s": self.src,
            "d": self.dst,
            "u": self.uid,
            "n": self.seq,
            "p": self.pub,
            "i": self.index,
            "a": self.tag,
            "ds": self.ds,
            "h": self.hops,
        }


@dataclass(frozen=True)
class PairKeys:
    """The outcome of an agreement: keys with ``peer``, named by ``kid``, under ``secret`` (kept to notice that a
    reload retired it)."""

    peer: int
    kid: int
    keys: SessionKeys
    secret: bytes
    initiator: bool


@dataclass
class Offer:
    """Our init in flight: what is needed to take its response, once."""

    init: Init
    key: EphemeralKey
    secrets: list[bytes]


def parse(msg: dict[str, Any]) -> Init | Response:
    """An init or a response from a decoded control map; DecodeError for anything else."""
    kind = field(msg, "t", str, KIND)
    src = _name(field(msg, "s", int, KIND), "s")
    dst = _name(field(msg, "d", int, KIND), "d")
    uid = expect_uint(field(msg, "u", int, KIND), 64, KIND, "u")
    seq = expect_uint(field(msg, "n", int, KIND), 64, KIND, "n")
    pub = field(msg, "p", bytes, KIND)
    ds = expect_uint(msg.get("ds", 0), 16, KIND, "ds")
    hops = expect_uint(msg.get("h", 0), 8, KIND, "h")
    if len(pub) != PUBLIC_KEY_LEN:
        raise DecodeError(KIND, "agreement: bad public key")
    if kind == INIT:
        tags = field(msg, "a", list, KIND)
        if not tags or len(tags) > MAX_SECRETS:
            raise DecodeError(KIND, "agreement: bad tag list")
        for tag in tags:
            if not isinstance(tag, bytes) or len(tag) != PAIR_TAG_LEN:
                raise DecodeError(KIND, "agreement: bad tag")
        return Init(src, dst, uid, seq, pub, tags, ds, hops)
    if kind == RESPONSE:
        index = expect_uint(field(msg, "i", int, KIND), 8, KIND, "i")
        tag = field(msg, "a", bytes, KIND)
        if index >= MAX_SECRETS or len(tag) != PAIR_TAG_LEN:
            raise DecodeError(KIND, "agreement: bad tag")
        return Response(src, dst, uid, seq, pub, index, tag, ds, hops)
    raise DecodeError(KIND, f"not an agreement message: {kind[:16]!r}")


def initiate(ourself: int, uid: int, peer: int, seq: int, secrets: list[bytes], ds: int) -> Offer:
    """A fresh init for ``peer`` with a new X25519 key, tagged under each of our secrets (in our order)."""
    key = EphemeralKey()
    init = Init(ourself, peer, uid, seq, key.public, [], ds)
    transcript = init.transcript()
    init.tags = [pair_tag(s, _INIT_LABEL, transcript) for s in secrets[:MAX_SECRETS]]
    return Offer(init, key, list(secrets[:MAX_SECRETS]))


class ReplayGuard:
    """The newest (uid, seq) taken from each initiator: an init is taken once, and only from the peer's current run."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[int, int]] = {}

    def check(self, init: Init, expected_uid: int | None) -> None:
        if expected_uid is None or init.uid != expected_uid:
            raise AgreementError("stale_run", "the init is not from the peer's current run")
        last = self._last.get(init.src)
        if last is not None and last[0] == init.uid and init.seq <= last[1]:
            raise AgreementError("replay", "an init already taken (or older)")

    def record(self, init: Init) -> None:
        self._last[init.src] = (init.uid, init.seq)

    def forget(self, peer: int) -> None:
        self._last.pop(peer, None)


def respond(
    init: Init, ourself: int, uid: int, secrets: list[bytes], guard: ReplayGuard, expected_uid: int | None, ds: int
) -> tuple[Response, PairKeys]:
    """Check an init meant for us and answer it; the keys are the responder's (unconfirmed until the initiator's
    first sealed message opens under them). Raises AgreementError."""
    if init.dst != ourself:
        raise AgreementError("misdirected", "an init for another peer")
    transcript = init.transcript()
    chosen = _first_common(init.tags, secrets, transcript)
    if chosen is None:
        raise AgreementError("auth", "the init is tagged under none of our mesh secrets")
    guard.check(init, expected_uid)  # after the tag: a forged init must not move the replay record
    guard.record(init)
    index, secret = chosen
    key = EphemeralKey()
    resp = Response(ourself, init.src, uid, init.seq, key.public, index, b"", ds)
    resp.tag = pair_tag(secret, _RESPONSE_LABEL, resp.transcript(transcript))
    keys, kid = derive_pair_keys(
        key.exchange(init.pub), secret, init.pub, key.public, _names(init.src, ourself), initiator=False
    )
    return resp, PairKeys(init.src, kid, keys, secret, initiator=False)


def complete(offer: Offer, resp: Response, expected_uid: int | None) -> PairKeys:
    """Take the response to our init in flight. Raises AgreementError."""
    init = offer.init
    if resp.src != init.dst or resp.dst != init.src or resp.seq != init.seq:
        raise AgreementError("stale", "a response to another init")
    if resp.index >= len(offer.secrets):
        raise AgreementError("auth", "the response names a secret we did not offer")
    secret = offer.secrets[resp.index]
    transcript = init.transcript()
    if not hmac.compare_digest(resp.tag, pair_tag(secret, _RESPONSE_LABEL, resp.transcript(transcript))):
        raise AgreementError("auth", "the response's tag does not verify")
    if expected_uid is not None and resp.uid != expected_uid:
        raise AgreementError("stale_run", "the response is not from the peer's current run")
    keys, kid = derive_pair_keys(
        offer.key.exchange(resp.pub), secret, init.pub, resp.pub, _names(init.src, init.dst), initiator=True
    )
    return PairKeys(init.dst, kid, keys, secret, initiator=True)


def _first_common(tags: list[bytes], secrets: list[bytes], transcript: bytes) -> tuple[int, bytes] | None:
    """The first of the initiator's tags (its order of preference) made with a secret we hold."""
    ours = [(s, pair_tag(s, _INIT_LABEL, transcript)) for s in secrets[:MAX_SECRETS]]
    for index, tag in enumerate(tags):
        for secret, mine in ours:
            if hmac.compare_digest(tag, mine):
                return index, secret
    return None


def _name(value: Any, what: str) -> int:
    name = expect_uint(expect(value, int, KIND, what), NAME_BITS, KIND, what)
    if name == 0:
        raise DecodeError(KIND, f"agreement: peer name 0 in {what!r}")
    return name


def _names(a: int, b: int) -> bytes:
    return a.to_bytes(6, "big") + b.to_bytes(6, "big")
