"""The agent's Prometheus metrics, on a registry of its own so many agents can share a process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.peers = Gauge("weft_peers", "Peers in this agent's view of the mesh, itself included", registry=r)
        self.connections = Gauge(
            "weft_connections", "Control connections by state and encryption", ["state", "encrypted"], registry=r
        )
        self.terminations = Counter(
            "weft_connection_terminations_total", "Established connections that ended", registry=r
        )
        self.gossip_bytes = Counter(
            "weft_gossip_bytes",
            "Gossip payload bytes by channel and direction",
            ["channel", "direction"],
            registry=r,
        )
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
        self.gossip_dropped = Counter(
            "weft_gossip_dropped", "Gossip messages dropped, by reason", ["reason"], registry=r
        )

        self.reload_failures = Counter(
            "weft_config_reload_failures", "SIGHUP reloads refused because the new config was invalid", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
