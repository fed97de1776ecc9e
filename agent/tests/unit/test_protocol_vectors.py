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


def test_an_end_to_end_agreement_and_datagram_match_the_document(v: dict[str, bytes]) -> None:
    """The relayed key agreement's tags and keys, and an end-to-end datagram taken apart and opened."""
    from weft.datapath.agreement import Init, Response
    from weft.mesh.crypto import derive_pair_keys, pair_tag

    initiator, responder = 0x020000000001, 0x020000000003
    init_key, init_pub = public(v["dialler_private"])
    resp_key, resp_pub = public(v["acceptor_private"])
    init = Init(initiator, responder, 0x0102030405060708, 1, init_pub, [], 0)
    resp = Response(responder, initiator, 0x1112131415161718, 1, resp_pub, 0, b"", 0)
    assert pair_tag(v["mesh_secret"], b"weft e2e init", init.transcript()) == v["pair_init_tag"]
    resp_transcript = resp.transcript(init.transcript())
    assert pair_tag(v["mesh_secret"], b"weft e2e response", resp_transcript) == v["pair_response_tag"]
    names = wire.peer_bytes(initiator) + wire.peer_bytes(responder)
    assert init_key.exchange(resp_key.public_key()) == v["shared"]
    ours, kid = derive_pair_keys(v["shared"], v["mesh_secret"], init_pub, resp_pub, names, initiator=True)
    theirs, kid2 = derive_pair_keys(v["shared"], v["mesh_secret"], init_pub, resp_pub, names, initiator=False)
    assert kid == kid2 == int.from_bytes(v["pair_kid"], "big")
    assert ours.send == theirs.receive == v["pair_initiator_to_responder"]
    assert ours.receive == theirs.send == v["pair_responder_to_initiator"]

    got: list[tuple[bytes, bytes]] = []
    reassembler = wire.Reassembler({}, lambda: {names}, header=wire.E2E_HEADER, magic=wire.E2E_MAGIC)
    datagram = v["e2e_datagram"]
    reassembler.feed(memoryview(datagram), len(datagram), 0, lambda hop, msg, _size: got.append((hop, bytes(msg))))
    assert got and got[0][0] == names
    message = got[0][1]
    assert wire.E2E_NONCE.unpack_from(message) == (kid, 7)
    plain = ChaCha20Poly1305(ours.send).decrypt(message[: wire.E2E_NLEN], message[wire.E2E_NLEN :], None)
    assert plain == v["e2e_plain"]
    (length,) = wire.CONTROL_LEN.unpack_from(plain, wire.ILEN)
    assert unpack(plain[wire.ILEN + 2 : wire.ILEN + 2 + length], "datapath") == {"t": "eh", "rx": True, "ds": 1400}
