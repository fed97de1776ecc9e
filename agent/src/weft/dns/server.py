"""The DNS server containers query: UDP and TCP on the addresses it is given (the agent's: the host's bridge).

Names in the domain (``weft.local.``) are answered from an ``Answers`` (the replicated table), with the
authoritative flag: A records for every live address of a name, rotated one place each answer (round robin); other
types of a known name NOERROR with no answer; an unknown name NXDOMAIN. A single-label name (``web.``) is the name
in the domain when the table knows it. PTR questions for addresses the table knows are answered too. Everything else
goes to the host's resolvers (``Upstream``), SERVFAIL when none answers in time.

Anyone on the bridge can send anything, so a message is never trusted: whatever fails to parse gets FORMERR (or
nothing, without a whole header), opcodes other than QUERY are refused without touching the table, and every
message is counted in ``weft_dns_queries_total{rcode}`` (docs/dns.md, "Server").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.PTR
import dns.rdtypes.IN.A
import dns.rrset

from weft.dns import names
from weft.dns.upstream import Upstream
from weft.limits import Episode
from weft.metrics import Metrics
from weft.promtext import Child

log = logging.getLogger(__name__)

TTL = 30  # seconds; see docs/dns.md for why not Weave's 1
MIN_UDP = 512  # the answer size every client takes over UDP (RFC 1035); without EDNS, the limit
MAX_UDP = 4096  # the most sent in one UDP answer, whatever size a client's EDNS offers
OUR_PAYLOAD = 1232  # the UDP size our answers' OPT records advertise (DNS flag day 2020)
MAX_QUERY = 4096  # bytes: a longer message is no query a resolver sends, and is dropped unread
TCP_LIMIT = 256  # TCP connections at once; beyond, a new one is closed at once
TCP_IDLE = 10.0  # seconds a TCP connection may stay without a whole query before it is closed
TCP_PIPELINE = 16  # forwarded queries one TCP connection may have waiting; beyond, it is not read
UDP_BATCH = 64  # datagrams read each time the UDP socket is readable, before other work gets its turn
ROTATIONS = 4096  # names whose round-robin position is kept; beyond, all positions start over
CACHE_BYTES = 4 << 20  # rendered answers kept (roughly, in bytes), to answer the same query again without work
CACHE_ENTRIES = 4096  # and at most this many queries; beyond either, the cache starts empty again
CACHE_ENTRY = 1024  # what an entry costs besides its bytes (its parsed query, mostly), as counted against the above

# Label values of weft_dns_queries_total: the rcode answered, or "dropped" for a message not answered (shorter than
# a header, a response rather than a query, or longer than MAX_QUERY). An upstream's unusual rcode is "other".
RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "BADVERS", "other", "dropped")

_QUERY = dns.opcode.QUERY
_UPDATE = dns.opcode.UPDATE
_IN = dns.rdataclass.IN
_ANY_CLASS = dns.rdataclass.ANY
_A = dns.rdatatype.A
_PTR = dns.rdatatype.PTR
_ANY = dns.rdatatype.ANY
_TRANSFERS = (dns.rdatatype.AXFR, dns.rdatatype.IXFR)
_IN_ADDR_ARPA = dns.name.from_text("in-addr.arpa.")
_OCTETS = {str(i).encode(): i for i in range(256)}  # reverse-name labels in canonical form only (no "01")
_QR = 0x80  # in the third byte of the header


class Answers(Protocol):
    """What the server answers from (the table, seen through the live peers). Names are normalised: lower case,
    absolute (``web.weft.local.``); addresses are IPv4 as integers."""

    def lookup(self, name: str) -> Sequence[int]:
        """The live addresses of ``name``; empty when no container has the name."""
        ...

    def reverse(self, address: int) -> Sequence[str]:
        """The names that ``address`` has; empty when none."""
        ...


Result = bytes | dns.message.Message | None  # an answer, a query to forward, or nothing to send


@dataclass(slots=True)
class _Cached:
    """Answers rendered for one query (all its bytes but the ID), valid while ``key`` has ``addresses``."""

    key: str  # the normalised name the query asked for
    addresses: list[int]  # what the table said for it
    variants: list[bytes | None]  # the answer starting at each address (rendered when first needed); or just one
    counter: Child  # weft_dns_queries_total, for its rcode
    query: dns.message.Message  # to render the variants not yet rendered


class DnsServer:
    def __init__(
        self,
        answers: Answers,
        metrics: Metrics,
        *,
        upstream: Upstream,
        binds: Sequence[tuple[str, int]],
        domain: str = names.DEFAULT_DOMAIN,
        ttl: int = TTL,
        tcp_limit: int = TCP_LIMIT,
        tcp_idle: float = TCP_IDLE,
        device: str | None = None,
    ) -> None:
        """``binds``: (host, port) pairs to serve on, UDP and TCP each; port 0 picks one (the same for both).
        ``device``: the sockets are bound to that interface (the bridge): answers leave by it with no route to the
        asker, and a query that came in by another is never seen."""
        if not binds:
            raise ValueError("the DNS server needs at least one address to listen on")
        self.answers = answers
        self.upstream = upstream
        self.binds = list(binds)
        self.domain = names.domain_of(domain)
        self.ttl = ttl
        self.tcp_limit = tcp_limit
        self.tcp_idle = tcp_idle
        self.device = device
        self.addresses: list[tuple[str, int]] = []  # where it listens, once started
        self._domain_name = dns.name.from_text(self.domain)
        self._counts = {rcode: metrics.dns_queries.labels(rcode) for rcode in RCODES}
        self._dropped = self._counts["dropped"]
        self._rotation: dict[str, int] = {}
        self._rdata: dict[int, dns.rdtypes.IN.A.A] = {}
        self._cache_udp: dict[bytes, _Cached] = {}  # a query's bytes after its ID -> what was answered
        self._cache_tcp: dict[bytes, _Cached] = {}
        self._cache_bytes = 0
        self._udp: list[_UdpListener] = []
        self._tcp: list[asyncio.Server] = []
        self._connections: set[_TcpConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._errors = -float("inf")  # when an internal error was last logged
        self._refusals = Episode(
            log,
            f"DNS: TCP connection cap ({tcp_limit}) reached; closing new connections",
            "DNS: below its TCP connection cap again; connections closed",
        )

    # -- listening -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on every address (OSError if one cannot be had: then nothing is left listening)."""
        loop = asyncio.get_running_loop()
        try:
            for host, port in self.binds:
                for attempt in range(10):
                    udp = _UdpListener(self, host, port)
                    bound = udp.sock.getsockname()[1]
                    try:
                        tcp = await loop.create_server(self._tcp_protocol, sock=_tcp_socket(host, bound, self.device))
                    except OSError:
                        udp.close()
                        if port != 0 or attempt == 9:
                            raise
                        continue  # the port the kernel gave UDP is taken for TCP: another one
                    self._udp.append(udp)
                    self._tcp.append(tcp)
                    self.addresses.append((host, bound))
                    break
        except BaseException:
            await self.stop()
            raise
        self.upstream.exclude(self.addresses)
        log.info(
            "DNS: serving %s on %s (UDP and TCP), TTL %ds",
            self.domain,
            ", ".join(f"{h}:{p}" for h, p in self.addresses),
            self.ttl,
        )

    async def stop(self) -> None:
        for udp in self._udp:
            udp.close()
        for tcp in self._tcp:
            tcp.close()
        for conn in list(self._connections):
            conn.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._udp, self._tcp, self._tasks = [], [], set()
        self.addresses = []
        self._refusals.cancel()

    def _tcp_protocol(self) -> asyncio.Protocol:
        if len(self._connections) >= self.tcp_limit:
            self._refusals.hit()
            return _Refused()
        return _TcpConnection(self)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- answering ---------------------------------------------------------------------------------

    def handle(self, wire: bytes, tcp: bool) -> Result:
        """The answer to one message, a query to forward (see ``forwarded``), or None. Never raises."""
        if len(wire) < 12 or len(wire) > MAX_QUERY or wire[2] & _QR:
            self._dropped.inc()
            return None
        try:
            hit = self._cached(wire, tcp)
            if hit is not None:
                return hit
        except Exception:
            self._internal_error()
            self._cache_udp.clear()
            self._cache_tcp.clear()
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # truncated, compression loops, counts beyond the data, bad rdata...
            return self._formerr(wire)
        try:
            return self._answer(query, wire, tcp)
        except Exception:
            self._internal_error()
            with contextlib.suppress(Exception):
                return self._error(query, dns.rcode.SERVFAIL, tcp)
            return None

    def _cached(self, wire: bytes, tcp: bool) -> bytes | None:
        """The answer rendered before to a query of the same bytes (but for the ID), if the table still says the
        same: then the message needs no parsing and the answer no rendering (one lookup, one copy)."""
        cache = self._cache_tcp if tcp else self._cache_udp
        entry = cache.get(wire[2:])
        if entry is None:
            return None
        addresses = self.answers.lookup(entry.key)
        if not isinstance(addresses, list):
            addresses = list(addresses)
        if addresses != entry.addresses:  # the table changed: answer afresh
            del cache[wire[2:]]
            return None
        variants = entry.variants
        if len(variants) == 1:
            out = variants[0]
        else:
            first = self._turn(entry.key, len(variants))
            out = variants[first]
            if out is None:
                out = variants[first] = self._addresses(entry.query, addresses, first, tcp)
                self._cache_bytes += len(out)
        assert out is not None
        entry.counter.inc()
        return wire[:2] + out[2:]

    def _remember(
        self,
        wire: bytes,
        tcp: bool,
        query: dns.message.Message,
        key: str,
        addresses: list[int],
        variants: list[bytes | None],
        rcode: str,
    ) -> None:
        cache = self._cache_tcp if tcp else self._cache_udp
        size = CACHE_ENTRY + len(wire) + sum(len(v) for v in variants if v is not None)
        if self._cache_bytes + size > CACHE_BYTES or len(cache) >= CACHE_ENTRIES:
            self._cache_udp.clear()  # a flood of new names: start over rather than keep books on which to drop
            self._cache_tcp.clear()
            self._cache_bytes = 0
        cache[wire[2:]] = _Cached(key, addresses, variants, self._counts[rcode], query)
        self._cache_bytes += size

    def _answer(self, query: dns.message.Message, wire: bytes, tcp: bool) -> Result:
        opcode = query.opcode()
        if opcode != _QUERY:  # UPDATE, NOTIFY, ...: nothing a client sends changes the table
            return self._error(query, dns.rcode.REFUSED if opcode == _UPDATE else dns.rcode.NOTIMP, tcp)
        if len(query.question) != 1:
            return self._error(query, dns.rcode.FORMERR, tcp)
        if query.edns > 0:
            return self._error(query, dns.rcode.BADVERS, tcp)
        question = query.question[0]
        qname = question.name
        if qname.is_subdomain(self._domain_name):
            if (question.rdclass != _IN and question.rdclass != _ANY_CLASS) or question.rdtype in _TRANSFERS:
                return self._error(query, dns.rcode.REFUSED, tcp)
            key = qname.to_text().lower()
            if key == self.domain:  # the domain itself: it exists, and has no records of its own
                self._counts["NOERROR"].inc()
                return self._records(query, None, tcp)
            return self._local(query, wire, key, tcp, nxdomain=True)
        labels = len(qname.labels)
        if labels == 2 and question.rdclass == _IN:  # "web.": the name in the domain, if the table has it
            try:
                key = names.normalise(qname.labels[0].decode("ascii").lower(), self.domain)
            except (ValueError, UnicodeDecodeError):
                return query
            if not names.in_domain(key, self.domain):
                return query
            return self._local(query, wire, key, tcp, nxdomain=False)
        if labels == 7 and question.rdclass == _IN and qname.is_subdomain(_IN_ADDR_ARPA):
            return self._reverse(query, tcp)
        return query

    def _local(self, query: dns.message.Message, wire: bytes, key: str, tcp: bool, *, nxdomain: bool) -> Result:
        addresses = self.answers.lookup(key)
        if not isinstance(addresses, list):
            addresses = list(addresses)
        if not addresses:
            if not nxdomain:
                return query  # a single label the table does not know: perhaps the upstream does
            out = self._error(query, dns.rcode.NXDOMAIN, tcp, authoritative=True)
            self._remember(wire, tcp, query, key, addresses, [out], "NXDOMAIN")
            return out
        self._counts["NOERROR"].inc()
        rdtype = query.question[0].rdtype
        if rdtype != _A and rdtype != _ANY:
            out = self._records(query, None, tcp)
            self._remember(wire, tcp, query, key, addresses, [out], "NOERROR")
            return out
        first = self._turn(key, len(addresses))
        out = self._addresses(query, addresses, first, tcp)
        variants: list[bytes | None] = [None] * len(addresses)
        variants[first] = out
        self._remember(wire, tcp, query, key, addresses, variants, "NOERROR")
        return out

    def _turn(self, key: str, n: int) -> int:
        """Where the next answer for ``key`` starts in its ``n`` addresses: one further each time."""
        turn = self._rotation.get(key)
        if turn is None:
            turn = 0
            if len(self._rotation) >= ROTATIONS:
                self._rotation.clear()
        self._rotation[key] = (turn + 1) % n
        return turn % n

    def _addresses(self, query: dns.message.Message, addresses: list[int], first: int, tcp: bool) -> bytes:
        """The A answer to ``query``: every address, starting at ``first``."""
        rrset = dns.rrset.RRset(query.question[0].name, _IN, _A)
        rrset.update_ttl(self.ttl)
        rdata = self._rdata
        for address in (*addresses[first:], *addresses[:first]):
            rd = rdata.get(address)
            if rd is None:
                if len(rdata) >= 65536:
                    rdata.clear()
                rd = rdata[address] = dns.rdtypes.IN.A.A(_IN, _A, socket.inet_ntoa(address.to_bytes(4, "big")))
            rrset.add(rd)
        return self._records(query, rrset, tcp)

    def _reverse(self, query: dns.message.Message, tcp: bool) -> Result:
        question = query.question[0]
        address = 0
        for label in reversed(question.name.labels[:4]):
            octet = _OCTETS.get(label)
            if octet is None:
                return query
            address = address << 8 | octet
        found = self.answers.reverse(address)
        if not found:
            return query  # not an address of ours: perhaps the upstream knows it
        self._counts["NOERROR"].inc()
        if question.rdtype != _PTR and question.rdtype != _ANY:
            return self._records(query, None, tcp)
        rrset = dns.rrset.RRset(question.name, _IN, _PTR)
        rrset.update_ttl(self.ttl)
        for name in found:
            rrset.add(dns.rdtypes.ANY.PTR.PTR(_IN, _PTR, dns.name.from_text(name)))
        return self._records(query, rrset, tcp)

    def _records(self, query: dns.message.Message, rrset: dns.rrset.RRset | None, tcp: bool) -> bytes:
        """An authoritative NOERROR answer to ``query`` holding ``rrset`` (as many of its records as fit)."""
        response = dns.message.make_response(query, recursion_available=True, our_payload=OUR_PAYLOAD)
        response.flags |= dns.flags.AA
        if rrset is not None:
            response.answer.append(rrset)
        limit = _limit(query, tcp)
        try:
            return response.to_wire(max_size=limit, want_shuffle=False)  # our own order: the rotation
        except dns.exception.TooBig:
            return _truncated(response, limit)

    def _error(self, query: dns.message.Message, rcode: int, tcp: bool, *, authoritative: bool = False) -> bytes:
        response = dns.message.make_response(query, recursion_available=True, our_payload=OUR_PAYLOAD)
        response.set_rcode(rcode)
        if authoritative:
            response.flags |= dns.flags.AA
        self._count(rcode)
        return response.to_wire(max_size=_limit(query, tcp), prefer_truncation=True)

    def _formerr(self, wire: bytes) -> bytes | None:
        """FORMERR for a message with a header but nothing we can read after it: the header's ID and opcode."""
        response = dns.message.Message(id=int.from_bytes(wire[:2], "big"))
        response.flags = dns.flags.QR | dns.flags.RA | (wire[2] & 0x79) << 8  # opcode and RD from the query
        response.set_rcode(dns.rcode.FORMERR)
        self._counts["FORMERR"].inc()
        return response.to_wire()

    async def forwarded(self, query: dns.message.Message, tcp: bool) -> bytes:
        """The upstream's answer to ``query`` for our client, SERVFAIL when none came in time."""
        try:
            response = await self.upstream.forward(query, tcp=tcp)
            if response is None:
                return self._error(query, dns.rcode.SERVFAIL, tcp)
            # Its own answer, sized for our client (a larger one loses whole records and says TC).
            wire = response.to_wire(max_size=_limit(query, tcp), prefer_truncation=True, want_shuffle=False)
            self._count(response.rcode())
            return wire
        except asyncio.CancelledError:
            raise
        except Exception:
            self._internal_error()
            return self._error(query, dns.rcode.SERVFAIL, tcp)

    def _count(self, rcode: int) -> None:
        counter = self._counts.get(dns.rcode.to_text(rcode)) if 0 <= rcode <= 23 else None
        (counter if counter is not None else self._counts["other"]).inc()

    def _internal_error(self) -> None:
        """A bug, not an input: logged with its traceback, at most once a minute."""
        now = time.monotonic()
        if now - self._errors >= 60.0:
            self._errors = now
            log.exception("DNS: internal error answering a query (answered SERVFAIL)")


