"""The DNS server on real sockets (127.0.0.1, ephemeral ports), asked with dnspython and with dig.

The table is a dict here (``FakeAnswers``): what the server does with its answers is tested, not the table. Names
outside the domain go to small upstream servers run by the test on other loopback addresses (127.0.0.2, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import re
import shutil
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.update
import pytest

from weft.dns.server import DnsServer
from weft.dns.upstream import Upstream, parse_server, read_resolv_conf
from weft.metrics import Metrics

DOMAIN = "weft.local."
WEB = ["10.32.0.1", "10.32.0.2", "10.32.0.3"]
BIG = [f"10.40.{i // 256}.{i % 256}" for i in range(1, 101)]
OUTSIDE = "example.test."  # what the test upstreams know
OUTSIDE_ADDRESS = "192.0.2.10"
TIMEOUT = 5.0  # seconds a test query may take (a generous bound, not a measurement)


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


class FakeAnswers:
    """The server's view of the table: names (normalised) to addresses."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = {name: [ip(a) for a in addresses] for name, addresses in table.items()}

    def lookup(self, name: str) -> list[int]:
        return list(self.table.get(name, []))

    def reverse(self, address: int) -> list[str]:
        return sorted(name for name, addresses in self.table.items() if address in addresses)


def default_table() -> FakeAnswers:
    return FakeAnswers({"web.weft.local.": WEB, "big.weft.local.": BIG, "db.weft.local.": ["10.32.0.9"]})


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def serving(
    answers: FakeAnswers | None = None,
    *,
    upstream: Upstream | None = None,
    metrics: Metrics | None = None,
    **kwargs: Any,
) -> AsyncIterator[DnsServer]:
    metrics = metrics or Metrics()
    if upstream is None:
        upstream = Upstream(metrics, resolv_conf="/nonexistent/resolv.conf", timeout=1.0)
    server = DnsServer(answers or default_table(), metrics, upstream=upstream, binds=[("127.0.0.1", 0)], **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def port_of(server: DnsServer) -> int:
    return server.addresses[0][1]


async def ask(
    server: DnsServer, name: str, rdtype: str = "A", *, tcp: bool = False, **make: Any
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **make)
    if tcp:
        return await dns.asyncquery.tcp(query, "127.0.0.1", port=port_of(server), timeout=TIMEOUT)
    return await dns.asyncquery.udp(query, "127.0.0.1", port=port_of(server), timeout=TIMEOUT)


def addresses(response: dns.message.Message) -> list[str]:
    return [rd.address for rrset in response.answer if rrset.rdtype == dns.rdatatype.A for rd in rrset]


def count(metrics: Metrics, rcode: str) -> float:
    return metrics.registry.get_sample_value("weft_dns_queries_total", {"rcode": rcode}) or 0.0


def counted(metrics: Metrics) -> float:
    return sum(
        sample.value
        for family in metrics.registry.collect()
        if family.name == "weft_dns_queries"
        for sample in family.samples
        if sample.name == "weft_dns_queries_total"
    )


def failures(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("weft_dns_upstream_failures_total", {"reason": reason}) or 0.0


def needs_dig() -> str:
    path = shutil.which("dig")
    if path is None:
        pytest.skip("dig is not installed (apt-get install dnsutils)")
    return path


async def dig(server: DnsServer, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        needs_dig(),
        "-p",
        str(port_of(server)),
        "@127.0.0.1",
        "+time=3",
        "+tries=1",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return out.decode()


def dig_status(out: str) -> str:
    found = re.search(r"status: (\w+)", out)
    assert found, out
    return found.group(1)


def dig_flags(out: str) -> set[str]:
    found = re.search(r";; flags: ([a-z ]+);", out)
    assert found, out
    return set(found.group(1).split())


def dig_answers(out: str, rdtype: str = "A") -> list[str]:
    section = out.split(";; ANSWER SECTION:", 1)
    if len(section) == 1:
        return []
    values = []
    for line in section[1].splitlines()[1:]:
        if not line.strip():
            break
        fields = line.split()
        if len(fields) >= 5 and fields[3] == rdtype:
            values.append(fields[4])
    return values


# -- a small upstream server, dnspython-built answers --------------------------------------------------


class FakeUpstream:
    """Answers OUTSIDE (A ``address``) and the PTR of 192.0.2.10, NXDOMAIN for the rest, on UDP and TCP; or, with
    ``silent``, reads queries and never answers."""

    def __init__(self, host: str, *, address: str = OUTSIDE_ADDRESS, silent: bool = False) -> None:
        self.host = host
        self.address = address
        self.silent = silent
        self.port = 0
        self.ids: list[int] = []
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    def answer(self, wire: bytes) -> bytes | None:
        query = dns.message.from_wire(wire)
        self.ids.append(query.id)
        if self.silent:
            return None
        response = dns.message.make_response(query, recursion_available=True)
        question = query.question[0]
        if question.name == dns.name.from_text(OUTSIDE) and question.rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", self.address))
        elif question.name == dns.name.from_text("10.2.0.192.in-addr.arpa."):
            response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "PTR", "upstream.example.test."))
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    async def start(self, port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        upstream = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                out = upstream.answer(data)
                if out is not None:
                    self.transport.sendto(out, addr)  # type: ignore[attr-defined]

        self._udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=(self.host, port))
        self.port = self._udp.get_extra_info("sockname")[1]

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while True:
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                    out = self.answer(await reader.readexactly(size))
                    if out is not None:
                        writer.write(struct.pack("!H", len(out)) + out)
                        await writer.drain()
            writer.close()

        self._tcp = await asyncio.start_server(tcp, self.host, self.port)

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


@contextlib.asynccontextmanager
async def upstreams(
    *hosts: str, same_port: bool = False, addresses: list[str] | None = None
) -> AsyncIterator[list[FakeUpstream]]:
    """Fake upstreams on ``hosts``; with ``same_port`` all on one port (resolv.conf cannot name a port)."""
    started: list[FakeUpstream] = []
    try:
        for attempt in range(20):
            port = 0
            try:
                for i, host in enumerate(hosts):
                    up = FakeUpstream(host, address=addresses[i] if addresses else OUTSIDE_ADDRESS)
                    await up.start(port)
                    started.append(up)
                    if same_port:
                        port = up.port
                break
            except OSError:
                for up in started:
                    await up.stop()
                started.clear()
                if attempt == 19:
                    raise
        yield started
    finally:
        for up in started:
            await up.stop()


# -- protocol ------------------------------------------------------------------------------------------


def test_a_records_every_address_authoritative() -> None:
    async def main() -> None:
        async with serving(ttl=30) as server:
            response = await ask(server, "web.weft.local.")
            assert response.rcode() == dns.rcode.NOERROR
            assert sorted(addresses(response)) == WEB
            assert response.flags & dns.flags.AA and response.flags & dns.flags.RA
            assert response.answer[0].ttl == 30
            out = await dig(server, "web.weft.local", "A")
            assert dig_status(out) == "NOERROR"
            assert {"qr", "aa", "ra"} <= dig_flags(out)
            assert sorted(dig_answers(out)) == WEB
        async with serving(ttl=7) as server:
            assert (await ask(server, "db.weft.local.")).answer[0].ttl == 7

    run(main())


def test_round_robin_each_answer_starts_elsewhere() -> None:
    async def main() -> None:
        async with serving() as server:
            firsts = []
            for i in range(30):
                # Alternate two query forms (dnspython with and without EDNS): the rotation is the name's.
                response = await ask(server, "web.weft.local.", use_edns=0 if i % 2 else None)
                assert sorted(addresses(response)) == WEB
                firsts.append(addresses(response)[0])
            assert set(firsts) == set(WEB)
            assert len(set(firsts[:3])) == 3, firsts  # one place further each answer
            dug = [dig_answers(await dig(server, "web.weft.local"))[0] for _ in range(3)]
            assert set(dug) == set(WEB), dug

    run(main())


def test_known_name_other_types_noerror_empty() -> None:
    async def main() -> None:
        async with serving() as server:
            for rdtype in ("AAAA", "MX", "TXT", "SRV"):
                response = await ask(server, "web.weft.local.", rdtype)
                assert response.rcode() == dns.rcode.NOERROR, rdtype
                assert response.answer == [] and response.flags & dns.flags.AA
            out = await dig(server, "web.weft.local", "AAAA")
            assert dig_status(out) == "NOERROR" and dig_answers(out, "AAAA") == []

    run(main())


def test_unknown_name_in_domain_nxdomain() -> None:
    async def main() -> None:
        async with serving() as server:
            for rdtype in ("A", "AAAA"):
                response = await ask(server, "nosuch.weft.local.", rdtype)
                assert response.rcode() == dns.rcode.NXDOMAIN and response.flags & dns.flags.AA
            assert (await ask(server, "a.b.web.weft.local.")).rcode() == dns.rcode.NXDOMAIN
            out = await dig(server, "nosuch.weft.local")
            assert dig_status(out) == "NXDOMAIN" and "aa" in dig_flags(out)
            apex = await ask(server, DOMAIN, "SOA")  # the domain itself exists: no records of its own
            assert apex.rcode() == dns.rcode.NOERROR and apex.answer == []

    run(main())


def test_names_that_are_not_ascii_or_as_long_as_a_name_can_be_are_just_unknown() -> None:
    """A container asks for raw UTF-8 labels, a dot inside a label, punycode and a 255-byte name of 0xff bytes: each
    is an unknown name of the domain (NXDOMAIN, its question as asked), and the server answers the next query."""

    async def main() -> None:
        async with serving() as server:
            for labels in ([b"b\xc3\xbccher"], [b"a.b"], [b"xn--bcher-kva"], [b"\xff" * 63] * 3 + [b"\xff" * 50]):
                query = dns.message.make_query(dns.name.Name([*labels, b"weft", b"local", b""]), "A")
                response = dns.message.from_wire(await _udp_exchange(server, query.to_wire()))
                assert response.rcode() == dns.rcode.NXDOMAIN, labels[0][:8]
                assert response.question[0].name == query.question[0].name
            assert addresses(await ask(server, "web.weft.local.")) == WEB

    run(main())


def test_names_are_case_insensitive_and_the_question_keeps_its_case() -> None:
    async def main() -> None:
        async with serving() as server:
            for name in ("WEB.WEFT.LOCAL.", "wEb.WeFt.lOcAl."):
                response = await ask(server, name)
                assert sorted(addresses(response)) == WEB
                asked = response.question[0].name.to_text()
                assert asked == name  # a resolver's 0x20 check compares the case
                assert response.answer[0].name.to_text() == name
            out = await dig(server, "Web.Weft.Local")
            assert sorted(dig_answers(out)) == WEB

    run(main())


def test_single_label_is_the_name_in_the_domain() -> None:
    async def main() -> None:
        async with upstreams("127.0.0.2") as ups:
            metrics = Metrics()
            upstream = Upstream(metrics, override=[ups[0].where], timeout=2.0)
            async with serving(upstream=upstream, metrics=metrics) as server:
                response = await ask(server, "web.")
                assert sorted(addresses(response)) == WEB
                assert response.answer[0].name.to_text() == "web."
                assert (await ask(server, "WEB.", "AAAA")).rcode() == dns.rcode.NOERROR
                out = await dig(server, "web")
                assert sorted(dig_answers(out)) == WEB
                # A single label the table does not know is not ours to deny: the upstream answers it.
                before = len(ups[0].ids)
                assert (await ask(server, "nosuch.")).rcode() == dns.rcode.NXDOMAIN
                assert len(ups[0].ids) == before + 1

    run(main())


def test_ptr_for_overlay_addresses() -> None:
    async def main() -> None:
        async with upstreams("127.0.0.2") as ups:
            metrics = Metrics()
            upstream = Upstream(metrics, override=[ups[0].where], timeout=2.0)
            async with serving(upstream=upstream, metrics=metrics) as server:
                response = await ask(server, "2.0.32.10.in-addr.arpa.", "PTR")
                assert response.rcode() == dns.rcode.NOERROR and response.flags & dns.flags.AA
                assert [rd.target.to_text() for rd in response.answer[0]] == ["web.weft.local."]
                out = await dig(server, "-x", "10.32.0.9")
                assert dig_answers(out, "PTR") == ["db.weft.local."]
                assert ups[0].ids == []
                # An address the table does not have: the upstream's answer.
                out = await dig(server, "-x", "192.0.2.10")
                assert dig_answers(out, "PTR") == ["upstream.example.test."]
                assert "aa" not in dig_flags(out)

    run(main())


def test_large_answer_truncated_over_udp_whole_over_tcp() -> None:
    async def main() -> None:
        async with serving() as server:
            query = dns.message.make_query("big.weft.local.", "A")  # no EDNS: 512 bytes
            wire = await _udp_exchange(server, query.to_wire())
            assert len(wire) <= 512
            response = dns.message.from_wire(wire)
            assert response.flags & dns.flags.TC
            assert 0 < len(addresses(response)) < 100  # as many as fit, for clients that cannot use TCP
            assert set(addresses(response)) <= set(BIG)
            edns = await ask(server, "big.weft.local.", use_edns=0, payload=1232)
            assert edns.flags & dns.flags.TC and len(edns.to_wire()) <= 1232
            roomy = await ask(server, "big.weft.local.", use_edns=0, payload=4096)  # the client's size is honoured
            assert not roomy.flags & dns.flags.TC and sorted(addresses(roomy)) == sorted(BIG)
            whole = await ask(server, "big.weft.local.", tcp=True)
            assert not whole.flags & dns.flags.TC and sorted(addresses(whole)) == sorted(BIG)
            out = await dig(server, "+ignore", "+noedns", "big.weft.local")  # UDP only, TC shown
            assert "tc" in dig_flags(out)
            out = await dig(server, "+tcp", "big.weft.local")
            assert sorted(dig_answers(out)) == sorted(BIG)
            out = await dig(server, "big.weft.local")  # dig's own retry over TCP on TC
            assert sorted(dig_answers(out)) == sorted(BIG)

    run(main())


def test_edns_version_above_zero_badvers() -> None:
    async def main() -> None:
        async with serving() as server:
            response = await ask(server, "web.weft.local.", use_edns=1)
            assert response.rcode() == dns.rcode.BADVERS

    run(main())


def test_answers_follow_the_table() -> None:
    async def main() -> None:
        answers = default_table()
        async with serving(answers) as server:
            assert sorted(addresses(await ask(server, "web.weft.local."))) == WEB
            answers.table["web.weft.local."] = [ip("10.32.0.77")]
            assert addresses(await ask(server, "web.weft.local.")) == ["10.32.0.77"]
            del answers.table["web.weft.local."]
            assert (await ask(server, "web.weft.local.")).rcode() == dns.rcode.NXDOMAIN
            answers.table["web.weft.local."] = [ip("10.32.0.78")]
            assert addresses(await ask(server, "web.weft.local.")) == ["10.32.0.78"]
            assert addresses(await ask(server, "web.weft.local.", tcp=True)) == ["10.32.0.78"]

    run(main())


def test_update_and_other_opcodes_refused_table_unchanged() -> None:
    async def main() -> None:
        answers = default_table()
        before = {k: list(v) for k, v in answers.table.items()}
        metrics = Metrics()
        async with serving(answers, metrics=metrics) as server:
            port = port_of(server)
            update = dns.update.UpdateMessage(DOMAIN)
            update.add("evil", 300, "A", "10.99.0.1")
            update.replace("web", 300, "A", "10.99.0.2")
            for tcp in (False, True):
                send = dns.asyncquery.tcp if tcp else dns.asyncquery.udp
                response = await send(update, "127.0.0.1", port=port, timeout=TIMEOUT)
                assert response.rcode() == dns.rcode.REFUSED
            for opcode in (dns.opcode.NOTIFY, dns.opcode.STATUS, dns.opcode.IQUERY):
                query = dns.message.make_query("web.weft.local.", "A")
                query.set_opcode(opcode)
                response = await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=TIMEOUT)
                assert response.rcode() == dns.rcode.NOTIMP, opcode
            assert answers.table == before
            assert (await ask(server, "evil.weft.local.")).rcode() == dns.rcode.NXDOMAIN
            assert sorted(addresses(await ask(server, "web.weft.local."))) == WEB
            assert count(metrics, "REFUSED") == 2 and count(metrics, "NOTIMP") == 3

    run(main())


