"""Where the DNS server sends the names it does not answer itself: the host's resolvers.

The servers are the ``nameserver`` lines of the host's resolv.conf, read again when the file changes (looked at
no more than once a second, when a query needs them), or a fixed list (``--dns-upstream``). A query is tried on
each server in turn, all of them within one timeout; a server that is our own listening address is never used
(that would be a loop). Failures are counted in ``weft_dns_upstream_failures_total{reason}`` (docs/dns.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import dns.asyncbackend
import dns.asyncquery
import dns.exception
import dns.inet
import dns.message

from weft.mesh.address import ip_host_port, join_host_port
from weft.metrics import Metrics

log = logging.getLogger(__name__)

RESOLV_CONF = Path("/etc/resolv.conf")
DNS_PORT = 53
TIMEOUT = 2.0  # seconds for a whole forward, all servers included; below a stub's own (glibc: 5 s)
CHECK_INTERVAL = 1.0  # seconds between looks at resolv.conf
MAX_INFLIGHT = 256  # forwards waiting for an answer at once; beyond, a query gets SERVFAIL at once
FAILURE_REASONS = ("timeout", "unreachable", "bad_response", "no_servers", "busy")

Server = tuple[str, int]


def parse_server(text: str, default_port: int = DNS_PORT) -> Server:
    """``host[:port]`` (IPv6 as ``[addr]:port`` or bare) as ``(host, port)``; the host must be an IP address (a name
    would need DNS to be found). An AddressError (a ValueError) says what is wrong."""
    return ip_host_port(text, default_port, "DNS upstream")


def read_resolv_conf(text: str, port: int = DNS_PORT) -> list[Server]:
    """The ``nameserver`` addresses of a resolv.conf, in order; lines that are not an IP address are skipped."""
    servers: list[Server] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        if "%" in fields[1]:
            continue  # a scoped IPv6 address (fe80::1%eth0): not supported
        try:
            address = ipaddress.ip_address(fields[1])
        except ValueError:
            continue
        server = (str(address), port)
        if server not in servers:
            servers.append(server)
    return servers


class Upstream:
    def __init__(
        self,
        metrics: Metrics,
        *,
        resolv_conf: str | os.PathLike[str] = RESOLV_CONF,
        override: Sequence[str] | None = None,
        timeout: float = TIMEOUT,
        max_inflight: int = MAX_INFLIGHT,
        check_interval: float = CHECK_INTERVAL,
        port: int = DNS_PORT,
    ) -> None:
        """``override`` (``host[:port]`` strings, from ``--dns-upstream``) replaces resolv.conf when not empty;
        ``port`` is where resolv.conf's servers are asked (it has no way to say; 53 but in tests)."""
        self.path = Path(resolv_conf)
        self.port = port
        self.override = [parse_server(s) for s in override] if override else None
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.check_interval = check_interval
        self._failures = {reason: metrics.dns_upstream_failures.labels(reason) for reason in FAILURE_REASONS}
        self._own: set[Server] = set()
        self._wildcard_ports: set[int] = set()
        self._read: list[Server] = []
        self._stat: tuple[int, int, int, int] | None = None
        self._checked = -float("inf")
        self._servers: list[Server] = []
        self._inflight = 0
        self._refresh()

    def exclude(self, addresses: Iterable[Server]) -> None:
        """Our own listening addresses: never forwarded to. A wildcard address (0.0.0.0, ::) excludes every
        loopback and unspecified address on its port."""
        for host, port in addresses:
            address = ipaddress.ip_address(host)
            if address.is_unspecified:
                self._wildcard_ports.add(port)
            self._own.add((str(address), port))
        self._servers = self._usable(self.override if self.override is not None else self._read)

    def servers(self) -> list[Server]:
        """The servers a query is tried on now, in order (resolv.conf looked at if a second has passed)."""
        if self.override is None:
            now = time.monotonic()
            if now - self._checked >= self.check_interval:
                self._checked = now
                self._refresh()
        return self._servers

    def _refresh(self) -> None:
        if self.override is not None:
            self._servers = self._usable(self.override)
            return
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if self._stat != (0, 0, 0, 0):
                log.warning("DNS: cannot read %s (%s): names outside the domain get SERVFAIL", self.path, exc)
                self._stat, self._read, self._servers = (0, 0, 0, 0), [], []
            return
        stat = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        if stat == self._stat:
            return
        try:
            text = self.path.read_text(errors="replace")
        except OSError as exc:
            log.warning("DNS: cannot read %s (%s): keeping the upstream servers %s", self.path, exc, self._read)
            return
        self._stat = stat
        read = read_resolv_conf(text, self.port)
        if read != self._read:
            self._read = read
            self._servers = self._usable(read)
            dropped = [s for s in read if s not in self._servers]
            log.info(
                "DNS: upstream servers from %s: %s%s",
                self.path,
                ", ".join(_show(s) for s in self._servers) or "none",
                f" (not {', '.join(_show(s) for s in dropped)}: our own address)" if dropped else "",
            )

    def _usable(self, servers: list[Server]) -> list[Server]:
        return [s for s in servers if not self._is_own(s)]

    def _is_own(self, server: Server) -> bool:
        if server in self._own:
            return True
        address = ipaddress.ip_address(server[0])
        return server[1] in self._wildcard_ports and (address.is_loopback or address.is_unspecified)

    async def forward(self, query: dns.message.Message, *, tcp: bool) -> dns.message.Message | None:
        """The first answer of a server to ``query`` (with the query's ID), or None when none answered in time.

        The query goes out under an ID of our own, so a client cannot choose what an off-path forger must guess;
        ``query`` is as it was when this returns.
        """
        servers = self.servers()
        if not servers:
            self._failures["no_servers"].inc()
            return None
        if self._inflight >= self.max_inflight:
            self._failures["busy"].inc()
            return None
        self._inflight += 1
        qid = query.id
        query.id = random.getrandbits(16)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            for i, (host, port) in enumerate(servers):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                share = remaining / (len(servers) - i)  # a dead first server leaves time for the others
                try:
                    response = await (_tcp if tcp else _udp)(query, host, port, share)
                except dns.exception.Timeout:
                    self._failures["timeout"].inc()
                except OSError:  # refused (ICMP port unreachable), no route
                    self._failures["unreachable"].inc()
                except Exception:  # an answer we cannot parse, or one to another question
                    self._failures["bad_response"].inc()
                else:
                    response.id = qid
                    return response
            return None
        finally:
            query.id = qid
            self._inflight -= 1


async def _udp(query: dns.message.Message, host: str, port: int, timeout: float) -> dns.message.Message:
    # A connected socket: a port with no server answers with ICMP, which ends the try at once.
    backend = dns.asyncbackend.get_backend("asyncio")
    af = dns.inet.af_for_address(host)
    sock = await backend.make_socket(af, socket.SOCK_DGRAM, 0, None, (host, port))
    try:
        # Datagrams that are not an answer to this query (forgeries, garbage) are skipped until the timeout.
        return await dns.asyncquery.udp(
            query, host, timeout=timeout, port=port, sock=sock, ignore_unexpected=True, ignore_errors=True
        )
    finally:
        await sock.close()


async def _tcp(query: dns.message.Message, host: str, port: int, timeout: float) -> dns.message.Message:
    try:
        return await asyncio.wait_for(dns.asyncquery.tcp(query, host, timeout=timeout, port=port), timeout)
    except TimeoutError:
        raise dns.exception.Timeout(timeout=timeout) from None


def _show(server: Server) -> str:
    host, port = server
    if port != DNS_PORT:
        return join_host_port(host, port)
    return f"[{host}]" if ":" in host else host
