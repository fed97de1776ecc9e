"""Session keys and sealing for control connections.

Each connection makes a fresh X25519 key pair (forward secrecy). The session keys come from HKDF over
the X25519 shared secret *and* the mesh secret, so a peer without the mesh secret derives nothing
useful. Each direction has its own key and a message counter as nonce, so nonces never repeat and a
replayed or reordered message fails to open.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECRET_ID_LEN = 8
PUBLIC_KEY_LEN = 32


class SealError(Exception):
    """A sealed message did not authenticate: wrong key, tampered, replayed or reordered."""


def x25519_functions(rust: Any) -> tuple[Callable[[], X25519PrivateKey], Callable[[bytes], X25519PublicKey]]:
    """How to make a key pair and read a peer's public key: cryptography's own functions behind
    ``X25519PrivateKey.generate`` and ``X25519PublicKey.from_public_bytes``, found in its Rust module ``rust``.

    Those two class methods import cryptography's whole OpenSSL backend module, its cffi bindings built name by name
    (about 1.1 MiB resident in the agent), only to ask whether OpenSSL runs in FIPS mode, which does not allow
    X25519. This asks that question itself. The class methods are used as they are where OpenSSL is in FIPS mode
    (they refuse with cryptography's own error) or where another release of cryptography lays its module out
    otherwise."""
    try:
        if not rust.is_fips_enabled():
            return rust.x25519.generate_key, rust.x25519.from_public_bytes
    except AttributeError:
        pass
    return X25519PrivateKey.generate, X25519PublicKey.from_public_bytes


try:
    from cryptography.hazmat.bindings._rust import openssl as rust_openssl
except ImportError:  # a release of cryptography laid out otherwise: the class methods (see x25519_functions)
    rust_openssl = None

_new_key, _public_key = x25519_functions(rust_openssl)


class EphemeralKey:
    def __init__(self) -> None:
        self._private = _new_key()
        # The raw form without the serialization package, whose SSH support imports bcrypt and every key type
        self.public = self._private.public_key().public_bytes_raw()

    def exchange(self, peer_public: bytes) -> bytes:
        return self._private.exchange(_public_key(peer_public))


def secret_id(secret: bytes, public: bytes) -> bytes:
    """A per-connection tag of a mesh secret: lets the two ends find a secret they share without
    revealing it, and differs on every connection so it cannot be used to track a mesh."""
    return hmac.new(secret, b"weft secret id" + public, hashlib.sha256).digest()[:SECRET_ID_LEN]


@dataclass(frozen=True, slots=True)
class SessionKeys:
    send: bytes
    receive: bytes


@dataclass(frozen=True, slots=True)
class LinkKeys:
    """Both directions of one connection: the control stream's keys and the data path's keys."""

    control: SessionKeys
    data: SessionKeys


def derive_session_keys(
    shared: bytes, secret: bytes, dialer_public: bytes, acceptor_public: bytes, outbound: bool
) -> LinkKeys:
    """Four independent keys: control and data path, each direction its own."""
    material = HKDF(
        algorithm=hashes.SHA256(),
        length=128,
        salt=b"weft/1",
        info=b"weft session keys" + dialer_public + acceptor_public,
    ).derive(shared + secret)
    keys = [material[i : i + 32] for i in range(0, 128, 32)]
    if outbound:
        return LinkKeys(SessionKeys(keys[0], keys[1]), SessionKeys(keys[2], keys[3]))
    return LinkKeys(SessionKeys(keys[1], keys[0]), SessionKeys(keys[3], keys[2]))


PAIR_TAG_LEN = 16


def pair_tag(secret: bytes, label: bytes, transcript: bytes) -> bytes:
    """Authenticates a relayed key agreement message with a mesh secret (HMAC-SHA256, as the secret ids are)."""
    return hmac.new(secret, label + transcript, hashlib.sha256).digest()[:PAIR_TAG_LEN]


def derive_pair_keys(
    shared: bytes,
    secret: bytes,
    initiator_public: bytes,
    responder_public: bytes,
    names: bytes,
    initiator: bool,
) -> tuple[SessionKeys, int]:
    """Data keys for two peers with no direct link (one per direction) and the 32-bit id that names them: HKDF as
    in :func:`derive_session_keys`, over a fresh X25519 exchange and the mesh secret, with its own label."""
    material = HKDF(
        algorithm=hashes.SHA256(),
        length=68,
        salt=b"weft/1",
        info=b"weft end-to-end keys" + initiator_public + responder_public + names,
    ).derive(shared + secret)
    forward, backward, kid = material[0:32], material[32:64], int.from_bytes(material[64:68], "big")
    return (SessionKeys(forward, backward) if initiator else SessionKeys(backward, forward)), kid


class _Direction:
    """One direction of a stream: ChaCha20-Poly1305 with a 64-bit message counter as nonce."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._counter = 0

    def _nonce(self) -> bytes:
        return struct.pack(">IQ", 0, self._counter)


class Sealer(_Direction):
    def seal(self, plaintext: bytes) -> bytes:
        sealed = self._aead.encrypt(self._nonce(), plaintext, None)
        self._counter += 1
        return sealed


class Opener(_Direction):
    def open(self, ciphertext: bytes) -> bytes:
        """Open the next message; the counter moves on only when it authenticates."""
        try:
            plaintext = self._aead.decrypt(self._nonce(), ciphertext, None)
        except InvalidTag:
            raise SealError("message failed authentication") from None
        self._counter += 1
        return plaintext