# -- upstream ------------------------------------------------------------------------------------------


def test_names_outside_the_domain_go_upstream() -> None:
    async def main() -> None:
        async with upstreams("127.0.0.2") as ups:
            metrics = Metrics()
            upstream = Upstream(metrics, override=[ups[0].where], timeout=2.0)
            async with serving(upstream=upstream, metrics=metrics) as server:
                ids = []
                for i in range(6):
                    query = dns.message.make_query(OUTSIDE, "A", id=i + 1)
                    send = dns.asyncquery.tcp if i % 2 else dns.asyncquery.udp
                    response = await send(query, "127.0.0.1", port=port_of(server), timeout=TIMEOUT)
                    assert response.id == query.id  # back under the client's ID
                    assert addresses(response) == [OUTSIDE_ADDRESS]
                    assert not response.flags & dns.flags.AA
                    ids.append(query.id)
                assert ups[0].ids != ids  # asked under IDs of our own choosing
                out = await dig(server, OUTSIDE)
                assert dig_answers(out) == [OUTSIDE_ADDRESS]
                out = await dig(server, "+tcp", "nosuch.example.test")
                assert dig_status(out) == "NXDOMAIN"
                assert count(metrics, "NOERROR") == 7 and count(metrics, "NXDOMAIN") == 1

    run(main())


