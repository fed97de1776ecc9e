"""The agent's Prometheus metrics, on a registry of its own so many agents can share a process."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator

from weft.promtext import Counter, Family, Gauge, Registry, Sample


class Metrics:
    def __init__(self) -> None:
        self.registry = Registry()
        r = self.registry
        self.peers = Gauge("weft_peers", "Peers in this agent's view of the mesh, itself included", registry=r)
        self.peers_changed = Gauge(
            "weft_peers_changed_timestamp_seconds",
            "When this agent's view of the mesh last gained or lost a peer (Unix time)",
            registry=r,
        )
        self.connections = Gauge(
            "weft_connections", "Control connections by state and encryption", ["state", "encrypted"], registry=r
        )
        self.terminations = Counter(
            "weft_connection_terminations_total", "Established connections that ended", registry=r
        )
        # Counted on every gossip message, so kept as plain integers (a labelled counter takes a lock for each
        # increment) and exported as a counter when scraped.
        self.gossip_bytes: defaultdict[tuple[str, str], int] = defaultdict(int)
        r.register(
            _plain_counters(
                "weft_gossip_bytes", "Gossip payload bytes by channel and direction", ("channel", "direction"),
                self.gossip_bytes,
            )
        )  # fmt: skip
        self.handshake_failures = Counter(
            "weft_handshake_failures",
            "Control connections that failed before becoming a peer connection",
            ["reason"],
            registry=r,
        )
        self.decode_errors = Counter(
            "weft_decode_errors", "Malformed input dropped, by what failed to decode", ["kind"], registry=r
        )
        self.refused = Counter(
            "weft_connections_refused",
            "Inbound connections refused before the handshake",
            ["reason"],
            registry=r,
        )
        self.discovery_held = Gauge(
            "weft_discovery_held",
            "Discovered peers not dialled, by reason: own_limit (this agent is at conn_limit), peer_full (the peer"
            " said it is at its own), view_settling (this agent's view of the mesh is still growing: dialled once it"
            " settles)",
            ["reason"],
            registry=r,
        )
        self.discovery_window = Gauge(
            "weft_discovery_dial_window",
            "Discovered peers this agent dials at a time: halved when a handshake times out (this agent or its peers"
            " too busy to finish one), grown by one with each that succeeds",
            registry=r,
        )
        self.gossip_dropped = Counter(
            "weft_gossip_dropped", "Gossip messages dropped, by reason", ["reason"], registry=r
        )
        self.gossip_unknown_relayed = Counter(
            "weft_gossip_unknown_relayed",
            "Gossip on channels this agent does not have, passed on to other peers, by type (broadcast, unicast)",
            ["type"],
            registry=r,
        )
        self.overlay_refused = Counter(
            "weft_overlay_refused",
            "attach/detach/expose/hide requests refused (nothing changed), by action and reason",
            ["action", "reason"],
            registry=r,
        )

        self.api_connections = Gauge(
            "weft_api_connections", "Open connections to the agent's API listeners", ["listener"], registry=r
        )
        self.api_refused = Counter(
            "weft_api_connections_refused",
            "API connections closed unanswered, by listener and reason (conn_limit, timeout, too_large, bad_request)",
            ["listener", "reason"],
            registry=r,
        )
        self.accept_errors = Counter(
            "weft_accept_errors",
            "Times a listener could not accept for lack of resources (EMFILE: out of open files)",
            ["reason"],
            registry=r,
        )

        self.reload_failures = Counter(
            "weft_config_reload_failures", "SIGHUP reloads refused because the new config was invalid", registry=r
        )

        self.mac_conflicts = Gauge(
            "weft_mac_conflicts", "MAC addresses that more than one peer claims as its own", registry=r
        )
        self.e2e_agreements = Counter(
            "weft_e2e_agreements",
            "End-to-end key agreements with peers reached through relays: inits sent, answered, completed, passed on"
            " (as a relay), and those refused, by reason",
            ["event"],
            registry=r,
        )
        self.e2e_peers = Gauge(
            "weft_e2e_peers", "Peers reached through relays whose frames this host seals end to end", registry=r
        )

        self.ipam_addresses = Gauge(
            "weft_ipam_addresses",
            "Addresses of the allocation range this peer owns, has allocated, and has free",
            ["state"],
            registry=r,
        )
        self.ipam_unreachable_ratio = Gauge(
            "weft_ipam_unreachable_ratio",
            "Share of the allocation range owned by peers this one cannot reach (weft rmpeer the dead ones)",
            registry=r,
        )
        self.ipam_pending = Gauge(
            "weft_ipam_pending_allocations", "Allocations waiting for a ring or for space from a peer", registry=r
        )
        self.ipam_refused = Counter(
            "weft_ipam_refused_updates",
            "IPAM ring updates refused: another range or seed, or one that would take allocated addresses",
            ["reason"],
            registry=r,
        )
        self.ipam_space_requests = Counter(
            "weft_ipam_space_requests", "Space requests sent, granted and denied by this peer", ["result"], registry=r
        )

        # The DNS name table (weft.dns.service; docs/dns.md, "Table").
        self.dns_entries = Gauge(
            "weft_dns_entries", "Live DNS entries this peer answers (their origin is in its topology)", registry=r
        )
        self.dns_refused = Counter(
            "weft_dns_refused_updates",
            "DNS entries from peers refused, one by one: an address no container has, naming this peer, table full",
            ["reason"],
            registry=r,
        )

        # The DNS server (weft.dns.server, weft.dns.upstream; docs/dns.md, "Server").
        self.dns_queries = Counter(
            "weft_dns_queries",
            "DNS messages received, by the rcode answered (dropped: not answered)",
            ["rcode"],
            registry=r,
        )
        self.dns_upstream_failures = Counter(
            "weft_dns_upstream_failures",
            "Forwarded DNS queries an upstream server did not answer, by reason (each server tried counts)",
            ["reason"],
            registry=r,
        )

    def add_datapath(
        self,
        byte_counts: Callable[[], dict[tuple[str, str], int]],
        drop_counts: Callable[[], dict[str, int]],
        worker_bytes: Callable[[], list[dict[str, int]]] = list,
        connections: Callable[[], dict[str, tuple[int, dict[str, int]]]] = dict,
    ) -> None:
        """Export the data path's counters, which its threads keep as plain integers, and each peer's path and
        MTU as ``weft status`` shows them at the moment of the scrape (``connections``: peer -> (mtu, {path: 0|1}))."""

        def collect() -> Iterator[Family]:
            sent = [
                Sample("weft_datapath_bytes_total", {"path": path, "direction": direction}, float(value))
                for (path, direction), value in sorted(byte_counts().items())
            ]
            yield Family("weft_datapath_bytes", "counter", "Overlay bytes by data path and direction", sent)
            dropped = [
                Sample("weft_datapath_packets_dropped_total", {"reason": reason}, float(value))
                for reason, value in sorted(drop_counts().items())
            ]
            yield Family("weft_datapath_packets_dropped", "counter", "Data-path packets dropped, by reason", dropped)
            workers = [
                Sample("weft_datapath_worker_bytes_total", {"worker": str(index), "direction": direction}, float(value))
                for index, counts in enumerate(worker_bytes())
                for direction, value in sorted(counts.items())
            ]
            yield Family(
                "weft_datapath_worker_bytes",
                "counter",
                "UDP bytes each sleeve worker sent and received (all paths; control sends aside)",
                workers,
            )
            rows = sorted(connections().items())
            mtus = [Sample("weft_connection_mtu", {"peer": peer}, float(mtu)) for peer, (mtu, _) in rows]
            yield Family(
                "weft_connection_mtu", "gauge", "Largest IP packet a container can send to the peer in one piece", mtus
            )
            paths = [
                Sample("weft_connection_path", {"peer": peer, "path": path}, float(on))
                for peer, (_, taken) in rows
                for path, on in taken.items()
            ]
            taken = "1 for the data path traffic to the peer takes, 0 for the others"
            yield Family("weft_connection_path", "gauge", taken, paths)

        self.registry.register(collect)

    def add_loop_lag(self, lag: Callable[[], float]) -> None:
        """Export how late the agent's event loop ran lately (weft.mesh.stalls), read when scraped."""
        name = "weft_event_loop_lag_seconds"
        about = (
            "The most the agent's event loop ran late in the last 10 s: a host too busy to give the agent its turn"
            " (handshake deadlines do not count that time)"
        )

        def collect() -> Iterator[Family]:
            yield Family(name, "gauge", about, [Sample(name, {}, round(lag(), 3))])

        self.registry.register(collect)

    def render(self) -> bytes:
        return self.registry.render()


def _plain_counters(
    name: str, documentation: str, labels: tuple[str, ...], counts: dict[tuple[str, ...], int]
) -> Callable[[], list[Family]]:
    """A labelled counter kept by its owner as a dict of label values to integers, exported when scraped."""

    def collect() -> list[Family]:
        samples = [
            Sample(f"{name}_total", dict(zip(labels, key, strict=True)), float(value))
            for key, value in sorted(counts.items())
        ]
        return [Family(name, "counter", documentation, samples)]

    return collect
