"""The control-connection handshake: magic and version range, then keys, then introductions.

    both send:  b"weft" | min_version | max_version          (6 bytes)
    both send:  frame(hello)     hello = {enc, pub, ids}     (clear: only public values)
    both send:  frame(intro)     intro = {name, nick, uid, conn_id, port, advertise, caps}  (sealed if enc)

A frame is a 4-byte big-endian length and a body. Everything a remote sends is checked before use;
every failure is a HandshakeError whose ``reason`` labels a metric.
"""

from __future__ import annotations

import asyncio
import secrets as pysecrets
import struct
from dataclasses import dataclass

from weft.mesh.codec import DecodeError, expect, expect_uint, field, pack, unpack
from weft.mesh.crypto import (
    PUBLIC_KEY_LEN,
    SECRET_ID_LEN,
    EphemeralKey,
    Opener,
    Sealer,
    SealError,
    SessionKeys,
    derive_session_keys,
    secret_id,
)
from weft.mesh.gossip import DIGEST_CAPABILITY
from weft.mesh.peer import NAME_BITS, PeerInfo
from weft.safetext import refuse_control

MAGIC = b"weft"
PROTOCOL_MIN = 1
PROTOCOL_MAX = 1
MAX_HELLO = 4096
MAX_SECRETS = 16
FRAME_HEADER = struct.Struct(">I")
# What this release reads beyond protocol 1, named in the introduction (an older peer ignores the key, and sends
# none): "e2e" = end-to-end data-path datagrams (opened when for us, passed on unopened otherwise) and the relayed
# key agreement that sets them up; "digest" = anti-entropy by digest (gossip.DIGEST), answered with what we lack.
CAPABILITIES = ("e2e", DIGEST_CAPABILITY)
MAX_CAPS = 32


class HandshakeError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class Intro:
    peer: PeerInfo
    conn_id: int
    port: int
    advertise: str | None
    caps: frozenset[str] = frozenset()  # what the peer says it reads beyond its protocol version


@dataclass
class Session:
    """The outcome of a handshake: who the remote is and how to talk to it from here on."""

    version: int
    intro: Intro
    conn_uid: int
    sealer: Sealer | None
    opener: Opener | None
    secret_index: int | None  # which of our secrets the session uses (for rotation)
    data_keys: SessionKeys | None = None  # the data path's keys for this link, one per direction

    @property
    def encrypted(self) -> bool:
        return self.sealer is not None


async def read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    header = await reader.readexactly(FRAME_HEADER.size)
    (length,) = FRAME_HEADER.unpack(header)
    if length > limit:
        raise DecodeError("frame", f"frame of {length} bytes is over the {limit}-byte limit")
    return await reader.readexactly(length)


def frame(body: bytes) -> bytes:
    return FRAME_HEADER.pack(len(body)) + body


async def handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    outbound: bool,
    ourself: PeerInfo,
    secrets: list[bytes],
    port: int,
    advertise: str | None,
) -> Session:
    """Run our side of the handshake. Raises HandshakeError (or asyncio/OSError on I/O trouble)."""
    writer.write(MAGIC + bytes([PROTOCOL_MIN, PROTOCOL_MAX]))
    header = await _read(reader, len(MAGIC) + 2, "magic and versions")
    if header[:4] != MAGIC:
        raise HandshakeError("bad_magic", "not a Weft peer (bad magic)")
    their_min, their_max = header[4], header[5]
    version = min(PROTOCOL_MAX, their_max)
    if version < max(PROTOCOL_MIN, their_min):
        raise HandshakeError(
            "version_mismatch",
            f"protocol versions do not overlap (ours {PROTOCOL_MIN}..{PROTOCOL_MAX}, theirs {their_min}..{their_max})",
        )

    key = EphemeralKey() if secrets else None
    hello: dict = {"enc": key is not None}
    if key is not None:
        hello["pub"] = key.public
        hello["ids"] = [secret_id(s, key.public) for s in secrets[:MAX_SECRETS]]
    writer.write(frame(pack(hello)))
    their_hello = _parse_hello(await _read_frame(reader, MAX_HELLO, "malformed_hello"))
    if their_hello["full"]:
        raise HandshakeError("peer_full", "the peer is at its connection limit")

    sealer = opener = None
    data_keys: SessionKeys | None = None
    secret_index = None
    if (key is not None) != their_hello["enc"]:
        if key is not None:
            raise HandshakeError("encryption_mismatch", "the peer runs without a mesh secret but we have one")
        raise HandshakeError("encryption_mismatch", "the peer requires a mesh secret but we have none")
    if key is not None:
        their_pub, their_ids = their_hello["pub"], their_hello["ids"]
        secret_index = _common_secret(secrets, their_pub, their_ids, outbound)
        if secret_index is None:
            raise HandshakeError("secret_mismatch", "the peer has none of our mesh secrets")
        dialer_pub, acceptor_pub = (key.public, their_pub) if outbound else (their_pub, key.public)
        keys = derive_session_keys(key.exchange(their_pub), secrets[secret_index], dialer_pub, acceptor_pub, outbound)
        sealer, opener = Sealer(keys.control.send), Opener(keys.control.receive)
        data_keys = keys.data

    conn_id = pysecrets.randbits(64)
    intro = {
        "name": ourself.name,
        "nick": ourself.nickname,
        "uid": ourself.uid,
        "conn_id": conn_id,
        "port": port,
        "advertise": advertise,
        "caps": list(CAPABILITIES),
    }
    body = pack(intro)
    writer.write(frame(sealer.seal(body) if sealer else body))
    raw = await _read_frame(reader, MAX_HELLO, "malformed_intro")
    if opener is not None:
        try:
            raw = opener.open(raw)
        except SealError:
            raise HandshakeError("secret_mismatch", "the peer's introduction failed authentication") from None
    their_intro = _parse_intro(raw)
    return Session(version, their_intro, conn_id ^ their_intro.conn_id, sealer, opener, secret_index, data_keys)