def test_upstream_down_servfail_within_the_timeout() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        # A server that takes queries and never answers, and a port where nothing listens (ICMP refusal).
        async with upstreams("127.0.0.2") as ups:
            ups[0].silent = True
            closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            closed.bind(("127.0.0.3", 0))
            refused = f"127.0.0.3:{closed.getsockname()[1]}"
            closed.close()
            timeout = 0.5
            metrics = Metrics()
            upstream = Upstream(metrics, override=[ups[0].where], timeout=timeout)
            async with serving(upstream=upstream, metrics=metrics) as server:
                for tcp in (False, True):
                    start = loop.time()
                    response = await ask(server, OUTSIDE, tcp=tcp)
                    took = loop.time() - start
                    assert response.rcode() == dns.rcode.SERVFAIL
                    assert took < timeout + 3.0, took  # generous slack for a busy machine
                out = await dig(server, OUTSIDE)
                assert dig_status(out) == "SERVFAIL"
                assert failures(metrics, "timeout") == 3 and count(metrics, "SERVFAIL") == 3
            metrics = Metrics()
            upstream = Upstream(metrics, override=[refused], timeout=timeout)
            async with serving(upstream=upstream, metrics=metrics) as server:
                start = loop.time()
                response = await ask(server, OUTSIDE)
                assert response.rcode() == dns.rcode.SERVFAIL and loop.time() - start < timeout + 3.0
                assert failures(metrics, "unreachable") == 1
            # Two servers, the first dead: the second answers within the same timeout.
            async with upstreams("127.0.0.4") as live:
                metrics = Metrics()
                upstream = Upstream(metrics, override=[ups[0].where, live[0].where], timeout=3.0)  # 1.5 s each
                async with serving(upstream=upstream, metrics=metrics) as server:
                    assert addresses(await ask(server, OUTSIDE)) == [OUTSIDE_ADDRESS]
                    assert failures(metrics, "timeout") == 1
            metrics = Metrics()
            upstream = Upstream(metrics, resolv_conf="/nonexistent/resolv.conf", timeout=timeout)
            async with serving(upstream=upstream, metrics=metrics) as server:
                assert (await ask(server, OUTSIDE)).rcode() == dns.rcode.SERVFAIL
                assert failures(metrics, "no_servers") == 1

    run(main())


