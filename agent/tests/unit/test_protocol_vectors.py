"""The test vectors in docs/protocol.md, derived again with the agent's own code.

The vectors are read from the document, so a change to the code or to the document alone fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from weft.datapath import wire
from weft.mesh.codec import pack, unpack
from weft.mesh.connection import HEARTBEAT
from weft.mesh.crypto import Opener, Sealer, derive_session_keys, secret_id

PROTOCOL_MD = Path(__file__).resolve().parents[3] / "docs" / "protocol.md"
DIALLER, ACCEPTOR = 0x020000000001, 0x020000000002


@pytest.fixture(scope="module")
def v() -> dict[str, bytes]:
    text = PROTOCOL_MD.read_text()
    block = re.search(
        r"<!-- protocol test vectors: begin -->\n```\n(.*?)\n```\n<!-- protocol test vectors: end -->", text, re.S
    )
    assert block, "docs/protocol.md has no test vector block"
    vectors = {}
    for line in block.group(1).splitlines():
        name, _, value = line.partition("=")
        vectors[name.strip()] = bytes.fromhex(value.strip())
    return vectors


def public(private: bytes) -> tuple[X25519PrivateKey, bytes]:
    key = X25519PrivateKey.from_private_bytes(private)
    return key, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_the_document_says_what_the_hkdf_uses() -> None:
    text = PROTOCOL_MD.read_text()
    assert '"weft session keys" || dialler_pub || acceptor_pub' in text
    assert "L    = 128" in text
    assert "weft control keys" not in text


def test_session_keys_match_the_document(v: dict[str, bytes]) -> None:
    dialler, dialler_pub = public(v["dialler_private"])
    acceptor, acceptor_pub = public(v["acceptor_private"])
    assert dialler_pub == v["dialler_pub"]
    assert acceptor_pub == v["acceptor_pub"]
    shared = dialler.exchange(acceptor.public_key())
    assert shared == v["shared"] == acceptor.exchange(dialler.public_key())
    assert secret_id(v["mesh_secret"], dialler_pub) == v["dialler_secret_id"]

    ours = derive_session_keys(shared, v["mesh_secret"], dialler_pub, acceptor_pub, outbound=True)
    theirs = derive_session_keys(shared, v["mesh_secret"], dialler_pub, acceptor_pub, outbound=False)
    assert ours.control.send == theirs.control.receive == v["control_dialler_to_acceptor"]
    assert ours.control.receive == theirs.control.send == v["control_acceptor_to_dialler"]
    assert ours.data.send == theirs.data.receive == v["data_dialler_to_acceptor"]
    assert ours.data.receive == theirs.data.send == v["data_acceptor_to_dialler"]


def test_control_sealing_matches_the_document(v: dict[str, bytes]) -> None:
    assert pack(HEARTBEAT) == v["heartbeat_plain"]
    sealer, opener = Sealer(v["control_dialler_to_acceptor"]), Opener(v["control_dialler_to_acceptor"])
    intro = b"the introduction takes counter 0"
    assert opener.open(sealer.seal(intro)) == intro
    assert sealer.seal(v["heartbeat_plain"]) == v["heartbeat_sealed"]
    assert opener.open(v["heartbeat_sealed"]) == v["heartbeat_plain"]


def test_a_sleeve_datagram_matches_the_document(v: dict[str, bytes]) -> None:
    """Take the documented datagram apart with the data path's own reassembler and open it."""
    got: list[tuple[bytes, bytes]] = []
    reassembler = wire.Reassembler({}, lambda: {wire.peer_bytes(DIALLER)})
    datagram = v["sleeve_datagram"]
    reassembler.feed(memoryview(datagram), len(datagram), 0, lambda hop, msg, _size: got.append((hop, bytes(msg))))
    assert got, "the reassembler did not take the documented datagram"
    hop, message = got[0]
    assert hop == wire.peer_bytes(DIALLER)
    (counter,) = wire.COUNTER.unpack_from(message)
    assert counter == 7
    plain = ChaCha20Poly1305(v["data_dialler_to_acceptor"]).decrypt(
        wire.NONCE.pack(counter), message[wire.CLEN :], None
    )
    assert plain == v["sleeve_plain"]
    kind, origin, dst = wire.INNER.unpack_from(plain)
    assert (kind, origin, dst) == (wire.CONTROL, wire.peer_bytes(DIALLER), wire.peer_bytes(ACCEPTOR))
    (length,) = wire.CONTROL_LEN.unpack_from(plain, wire.ILEN)
    assert unpack(plain[wire.ILEN + 2 : wire.ILEN + 2 + length], "datapath") == {"t": "pm"}