def _limit(query: dns.message.Message, tcp: bool) -> int:
    """How large an answer to ``query`` may be: 65535 on TCP; over UDP the EDNS size offered, 512 without."""
    if tcp:
        return 65535
    if query.edns < 0:
        return MIN_UDP
    return min(max(query.payload, MIN_UDP), MAX_UDP)


def _truncated(response: dns.message.Message, limit: int) -> bytes:
    """As many of the answer's records as fit in ``limit``, with TC set: a client that does not retry over TCP
    (musl before 1.2.4) still gets addresses, and another set of them each time."""
    rrset = response.answer[0]
    records = list(rrset)
    response.flags |= dns.flags.TC
    low, high = 0, len(records) - 1  # fits with ``low`` records; not with more than ``high``
    best = b""
    while low <= high:
        middle = (low + high) // 2
        part = dns.rrset.RRset(rrset.name, rrset.rdclass, rrset.rdtype)
        part.update_ttl(rrset.ttl)
        for rd in records[:middle]:
            part.add(rd)
        response.answer[0] = part
        try:
            best = response.to_wire(max_size=limit, want_shuffle=False)
        except dns.exception.TooBig:
            high = middle - 1
        else:
            low = middle + 1
    if not best:
        response.answer = []
        best = response.to_wire(max_size=limit, prefer_truncation=True, want_shuffle=False)
    return best