def test_resolv_conf_change_picked_up(tmp_path: Path) -> None:
    async def main() -> None:
        resolv = tmp_path / "resolv.conf"
        async with upstreams("127.0.0.2", "127.0.0.3", same_port=True, addresses=["192.0.2.2", "192.0.2.3"]) as ups:
            port = ups[0].port
            resolv.write_text("# written by the test\nsearch example.test\nnameserver 127.0.0.2\n")
            metrics = Metrics()
            upstream = Upstream(metrics, resolv_conf=resolv, timeout=2.0, check_interval=0.0, port=port)
            async with serving(upstream=upstream, metrics=metrics) as server:
                assert addresses(await ask(server, OUTSIDE)) == ["192.0.2.2"]
                # Replaced as resolvconf and NetworkManager do: a new file renamed over the old one.
                new = tmp_path / "resolv.conf.new"
                new.write_text("nameserver 127.0.0.3\n")
                new.rename(resolv)
                assert addresses(await ask(server, OUTSIDE)) == ["192.0.2.3"]
                # Rewritten in place.
                resolv.write_text("nameserver 127.0.0.2   # back\n")
                assert addresses(await ask(server, OUTSIDE)) == ["192.0.2.2"]
                # Naming our own address: skipped (a loop otherwise), so no server is left.
                upstream.port = port_of(server)
                resolv.write_text("nameserver 127.0.0.1\n")
                assert (await ask(server, OUTSIDE)).rcode() == dns.rcode.SERVFAIL
                assert failures(metrics, "no_servers") == 1

    run(main())


