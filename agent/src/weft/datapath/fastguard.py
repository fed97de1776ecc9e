"""The fast path's guard: nftables rules that keep the VXLAN port for the peers the mesh put on it.

The kernel VXLAN device listens on every address and decapsulates whatever arrives: without a guard,
any host on the underlay could send frames into the bridge. The agent therefore owns one nftables table
per VXLAN port (``inet weft_fast_<port>``) with a set of the underlay addresses the kernel currently
sends fast traffic to, a set of the connected peers that may send us fast traffic (no secret, or both ends
trusting each other's subnet), and a set of the connected peers whose fast-path probes may cross (no secret, or
we trust their subnet: their trust of ours is not known before their first heartbeat). UDP to the VXLAN port
from the first two is accepted, probes (inner frames to 01:80:c2:00:00:0f, ethertype 0x88b5, which a bridge
never forwards) from the third, and everything else is dropped and counted. Accepting from every peer that may
use the fast path, not only from those we send to, matters because each end chooses its path from its own
probes: a peer may start sending on the fast path a round before we do, or for good when the underlay lets its
VXLAN packets through but not ours, and its frames must not be lost. A peer that does not trust our subnet never
sends us plaintext, so what comes in its name is not accepted. What leaves towards the VXLAN port is held
tighter: nothing goes to an address outside the fast set except our own probes (sent from the sleeve's socket:
source port = the listen port), so the path can be discovered.

A third pair of sets holds the fast-path addresses again, with a packet counter per element, matched by a rule of
its own that only counts unicast frames (to and from each peer): that is how the agent knows which fast paths carry
traffic, and probes them more often (see paths.py). Broadcast and multicast, which go to every fast peer, and the
probes do not count.

The table outlives the agent, like the FDB, so fast traffic keeps flowing while the agent restarts;
a starting agent reconciles it. Everything is done with ``nft -f -`` (one transaction each time): the
ruleset is rendered in one place, and set changes are diffs against what we last wrote.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterable

from weft.datapath.probe import ETHERTYPE, GROUP

log = logging.getLogger(__name__)

TABLE_PREFIX = "weft_fast_"
FAST_SETS = ("fast4", "fast6")
PROBE_SETS = ("probe4", "probe6")
PEER_SETS = ("peer4", "peer6")  # connected peers that may send us fast traffic (both ends trust, or no secret)
BUSY_SETS = ("busy4", "busy6")  # the fast sets again, counting the unicast frames to and from each address
# Counter name in nftables -> reason label of weft_datapath_packets_dropped_total.
COUNTERS = {"unknown_sender": "fast_unknown_sender", "unknown_dest": "fast_unknown_dest"}
COUNTER_CACHE = 1.0  # seconds a counter reading is reused: scrapes must stay cheap
_NFT_PATHS = ("/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft")


class GuardError(Exception):
    """The guard cannot be put in place; worded for the operator."""


def table_name(vxlan_port: int) -> str:
    """One table per VXLAN port: two agents in one namespace cannot share a VXLAN port anyway."""
    return f"{TABLE_PREFIX}{vxlan_port}"


def find_nft() -> str:
    """The ``nft`` command on PATH, or where distributions install it. (Looked up by hand, as ``shutil.which``
    would: shutil, with the compression modules it imports, would be about 0.5 MiB of the agent for this alone.)"""
    found = (p for p in (*(os.path.join(d, "nft") for d in os.get_exec_path()), *_NFT_PATHS) if _executable(p))
    path = next(found, None)
    if path is None:
        raise GuardError(
            "nftables is not installed (no `nft` command): install it (apt install nftables); "
            "the data plane guards the fast path's UDP port with nftables rules and does not run unguarded"
        )
    return path


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _family(ip: str) -> int:
    try:
        return ipaddress.ip_address(ip).version
    except ValueError:
        return 0


def _elements(ips: Iterable[str], version: int) -> list[str]:
    return sorted(ip for ip in ips if _family(ip) == version)


def render(
    vxlan_port: int, udp_port: int, fast: Iterable[str] = (), probe: Iterable[str] = (), peers: Iterable[str] = ()
) -> str:
    """The whole table, replaced in one transaction (the first line makes the delete always succeed)."""
    table = table_name(vxlan_port)
    fast, probe, peers = list(fast), list(probe), list(peers)
    is_probe = f"@th,128,48 0x{GROUP.hex()} @th,224,16 0x{ETHERTYPE:04x}"  # inner dst MAC and ethertype

    def define(name: str, kind: str, ips: list[str], counter: bool) -> str:
        elements = f" elements = {{ {', '.join(ips)} }};" if ips else ""
        return f"    set {name} {{ type {kind};{' counter;' if counter else ''}{elements} }}\n"

    sets = "".join(
        define(name, kind, _elements(ips, version), counter=names == BUSY_SETS)
        for names, ips in ((FAST_SETS, fast), (PROBE_SETS, probe), (BUSY_SETS, fast), (PEER_SETS, peers))
        for name, kind, version in ((names[0], "ipv4_addr", 4), (names[1], "ipv6_addr", 6))
    )
    unicast = "@th,128,8 & 0x1 == 0x0"  # the inner frame's destination MAC is a unicast one
    return (
        f"table inet {table} {{}}\n"
        f"delete table inet {table}\n"
        f"table inet {table} {{\n"
        f'    comment "weft: UDP {vxlan_port} (the fast path) only to and from the fast-path peers"\n'
        f"{sets}"
        "    counter unknown_sender { }\n"
        "    counter unknown_dest { }\n"
        "    chain input {\n"
        "        type filter hook input priority filter - 5; policy accept;\n"
        f"        udp dport {vxlan_port} {unicast} ip saddr @busy4\n"
        f"        udp dport {vxlan_port} {unicast} ip6 saddr @busy6\n"
        f"        udp dport {vxlan_port} ip saddr @fast4 accept\n"
        f"        udp dport {vxlan_port} ip6 saddr @fast6 accept\n"
        f"        udp dport {vxlan_port} ip saddr @peer4 accept\n"
        f"        udp dport {vxlan_port} ip6 saddr @peer6 accept\n"
        f"        udp dport {vxlan_port} ip saddr @probe4 {is_probe} accept\n"
        f"        udp dport {vxlan_port} ip6 saddr @probe6 {is_probe} accept\n"
        f'        udp dport {vxlan_port} counter name "unknown_sender" drop\n'
        "    }\n"
        "    chain output {\n"
        "        type filter hook output priority filter - 5; policy accept;\n"
        f"        udp dport {vxlan_port} {unicast} ip daddr @busy4\n"
        f"        udp dport {vxlan_port} {unicast} ip6 daddr @busy6\n"
        f"        udp dport {vxlan_port} ip daddr @fast4 accept\n"
        f"        udp dport {vxlan_port} ip6 daddr @fast6 accept\n"
        f"        udp sport {udp_port} udp dport {vxlan_port} ip daddr @probe4 {is_probe} accept\n"
        f"        udp sport {udp_port} udp dport {vxlan_port} ip6 daddr @probe6 {is_probe} accept\n"
        f'        udp dport {vxlan_port} counter name "unknown_dest" drop\n'
        "    }\n"
        "}\n"
    )


def render_changes(table: str, sets: tuple[str, str], add: Iterable[str], delete: Iterable[str]) -> str:
    """Element changes for one pair of sets (IPv4, IPv6) as nft commands; empty if nothing changes."""
    lines = []
    for verb, ips in (("add", add), ("delete", delete)):
        ips = list(ips)
        for name, version in ((sets[0], 4), (sets[1], 6)):
            chosen = _elements(ips, version)
            if chosen:
                lines.append(f"{verb} element inet {table} {name} {{ {', '.join(chosen)} }}\n")
    return "".join(lines)


class FastGuard:
    """The agent's nftables table for one VXLAN port, and the two address sets it keeps in sync."""

    def __init__(self, vxlan_port: int, udp_port: int, *, run: Callable[..., str] | None = None) -> None:
        self.vxlan_port = vxlan_port
        self.udp_port = udp_port
        self.table = table_name(vxlan_port)
        self._run = run or self._nft
        self._nft_path = "" if run is not None else find_nft()
        self.fast: set[str] = set()  # what the fast sets hold (we are their only writer)
        self.probe: set[str] = set()  # connected peers whose probes may cross
        self.peers: set[str] = set()  # connected peers that may send us fast traffic
        self._counts: dict[str, int] = {}  # the table's counters at the last reading
        self._base: dict[str, int] = {}  # what earlier incarnations of the table (this run) counted
        self._counted_at = -COUNTER_CACHE
        self._loaded = False

    def _nft(self, *args: str, script: str | None = None) -> str:
        cmd = [self._nft_path, *args] if script is None else [self._nft_path, "-f", "-"]
        try:
            proc = subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise GuardError(f"nft failed: {exc}") from None
        if proc.returncode != 0:
            raise GuardError(f"nft {' '.join(args) or '-f -'}: {proc.stderr.strip() or proc.returncode}")
        return proc.stdout

    def kept(self) -> set[str]:
        """The fast-path addresses the table holds from the last run (empty if there is no table)."""
        kept: set[str] = set()
        for name in FAST_SETS:
            try:
                out = self._run("-j", "list", "set", "inet", self.table, name)
            except GuardError:
                return set()
            kept.update(_set_elements(out))
        return kept

    def start(self, fast: Iterable[str]) -> None:
        """Put the table in place, atomically, admitting ``fast`` (what the kernel may still send to)."""
        self._load(set(fast), set(), set())

    def _load(self, fast: set[str], probe: set[str], peers: set[str]) -> None:
        if self._loaded:  # the counters start again from zero: keep what they counted so far
            self._base = self.dropped(fresh=True)
        self._run(script=render(self.vxlan_port, self.udp_port, fast, probe, peers))
        self._loaded = True
        self.fast, self.probe, self.peers = fast, probe, peers
        self._counts = {}

    def admit(self, fast: Iterable[str]) -> None:
        """Add fast-path addresses (before the kernel starts sending to them)."""
        self._apply(self.fast | set(fast), self.probe, self.peers)

    def sync(self, fast: Iterable[str], probe: Iterable[str], peers: Iterable[str] = ()) -> None:
        """Make the sets exactly ``fast``, ``probe`` and ``peers``, changing only what differs."""
        self._apply(set(fast), set(probe), set(peers))

    def _apply(self, fast: set[str], probe: set[str], peers: set[str]) -> None:
        script = (
            render_changes(self.table, FAST_SETS, fast - self.fast, self.fast - fast)
            + render_changes(self.table, BUSY_SETS, fast - self.fast, self.fast - fast)
            + render_changes(self.table, PROBE_SETS, probe - self.probe, self.probe - probe)
            + render_changes(self.table, PEER_SETS, peers - self.peers, self.peers - peers)
        )
        if not script:
            return
        try:
            self._run(script=script)
        except GuardError as exc:  # someone removed or changed our table: put it back as it should be
            log.warning("the fast-path guard's table %s was changed outside weft (%s); restoring it", self.table, exc)
            self._load(fast, probe, peers)
            return
        self.fast, self.probe, self.peers = fast, probe, peers

    def traffic(self) -> dict[str, int]:
        """Unicast frames the fast path carried to and from each fast-path address so far, from the busy sets'
        per-element counters; empty if they cannot be read (a table an earlier version loaded has no busy sets)."""
        counts: dict[str, int] = {}
        for name in BUSY_SETS:
            try:
                out = self._run("-j", "list", "set", "inet", self.table, name)
            except GuardError as exc:
                log.debug("cannot read the fast-path guard's per-peer counters: %s", exc)
                return {}
            counts.update(_set_elements(out))
        return counts

    def dropped(self, *, fresh: bool = False) -> dict[str, int]:
        """Packets the guard dropped this run, by reason; read from nftables at most once a second."""
        now = time.monotonic()
        if fresh or now - self._counted_at >= COUNTER_CACHE:
            self._counted_at = now
            try:
                out = self._run("-j", "list", "counters", "table", "inet", self.table)
                counts = {}
                for item in json.loads(out).get("nftables", []):
                    counter = item.get("counter", {})
                    if counter.get("name") in COUNTERS:
                        counts[COUNTERS[counter["name"]]] = int(counter.get("packets", 0))
                self._counts = counts
            except (GuardError, ValueError) as exc:
                log.debug("cannot read the fast-path guard's counters: %s", exc)
        return {k: self._base.get(k, 0) + self._counts.get(k, 0) for k in {*self._base, *self._counts}}


def _set_elements(out: str) -> dict[str, int]:
    """Address -> packets counted, from ``nft -j list set``: an element is an address, or with a counter
    ``{"elem": {"val": address, "counter": {...}}}``; anything else is skipped."""
    elements: dict[str, int] = {}
    try:
        items = json.loads(out).get("nftables", [])
    except (ValueError, AttributeError):
        return elements
    for item in items:
        for e in item.get("set", {}).get("elem", []) if isinstance(item, dict) else ():
            if isinstance(e, str):
                elements[e] = 0
            elif isinstance(e, dict) and isinstance(e.get("elem"), dict) and isinstance(e["elem"].get("val"), str):
                counter = e["elem"].get("counter")
                packets = counter.get("packets", 0) if isinstance(counter, dict) else 0
                elements[e["elem"]["val"]] = packets if isinstance(packets, int) else 0
    return elements


def remove(vxlan_port: int) -> bool:
    """Delete the guard's table (``weft reset``); False if there was none or nftables is missing."""
    try:
        nft = find_nft()
    except GuardError:
        return False
    table = table_name(vxlan_port)
    proc = subprocess.run([nft, "delete", "table", "inet", table], capture_output=True, text=True, check=False)
    return proc.returncode == 0
