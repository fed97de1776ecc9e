"""DNS with real agents in network namespaces: names across hosts, round robin, removal, restarts, a late joiner,
upstream servers, and the DNS address kept off the overlay. Containers ask with the real ``dig`` through the
resolv.conf that ``weft attach --name`` points at their agent, and ping by name.

The table's merge rules, tombstone purge and stale entries are tested in virtual time (unit/test_dns_service.py), the
server's protocol and hostile packets with a table of its own (unit/test_dns_server.py); here, the agent put together.
"""

from __future__ import annotations

import re
import shutil
import signal
import time

import pytest
from lab import Container, Host, Lab, metric_value, wait_until

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("dig") is None, reason="dig (dnsutils) is not installed"),
]

DNS_ADDRESS = "169.254.53.53"
QUIET = ("--log-level", "info")
FAST = {"WEFT_HEARTBEAT_INTERVAL": "1", "WEFT_READ_TIMEOUT": "4", "WEFT_MAX_BACKOFF": "1"}


def seed_of(hosts: list[Host]) -> str:
    return "seed=" + ",".join(h.agent_name for h in hosts)


def start(hosts: list[Host], *args: str, env: dict[str, str] | None = None) -> None:
    for h in hosts:
        h.start_agent(*QUIET, "--ipalloc-init", seed_of(hosts), *args, peers=[o for o in hosts if o is not h], env=env)
    for h in hosts:
        h.wait_ready(timeout=30)
    wait_until(lambda: all(len(h.status()["peers"]) == len(hosts) for h in hosts), timeout=30, message="no mesh")


def named(h: Host, name: str) -> Container:
    """A container on ``h`` attached with no address and ``--name``."""
    index = len(h.containers) + 1
    netns = f"{h.netns}c{index}"
    h.lab._add_netns(netns)
    out = h.cli("attach", "--netns", netns, "--name", name).stdout
    address = out.split(": ", 1)[1].split()[0].split("/")[0]
    c = Container(h, f"{h.name}c{index}", netns, address, address + "/12")
    h.containers.append(c)
    return c


def dig(c: Container, name: str, *extra: str) -> list[str]:
    """The A records ``c`` is told for ``name``, in the order given, through its own resolv.conf."""
    res = c.exec("dig", "+short", "+time=2", "+tries=1", *extra, name, check=False)
    return [line for line in res.stdout.split() if line and line[0].isdigit()]


def rcode(c: Container, name: str, qtype: str = "A") -> str:
    res = c.exec("dig", "+time=2", "+tries=1", name, qtype, check=False)
    for line in res.stdout.splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    return f"no answer: {res.stdout[-200:]} {res.stderr[-200:]}"


# -- names across hosts ----------------------------------------------------------------------------------------------


def test_containers_on_three_hosts_resolve_and_ping_each_other_by_name(lab: Lab) -> None:
    hosts = lab(3)
    start(hosts)
    containers = [named(h, f"app{i}") for i, h in enumerate(hosts, 1)]
    for c in containers:
        assert c.exec("cat", "/etc/resolv.conf").stdout.splitlines()[1:] == [
            f"nameserver {DNS_ADDRESS}",
            "search weft.local",
        ]
    for asker in containers:
        for i, other in enumerate(containers, 1):
            wait_until(
                lambda a=asker, i=i, o=other: dig(a, f"app{i}") == [o.ip],
                timeout=5,
                message=f"{asker.name} does not resolve app{i} to {other.ip}",
            )
            assert dig(asker, f"app{i}.weft.local") == [other.ip]
            assert dig(asker, f"APP{i}.Weft.Local") == [other.ip]  # names are case-insensitive
            wait_until(  # the first packets may wait for the data path between two hosts that just met
                lambda a=asker, i=i: a.exec("ping", "-c", "1", "-W", "2", f"app{i}", check=False).returncode == 0,
                timeout=15,
                message=f"{asker.name} cannot ping app{i} by name",
            )
    # Reverse lookups of overlay addresses, from any host.
    c1, c3 = containers[0], containers[2]
    assert c1.exec("dig", "+short", "-x", c3.ip).stdout.split() == ["app3.weft.local."]
    # AAAA of a known name: no answer, no error; an unknown name in the domain: NXDOMAIN.
    assert rcode(c1, "app2.weft.local", "AAAA") == "NOERROR"
    assert c1.exec("dig", "+short", "app2.weft.local", "AAAA").stdout.strip() == ""
    assert rcode(c1, "nobody.weft.local") == "NXDOMAIN"
    text = hosts[0].cli("status", "dns").stdout
    for i in (1, 2, 3):
        assert f"app{i}.weft.local." in text, text