def test_upstream_lists() -> None:
    assert parse_server("192.0.2.1") == ("192.0.2.1", 53)
    assert parse_server("192.0.2.1:5353") == ("192.0.2.1", 5353)
    assert parse_server("[2001:db8::1]:5353") == ("2001:db8::1", 5353)
    assert parse_server("2001:db8::1") == ("2001:db8::1", 53)
    for bad in ("dns.example", "192.0.2.1:0", "192.0.2.1:x", "[2001:db8::1", "[::1]x", "fe80::1%eth0"):
        with pytest.raises(ValueError):
            parse_server(bad)
    text = "nameserver 10.0.0.2\n# nameserver 10.0.0.3\nnameserver bogus\nnameserver fe80::1%eth0\nnameserver ::1\n"
    assert read_resolv_conf(text) == [("10.0.0.2", 53), ("::1", 53)]
    up = Upstream(Metrics(), override=["127.0.0.1:5300", "127.0.0.2:5300", "127.0.0.1:53", "10.1.2.3:5300"])
    up.exclude([("127.0.0.1", 5300)])
    assert up.servers() == [("127.0.0.2", 5300), ("127.0.0.1", 53), ("10.1.2.3", 5300)]
    up.exclude([("0.0.0.0", 53)])  # a wildcard listener is reached on every loopback address
    assert up.servers() == [("127.0.0.2", 5300), ("10.1.2.3", 5300)]