def _tcp_socket(host: str, port: int, device: str | None) -> socket.socket:
    """A listening TCP socket (what loop.create_server would make), bound to ``device`` if given."""
    family, type_, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST
    )[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _UdpListener:
    """One UDP socket, read straight from the event loop: up to UDP_BATCH datagrams each time it is readable (an
    asyncio datagram transport reads one), answers sent at once. An answer the socket has no room for is dropped,
    as a datagram may be: the client asks again."""

    def __init__(self, server: DnsServer, host: str, port: int) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        family, type_, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST
        )[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):  # room for a burst; capped by net.core.rmem_max
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            if server.device:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, server.device.encode())
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self._read)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    def _read(self) -> None:
        sock, handle = self.sock, self.server.handle
        for _ in range(UDP_BATCH):
            try:
                data, addr = sock.recvfrom(MAX_QUERY + 1)  # a longer datagram is cut, then dropped as too long
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an error queued on the socket (ICMP about an earlier answer): read on
                continue
            result = handle(data, False)
            if result is None:
                continue
            if type(result) is bytes:
                self._send(result, addr)
            else:
                self.server.spawn(self._forward(result, addr))

    async def _forward(self, query: dns.message.Message, addr: tuple[str, int]) -> None:
        self._send(await self.server.forwarded(query, False), addr)

    def _send(self, wire: bytes, addr: tuple[str, int]) -> None:
        if self.sock.fileno() >= 0:
            with contextlib.suppress(OSError):  # EAGAIN: no room in the socket's buffer; the client asks again
                self.sock.sendto(wire, addr)


