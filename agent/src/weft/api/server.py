"""HTTP API: control over a root-only unix socket; metrics and read-only status on a TCP address."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from weft.addresses import AddressError
from weft.api.public import PublicServer
from weft.config import ConfigError
from weft.datapath.attach import OverlayError
from weft.ipam.holders import HolderError
from weft.ipam.holders import carry_out as with_ipam
from weft.ipam.service import IpamError
from weft.limits import Episode

if TYPE_CHECKING:
    from weft.agent import Agent
    from weft.dns.registrations import Registrations

log = logging.getLogger(__name__)

SECTIONS = ("peers", "connections", "targets", "ipam", "dns")
MAX_BODY = 64 * 1024  # the largest request body the control API reads; its requests are a few hundred bytes


class ApiServer:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._runners: list[web.AppRunner] = []
        self._unix: asyncio.Server | None = None
        self._public: PublicServer | None = None
        self._refusals = Episode(
            log,
            f"API socket: connection cap ({agent.config.api_conn_limit}) reached; closing new connections",
            "API socket: below its connection cap again; connections refused",
        )

    async def start(self) -> None:
        config = self.agent.config
        control = web.Application(client_max_size=MAX_BODY, middlewares=[_errors])
        control.add_routes(
            [
                web.get("/status", self.status),
                web.get("/status/{section}", self.status),
                web.get("/report", self.status),
                web.get("/metrics", self.metrics),
                web.post("/connect", self.connect),
                web.post("/forget", self.forget),
                web.post("/attach", self.attach),
                web.post("/detach", self.detach),
                web.post("/expose", self.expose),
                web.post("/hide", self.hide),
                web.post("/rmpeer", self.rmpeer),
                web.post("/dns/add", self.dns_add),
                web.post("/dns/remove", self.dns_remove),
                web.get("/dns/lookup", self.dns_lookup),
            ]
        )
        path = config.api_socket
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()  # left by a previous run that was killed
        # An idle connection is closed after api_timeout; the cap bounds what even root can hold open.
        runner = web.AppRunner(control, access_log=None, keepalive_timeout=config.api_timeout)
        await runner.setup()
        self._runners.append(runner)
        server = runner.server
        assert server is not None

        def factory() -> asyncio.BaseProtocol:
            if len(server.connections) >= config.api_conn_limit:
                return _Refused(self, "api")
            return server()

        old_umask = os.umask(0o077)
        try:
            self._unix = await asyncio.get_running_loop().create_unix_server(factory, str(path))
        except OSError as exc:
            raise ConfigError(f"cannot listen on the API socket {path}: {exc.strerror or exc}") from None
        finally:
            os.umask(old_umask)

        host, port = config.metrics_host_port()
        self._public = PublicServer(
            self.public_get, self.agent.metrics, limit=config.api_conn_limit, timeout=config.api_timeout
        )
        try:
            await self._public.start(host or None, port)
        except OSError as exc:
            # A metrics address the host does not have (or a port taken): say which setting, and exit.
            raise ConfigError(
                f"cannot listen for metrics on {config.metrics_addr} (metrics_addr): {exc.strerror or exc}"
            ) from None

    def refused(self, listener: str) -> None:
        self.agent.metrics.api_refused.labels(listener, "conn_limit").inc()
        self._refusals.hit()

    async def stop(self) -> None:
        if self._unix is not None:
            self._unix.close()
        if self._public is not None:
            await self._public.stop()
        self._refusals.cancel()
        for runner in self._runners:
            await runner.cleanup()
        with contextlib.suppress(OSError):
            self.agent.config.api_socket.unlink()

    async def status(self, request: web.Request) -> web.Response:
        status = self.agent.status()
        section = request.match_info.get("section")
        if section is None:
            return web.json_response(status)
        if section not in SECTIONS:
            return _error(404, f"no status section {section!r}; choose from {', '.join(SECTIONS)}")
        return web.json_response(status[section])

    def public_get(self, path: str) -> tuple[int, str, bytes]:
        """GET on the public listener: the metrics and the read-only status, nothing else."""
        if path == "/metrics":
            self._refresh_gauges()
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.agent.metrics.render()
        if path == "/status" or path.startswith("/status/"):
            status = self.agent.status()
            section = path[len("/status/") :] if path.startswith("/status/") else None
            if section is None:
                return 200, "application/json", json.dumps(status).encode()
            if section in SECTIONS:
                return 200, "application/json", json.dumps(status[section]).encode()
            body = {"error": f"no status section; choose from {', '.join(SECTIONS)}"}
            return 404, "application/json", json.dumps(body).encode()
        return 404, "application/json", json.dumps({"error": "not found: GET /metrics or /status"}).encode()

    async def metrics(self, request: web.Request) -> web.Response:
        self._refresh_gauges()
        return web.Response(body=self.agent.metrics.render(), content_type="text/plain", charset="utf-8")

    def _refresh_gauges(self) -> None:
        metrics = self.agent.metrics
        self.agent.ipam.update_metrics()
        metrics.peers.set(len(self.agent.router.topology.peers))
        counts: dict[tuple[str, str], int] = {}
        for row in self.agent.transport.status():
            key = (row["state"], "yes" if row["encrypted"] else "no")
            counts[key] = counts.get(key, 0) + 1
        for state in ("pending", "established"):
            for enc in ("yes", "no"):
                metrics.connections.labels(state, enc).set(counts.get((state, enc), 0))

    async def connect(self, request: web.Request) -> web.Response:
        body = await _json(request)
        if isinstance(body, web.Response):
            return body
        replace = body.get("replace", False)
        if not isinstance(replace, bool):
            return _error(400, "'replace' must be true or false")
        try:
            added = self.agent.maker.connect(body["addresses"], replace=replace)
        except AddressError as exc:
            return _error(400, str(exc))
        return web.json_response({"targets": added})

    async def forget(self, request: web.Request) -> web.Response:
        body = await _json(request)
        if isinstance(body, web.Response):
            return body
        try:
            forgotten = self.agent.maker.forget(body["addresses"])
        except AddressError as exc:
            return _error(400, str(exc))
        return web.json_response({"forgotten": forgotten})

    # -- the data plane: containers and the host on the overlay ------------------------------------

    async def attach(self, request: web.Request) -> web.Response:
        return await self._overlay(request, "attach")

    async def detach(self, request: web.Request) -> web.Response:
        return await self._overlay(request, "detach")

    async def expose(self, request: web.Request) -> web.Response:
        return await self._overlay(request, "expose")

    async def hide(self, request: web.Request) -> web.Response:
        return await self._overlay(request, "hide")

    async def _overlay(self, request: web.Request, action: str) -> web.Response:
        plane = self.agent.dataplane
        if plane is None:
            return _error(409, "the data plane is off on this agent (datapath: false); enable it and restart")
        body = await _object(request)
        if isinstance(body, web.Response):
            return body
        cidrs = body.get("cidrs", [])
        if not isinstance(cidrs, list) or not all(isinstance(c, str) for c in cidrs):
            return _error(400, "'cidrs' must be a list of CIDR strings like 10.32.0.1/12")
        name = body.get("name")
        if action == "attach" and name is not None:
            if self.agent.dns is None:
                return _error(409, "DNS is off on this agent (dns: false): attach without --name, or turn it on")
            if not isinstance(name, str):
                return _error(400, "'name' must be a string, like web")
            try:
                self.agent.dns.names.fqdn(name)
            except ValueError as exc:
                return _error(400, str(exc))
        try:
            result = await with_ipam(self.agent.ipam, plane.overlay, action, body, cidrs)
            if self.agent.dns is not None and action in ("attach", "detach") and result.get("key"):
                result = self._names(action, body, cidrs, result)
            return web.json_response(result)
        except OverlayError as exc:
            return _error(400, str(exc))
        except HolderError as exc:
            self.agent.metrics.overlay_refused.labels(action, "ipam").inc()
            log.info("%s refused: %s", action, exc)
            return _error(409, str(exc))

    def _names(self, action: str, body: dict, cidrs: list[str], result: dict) -> dict:
        """The container's name gets (or loses) its addresses; its resolver points at this host's DNS address."""
        dns = self.agent.dns
        assert dns is not None
        key, netns = result["key"], body.get("netns")
        if action == "attach":
            try:
                given = result.get("addresses", [])
                fqdn = dns.names.attached(key, body.get("name"), given, result.get("host_interface"))
            except ValueError as exc:
                log.warning("attach %s: no name registered: %s", key, exc)
                fqdn = None
            if isinstance(netns, str) and body.get("key") is None:  # a runtime (CNI) writes its own from "dns"
                dns.names.point_resolver(netns)
            return {**result, "name": fqdn, "dns": dns.names.settings()}
        only = None
        if cidrs:
            only = [int(ipaddress.ip_interface(c).ip) for c in cidrs if "/" in c and not c.startswith("net:")]
        removed = dns.names.detached(key, only)
        if isinstance(netns, str) and only is None and body.get("key") is None:
            dns.names.unpoint_resolver(netns)
        return {**result, "names_removed": removed}

    async def dns_add(self, request: web.Request) -> web.Response:
        """A name for addresses that are no container's (weft dns-add), kept across restarts."""

        def add(names: Registrations, name: str, addresses: list[str]) -> dict:
            fqdn, held = names.add(name, addresses)
            return {"name": fqdn, "addresses": held}

        return await self._names_request(request, add)

    async def dns_remove(self, request: web.Request) -> web.Response:
        def remove(names: Registrations, name: str, addresses: list[str]) -> dict:
            fqdn, removed = names.remove(name, addresses)
            return {"name": fqdn, "removed": removed, "changed": bool(removed)}

        return await self._names_request(request, remove)

    async def _names_request(
        self, request: web.Request, act: Callable[[Registrations, str, list[str]], dict]
    ) -> web.Response:
        """A body of 'name' and 'addresses', checked, then ``act`` on this host's registrations."""
        dns, body = self.agent.dns, await _object(request)
        if isinstance(body, web.Response):
            return body
        if dns is None:
            return _error(409, "DNS is off on this agent (dns: false)")
        name, addresses = body.get("name"), body.get("addresses", [])
        if not isinstance(name, str) or not _strings(addresses):
            return _error(400, "give 'name' (a string) and 'addresses' (a list of IPv4 addresses)")
        try:
            return web.json_response(act(dns.names, name, addresses))
        except ValueError as exc:
            return _error(400, str(exc))

    async def dns_lookup(self, request: web.Request) -> web.Response:
        """What the table answers for a name now (what every container asking this host is told)."""
        dns = self.agent.dns
        if dns is None:
            return _error(409, "DNS is off on this agent (dns: false)")
        name = request.query.get("name", "")
        try:
            fqdn = dns.names.fqdn(name)
        except ValueError as exc:
            return _error(400, str(exc))
        found = [str(ipaddress.IPv4Address(a)) for a in dns.table.lookup(fqdn)]
        return web.json_response({"name": fqdn, "addresses": found})

    async def rmpeer(self, request: web.Request) -> web.Response:
        """Take dead peers' address ranges over (weft rmpeer)."""
        body = await _object(request)
        if isinstance(body, web.Response):
            return body
        peers, force = body.get("peers"), body.get("force", False)
        if not isinstance(peers, list) or not peers or not all(isinstance(p, str) and p for p in peers):
            return _error(400, "'peers' must be a non-empty list of peer names or nicknames")
        if not isinstance(force, bool):
            return _error(400, "'force' must be true or false")
        try:
            return web.json_response({"reclaimed": self.agent.ipam.rmpeer(peers, force=force)})
        except IpamError as exc:
            return _error(409, str(exc))