# -- hostile input -------------------------------------------------------------------------------------


def hostile_packets(n: int, seed: int = 1234) -> list[bytes]:
    """Malformed DNS messages of every kind we could think of, ``n`` of them, the same each run."""
    rng = random.Random(seed)
    valid = dns.message.make_query("web.weft.local.", "A", use_edns=0).to_wire()

    def header(qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, flags: int = 0x0100) -> bytes:
        return struct.pack("!HHHHHH", rng.getrandbits(16), flags, qd, an, ns, ar)

    def garbage(low: int, high: int) -> bytes:
        return rng.randbytes(rng.randint(low, high))

    kinds: list[Callable[[], bytes]] = [
        lambda: valid[: rng.randrange(len(valid))],  # truncated anywhere, the empty datagram included
        lambda: header() + b"\xc0\x0c" + b"\x00\x01\x00\x01",  # the name points at itself
        lambda: header() + b"\xc0\x0e\xc0\x0c" + b"\x00\x01\x00\x01",  # two pointers pointing at each other
        lambda: header() + b"\x03abc\xc0\x0c\x00\x01\x00\x01",  # a pointer back to where the name started
        lambda: header(0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF) + garbage(0, 64),  # huge counts
        lambda: header(1, 0, 0, 0xFFFF) + valid[12:],  # a valid question, thousands of missing records
        lambda: garbage(0, 600),  # random bytes
        lambda: header() + garbage(1, 300),  # a valid header, then garbage
        lambda: header(flags=0x8180) + valid[12:],  # a response, not a query
        lambda: header() + (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01",  # a name over 255 bytes
        lambda: header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01",  # a reserved label type
        lambda: header(1, 1) + valid[12:-11] + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x1e\x00\x05\x01\x02",  # bad A
        lambda: header() + garbage(MAX + 1, MAX + 900),  # longer than any query
    ]
    return [rng.choice(kinds)() for _ in range(n)]


MAX = 4096


async def _udp_exchange(server: DnsServer, wire: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port_of(server)))
        await loop.sock_sendall(sock, wire)
        return await asyncio.wait_for(loop.sock_recv(sock, 65535), TIMEOUT)
    finally:
        sock.close()


