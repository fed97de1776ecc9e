"""HTTP API: control over a root-only unix socket; metrics and read-only status on a TCP address.

The server gets the components it serves (:class:`Served`), not the agent: the connection maker for connect and
forget, IPAM and the data plane for the overlay requests, the DNS names, the metrics, and the agent's status view.
Both listeners are :class:`weft.api.http.HttpListener` (h11, with the limits docs/operations.md lists).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from weft.addresses import AddressError
from weft.api.http import HttpListener, Request, Response, error, json_response
from weft.config import AgentConfig, ConfigError
from weft.datapath.attach import OverlayError
from weft.ipam.holders import HolderError
from weft.ipam.holders import carry_out as with_ipam
from weft.ipam.service import IpamError

if TYPE_CHECKING:
    from weft.datapath.plane import DataPlane
    from weft.dns.host import HostDns
    from weft.dns.registrations import Registrations
    from weft.ipam.service import Ipam
    from weft.mesh.connection_maker import ConnectionMaker
    from weft.mesh.router import Router
    from weft.mesh.transport import ControlTransport
    from weft.metrics import Metrics

log = logging.getLogger(__name__)

SECTIONS = ("peers", "connections", "targets", "ipam", "dns")
MAX_BODY = 64 * 1024  # the largest request body the control API reads; its requests are a few hundred bytes
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Served:
    """What the API serves: the agent's components, and its status as ``weft status --json`` shows it."""

    config: AgentConfig
    metrics: Metrics
    status: Callable[[], dict[str, Any]]
    router: Router
    transport: ControlTransport
    maker: ConnectionMaker
    ipam: Ipam
    dataplane: DataPlane | None = None
    dns: HostDns | None = None


Route = Callable[[Request], Awaitable[Response]]


