"""The control handshake over real sockets, and the sealing that follows it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest

from weft.mesh.crypto import Opener, Sealer, SealError, derive_session_keys
from weft.mesh.handshake import MAGIC, PROTOCOL_MAX, PROTOCOL_MIN, HandshakeError, Session, handshake
from weft.mesh.peer import PeerInfo

DIALER = PeerInfo(0x020000000001, "dialer-zebra-4711", 1111)
ACCEPTOR = PeerInfo(0x020000000002, "acceptor-okapi-0815", 2222)
OLD = b"old mesh secret, long enough"
NEW = b"new mesh secret, even longer!"
OTHER = b"somebody else's mesh secret"


class Tap:
    """A StreamWriter that keeps a copy of everything written through it."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data
        self._writer.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._writer, name)


async def _streams() -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], ...]:
    a, b = socket.socketpair()
    return await asyncio.open_connection(sock=a), await asyncio.open_connection(sock=b)


async def _close(*writers: asyncio.StreamWriter) -> None:
    for w in writers:
        w.close()
    for w in writers:
        with contextlib.suppress(OSError):
            await w.wait_closed()


def run_pair(
    dialer_secrets: list[bytes], acceptor_secrets: list[bytes], tap: bool = False
) -> tuple[Session | HandshakeError, Session | HandshakeError, bytes]:
    """Both ends of a handshake over a socketpair; returns each end's outcome and what the dialer wrote."""

    async def main() -> tuple[Session | HandshakeError, Session | HandshakeError, bytes]:
        (r1, w1), (r2, w2) = await _streams()
        writer = Tap(w1) if tap else w1
        try:
            results = await asyncio.wait_for(
                asyncio.gather(
                    handshake(
                        r1,
                        writer,  # type: ignore[arg-type]
                        outbound=True,
                        ourself=DIALER,
                        secrets=dialer_secrets,
                        port=6783,
                        advertise="10.0.0.1:6783",
                    ),
                    handshake(
                        r2, w2, outbound=False, ourself=ACCEPTOR, secrets=acceptor_secrets, port=7000, advertise=None
                    ),
                    return_exceptions=True,
                ),
                timeout=10,
            )
        finally:
            await _close(w1, w2)
        for result in results:
            if not isinstance(result, Session | HandshakeError):
                raise result
        return results[0], results[1], bytes(writer.data) if isinstance(writer, Tap) else b""

    return asyncio.run(main())