def test_three_containers_named_web_are_answered_in_turn(lab: Lab) -> None:
    hosts = lab(3)
    start(hosts)
    webs = [named(h, "web") for h in hosts]
    asker = named(hosts[0], "client")
    want = sorted(c.ip for c in webs)
    wait_until(lambda: sorted(dig(asker, "web")) == want, timeout=5, message="web does not have all three addresses")
    firsts = [dig(asker, "web.weft.local")[0] for _ in range(30)]
    assert len(set(firsts)) >= 3, firsts


# -- removal ---------------------------------------------------------------------------------------------------------


def test_a_detached_containers_name_goes_from_every_host_within_2_s(lab: Lab) -> None:
    hosts = lab(3)
    start(hosts)
    gone = named(hosts[0], "leaving")
    askers = [named(h, f"asker-{h.name}") for h in hosts[1:]]
    wait_until(lambda: all(dig(a, "leaving") == [gone.ip] for a in askers), timeout=5, message="not resolved")
    began = time.monotonic()
    hosts[0].cli("detach", "--netns", gone.netns)
    wait_until(
        lambda: all(rcode(a, "leaving.weft.local") == "NXDOMAIN" for a in askers),
        timeout=2.0,
        message="a host still answers the detached container's name after 2 s",
    )
    took = time.monotonic() - began
    assert hosts[0].exec("test", "-e", f"/etc/netns/{gone.netns}/resolv.conf", check=False).returncode != 0
    print(f"\nname gone from every host {took:.2f}s after detach")


def test_a_killed_hosts_names_go_when_it_leaves_the_topology_and_come_back_on_resume(lab: Lab) -> None:
    h1, h2, h3 = lab(3)
    start([h1, h2, h3], env=FAST)
    c3 = named(h3, "db")
    gone = named(h3, "cache")
    asker = named(h1, "client")
    wait_until(lambda: dig(asker, "db") == [c3.ip], timeout=5, message="db not resolved")
    h3.kill_agent(signal.SIGKILL)
    h3.exec("ip", "netns", "del", gone.netns)  # a container that goes while its agent is down
    wait_until(
        lambda: rcode(asker, "db.weft.local") == "NXDOMAIN",
        timeout=30,
        message="the killed host's name is still answered after it left the topology",
    )
    # Its container is still attached: restarted with --resume, the agent registers its name again.
    h3.start_agent(*QUIET, "--ipalloc-init", seed_of([h1, h2, h3]), peers=[h1, h2], env=FAST, resume=True)
    h3.wait_ready(timeout=30)
    wait_until(lambda: dig(asker, "db") == [c3.ip], timeout=20, message="db did not come back after the restart")
    assert rcode(asker, "cache.weft.local") == "NXDOMAIN"  # its container went while the agent was down


def test_a_host_that_joins_later_learns_the_whole_table(lab: Lab) -> None:
    h1, h2, h3, h4 = lab(4)
    start([h1, h2, h3])
    for i, h in enumerate((h1, h2, h3)):
        for j in range(3):
            named(h, f"svc{i}-{j}")
    h4.start_agent(*QUIET, "--ipalloc-init", "observer", peers=[h1])
    h4.wait_ready(timeout=30)
    late = named(h4, "late")
    for i in range(3):
        for j in range(3):
            wait_until(lambda n=f"svc{i}-{j}": len(dig(late, n)) == 1, timeout=10, message=f"h4 lacks svc{i}-{j}")
    wait_until(lambda: dig(h1.containers[0], "late") == [late.ip], timeout=5, message="h1 lacks h4's name")


# -- upstream --------------------------------------------------------------------------------------------------------


def test_names_outside_the_domain_go_upstream_and_a_dead_upstream_gives_servfail(lab: Lab) -> None:
    (h1,) = lab(1)
    # An upstream served in h1's namespace (its loopback): dnsmasq answering one zone from the command line.
    upstream = h1.popen(
        "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
        "--listen-address=127.0.0.1", "--port=5353", "--address=/example.test/192.0.2.7", "--user=root",
        log_name="dnsmasq.log",
    )  # fmt: skip
    wait_until(lambda: _port_open(h1, 5353), timeout=10, message="dnsmasq did not start")
    h1.start_agent(*QUIET, "--dns-upstream", "127.0.0.1:5353")
    h1.wait_ready()
    c = named(h1, "here")
    assert dig(c, "www.example.test") == ["192.0.2.7"]
    upstream.kill()
    upstream.wait(5)
    began = time.monotonic()
    assert rcode(c, "other.example.test") == "SERVFAIL"
    assert time.monotonic() - began < 2.0 + 3.0  # the upstream timeout (2 s), with room for a busy machine
    assert metric_value(h1.metrics(), "weft_dns_upstream_failures_total") >= 1


