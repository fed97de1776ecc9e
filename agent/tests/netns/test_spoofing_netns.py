"""A container cannot take another container's traffic by sending frames with its source MAC and taking its IP.

The attacker changes its interface MAC to the victim's, adds the victim's address and keeps announcing both with
gratuitous ARP from a packet socket. Whether it sits on the victim's host or on another one, it must receive none
of the victim's traffic, the victim must keep answering, the forged frames are counted and logged, and no host
starts claiming the victim's MAC (which every other host would see as a conflict).
"""

from __future__ import annotations

import json
import re
import sys
import time

import pytest
from lab import Container, Host, Lab, metric_value, wait_until

pytestmark = pytest.mark.netns

SECRET = "spoofing-test-secret"
FORGED = "forged_source_mac"

# Gratuitous ARP replies from a packet socket: "IP is at MAC", with MAC as the frame's source.
GARP = """
import socket, sys, time
mac, ip, seconds = bytes.fromhex(sys.argv[1].replace(":", "")), socket.inet_aton(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("ethwe", 0))
bcast = b"\\xff" * 6
arp = b"\\x00\\x01\\x08\\x00\\x06\\x04\\x00\\x02" + mac + ip + bcast + ip
frame = bcast + mac + b"\\x08\\x06" + arp
end = time.monotonic() + seconds
while time.monotonic() < end:
    s.send(frame)
    time.sleep(0.02)
"""


def start_mesh(lab: Lab, *, secret: bool) -> list[Host]:
    hosts = lab(3)
    for h in hosts:
        h.start_agent(peers=[o for o in hosts if o is not h], secrets=[SECRET] if secret else [])
    for h in hosts:
        h.wait_ready()
    wait_until(lambda: all(len(h.status()["peers"]) == 3 for h in hosts), timeout=20, message="hosts did not meet")
    return hosts


def echo_requests(c: Container) -> int:
    """ICMP echo requests this container's stack received (/proc/net/snmp is per namespace)."""
    lines = [line.split() for line in c.exec("cat", "/proc/net/snmp").stdout.splitlines() if line.startswith("Icmp:")]
    return int(lines[1][lines[0].index("InEchos")])


def guarded_pairs(h: Host) -> int | None:
    """How many (port, MAC) pairs the host's port guard allows; None if it has no guard table."""
    res = h.exec("nft", "-j", "list", "set", "bridge", "weft_portguard", "allowed", check=False)
    if res.returncode != 0:
        return None
    sets = [o["set"] for o in json.loads(res.stdout)["nftables"] if "set" in o]
    return len(sets[0].get("elem", []))


def forged_drops(h: Host) -> float:
    return metric_value(h.metrics(), "weft_datapath_packets_dropped", reason=FORGED)


def take_over(attacker: Container, victim: Container, seconds: float) -> None:
    """The attacker becomes the victim: its MAC, its address, and ARP saying so."""
    mac = victim.mac()
    attacker.exec("ip", "link", "set", "ethwe", "address", mac)
    attacker.exec("ip", "addr", "add", victim.cidr, "dev", "ethwe")
    attacker.popen(sys.executable, "-c", GARP, mac, victim.ip, str(seconds))


def assert_victim_keeps_its_traffic(
    hosts: list[Host], client: Container, victim: Container, attacker: Container
) -> None:
    victim_before, attacker_before = echo_requests(victim), echo_requests(attacker)
    dropped_before = forged_drops(attacker.host)
    take_over(attacker, victim, seconds=12)
    time.sleep(3)  # let the forged ARP do whatever it can: learning, gossip, every host repointing
    replies = sum(client.ping(victim, timeout=1) for _ in range(10))
    assert replies >= 9, f"the victim answered only {replies} of 10 pings while {attacker} forged its MAC"
    assert echo_requests(attacker) == attacker_before, f"{attacker} received pings meant for {victim}"
    assert echo_requests(victim) - victim_before >= replies
    wait_until(
        lambda: forged_drops(attacker.host) > dropped_before,
        timeout=10,
        message=f"{attacker.host.name}: no forged frames counted",
    )
    mac = victim.mac()
    pattern = re.compile(rf"forged source MAC on container port vwe[0-9a-f]+: .*{mac} x\d+")
    wait_until(
        lambda: pattern.search(attacker.host.agent_log()),
        timeout=20,
        message=f"{attacker.host.name}: no log line about the forged MAC",
    )
    for h in hosts:  # had the attacker's host gossiped the victim's MAC, every host would see two claims
        status = h.status()
        assert status["mac_conflicts"] == [], f"{h.name}: {status['mac_conflicts']}"
        assert metric_value(h.metrics(), "weft_mac_conflicts") == 0