async def _until(condition: Callable[[], bool], what: str, limit: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not condition():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.002)


def test_hostile_packets_counted_no_crash_answers_still_right() -> None:
    async def main() -> None:
        metrics = Metrics()
        async with serving(metrics=metrics) as server:
            packets = hostile_packets(10_000)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            target = ("127.0.0.1", port_of(server))
            replies = 0
            try:
                start = counted(metrics)
                for i in range(0, len(packets), 50):
                    batch = packets[i : i + 50]
                    for packet in batch:
                        sock.sendto(packet, target)
                    expected = start + i + len(batch)
                    await _until(lambda e=expected: counted(metrics) >= e, f"counted {counted(metrics)} of {expected}")
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            reply = sock.recv(65535)
                            replies += 1
                            assert dns.message.from_wire(reply).flags & dns.flags.QR
            finally:
                sock.close()
            assert counted(metrics) == start + len(packets)  # each one counted once
            assert count(metrics, "FORMERR") > 1000 and count(metrics, "dropped") > 1000
            assert replies > 0
            # Still answering, and answering right.
            assert sorted(addresses(await ask(server, "web.weft.local."))) == WEB
            assert sorted(addresses(await ask(server, "big.weft.local.", tcp=True))) == sorted(BIG)
            assert (await ask(server, "nosuch.weft.local.")).rcode() == dns.rcode.NXDOMAIN
            assert sorted(dig_answers(await dig(server, "web.weft.local"))) == WEB

    run(main())


