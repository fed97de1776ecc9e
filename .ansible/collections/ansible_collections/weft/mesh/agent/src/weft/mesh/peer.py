"""Peer identity: a 48-bit name printed like a MAC address, a nickname and a per-process UID."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

NAME_BITS = 48
_MAC_RE = re.compile(r"^[0-9a-fA-F]{1,2}(:[0-9a-fA-F]{1,2}){5}$")


class PeerNameError(ValueError):
    """A peer name that is not six colon-separated hex bytes."""


def format_name(name: int) -> str:
    """Render a peer name the way operators see it: ``aa:bb:cc:dd:ee:ff``."""
    raw = name.to_bytes(6, "big")
    return ":".join(f"{b:02x}" for b in raw)


def parse_name(text: str) -> int:
    """Parse ``aa:bb:cc:dd:ee:ff`` into the integer carried on the wire."""
    text = text.strip()
    if not _MAC_RE.match(text):
        raise PeerNameError(f"peer name {text!r} is not six colon-separated hex bytes (like 02:1f:aa:00:00:01)")
    value = int("".join(part.zfill(2) for part in text.split(":")), 16)
    if value == 0:
        raise PeerNameError("peer name 00:00:00:00:00:00 is reserved")
    return value


def random_name() -> int:
    """A fresh locally administered, unicast MAC-style name (what a new host gets once)."""
    raw = bytearray(secrets.token_bytes(6))
    raw[0] = (raw[0] | 0x02) & 0xFE
    return int.from_bytes(raw, "big")


def random_uid() -> int:
    """A non-zero 64-bit number that changes on every start, so peers notice a restart."""
    while True:
        uid = secrets.randbits(64)
        if uid:
            return uid


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """Who is at the other end of a connection, as it introduced itself."""

    name: int
    nickname: str
    uid: int

    def label(self) -> str:
        return f"{format_name(self.name)}({self.nickname})"