class _TcpConnection(asyncio.Protocol):
    """Length-prefixed messages (RFC 7766), several in a row allowed; answers to forwarded ones may come out of order.

    Closed when idle (no whole query) for ``tcp_idle`` seconds with nothing pending, when a message is longer than
    MAX_QUERY, and when the server stops. While the client does not read its answers, it is not read either.
    """

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._pending = 0
        self._paused = False  # reading paused: too many pending, or the client not reading
        self._write_paused = False
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server._connections.add(self)
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        self._timer = loop.call_later(self.server.tcp_idle, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.server._connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _check_idle(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        loop = asyncio.get_running_loop()
        idle = loop.time() - self._last
        if idle >= self.server.tcp_idle and self._pending == 0:
            self.transport.close()
            return
        self._timer = loop.call_later(max(self.server.tcp_idle - idle, 0.5), self._check_idle)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._drain()

    def _drain(self) -> None:
        buffer = self._buffer
        while (
            self.transport is not None and len(buffer) >= 2 and self._pending < TCP_PIPELINE and not self._write_paused
        ):
            size = buffer[0] << 8 | buffer[1]
            if size > MAX_QUERY:
                self.server._dropped.inc()
                self.transport.abort()
                return
            if len(buffer) < 2 + size:
                break
            wire = bytes(buffer[2 : 2 + size])
            del buffer[: 2 + size]
            self._last = asyncio.get_running_loop().time()
            result = self.server.handle(wire, True)
            if result is None:
                continue
            if isinstance(result, bytes):
                self._send(result)
            else:
                self._pending += 1
                self.server.spawn(self._forward(result))
        self._flow()

    async def _forward(self, query: dns.message.Message) -> None:
        try:
            self._send(await self.server.forwarded(query, True))
        finally:
            self._pending -= 1
            if self.transport is not None and len(self._buffer) >= 2:
                self._drain()
            else:
                self._flow()

    def _send(self, wire: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(len(wire).to_bytes(2, "big") + wire)

    def _flow(self) -> None:
        if self.transport is None:
            return
        stop = self._write_paused or self._pending >= TCP_PIPELINE
        if stop and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        elif not stop and self._paused:
            self._paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._flow()
        if not self._paused and self.transport is not None and len(self._buffer) >= 2:
            self._drain()


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed as soon as it is made, unread."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]
