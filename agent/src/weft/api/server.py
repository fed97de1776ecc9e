"""HTTP API: control over a root-only unix socket; metrics and read-only status on a TCP address."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING

from aiohttp import web

from weft.addresses import AddressError
from weft.datapath.overlay import OverlayError

if TYPE_CHECKING:
    from weft.agent import Agent

log = logging.getLogger(__name__)

SECTIONS = ("peers", "connections", "targets")


class ApiServer:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        config = self.agent.config
        control = web.Application()
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
            ]
        )
        path = config.api_socket
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()  # left by a previous run that was killed
        runner = web.AppRunner(control, access_log=None)
        await runner.setup()
        old_umask = os.umask(0o077)
        try:
            await web.UnixSite(runner, str(path)).start()
        finally:
            os.umask(old_umask)
        self._runners.append(runner)

        public = web.Application()
        public.add_routes(
            [
                web.get("/metrics", self.metrics),
                web.get("/status", self.status),
                web.get("/status/{section}", self.status),
            ]
        )
        runner = web.AppRunner(public, access_log=None)
        await runner.setup()
        host, port = config.metrics_host_port()
        await web.TCPSite(runner, host or None, port, reuse_address=True).start()
        self._runners.append(runner)

    async def stop(self) -> None:
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

    async def metrics(self, request: web.Request) -> web.Response:
        self._refresh_gauges()
        return web.Response(body=self.agent.metrics.render(), content_type="text/plain", charset="utf-8")

    def _refresh_gauges(self) -> None:
        metrics = self.agent.metrics
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
        try:
            added = self.agent.maker.connect(body["addresses"], replace=bool(body.get("replace")))
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
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body must be JSON")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        cidrs = body.get("cidrs", [])
        if not isinstance(cidrs, list) or not all(isinstance(c, str) for c in cidrs):
            return _error(400, "'cidrs' must be a list of CIDR strings like 10.32.0.1/12")
        try:
            return web.json_response(plane.overlay(action, body, cidrs))
        except OverlayError as exc:
            return _error(400, str(exc))


async def _json(request: web.Request) -> dict | web.Response:
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "request body must be JSON")
    addresses = body.get("addresses") if isinstance(body, dict) else None
    if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
        return _error(400, "'addresses' must be a list of HOST[:PORT] strings")
    return body


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