class _Refused(asyncio.Protocol):
    """A connection over a listener's cap: closed at once, unread, counted, logged once per episode."""

    def __init__(self, server: ApiServer, listener: str) -> None:
        self._server = server
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()
        self._server.refused(self._listener)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Whatever goes wrong in a handler, the client gets one line of JSON and the log one line."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"request body is over the {MAX_BODY}-byte limit")
    except web.HTTPException:
        raise
    except Exception as exc:
        log.error("API %s %s failed: %s: %s", request.method, request.path, type(exc).__name__, exc)
        log.debug("API failure", exc_info=True)
        return _error(500, f"internal error ({type(exc).__name__}); the agent log has the details")


async def _object(request: web.Request) -> dict | web.Response:
    """The request body as a JSON object, or the 4xx answer that says what is wrong with it."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        return _error(413, f"request body is over the {MAX_BODY}-byte limit")
    raw = await request.read()  # aiohttp stops at client_max_size (413, via _errors)
    try:
        body = json.loads(raw)
    except RecursionError:
        return _error(400, "request body is nested too deeply")
    except ValueError:
        return _error(400, "request body must be JSON")
    if not isinstance(body, dict):
        return _error(400, "request body must be a JSON object")
    return body


async def _json(request: web.Request) -> dict | web.Response:
    body = await _object(request)
    if isinstance(body, web.Response):
        return body
    addresses = body.get("addresses")
    if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
        return _error(400, "'addresses' must be a list of HOST[:PORT] strings")
    return body


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
