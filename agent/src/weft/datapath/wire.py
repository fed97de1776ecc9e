"""The sleeve's wire format: sealed messages split into path-MTU-sized UDP datagrams.

A *message* is what one hop seals; a *datagram* carries one chunk of it::

    datagram = magic(1) | hop(6) | msgid(4) | idx(1) | cnt(1) | csize(2) | chunk      (HEADER = 15 bytes)
    message  = counter(8) | AEAD_seal(kind(1) | origin(6) | dst(6) | payload)         (16-byte tag at the end)

* ``magic`` is 0x57 ("W", wire version 1): garbage is rejected before any lookup.
* ``hop`` is the 48-bit name of the peer that sent this datagram (the previous hop, not the origin): it picks the
  link whose keys open the message. ``msgid`` numbers the sender's messages (wrapping at 2**32); ``idx`` of
  ``cnt`` is this chunk's place, every chunk but the last is ``csize`` bytes, so chunk ``idx`` sits at
  ``idx * csize`` and reassembly needs no other state.
* ``counter`` is the nonce (4 zero bytes + counter, big-endian); it is authenticated because a wrong nonce fails
  the tag. Each direction of a link has its own key and counter, and the receiver keeps a replay window.
* ``kind`` is FRAME (payload = 10-byte virtio_net_hdr + Ethernet frame, for ``dst``), BROADCAST (same payload,
  flooded along ``origin``'s broadcast tree, ``dst`` = 0) or CONTROL (payload = length(2) | bytes | padding).
* Meshes without a secret use the same framing without the AEAD (no tag); the counter is then not checked.

Two peers with no direct link that agreed end-to-end keys (endtoend.py) use a second datagram form, which relays
pass on by its header alone, without opening or reassembling the message::

    datagram = magic(1) | origin(6) | dst(6) | msgid(4) | idx(1) | cnt(1) | csize(2) | chunk    (E2E_HEADER = 21)
    message  = kid(4) | counter(8) | AEAD_seal(kind(1) | origin(6) | dst(6) | payload)

* ``magic`` is 0x45 ("E"). ``origin|dst`` stands where ``hop`` stands in the first form, so one reassembler reads
  both: chunks of one message are told apart by (origin, dst, msgid).
* ``kid`` names the pair's keys (a rekey changes it); ``kid|counter`` is the 12-byte nonce.

A message is sealed once (up to ~64 KiB: a whole GSO frame) and then cut into chunks so that every datagram is at
most the link's ``datagram_size``; the sender hands them to the kernel with UDP_SEGMENT and the receiver gets them
back coalesced with UDP_GRO, so the Python cost is per message, not per datagram.
"""

from __future__ import annotations

import mmap
import struct
import threading
import time
from collections.abc import Callable, Container

MAGIC = 0x57
HEADER = struct.Struct(">B6sIBBH")
HLEN = HEADER.size
COUNTER = struct.Struct(">Q")
NONCE = struct.Struct(">4xQ")
INNER = struct.Struct(">B6s6s")  # kind, origin, dst
ILEN = INNER.size
CLEN = COUNTER.size
TAG = 16
CONTROL_LEN = struct.Struct(">H")
IDX_FROM_END = 4  # idx, cnt and csize end both headers: segment_into writes idx at a stride, this far from the end
_INDEXES = bytes(range(256))

FRAME, BROADCAST, CONTROL = 1, 2, 3

E2E_MAGIC = 0x45
E2E_HEADER = struct.Struct(">B12sIBBH")  # magic, origin|dst, msgid, idx, cnt, csize
E2E_HLEN = E2E_HEADER.size
E2E_NONCE = struct.Struct(">IQ")  # kid, counter: the whole 12-byte nonce travels in front of the ciphertext
E2E_NLEN = E2E_NONCE.size

