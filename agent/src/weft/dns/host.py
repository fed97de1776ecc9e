"""DNS on this host, put together: the replicated table, this host's registrations, the address on the bridge and
the server that answers there. The agent makes one when ``dns`` is on (it needs the data plane's bridge).

Order at start: the table before any connection (gossip that arrives finds it), the registrations restored once
the data plane knows which containers are still attached, then the address guard, the address and the server.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING, Any

from weft.config import AgentConfig, ConfigError
from weft.dns.persist import DnsStore
from weft.dns.registrations import Registrations
from weft.dns.service import Dns
from weft.mesh.peer import format_name
from weft.mesh.router import Router
from weft.metrics import Metrics
from weft.store import Store

if TYPE_CHECKING:
    from weft.datapath.netdev import NetDev
    from weft.dns.server import DnsServer

log = logging.getLogger(__name__)

PORT = 53


class HostDns:
    def __init__(self, config: AgentConfig, router: Router, metrics: Metrics, store: Store) -> None:
        self.config = config
        self.metrics = metrics
        self.table = Dns(router, metrics, domain=config.dns_domain)
        self.names = Registrations(self.table, DnsStore(store), address=config.dns_address)
        self.server: DnsServer | None = None
        self.names.register_kept()  # before any connection: see Registrations.register_kept

    def restore(self, nd: NetDev) -> None:
        """Keep the names of the containers still attached (a restart, or --resume), drop the others."""
        self.names.forget_gone(lambda ifname: nd.link(ifname) is not None)

    async def serve(self, nd: NetDev, *, bridge: str, overlay_ports: tuple[str, ...]) -> None:
        """Guard the address off the overlay, put it on the bridge, and answer there."""
        from weft.datapath import dnsaddr
        from weft.datapath.portguard import NftError
        from weft.dns.server import DnsServer
        from weft.dns.upstream import Upstream

        c = self.config
        try:
            dnsaddr.install(nd, bridge=bridge, overlay_ports=overlay_ports, address=c.dns_address)
        except NftError as exc:  # without the guard every host would answer every container: do not serve
            raise ConfigError(f"{exc}; or turn DNS off (dns: false)") from None
        upstream = Upstream(self.metrics, override=c.dns_upstream or None)
        server = DnsServer(
            self.table,
            self.metrics,
            upstream=upstream,
            binds=[(c.dns_address, PORT)],
            domain=c.dns_domain,
            ttl=c.dns_ttl,
            device=bridge,
        )
        try:
            await server.start()
        except OSError as exc:
            raise ConfigError(
                f"cannot serve DNS on {c.dns_address}:{PORT} (dns_address): {exc.strerror or exc}; another DNS "
                "server may hold port 53 on every address (bind it to its own addresses), or turn DNS off (dns: false)"
            ) from None
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
        self.table.stop()

    def status(self) -> dict[str, Any]:
        out = self.table.status()
        present = self.table.router.topology.peers
        nick = {o["name"]: (f"{o['name']}({o['nickname']})" if o["nickname"] else o["name"]) for o in out["origins"]}
        out["names"] = [
            {"name": e.name, "address": str(ipaddress.IPv4Address(e.address)), "origin": nick[format_name(e.origin)]}
            for e in self.table.entries()
            if e.live and e.origin in present
        ]
        out["address"] = self.config.dns_address
        out["serving"] = self.server is not None
        if self.server is not None:
            out["upstreams"] = [f"{h}:{p}" for h, p in self.server.upstream.servers()]
        return out
