"""The agent process: wires config, state, the mesh and the API together and handles signals."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from weft import __version__
from weft.allocator import trim
from weft.api.server import ApiServer, Served
from weft.config import SETTINGS, AgentConfig, ConfigError, read_secrets
from weft.ipam.holders import claim_found
from weft.ipam.persist import IpamStore
from weft.ipam.service import Ipam
from weft.limits import install_accept_error_handler, raise_file_limit
from weft.mesh.clock import AsyncioScheduler
from weft.mesh.connection_maker import ConnectionMaker, Target
from weft.mesh.handshake import PROTOCOL_MAX, PROTOCOL_MIN
from weft.mesh.peer import PeerInfo, format_name, parse_name, random_name, random_uid
from weft.mesh.router import Router
from weft.mesh.stalls import LoopStalls
from weft.mesh.transport import ConnectionSettings, ControlTransport
from weft.metrics import Metrics
from weft.sdnotify import notify
from weft.store import Store

if TYPE_CHECKING:
    from weft.datapath.plane import DataPlane
    from weft.dns.host import HostDns

log = logging.getLogger(__name__)

FORWARDING_WAIT = 1  # path intervals a starting agent waits for its targets' data paths before it starts the API


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        reload_config: Callable[[], AgentConfig],
        early_reloads: list[int] | None = None,
    ) -> None:
        """``early_reloads`` collects SIGHUPs that came before the event loop ran (see ``weft run``)."""
        self.config = config
        self._early_reloads = early_reloads if early_reloads is not None else []
        self._reload_pending = False
        self._reload_config = reload_config
        self.metrics = Metrics()
        self.stalls = LoopStalls()  # how late the loop runs: handshake and read deadlines do not count it
        self.metrics.add_loop_lag(self.stalls.lag)
        self.store = Store(config.state_dir)
        self.secrets = read_secrets(config.secret_files)
        self.ourself = PeerInfo(self._peer_name(), config.nickname or socket.gethostname(), random_uid())
        self.ready = False
        self._stopping = asyncio.Event()
        self.router: Router
        self.maker: ConnectionMaker
        self.transport: ControlTransport
        self.dataplane: DataPlane | None = None
        self.ipam: Ipam
        self.dns: HostDns | None = None

    def _peer_name(self) -> int:
        """The configured name, else the one kept in the state dir, else a new one kept from now on."""
        stored = self.store.get("peer_name")
        if self.config.name:
            name = parse_name(self.config.name)
        elif stored:
            name = parse_name(stored)
        else:
            name = random_name()
        if stored != format_name(name):
            self.store.put("peer_name", format_name(name))
        return name

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # From the first moment: a reload asked for while starting is applied once the agent is ready.
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        install_accept_error_handler(loop, self.metrics)
        files_before, files = raise_file_limit()
        if files != files_before:
            log.debug("open-file limit raised from %d to %d", files_before, files)
        scheduler = AsyncioScheduler(loop)
        self.stalls.start(loop)
        c = self.config
        self.router = Router(
            self.ourself, scheduler, self.metrics, gossip_interval=c.gossip_interval, conn_limit=c.conn_limit
        )
        settings = ConnectionSettings(
            heartbeat_interval=c.heartbeat_interval,
            read_timeout=c.read_timeout,
            handshake_timeout=c.handshake_timeout,
            dial_timeout=c.dial_timeout,
            accept_rate=c.accept_rate,
            accept_burst=c.accept_burst,
        )
        self.transport = ControlTransport(
            self.router,
            self.metrics,
            settings,
            lambda: self.secrets,
            listen=c.listen_host_port(),
            advertise=c.advertise,
            stalls=self.stalls,
        )
        self.maker = ConnectionMaker(
            self.router,
            scheduler,
            self.transport.dial,
            discovery=c.discovery,
            max_interval=c.max_backoff,
            on_direct_changed=self._persist_targets,
        )
        self.transport.maker = self.maker
        self._load_targets()
        universe, default_subnet = c.ipam_subnets()
        init = c.ipam_init()
        self.ipam = Ipam(
            self.router,
            self.metrics,
            universe=universe,
            default_subnet=default_subnet,
            init=init,
            quorum=init.quorum(len(c.peers)),
            store=IpamStore(self.store),
        )
        self.ipam.start()  # before any connection: gossip that arrives finds the kept ring
        if c.dns and c.datapath:
            from weft.dns.host import HostDns

            self.dns = HostDns(c, self.router, self.metrics, self.store)
        if c.datapath:
            from weft.datapath.plane import DataPlane

            self.dataplane = DataPlane(
                c, self.router, self.metrics, encrypting=bool(self.secrets), secrets=lambda: self.secrets
            )
            self.metrics.add_datapath(
                self.dataplane.byte_counts,
                self.dataplane.drop_counts,
                self.dataplane.worker_bytes,
                self.dataplane.connection_metrics,
            )
            self.transport.refusal_listeners.append(self.dataplane.address_refused)
            self.dataplane.dialling = self.maker.dialling
            self.dataplane.view_settles_in = self.router.view_settles_in

        try:
            await self.transport.start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on {c.listen}: {exc.strerror or exc}") from None
        if self.dataplane is not None:  # before the API: a status answer means the data plane is guarded
            try:
                self.dataplane.start()
            except Exception as exc:
                await self.transport.stop()
                raise ConfigError(f"cannot set up the data plane: {exc}") from None
            self.ipam.sweep(self.dataplane.ipam_holders_alive())
            known = {a.host_ifname for a in self.ipam.alloc.space.allocations.values() if a.host_ifname}
            try:
                found = await asyncio.to_thread(self.dataplane.attached_containers, known)
            except Exception as exc:  # the scan is a safety net: say so and go on
                log.warning("IPAM: could not look for containers attached before this run: %s", exc)
                found = []
            claim_found(self.ipam, found)
            if self.dns is not None:
                assert self.dataplane.nd is not None
                self.dns.restore(self.dataplane.nd)
                try:
                    await self.dns.serve(
                        self.dataplane.nd, bridge=c.bridge, overlay_ports=(self.dataplane.vxlan, self.dataplane.tap)
                    )
                except ConfigError:
                    self.dataplane.stop()
                    await self.transport.stop()
                    raise
        # Peers before the API: a restart's traffic waits for the targets' dials and their data paths, not for the API.
        self.router.start()
        targets = list(self.maker.targets.values())
        self.maker.check()
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        await self._until_forwarding(targets, FORWARDING_WAIT * c.path_interval)
        try:
            api = ApiServer(self.served())
            await api.start()
        except BaseException:
            self.maker.stop()
            self.router.stop()
            if self.dns is not None:
                await self.dns.stop()
            if self.dataplane is not None:
                self.dataplane.stop()
            await self.transport.stop()
            raise
        self.ready = True
        log.info(
            "weft %s running as %s, listening on %s, encryption %s, %d target(s)",
            __version__,
            self.ourself.label(),
            c.listen,
            "enabled" if self.secrets else "disabled",
            len(self.maker.targets),
        )
        if self._reload_pending or self._early_reloads:
            log.info("applying the reload asked for while the agent was starting")
            self.reload()
        trim()  # what starting freed goes back to the system (see weft.allocator)
        notify("READY=1")  # systemd (Type=notify) sends reloads only from now on
        await self._stopping.wait()
        notify("STOPPING=1")
        log.info("shutting down")
        self.maker.stop()
        self.ipam.stop()
        if self.dns is not None:
            await self.dns.stop()
        self.router.stop()
        if self.dataplane is not None:
            self.dataplane.stop()
        await self.transport.stop()
        await api.stop()
        self.stalls.stop()
        self.store.close()

    def stop(self) -> None:
        self._stopping.set()

    async def _until_forwarding(self, targets: list[Target], limit: float) -> None:
        """Until the first dial of each of ``targets`` has ended and each peer it reached has a data path, at most
        ``limit`` seconds (a peer that never answers must not keep the API away for long)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while targets and loop.time() < deadline and not self._stopping.is_set():
            dialling = any(t.state == "connecting" for t in targets)
            reached = [t.peer for t in targets if t.peer is not None]
            if not dialling and (self.dataplane is None or self.dataplane.forwarding(reached)):
                return
            await asyncio.sleep(0.01)

    # -- targets and reload ------------------------------------------------------------------------

    def _load_targets(self) -> None:
        """Config peers always; with --resume also the targets kept from the last run."""
        kept = self.store.targets() if self.config.resume else []
        if kept:
            log.info("resuming %d target(s) kept in %s", len(kept), self.store.path)
        self.maker.set_origin_targets("api", [a for a, o in kept if o == "api"])
        self.maker.set_origin_targets("config", [*(a for a, o in kept if o == "config"), *self.config.peers])

    def _persist_targets(self, targets: list[Target]) -> None:
        self.store.set_targets([(t.address, t.origin) for t in targets])

    # Settings a reload applies in place; the rest need a restart.
    RELOADABLE = ("peers", "secret_files")

    def _on_sighup(self) -> None:
        if self.ready:
            self.reload()
        else:
            self._reload_pending = True

    def reload(self) -> None:
        """SIGHUP: re-read config; peers and secrets change in place.

        Connections keyed with a retired secret, or whose encryption no longer matches (plaintext once a
        secret is set, encrypted once none is), are closed and the data plane stops using them, all
        before the log line that acknowledges the reload: from then on nothing crosses in clear.
        """
        try:
            config = self._reload_config()
            secrets = read_secrets(config.secret_files)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            self.metrics.reload_failures.inc()
            return
        needs_restart = [
            k for k in SETTINGS if k not in self.RELOADABLE and getattr(config, k) != getattr(self.config, k)
        ]
        if needs_restart:
            log.warning(
                "reload: %s changed; restart the agent to apply %s",
                ", ".join(needs_restart),
                "it" if len(needs_restart) == 1 else "them",
            )
        self.config = self.config.copy(**{k: getattr(config, k) for k in self.RELOADABLE})
        was_encrypting = bool(self.secrets)
        self.secrets = secrets
        self.maker.set_origin_targets("config", config.peers)
        retired = self.transport.retire_stale_sessions()
        dropped_fast = 0
        if self.dataplane is not None:
            dropped_fast = self.dataplane.set_encryption(bool(secrets))
        if bool(secrets) != was_encrypting:
            encryption = "encryption is now ON" if secrets else "encryption is now OFF"
        else:
            encryption = "encryption on" if secrets else "encryption off"
        log.info(
            "reloaded configuration: %d configured peer(s), %d secret(s), %s%s%s",
            len(config.peers),
            len(secrets),
            encryption,
            f", {retired} connection(s) closed to re-key" if retired else "",
            f", fast path to {dropped_fast} peer address(es) dropped" if dropped_fast else "",
        )

    # -- status -----------------------------------------------------------------------------------

    def served(self) -> Served:
        """What the API serves: the components, each for what it does, and this agent's status view."""
        return Served(
            config=self.config,
            metrics=self.metrics,
            status=self.status,
            router=self.router,
            transport=self.transport,
            maker=self.maker,
            ipam=self.ipam,
            dataplane=self.dataplane,
            dns=self.dns,
        )

    def status(self) -> dict[str, Any]:
        c = self.config
        connections = self.transport.status()
        if self.dataplane is not None:
            paths = self.dataplane.connection_status()
            for row in connections:
                if row["peer"] is not None:
                    row["datapath"] = paths.pop(parse_name(row["peer"]), None)
            for name, path in paths.items():  # peers reached only through a relay
                entry = self.router.topology.peers.get(name)
                connections.append(
                    {
                        "peer": format_name(name),
                        "nickname": entry.nickname if entry else None,
                        "address": None,
                        "outbound": None,
                        "state": "relayed",
                        "encrypted": path["encrypted"],
                        "info": f"via {path.get('via')}",
                        "datapath": path,
                    }
                )
        return {
            "version": __version__,
            "protocol": f"weft {PROTOCOL_MIN}..{PROTOCOL_MAX}",
            "ready": self.ready,
            "name": format_name(self.ourself.name),
            "nickname": self.ourself.nickname,
            "uid": self.ourself.uid,
            "encryption": "enabled" if self.secrets else "disabled",
            "secrets": len(self.secrets),
            "discovery": c.discovery,
            "listen": c.listen,
            "advertise": c.advertise,
            "peers": self.router.peers_status(),
            "connections": connections,
            "targets": self.maker.status(),
            "mac_conflicts": self.dataplane.mac_conflicts() if self.dataplane is not None else [],
            "end_to_end": self.dataplane.end_to_end_status() if self.dataplane is not None else [],
            "loop_lag_s": round(self.stalls.lag(), 3),
            "ipam": self.ipam.status(),
            "dns": self.dns.status() if self.dns is not None else {"enabled": False},
        }