MAX_SEGMENTS = 255
FRAME_ROOM = 10 + 14 + 4  # what a TAP read holds around an IP packet: vnet header + Ethernet (+ VLAN tag)
MAX_PAYLOAD = FRAME_ROOM + 65535  # ... around the largest IP packet
MAX_MESSAGE = E2E_NLEN + ILEN + MAX_PAYLOAD + TAG  # the larger of the two forms' messages
MAX_UDP = 65507  # largest UDP payload over IPv4: also the limit of one UDP_SEGMENT send
# Datagrams in one UDP_SEGMENT send: every kernel with UDP_SEGMENT takes 64 (UDP_MAX_SEGMENTS; recent ones 128),
# and GRO coalesces at most 64 into one buffer. At a 1500-byte path MTU the 65,507 bytes of a send stop it at 44
# already; below it (a VPN's 1,436 or 1,400) it lets a frame below OVERLAY_GSO_MAX still fit one send.
GSO_MAX_SEGS = 64
# The UDP payloads of the common path MTUs: 1500 (an Ethernet LAN, the internet) and 9000 (jumbo frames in a data
# centre; EC2 within a VPC gives 9001)
COMMON_DATAGRAMS = (1472, 8972)
MAX_PARTIAL = 32  # messages being reassembled at once, all senders together
PARTIAL_AGE = 1.0  # seconds a partial message may wait for its missing chunks


def peer_bytes(peer: int) -> bytes:
    return peer.to_bytes(6, "big")