# Broadcast an ARP request for an address three times from an interface; print each MAC that answers.
ARP_WHO_HAS = """
import socket, struct, sys, time
ifname, target = sys.argv[1], socket.inet_aton(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind((ifname, 0x0806))
mac = s.getsockname()[4]
src = socket.inet_aton("0.0.0.0")
arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, src, bytes(6), target)
frame = b"\\xff" * 6 + mac + b"\\x08\\x06" + arp
s.settimeout(0.2)
seen = set()
end = time.monotonic() + 2.0
for _ in range(3):
    s.send(frame)
while time.monotonic() < end:
    try:
        data = s.recv(2048)
    except TimeoutError:
        continue
    if len(data) >= 42 and data[20:22] == b"\\x00\\x02" and data[28:32] == target:
        seen.add(data[22:28].hex(":"))
print(" ".join(sorted(seen)))
"""


def _port_open(h: Host, port: int) -> bool:
    res = h.exec("ss", "-Hlun", f"sport = :{port}", check=False)
    return bool(res.stdout.strip())


# -- the address, and hostile containers -----------------------------------------------------------------------------


def test_only_the_containers_own_host_answers_at_the_dns_address(lab: Lab) -> None:
    """Every host holds 169.254.53.53 on its bridge: a container's ARP for it, flooded on the overlay, must be
    answered by its own host alone, and no packet to or from it crosses."""
    h1, h2 = lab(2)
    start([h1, h2])
    c1 = named(h1, "one")
    named(h2, "two")
    macs = c1.exec(h1.python, "-c", ARP_WHO_HAS, "ethwe", DNS_ADDRESS, timeout=30).stdout.split()
    bridge_mac = h1.exec("cat", "/sys/class/net/weft/address").stdout.strip().lower()
    assert set(macs) == {bridge_mac}, macs
    dropped = h2.exec("nft", "list", "table", "bridge", "weft_dns").stdout
    dropped1 = h1.exec("nft", "list", "table", "bridge", "weft_dns").stdout
    assert "counter packets 0" in dropped  # nothing naming the address reached h2 from the overlay...
    assert any(f"packets {n}" in dropped1 for n in range(1, 100)), (
        dropped1
    )  # ...because h1 dropped the ARP requests on its way out


def _dropped(h: Host, chain: str, match: str) -> int:
    """Packets the DNS address guard's rule ``match`` (e.g. "ip daddr") dropped in ``chain`` on ``h``."""
    for line in h.exec("nft", "list", "chain", "bridge", "weft_dns", chain).stdout.splitlines():
        if line.strip().startswith(f"{match} {DNS_ADDRESS}"):
            return int(re.search(r"packets (\d+)", line)[1])
    raise AssertionError(f"{h.name}: no rule {match} {DNS_ADDRESS} in {chain}")


def _send_to_dns_address_at(src: Container, dst: Container) -> None:
    """Three pings from ``src`` to the DNS address, sent over the overlay to ``dst``'s MAC (a forged neighbour)."""
    src.exec("ip", "neigh", "replace", DNS_ADDRESS, "lladdr", dst.mac(), "dev", "ethwe")
    src.exec("ip", "route", "replace", f"{DNS_ADDRESS}/32", "dev", "ethwe")
    src.exec("ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", DNS_ADDRESS, check=False, timeout=20)


def _forwards_to(h: Host, mac: str) -> bool:
    """Whether ``h``'s bridge has the agent's static entry for ``mac`` (else a frame to it is flooded to every
    overlay port, and each copy meets the guard)."""
    return any(
        line.startswith(mac.lower()) and "static" in line
        for line in h.exec("bridge", "fdb", "show", "br", "weft").stdout.splitlines()
    )


def test_ip_packets_naming_the_dns_address_never_cross_the_overlay(lab: Lab) -> None:
    """IP packets to the address, sent towards another host, are dropped on the way out of the sender's host; a host
    that let them out (its own guard gone) would see them dropped on the way into the receiver's. Traffic that does
    not name the address passes the same chains."""
    h1, h2 = lab(2)
    start([h1, h2])
    c1, c2 = named(h1, "one"), named(h2, "two")
    wait_until(lambda: c1.ping(c2), timeout=30, message="no path between the containers")
    # Counted once per packet only when it goes out of one port: the MACs' entries first (a ping works before them).
    wait_until(lambda: _forwards_to(h1, c2.mac()) and _forwards_to(h2, c1.mac()), timeout=30, message="no FDB entry")
    _send_to_dns_address_at(c1, c2)
    assert _dropped(h1, "to_overlay", "ip daddr") == 3
    assert _dropped(h2, "from_overlay", "ip daddr") == 0  # nothing reached h2
    h2.exec("nft", "flush", "chain", "bridge", "weft_dns", "to_overlay")
    _send_to_dns_address_at(c2, c1)
    assert _dropped(h1, "from_overlay", "ip daddr") == 3
    assert c1.ping(c2, count=3) and c2.ping(c1, count=3)