def run_against(remote: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> HandshakeError:
    """Our handshake (as acceptor) against a scripted remote; returns the error it raised."""

    async def main() -> HandshakeError:
        (r1, w1), (r2, w2) = await _streams()
        try:
            ours = asyncio.ensure_future(
                handshake(r1, w1, outbound=False, ourself=ACCEPTOR, secrets=[OLD], port=6783, advertise=None)
            )
            await remote(r2, w2)
            with pytest.raises(HandshakeError) as info:
                await asyncio.wait_for(ours, timeout=10)
            return info.value
        finally:
            await _close(w1, w2)

    return asyncio.run(main())


def assert_talks(a: Session, b: Session) -> None:
    """Messages sealed at one end open at the other, in both directions, in order."""
    assert a.sealer is not None and b.opener is not None and b.sealer is not None and a.opener is not None
    for i in range(3):
        assert b.opener.open(a.sealer.seal(b"ping %d" % i)) == b"ping %d" % i
        assert a.opener.open(b.sealer.seal(b"pong %d" % i)) == b"pong %d" % i


# -- agreement --------------------------------------------------------------------------------------


def test_same_secret_gives_both_ends_matching_session_keys() -> None:
    dialer, acceptor, _ = run_pair([OLD], [OLD])
    assert isinstance(dialer, Session) and isinstance(acceptor, Session)
    assert dialer.encrypted and acceptor.encrypted
    assert_talks(dialer, acceptor)
    # Each end learned who the other is.
    assert dialer.intro.peer == ACCEPTOR and acceptor.intro.peer == DIALER
    assert acceptor.intro.port == 6783 and acceptor.intro.advertise == "10.0.0.1:6783"
    assert dialer.intro.port == 7000 and dialer.intro.advertise is None
    assert dialer.conn_uid == acceptor.conn_uid
    assert dialer.version == acceptor.version == PROTOCOL_MAX
    assert dialer.intro.caps == acceptor.intro.caps == {"e2e", "digest"}  # all this release reads


def test_each_connection_gets_fresh_keys() -> None:
    first, _, _ = run_pair([OLD], [OLD])
    _, second, _ = run_pair([OLD], [OLD])
    assert isinstance(first, Session) and isinstance(second, Session)
    assert first.sealer is not None and second.opener is not None
    with pytest.raises(SealError):
        second.opener.open(first.sealer.seal(b"hello"))


@pytest.mark.parametrize(
    ("dialer_secrets", "acceptor_secrets", "agreed"),
    [
        ([NEW, OLD], [OLD], OLD),  # rotation, first run: the updated peer dials one not yet updated
        ([OLD], [NEW, OLD], OLD),  # ... and the other way round
        ([NEW], [NEW, OLD], NEW),  # rotation, second run
        ([NEW, OLD], [NEW], NEW),
        ([NEW, OLD], [NEW, OLD], NEW),
        ([OTHER, OLD, NEW], [NEW, OLD], OLD),  # the first of the dialer's list that the acceptor has
    ],
)
def test_secret_lists_agree_on_a_common_secret(
    dialer_secrets: list[bytes], acceptor_secrets: list[bytes], agreed: bytes
) -> None:
    dialer, acceptor, _ = run_pair(dialer_secrets, acceptor_secrets)
    assert isinstance(dialer, Session) and isinstance(acceptor, Session)
    assert_talks(dialer, acceptor)
    assert dialer.secret_index is not None and acceptor.secret_index is not None
    assert dialer_secrets[dialer.secret_index] == agreed
    assert acceptor_secrets[acceptor.secret_index] == agreed


def test_no_secret_at_both_ends_is_an_unencrypted_session() -> None:
    dialer, acceptor, _ = run_pair([], [])
    assert isinstance(dialer, Session) and isinstance(acceptor, Session)
    assert not dialer.encrypted and not acceptor.encrypted
    assert dialer.intro.peer == ACCEPTOR and acceptor.intro.peer == DIALER
    assert dialer.conn_uid == acceptor.conn_uid


# -- refusals ---------------------------------------------------------------------------------------


def test_disjoint_secrets_fail_on_both_ends_with_secret_mismatch() -> None:
    dialer, acceptor, _ = run_pair([NEW, OTHER], [OLD])
    assert isinstance(dialer, HandshakeError) and isinstance(acceptor, HandshakeError)
    assert dialer.reason == acceptor.reason == "secret_mismatch"


@pytest.mark.parametrize(("dialer_secrets", "acceptor_secrets"), [([OLD], []), ([], [OLD])])
def test_secret_against_no_secret_fails_on_both_ends_with_encryption_mismatch(
    dialer_secrets: list[bytes], acceptor_secrets: list[bytes]
) -> None:
    dialer, acceptor, _ = run_pair(dialer_secrets, acceptor_secrets)
    assert isinstance(dialer, HandshakeError) and isinstance(acceptor, HandshakeError)
    assert dialer.reason == acceptor.reason == "encryption_mismatch"
    # The message says which side lacks the secret.
    for err, has_secret in ((dialer, bool(dialer_secrets)), (acceptor, bool(acceptor_secrets))):
        assert ("we have one" in str(err)) == has_secret
        assert ("we have none" in str(err)) == (not has_secret)


def test_bad_magic_is_refused() -> None:
    async def http_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"GET / HTTP/1.1\r\n\r\n")

    assert run_against(http_client).reason == "bad_magic"