def segments_per_send(datagram_size: int) -> int:
    """How many full datagrams one UDP_SEGMENT send may carry: <= GSO_MAX_SEGS and <= 65,507 bytes together."""
    return max(1, min(GSO_MAX_SEGS, MAX_UDP // datagram_size))


def one_send(datagram_size: int, hlen: int) -> int:
    """The most message bytes one UDP_SEGMENT send (and so one GRO buffer at the receiver) carries in datagrams of
    ``datagram_size`` with headers of ``hlen`` bytes."""
    return segments_per_send(datagram_size) * (datagram_size - hlen)


# The largest GSO packet (a device's gso_max_size) the overlay's devices ask the kernel for when the mesh has a
# secret (attach.gso_size_for; without one the fast path carries the traffic and does best with the kernel's 64 KiB).
# A frame that takes two UDP_SEGMENT sends costs a second send, a second receive and a reassembly across two GRO
# buffers: about a tenth more CPU per byte on the encrypted path than one that fits a send, a fifth through a relay
# (docs/datapath.md). The kernel's 64 KiB packets sealed do not fit one send at a 1500-byte path MTU (65,535 + 47
# bytes against 64,108). Packets below this size do, in either form, at both common path MTUs (a TCP socket keeps
# its packets below the device's gso_max_size, headers included), and at every path MTU between 1280 and 1500;
# smaller ones still split them, as before.
OVERLAY_GSO_MAX = min(
    min(one_send(size, HLEN) - CLEN, one_send(size, E2E_HLEN) - E2E_NLEN) for size in COMMON_DATAGRAMS
) - (ILEN + TAG + FRAME_ROOM)


def segment_into(
    out: bytearray | mmap.mmap,
    msg: memoryview,
    hop: bytes,
    msgid: int,
    datagram_size: int,
    header: struct.Struct = HEADER,
    magic: int = MAGIC,
) -> int:
    """Lay ``msg`` out in ``out`` as consecutive datagrams (header + chunk) of ``datagram_size``; return the total
    length, or -1 if it would need more than MAX_SEGMENTS datagrams. ``hop`` is the header's address field: the
    sender (HEADER) or origin|dst (E2E_HEADER).

    The header of index 0 joins the chunks in one C call, and one strided assignment then writes every datagram's
    index: a Python loop over the chunks cost as much as sealing the message, all of it holding the GIL."""
    hlen = header.size
    csize = datagram_size - hlen
    length = len(msg)
    cnt = -(-length // csize)
    if cnt > MAX_SEGMENTS or csize <= 0:
        return -1
    first = header.pack(magic, hop, msgid, 0, cnt, csize)
    total = length + cnt * hlen
    out[:hlen] = first
    if cnt == 1:
        out[hlen:total] = msg
        return total
    out[hlen:total] = first.join([msg[src : src + csize] for src in range(0, length, csize)])
    out[hlen - IDX_FROM_END : total : datagram_size] = _INDEXES[:cnt]
    return total


def preallocated(size: int) -> mmap.mmap:
    """A buffer of ``size`` zero bytes, made once and written in place, whose pages become resident only when first
    written (private anonymous memory): an idle or lightly used path's datagrams touch a page or two of a 64 KiB
    buffer, a bulk transfer's segmented super-frames all of it. A bytearray's are all written (zeroed) when it is
    made: about 0.5 MiB for each sleeve worker's buffers, carried whether or not anything crossed it."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


class ReplayWindow:
    """Accepts each counter once: anything above the highest seen, or within SIZE below it and not yet seen.
    ``check`` before opening (a cheap rejection, without the lock), ``accept`` only after the message authenticated:
    it checks again and records the counter under the window's lock, so when two workers open messages of one link
    at once each counter is still accepted exactly once, and a forged message never moves the window."""

    SIZE = 1024
    __slots__ = ("bits", "lock", "top")

    def __init__(self) -> None:
        self.top = -1
        self.bits = 0  # bit i set: counter top - i was seen
        self.lock = threading.Lock()

    def check(self, counter: int) -> bool:
        top = self.top
        if counter > top:
            return True
        back = top - counter
        return back < self.SIZE and not (self.bits >> back) & 1

    def accept(self, counter: int) -> bool:
        """Atomically: True and recorded if ``counter`` was not seen (and is not too old), else False."""
        with self.lock:
            if not self.check(counter):
                return False
            self.update(counter)
            return True

    def update(self, counter: int) -> None:
        top = self.top
        if counter > top:
            shift = counter - top
            self.bits = ((self.bits << shift) | 1) & ((1 << self.SIZE) - 1) if shift < self.SIZE else 1
            self.top = counter
        else:
            self.bits |= 1 << (top - counter)


Deliver = Callable[[bytes, memoryview, int], None]


class _Partial:
    __slots__ = ("buf", "cnt", "csize", "full", "length", "mask", "since")

    def __init__(self, buf: bytearray, cnt: int, csize: int, since: float) -> None:
        self.buf = buf
        self.cnt = cnt
        self.csize = csize
        self.full = (1 << cnt) - 1
        self.mask = 0
        self.length = -1
        self.since = since


class Partials:
    """Messages being reassembled, shared by every worker of a sleeve under one lock: the chunks of one message
    normally reach one worker (steering), but a GRO buffer may begin with another message's chunks, and then the
    rest of a message lands elsewhere. Only partial messages come here; whole ones never take the lock."""

    __slots__ = ("lock", "pool", "table")

    def __init__(self) -> None:
        self.table: dict[tuple[bytes, int], _Partial] = {}
        self.pool: list[bytearray] = []
        self.lock = threading.Lock()


class Reassembler:
    """Turns received UDP buffers (one datagram, or several coalesced by GRO) back into whole messages.

    Fast path: a buffer whose first and last headers show one run of a single message is handled with two header
    reads; a complete single-datagram message is passed on without a copy. Anything else is taken datagram by
    datagram. Partial messages wait in a small table (``Partials``, which workers may share) bounded in size and
    age; evictions count as "incomplete". ``deliver(hop, message, datagram_size)`` gets a view that is valid only
    during the call.
    """

    def __init__(
        self,
        dropped: dict[str, int],
        known: Callable[[], Container[bytes]],
        header: struct.Struct = HEADER,
        magic: int = MAGIC,
        partials: Partials | None = None,
    ) -> None:
        self.dropped = dropped
        self._known = known  # address fields worth a reassembly buffer (the current links, or pairs)
        self._header = header
        self._hlen = header.size
        self._magic = magic
        self._shared = partials if partials is not None else Partials()
        self._whole = preallocated(MAX_MESSAGE)
        self._whole_view = memoryview(self._whole)

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def feed(self, view: memoryview, n: int, gso: int, deliver: Deliver) -> None:
        """``view[:n]`` holds datagrams of ``gso`` bytes each (the last may be shorter); gso <= 0 means one."""
        if gso <= 0 or gso >= n:
            self._run(view, 0, n, n, 1, deliver)
            return
        k = -(-n // gso)
        last = (k - 1) * gso
        hlen, magic = self._hlen, self._magic
        if n - last < hlen or gso < hlen:
            self._drop("malformed")
            return
        m0, hop0, id0, idx0, cnt0, _ = self._header.unpack_from(view, 0)
        m1, hop1, id1, idx1, cnt1, _ = self._header.unpack_from(view, last)
        if m0 == magic and m1 == magic and id0 == id1 and idx1 - idx0 == k - 1 and hop0 == hop1 and cnt0 == cnt1:
            self._run(view, 0, n, gso, k, deliver)
            return
        for off in range(0, n, gso):
            end = off + gso
            self._run(view, off, end if end < n else n, gso, 1, deliver)

    def _run(self, view: memoryview, start: int, end: int, step: int, k: int, deliver: Deliver) -> None:
        """``k`` consecutive datagrams of one message in ``view[start:end]``, each ``step`` bytes but the last."""
        hlen = self._hlen
        if end - start < hlen:
            self._drop("malformed")
            return
        magic, hop, msgid, idx, cnt, csize = self._header.unpack_from(view, start)
        last_len = end - start - (k - 1) * step - hlen  # chunk length of the run's last datagram
        if (
            magic != self._magic
            or idx + k > cnt
            or csize <= 0
            or (k > 1 and step - hlen != csize)
            or last_len > csize
            or last_len <= 0
            or (idx + k < cnt and last_len != csize)
            or (idx + k - 1) * csize + last_len > MAX_MESSAGE
        ):
            self._drop("malformed")
            return
        if cnt == 1:
            deliver(hop, view[start + hlen : end], end - start)
            return
        if idx == 0 and k == cnt:
            length = (cnt - 1) * csize + last_len
            out = self._whole
            _gather(out, 0, view, start, k, step, csize, end, hlen)
            deliver(hop, self._whole_view[:length], step)
            return
        key = (hop, msgid)
        shared = self._shared
        with shared.lock:
            part = shared.table.get(key)
            if part is None:
                if hop not in self._known():
                    self._drop("unknown_peer")
                    return
                part = self._new_partial(key, cnt, csize)
            elif part.cnt != cnt or part.csize != csize:
                self._drop("malformed")
                return
            bits = ((1 << k) - 1) << idx
            if part.mask & bits:
                self._drop("duplicate")
                return
            _gather(part.buf, idx * csize, view, start, k, step, csize, end, hlen)
            part.mask |= bits
            if idx + k == cnt:
                part.length = (cnt - 1) * csize + last_len
            if part.mask != part.full:
                return
            del shared.table[key]
        try:
            deliver(hop, memoryview(part.buf)[: part.length], step if k > 1 else csize + hlen)
        finally:
            with shared.lock:
                shared.pool.append(part.buf)

    def _new_partial(self, key: tuple[bytes, int], cnt: int, csize: int) -> _Partial:
        """A fresh partial (under the shared lock), evicting the oldest while the table is full or they are stale."""
        now = time.monotonic()
        shared = self._shared
        partial = shared.table
        while partial:
            oldest = next(iter(partial))
            if len(partial) < MAX_PARTIAL and now - partial[oldest].since < PARTIAL_AGE:
                break
            shared.pool.append(partial.pop(oldest).buf)
            self._drop("incomplete")
        buf = shared.pool.pop() if shared.pool else bytearray(MAX_MESSAGE)
        part = partial[key] = _Partial(buf, cnt, csize, now)
        return part

    def pending(self) -> int:
        return len(self._shared.table)


def _gather(
    out: bytearray | mmap.mmap,
    dst: int,
    view: memoryview,
    start: int,
    k: int,
    step: int,
    csize: int,
    end: int,
    hlen: int,
) -> None:
    """Copy the chunks of ``k`` datagrams (headers of ``hlen`` bytes skipped) to ``out[dst:]``: joined in one C
    call."""
    view = view[:end]
    data = b"".join([view[src : src + csize] for src in range(start + hlen, end, step)])
    out[dst : dst + len(data)] = data