def test_hostile_dns_packets_are_counted_and_change_nothing(lab: Lab) -> None:
    """10,000 malformed packets and DNS UPDATEs from a container: counted, the agent answers as before, and no
    update reaches the table (a container cannot name an address it does not own)."""
    (h1,) = lab(1)
    h1.start_agent(*QUIET)
    h1.wait_ready()
    victim = named(h1, "victim")
    attacker = named(h1, "attacker")
    script = f"""
import random, socket, struct, dns.update, dns.rcode, dns.message, dns.query
r = random.Random(7)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = 0
for i in range(10000):
    kind = i % 4
    if kind == 0:
        data = r.randbytes(r.randrange(0, 600))
    elif kind == 1:
        data = struct.pack("!HHHHHH", i, 0, 1, 0, 0, 0) + b"\\xc0\\x0c" + b"\\x00\\x01\\x00\\x01"  # a pointer to itself
    elif kind == 2:
        data = struct.pack("!HHHHHH", i, 0, 65535, 65535, 65535, 65535) + r.randbytes(40)  # huge counts
    else:
        good = dns.message.make_query("victim.weft.local", "A").to_wire()
        data = good[: r.randrange(1, len(good))]  # truncated
    s.sendto(data, ("{DNS_ADDRESS}", 53))
    sent += 1
    if i % 200 == 199:  # a real question now and then, answered once the agent has read all before it
        ok = dns.query.udp(dns.message.make_query("victim.weft.local", "A"), "{DNS_ADDRESS}", timeout=10)
        assert ok.answer[0][0].address == "{victim.ip}", ok
u = dns.update.UpdateMessage("weft.local.")
u.replace("victim", 30, "A", "{attacker.ip}")
answer = dns.query.udp(u, "{DNS_ADDRESS}", timeout=3)
print(sent, dns.rcode.to_text(answer.rcode()))
"""
    out = attacker.exec(h1.python, "-c", script, timeout=120).stdout.split()
    assert out == ["10000", "REFUSED"], out
    assert dig(attacker, "victim") == [victim.ip]
    metrics = h1.metrics()
    counted = metric_value(metrics, "weft_dns_queries_total")  # every message, whatever became of it
    assert counted >= 10000 + 50 + 1  # the hostile ones, the questions between them, the update
    assert h1.agent_running()


def test_dns_can_be_turned_off(lab: Lab) -> None:
    (h1,) = lab(1)
    h1.start_agent(*QUIET, "--no-dns")
    h1.wait_ready()
    res = h1.cli("attach", "--netns", "x", "--name", "web", check=False)
    assert res.returncode != 0 and "DNS is off on this agent" in res.stderr
    assert "off (dns: false)" in h1.cli("status", "dns").stdout
    assert DNS_ADDRESS not in h1.exec("ip", "addr", "show", "weft").stdout


def test_names_that_are_no_containers_are_added_and_removed_from_the_cli(lab: Lab) -> None:
    h1, h2 = lab(2)
    start([h1, h2])
    asker = named(h2, "asker")
    assert h1.cli("dns-add", "db", "10.32.9.9", "10.32.9.10").stdout.split() == [
        "db.weft.local.",
        "10.32.9.9",
        "10.32.9.10",
    ]
    wait_until(lambda: sorted(dig(asker, "db")) == ["10.32.9.10", "10.32.9.9"], timeout=5, message="db not resolved")
    bad = h1.cli("dns-add", "x", "127.0.0.1", check=False)
    assert bad.returncode == 1 and "127.0.0.1 is a loopback address" in bad.stderr
    assert "removed 10.32.9.9" in h1.cli("dns-remove", "db", "10.32.9.9").stdout
    wait_until(lambda: dig(asker, "db") == ["10.32.9.10"], timeout=5, message="10.32.9.9 still answered")
    h1.cli("dns-remove", "db")
    assert "nothing to remove" in h1.cli("dns-remove", "db").stdout
    assert h1.cli("dns-lookup", "db", check=False).returncode == 1