@pytest.mark.parametrize("secret", [False, True], ids=["plain", "secret"])
def test_a_container_forging_another_ones_mac_gets_none_of_its_traffic(lab: Lab, secret: bool) -> None:
    h1, h2, h3 = hosts = start_mesh(lab, secret=secret)
    victim = h1.add_container("10.32.1.1/16")
    neighbour = h1.add_container("10.32.1.2/16")  # attacks from the victim's own host
    remote = h2.add_container("10.32.2.1/16")  # attacks from another host
    client = h3.add_container("10.32.3.1/16")
    for c in (victim, neighbour, remote):
        wait_until(lambda c=c: client.ping(c), timeout=20, message=f"{client} cannot ping {c}")

    assert_victim_keeps_its_traffic(hosts, client, victim, neighbour)
    assert_victim_keeps_its_traffic(hosts, client, victim, remote)

    # The guard outlives the agent (containers stay guarded while it is down), a new run rebuilds it, and
    # `weft reset` removes it.
    h1.kill_agent()
    assert guarded_pairs(h1) >= 2, "the guard went with the agent"
    h1.start_agent(peers=[h2, h3], secrets=[SECRET] if secret else [])
    h1.wait_ready()
    wait_until(lambda: client.ping(victim), timeout=20, message="victim unreachable after a restart")
    before = echo_requests(neighbour)
    neighbour.popen(sys.executable, "-c", GARP, victim.mac(), victim.ip, "3")
    assert sum(client.ping(victim, timeout=1) for _ in range(5)) >= 4
    assert echo_requests(neighbour) == before
    h1.kill_agent()
    reset = [sys.executable, "-m", "weft.cli", "--api-socket", str(h1.api_socket), "reset"]
    assert "nftables table bridge weft_portguard" in h1.exec(*reset).stdout
    assert guarded_pairs(h1) is None


def test_a_mac_attached_on_two_hosts_is_a_visible_conflict_and_the_lowest_name_keeps_it(lab: Lab) -> None:
    h1, h2, h3 = hosts = start_mesh(lab, secret=False)
    victim = h1.add_container("10.32.1.1/16")
    twin = h2.add_container("10.32.2.1/16")
    client = h3.add_container("10.32.3.1/16")
    wait_until(lambda: client.ping(victim), timeout=20, message="victim unreachable")
    mac = victim.mac()

    same_host = h1.add_container("10.32.1.2/16")
    same_host.exec("ip", "link", "set", "ethwe", "address", mac)
    refused = h1.cli("attach", "--netns", same_host.netns, same_host.cidr, check=False)
    assert refused.returncode != 0 and f"MAC {mac} is already attached" in refused.stderr, refused.stderr

    # An operator re-attaches a container whose MAC was changed to the victim's: now two hosts claim it.
    twin.exec("ip", "link", "set", "ethwe", "address", mac)
    h2.cli("attach", "--netns", twin.netns, twin.cidr)
    expected = [{"mac": mac, "peers": [h1.agent_name, h2.agent_name], "owner": h1.agent_name}]
    for h in hosts:
        wait_until(lambda h=h: h.status()["mac_conflicts"] == expected, timeout=15, message=f"{h.name}: no conflict")
        assert metric_value(h.metrics(), "weft_mac_conflicts") == 1
        assert h.agent_log().count(f"MAC conflict: {mac} is claimed by peers") == 1
    summary = h3.cli("status").stdout
    assert f"MACConflict: {mac} claimed by {h1.agent_name}, {h2.agent_name}; owner {h1.agent_name}" in summary
    before = echo_requests(twin)
    assert sum(client.ping(victim, timeout=1) for _ in range(5)) >= 4, "the lowest name keeps the MAC"
    assert echo_requests(twin) == before

    h2.cli("detach", "--netns", twin.netns)
    for h in hosts:
        wait_until(lambda h=h: h.status()["mac_conflicts"] == [], timeout=15, message=f"{h.name}: conflict stayed")
        assert metric_value(h.metrics(), "weft_mac_conflicts") == 0