@pytest.mark.parametrize(("their_min", "their_max"), [(PROTOCOL_MAX + 1, PROTOCOL_MAX + 5), (0, PROTOCOL_MIN - 1)])
def test_version_ranges_that_do_not_overlap_are_refused(their_min: int, their_max: int) -> None:
    async def other_version(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(MAGIC + bytes([their_min, their_max]))

    err = run_against(other_version)
    assert err.reason == "version_mismatch"
    assert f"{their_min}..{their_max}" in str(err)


def test_a_huge_hello_length_is_refused_without_reading_it() -> None:
    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(MAGIC + bytes([PROTOCOL_MIN, PROTOCOL_MAX]) + struct.pack(">I", 0xFFFFFFF0))

    assert run_against(huge).reason == "malformed_hello"


@pytest.mark.parametrize(
    "hello",
    [
        b"\xc1",  # not msgpack
        b"\x90",  # a list, not a map
        b"\x81\xa3enc\xa3yes",  # enc is not a bool
        b"\x82\xa3enc\xc3\xa3pub\xc4\x03abc",  # short public key, no ids
    ],
)
def test_a_malformed_hello_is_refused(hello: bytes) -> None:
    async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(MAGIC + bytes([PROTOCOL_MIN, PROTOCOL_MAX]) + struct.pack(">I", len(hello)) + hello)

    assert run_against(bad).reason == "malformed_hello"


@pytest.mark.parametrize(
    "sent",
    [
        MAGIC[:2],  # during the magic and versions
        MAGIC + bytes([PROTOCOL_MIN, PROTOCOL_MAX]),  # during the hello
        MAGIC + bytes([PROTOCOL_MIN, PROTOCOL_MAX]) + struct.pack(">I", 40) + b"\x80",  # half-way through the hello
    ],
)
def test_a_peer_hanging_up_mid_handshake_is_a_short_handshake_whatever_the_stage(sent: bytes) -> None:
    """A peer that gives up (its own handshake timeout, a refusal) is not one that sent something malformed."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(sent)
        with contextlib.suppress(TimeoutError):  # read all it sends, so closing is a clean end of stream
            while await asyncio.wait_for(reader.read(65536), 0.2):
                pass
        writer.close()

    error = run_against(hang_up)
    assert error.reason == "short_handshake", error
    assert "closed the connection" in error.detail


# -- what is on the wire -----------------------------------------------------------------------------


def test_the_nickname_is_not_on_the_wire_when_encrypted() -> None:
    dialer, acceptor, wire = run_pair([OLD], [OLD], tap=True)
    assert isinstance(dialer, Session) and isinstance(acceptor, Session)
    assert acceptor.intro.peer.nickname == DIALER.nickname  # it was sent, sealed
    assert len(wire) > 6
    assert DIALER.nickname.encode() not in wire
    assert b"10.0.0.1:6783" not in wire  # nor the advertised address
    assert OLD not in wire


def test_the_nickname_is_on_the_wire_when_unencrypted() -> None:
    dialer, acceptor, wire = run_pair([], [], tap=True)
    assert isinstance(dialer, Session) and isinstance(acceptor, Session)
    assert DIALER.nickname.encode() in wire


# -- sealing ------------------------------------------------------------------------------------------


def _keys() -> tuple[Sealer, Opener]:
    both = derive_session_keys(b"\x01" * 32, OLD, b"\x02" * 32, b"\x03" * 32, outbound=True)
    peer = derive_session_keys(b"\x01" * 32, OLD, b"\x02" * 32, b"\x03" * 32, outbound=False)
    keys = both.control
    assert keys.send == peer.control.receive and keys.receive == peer.control.send and keys.send != keys.receive
    assert both.data.send == peer.data.receive and both.data.receive == peer.data.send
    assert len({keys.send, keys.receive, both.data.send, both.data.receive}) == 4
    return Sealer(keys.send), Opener(peer.control.receive)


def test_a_replayed_message_fails_to_open() -> None:
    sealer, opener = _keys()
    first = sealer.seal(b"set route")
    assert opener.open(first) == b"set route"
    with pytest.raises(SealError):
        opener.open(first)


def test_reordered_messages_fail_to_open() -> None:
    sealer, opener = _keys()
    first, second = sealer.seal(b"one"), sealer.seal(b"two")
    with pytest.raises(SealError):
        opener.open(second)
    in_order = Opener(
        derive_session_keys(b"\x01" * 32, OLD, b"\x02" * 32, b"\x03" * 32, outbound=False).control.receive
    )
    assert in_order.open(first) == b"one"
    assert in_order.open(second) == b"two"


def test_a_tampered_message_fails_to_open() -> None:
    sealer, opener = _keys()
    sealed = bytearray(sealer.seal(b"payload"))
    sealed[0] ^= 1
    with pytest.raises(SealError):
        opener.open(bytes(sealed))


def test_a_message_sealed_under_another_secret_fails_to_open() -> None:
    sealer = Sealer(derive_session_keys(b"\x01" * 32, NEW, b"\x02" * 32, b"\x03" * 32, outbound=True).control.send)
    _, opener = _keys()
    with pytest.raises(SealError):
        opener.open(sealer.seal(b"payload"))


def test_the_same_plaintext_seals_differently_each_time() -> None:
    sealer, _ = _keys()
    assert sealer.seal(b"heartbeat") != sealer.seal(b"heartbeat")


def test_capabilities_a_later_release_names_are_ignored_and_a_bad_list_is_refused() -> None:
    from weft.mesh.codec import pack
    from weft.mesh.handshake import _parse_intro

    intro = {"name": 5, "nick": "n", "uid": 1, "conn_id": 2, "port": 6783, "advertise": None}
    assert _parse_intro(pack(intro)).caps == frozenset()  # an older peer sends none
    assert _parse_intro(pack({**intro, "caps": ["e2e", "teleport", 7]})).caps == {"e2e"}
    with pytest.raises(HandshakeError) as info:
        _parse_intro(pack({**intro, "caps": "e2e"}))
    assert info.value.reason == "malformed_intro"


def test_a_connection_whose_peer_is_gone_stops_writing(caplog: pytest.LogCaptureFixture) -> None:
    """Many messages queued for a peer whose socket has gone: the connection ends on the first failed write, rather
    than go on writing into a dead transport (which asyncio drops, logging a warning for each)."""
    from weft.mesh.connection import ConnectionSettings, ControlConnection
    from weft.metrics import Metrics

    async def main() -> str:
        (r1, w1), (r2, w2) = await _streams()
        session, _ = await asyncio.gather(
            handshake(r1, w1, outbound=True, ourself=DIALER, secrets=[OLD], port=6783, advertise=None),
            handshake(r2, w2, outbound=False, ourself=ACCEPTOR, secrets=[OLD], port=7000, advertise=None),
        )
        conn = ControlConnection(
            r1,
            w1,
            session,
            settings=ConnectionSettings(),
            metrics=Metrics(),
            on_message=lambda c, m: None,
            on_sent=lambda ms: None,
            outbound=True,
            remote_address="10.0.0.2:7000",
            secret=OLD,
        )
        w2.transport.abort()  # the peer is gone
        for i in range(50):
            conn.sender.send_unicast("ipam", DIALER.name, ACCEPTOR.name, b"x" * 100_000 + bytes([i]))
        return await asyncio.wait_for(conn.run(), 10)

    with caplog.at_level("WARNING", logger="asyncio"):
        reason = asyncio.run(main())
    assert "lost" in reason or "failed" in reason or "closed" in reason, reason
    assert not [r for r in caplog.records if r.name == "asyncio"], "writes went on into a failed socket"