def test_hostile_tcp_counted_connection_closed_server_alive() -> None:
    async def main() -> None:
        metrics = Metrics()
        async with serving(metrics=metrics) as server:
            port = port_of(server)
            packets = [p for p in hostile_packets(300, seed=99) if len(p) <= MAX]
            start = counted(metrics)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"".join(struct.pack("!H", len(p)) + p for p in packets))  # pipelined, one write
            await writer.drain()
            await _until(lambda: counted(metrics) >= start + len(packets), "every framed message counted")
            assert counted(metrics) == start + len(packets)
            # Answers came back on the connection, each a whole framed DNS response.
            answered = sum(1 for p in packets if len(p) >= 12 and not p[2] & 0x80)
            for _ in range(answered):
                size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), TIMEOUT))[0]
                assert dns.message.from_wire(await reader.readexactly(size)).flags & dns.flags.QR
            # A length beyond any query: dropped, counted, and the connection closed.
            writer.write(struct.pack("!H", 65000) + b"\x00" * 100)
            await writer.drain()
            with contextlib.suppress(ConnectionResetError):  # closed with data unread: a reset, or an end
                assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            writer.close()
            assert count(metrics, "dropped") >= 1
            # Half a message, then the client goes: nothing answered, nothing counted, nothing left over.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(struct.pack("!H", 40) + b"\x12\x34\x01\x00")
            await writer.drain()
            writer.close()
            await _until(lambda: not server._connections, "the half-message connection gone")
            whole = await ask(server, "big.weft.local.", tcp=True)
            assert sorted(addresses(whole)) == sorted(BIG)

    run(main())


def test_tcp_pipelining_idle_timeout_and_connection_cap() -> None:
    async def main() -> None:
        async with serving(tcp_limit=2, tcp_idle=0.3) as server:
            port = port_of(server)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            names = ("web.weft.local.", "db.weft.local.", "nosuch.weft.local.")
            queries = [dns.message.make_query(name, "A", id=i + 1) for i, name in enumerate(names)]
            writer.write(b"".join(q.to_wire(prepend_length=True) for q in queries))
            await writer.drain()
            got = {}
            for _ in queries:
                size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), TIMEOUT))[0]
                response = dns.message.from_wire(await reader.readexactly(size))
                got[response.id] = response
            assert sorted(addresses(got[queries[0].id])) == WEB
            assert addresses(got[queries[1].id]) == ["10.32.0.9"]
            assert got[queries[2].id].rcode() == dns.rcode.NXDOMAIN
            # Idle: closed by the server.
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            writer.close()
            await _until(lambda: not server._connections, "idle connection gone")
            server.tcp_idle = 60.0  # the rest holds connections open
            # Over the cap: closed at once; those under it still served.
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            await _until(lambda: len(server._connections) == 2, "two connections held")
            reader3, writer3 = await asyncio.open_connection("127.0.0.1", port)
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader3.read(), TIMEOUT) == b""
            writer3.close()
            r, w = held[0]
            w.write(queries[0].to_wire(prepend_length=True))
            size = struct.unpack("!H", await asyncio.wait_for(r.readexactly(2), TIMEOUT))[0]
            assert sorted(addresses(dns.message.from_wire(await r.readexactly(size)))) == WEB
            for _, w in held:
                w.close()

    run(main())


def test_counted_by_rcode() -> None:
    async def main() -> None:
        metrics = Metrics()
        async with serving(metrics=metrics) as server:
            await ask(server, "web.weft.local.")
            await ask(server, "web.weft.local.")  # the second time from the rendered-answer cache: counted too
            await ask(server, "nosuch.weft.local.")
            await ask(server, "nosuch.weft.local.")
            formerr = dns.message.from_wire(await _udp_exchange(server, b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 7))
            assert formerr.id == 0x1234 and formerr.rcode() == dns.rcode.FORMERR
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"\x12\x34\x01", ("127.0.0.1", port_of(server)))  # no whole header: no answer
                await _until(lambda: count(metrics, "dropped") == 1, "the short datagram counted")
        assert count(metrics, "NOERROR") == 2 and count(metrics, "NXDOMAIN") == 2 and count(metrics, "FORMERR") == 1

    run(main())


def test_start_fails_cleanly_on_a_taken_port() -> None:
    async def main() -> None:
        async with serving() as first:
            metrics = Metrics()
            upstream = Upstream(metrics, resolv_conf="/nonexistent/resolv.conf")
            second = DnsServer(default_table(), metrics, upstream=upstream, binds=[("127.0.0.1", port_of(first))])
            with pytest.raises(OSError):
                await second.start()
            assert second.addresses == []
            assert sorted(addresses(await ask(first, "web.weft.local."))) == WEB

    run(main())