class ApiServer:
    def __init__(self, served: Served) -> None:
        self.served = served
        config = served.config
        self.control = HttpListener(
            "api",
            self.handle,
            served.metrics,
            limit=config.api_conn_limit,
            timeout=config.api_timeout,  # an idle connection is closed after it; the cap bounds what even root holds
            max_body=MAX_BODY,
            keep_alive=True,
        )
        self.public = HttpListener(
            "metrics",
            self.handle_public,
            served.metrics,
            limit=config.api_conn_limit,
            timeout=config.api_timeout,
            max_body=0,
            keep_alive=False,
            methods=("GET", "HEAD"),
            error_body=_text_error,
        )
        self._gets: dict[str, Route] = {
            "/status": self.status,
            "/report": self.status,
            "/metrics": self.metrics,
            "/dns/lookup": self.dns_lookup,
        }
        self._posts: dict[str, Route] = {
            "/connect": self.connect,
            "/forget": self.forget,
            "/attach": self.attach,
            "/detach": self.detach,
            "/expose": self.expose,
            "/hide": self.hide,
            "/rmpeer": self.rmpeer,
            "/dns/add": self.dns_add,
            "/dns/remove": self.dns_remove,
        }

    async def start(self) -> None:
        config = self.served.config
        path = config.api_socket
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()  # left by a previous run that was killed
        old_umask = os.umask(0o077)
        try:
            await self.control.listen_unix(str(path))
        except OSError as exc:
            raise ConfigError(f"cannot listen on the API socket {path}: {exc.strerror or exc}") from None
        finally:
            os.umask(old_umask)
        host, port = config.metrics_host_port()
        try:
            await self.public.listen_tcp(host or None, port)
        except OSError as exc:
            # A metrics address the host does not have (or a port taken): say which setting, and exit.
            await self.control.stop()
            raise ConfigError(
                f"cannot listen for metrics on {config.metrics_addr} (metrics_addr): {exc.strerror or exc}"
            ) from None

    async def stop(self) -> None:
        await self.control.stop()
        await self.public.stop()
        with contextlib.suppress(OSError):
            self.served.config.api_socket.unlink()

    # -- dispatch -----------------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """The control API: a route by method and path, else 404 (no such path) or 405 (another method)."""
        method = "GET" if request.method == "HEAD" else request.method
        table = {"GET": self._gets, "POST": self._posts}.get(method, {})
        route = table.get(request.path)
        if route is None and method == "GET" and request.path.startswith("/status/"):
            route = self.status
        if route is not None:
            return await route(request)
        allowed = [m for m, t in (("GET", self._gets), ("POST", self._posts)) if request.path in t]
        if request.path.startswith("/status/"):
            allowed = ["GET"]
        if allowed:
            response = error(405, f"{request.method} is not served at {request.path}; use {' or '.join(allowed)}")
            response.headers.append(("Allow", ", ".join(allowed)))
            return response
        return error(404, f"no such API endpoint: {request.method} {request.path}")

    async def handle_public(self, request: Request) -> Response:
        """GET on the public listener (its only method): the metrics and the read-only status, nothing else."""
        path = request.path
        if path == "/metrics":
            return await self.metrics(request)
        if path == "/status" or path.startswith("/status/"):
            response = await self.status(request)
            if response.status == 404:
                return error(404, f"no status section; choose from {', '.join(SECTIONS)}")
            return response
        return error(404, "not found: GET /metrics or /status")

    # -- status and metrics -------------------------------------------------------------------------

    async def status(self, request: Request) -> Response:
        status = self.served.status()
        if not request.path.startswith("/status/"):
            return Response(200, json.dumps(status).encode())
        section = request.path[len("/status/") :]
        if section not in SECTIONS:
            return error(404, f"no status section {section!r}; choose from {', '.join(SECTIONS)}")
        return Response(200, json.dumps(status[section]).encode())

    async def metrics(self, request: Request) -> Response:
        self._refresh_gauges()
        return Response(200, self.served.metrics.render(), PROMETHEUS_TEXT)

    def _refresh_gauges(self) -> None:
        served = self.served
        metrics = served.metrics
        served.ipam.update_metrics()
        router = served.router
        metrics.peers.set(len(router.topology.peers))
        metrics.peers_changed.set(time.time() - (router.scheduler.now() - router.view_changed_at))
        counts: dict[tuple[str, str], int] = {}
        for row in served.transport.status():
            key = (row["state"], "yes" if row["encrypted"] else "no")
            counts[key] = counts.get(key, 0) + 1
        for state in ("pending", "established"):
            for enc in ("yes", "no"):
                metrics.connections.labels(state, enc).set(counts.get((state, enc), 0))

    # -- targets ------------------------------------------------------------------------------------

    async def connect(self, request: Request) -> Response:
        body = _addresses(request)
        if isinstance(body, Response):
            return body
        replace = body.get("replace", False)
        if not isinstance(replace, bool):
            return error(400, "'replace' must be true or false")
        try:
            added = self.served.maker.connect(body["addresses"], replace=replace)
        except AddressError as exc:
            return error(400, str(exc))
        return json_response({"targets": added})

    async def forget(self, request: Request) -> Response:
        body = _addresses(request)
        if isinstance(body, Response):
            return body
        try:
            forgotten = self.served.maker.forget(body["addresses"])
        except AddressError as exc:
            return error(400, str(exc))
        return json_response({"forgotten": forgotten})

    # -- the data plane: containers and the host on the overlay ------------------------------------

    async def attach(self, request: Request) -> Response:
        return await self._overlay(request, "attach")

    async def detach(self, request: Request) -> Response:
        return await self._overlay(request, "detach")

    async def expose(self, request: Request) -> Response:
        return await self._overlay(request, "expose")

    async def hide(self, request: Request) -> Response:
        return await self._overlay(request, "hide")

    async def _overlay(self, request: Request, action: str) -> Response:
        plane, dns = self.served.dataplane, self.served.dns
        if plane is None:
            return error(409, "the data plane is off on this agent (datapath: false); enable it and restart")
        body = _object(request)
        if isinstance(body, Response):
            return body
        cidrs = body.get("cidrs", [])
        if not isinstance(cidrs, list) or not all(isinstance(c, str) for c in cidrs):
            return error(400, "'cidrs' must be a list of CIDR strings like 10.32.0.1/12")
        name = body.get("name")
        if action == "attach" and name is not None:
            if dns is None:
                return error(409, "DNS is off on this agent (dns: false): attach without --name, or turn it on")
            if not isinstance(name, str):
                return error(400, "'name' must be a string, like web")
            try:
                dns.names.fqdn(name)
            except ValueError as exc:
                return error(400, str(exc))
        try:
            result = await with_ipam(self.served.ipam, plane.overlay, action, body, cidrs)
            if dns is not None and action in ("attach", "detach") and result.get("key"):
                result = self._names(dns, action, body, cidrs, result)
            return json_response(result)
        except OverlayError as exc:
            return error(400, str(exc))
        except HolderError as exc:
            self.served.metrics.overlay_refused.labels(action, "ipam").inc()
            log.info("%s refused: %s", action, exc)
            return error(409, str(exc))

    @staticmethod
    def _names(dns: HostDns, action: str, body: dict, cidrs: list[str], result: dict) -> dict:
        """The container's name gets (or loses) its addresses; its resolver points at this host's DNS address."""
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

    # -- names --------------------------------------------------------------------------------------

    async def dns_add(self, request: Request) -> Response:
        """A name for addresses that are no container's (weft dns-add), kept across restarts."""

        def add(names: Registrations, name: str, addresses: list[str]) -> dict:
            fqdn, held = names.add(name, addresses)
            return {"name": fqdn, "addresses": held}

        return self._names_request(request, add)

    async def dns_remove(self, request: Request) -> Response:
        def remove(names: Registrations, name: str, addresses: list[str]) -> dict:
            fqdn, removed = names.remove(name, addresses)
            return {"name": fqdn, "removed": removed, "changed": bool(removed)}

        return self._names_request(request, remove)

    def _names_request(self, request: Request, act: Callable[[Registrations, str, list[str]], dict]) -> Response:
        """A body of 'name' and 'addresses', checked, then ``act`` on this host's registrations."""
        dns, body = self.served.dns, _object(request)
        if isinstance(body, Response):
            return body
        if dns is None:
            return error(409, "DNS is off on this agent (dns: false)")
        name, addresses = body.get("name"), body.get("addresses", [])
        if not isinstance(name, str) or not _strings(addresses):
            return error(400, "give 'name' (a string) and 'addresses' (a list of IPv4 addresses)")
        try:
            return json_response(act(dns.names, name, addresses))
        except ValueError as exc:
            return error(400, str(exc))

    async def dns_lookup(self, request: Request) -> Response:
        """What the table answers for a name now (what every container asking this host is told)."""
        dns = self.served.dns
        if dns is None:
            return error(409, "DNS is off on this agent (dns: false)")
        try:
            fqdn = dns.names.fqdn(request.query.get("name", ""))
        except ValueError as exc:
            return error(400, str(exc))
        found = [str(ipaddress.IPv4Address(a)) for a in dns.table.lookup(fqdn)]
        return json_response({"name": fqdn, "addresses": found})

    # -- IPAM ---------------------------------------------------------------------------------------

    async def rmpeer(self, request: Request) -> Response:
        """Take dead peers' address ranges over (weft rmpeer)."""
        body = _object(request)
        if isinstance(body, Response):
            return body
        peers, force = body.get("peers"), body.get("force", False)
        if not isinstance(peers, list) or not peers or not all(isinstance(p, str) and p for p in peers):
            return error(400, "'peers' must be a non-empty list of peer names or nicknames")
        if not isinstance(force, bool):
            return error(400, "'force' must be true or false")
        try:
            return json_response({"reclaimed": self.served.ipam.rmpeer(peers, force=force)})
        except IpamError as exc:
            return error(409, str(exc))


def _object(request: Request) -> dict | Response:
    """The request body as a JSON object, or the 4xx answer that says what is wrong with it."""
    try:
        body = json.loads(request.body)
    except RecursionError:
        return error(400, "request body is nested too deeply")
    except ValueError:
        return error(400, "request body must be JSON")
    if not isinstance(body, dict):
        return error(400, "request body must be a JSON object")
    return body


def _addresses(request: Request) -> dict | Response:
    body = _object(request)
    if isinstance(body, Response):
        return body
    addresses = body.get("addresses")
    if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
        return error(400, "'addresses' must be a list of HOST[:PORT] strings")
    return body


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _text_error(status: int, message: str) -> Response:
    """The public listener's refusals (431, 400, 500) are plain text, as a scraper shows them."""
    return Response(status, f"{message}\n".encode(), "text/plain")