async def _read(reader: asyncio.StreamReader, n: int, stage: str) -> bytes:
    """``n`` bytes of the handshake. A close before they arrive is ``short_handshake`` at any stage: mostly the peer's
    own handshake timeout or a refusal, not something malformed (and the dialler's window counts it as a timeout)."""
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise HandshakeError("short_handshake", f"the peer closed the connection during the {stage}") from None


async def _read_frame(reader: asyncio.StreamReader, limit: int, reason: str) -> bytes:
    """One length-prefixed frame; ``reason`` is the failure if its length is over ``limit``."""
    stage = reason.removeprefix("malformed_")
    (length,) = FRAME_HEADER.unpack(await _read(reader, FRAME_HEADER.size, stage))
    if length > limit:
        raise HandshakeError(reason, f"handshake frame of {length} bytes is over the {limit}-byte limit")
    return await _read(reader, length, stage)


async def refuse_full(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, secrets: list[bytes]) -> None:
    """Tell a dialler that we are at our connection limit: magic and versions, then a hello that says ``full``.

    A dialler of this version fails with ``peer_full`` and stops dialling the discovered peer that said so; an older
    one, which ignores keys it does not know, sees the connection close during the handshake, as it always did. The
    hello is a whole one (a fresh key and the secret ids) so an older dialler reads it as well formed. Their hello is
    read before we return, so closing afterwards is orderly.
    """
    writer.write(MAGIC + bytes([PROTOCOL_MIN, PROTOCOL_MAX]))
    await _read(reader, len(MAGIC) + 2, "magic and versions")
    hello: dict = {"enc": bool(secrets), "full": True}
    if secrets:
        key = EphemeralKey()
        hello["pub"] = key.public
        hello["ids"] = [secret_id(s, key.public) for s in secrets[:MAX_SECRETS]]
    writer.write(frame(pack(hello)))
    await _read_frame(reader, MAX_HELLO, "malformed_hello")
    await writer.drain()


def _parse_hello(raw: bytes) -> dict:
    try:
        hello = expect(unpack(raw, "hello"), dict, "hello", "hello")
        enc = field(hello, "enc", bool, "hello")
        full = hello.get("full") is True  # the acceptor is at its connection limit (see refuse_full)
        if not enc:
            return {"enc": False, "full": full}
        pub = field(hello, "pub", bytes, "hello")
        ids = field(hello, "ids", list, "hello")
        if len(pub) != PUBLIC_KEY_LEN or not ids or len(ids) > MAX_SECRETS:
            raise DecodeError("hello", "bad public key or secret ids")
        for i in ids:
            if not isinstance(i, bytes) or len(i) != SECRET_ID_LEN:
                raise DecodeError("hello", "bad secret id")
        return {"enc": True, "pub": pub, "ids": ids, "full": full}
    except DecodeError as exc:
        raise HandshakeError("malformed_hello", str(exc)) from None


def _parse_intro(raw: bytes) -> Intro:
    try:
        intro = expect(unpack(raw, "intro"), dict, "intro", "intro")
        name = expect_uint(field(intro, "name", int, "intro"), NAME_BITS, "intro", "name")
        nick = _printable(field(intro, "nick", str, "intro")[:255], "nickname")
        uid = expect_uint(field(intro, "uid", int, "intro"), 64, "intro", "uid")
        conn_id = expect_uint(field(intro, "conn_id", int, "intro"), 64, "intro", "conn_id")
        port = expect_uint(field(intro, "port", int, "intro"), 16, "intro", "port")
        advertise = intro.get("advertise")
        if advertise is not None and (not isinstance(advertise, str) or len(advertise) > 300):
            raise DecodeError("intro", "bad advertise address")
        if advertise is not None:
            _printable(advertise, "advertise address")
        if name == 0:
            raise DecodeError("intro", "peer name 0 is reserved")
        caps = intro.get("caps", [])
        if not isinstance(caps, list):
            raise DecodeError("intro", "bad capability list")
        # Names this release does not know are ignored (a later one may add some); only known ones are kept.
        known = frozenset(c for c in caps[:MAX_CAPS] if isinstance(c, str) and c in CAPABILITIES)
    except DecodeError as exc:
        raise HandshakeError("malformed_intro", str(exc)) from None
    return Intro(PeerInfo(name, nick, uid), conn_id, port, advertise, known)


def _printable(text: str, what: str) -> str:
    """Refuse a string with control characters: it would forge log lines or drive a terminal."""
    try:
        return refuse_control(text, what)
    except ValueError as exc:
        raise DecodeError("intro", str(exc)) from None


def _common_secret(secrets: list[bytes], their_pub: bytes, their_ids: list[bytes], outbound: bool) -> int | None:
    """Index of the secret both ends use: the first in the dialer's list that the acceptor also has.

    Each side tags its secrets with its own public key, so we tag ours with theirs to compare.
    """
    ours = [secret_id(s, their_pub) for s in secrets[:MAX_SECRETS]]
    if outbound:
        return next((i for i, tag in enumerate(ours) if tag in their_ids), None)
    return next((ours.index(tag) for tag in their_ids if tag in ours), None)
