"""One established control connection: a reader, a writer and heartbeats over a TCP stream.

The writer drains the connection's GossipSender whenever it is woken, so gossip for a busy or slow
peer is merged while it waits instead of piling up. Silence longer than the read timeout ends the
connection; so does anything that breaks the framing or fails authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from weft.mesh.codec import MAX_MESSAGE, DecodeError, expect, pack, unpack
from weft.mesh.crypto import SealError
from weft.mesh.gossip import GossipSender
from weft.mesh.handshake import Session, frame, read_frame
from weft.mesh.stalls import Deadline, LoopStalls
from weft.metrics import Metrics

log = logging.getLogger(__name__)

HEARTBEAT = {"t": "hb"}
READ_STALL_ALLOWANCE = 3  # a peer's silence is judged by our loop's on-time seconds, within 3 x read_timeout in all


# A peer whose kernel stops answering (its host down, the path cut) is noticed by TCP keepalive after this long, with
# no work for either agent: the kernels probe an idle connection and answer. The agents' own heartbeats then come less
# often (every connection's heartbeat costs both agents a wakeup, a seal, an open and a parse: with a hundred
# neighbours, a third of a settled agent's CPU at one every 5 s) and catch what keepalive cannot: a stuck agent.
KEEPALIVE_AFTER = 20.0


@dataclass
class ConnectionSettings:
    # 10 s: an older agent, whose read timeout is 20 s, still hears from us twice within it.
    heartbeat_interval: float = 10.0
    read_timeout: float = 30.0
    handshake_timeout: float = 5.0
    dial_timeout: float = 3.0
    accept_rate: float = 20.0  # inbound connections per second, sustained
    accept_burst: int = 100  # a mesh of a hundred peers told of one at once: each let in at the first try


class ControlConnection:
    """Hands each message it reads to ``on_message`` and tells ``on_sent`` what it wrote (the router's
    ``handle_message`` and ``count_sent``); it knows nothing of the transport that made it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: Session,
        *,
        settings: ConnectionSettings,
        metrics: Metrics,
        on_message: Callable[[ControlConnection, dict], None],
        on_sent: Callable[[list[dict]], None],
        outbound: bool,
        remote_address: str,
        secret: bytes | None,
        stalls: LoopStalls | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._stalls = stalls  # the time our own loop ran late is not silence from the peer
        self._on_message = on_message
        self._on_sent = on_sent
        self._reader = reader
        self._writer = writer
        self._session = session
        self.remote = session.intro.peer
        self.remote_address = remote_address
        self.outbound = outbound
        self.conn_uid = session.conn_uid
        self.encrypted = session.encrypted
        self.data_keys = session.data_keys  # the data path's keys for this link (None without a secret)
        self.caps = session.intro.caps  # what the peer reads beyond the protocol version (handshake.CAPABILITIES)
        _keep_alive(writer.get_extra_info("socket"), KEEPALIVE_AFTER)
        peername = writer.get_extra_info("peername")
        self.remote_ip: str | None = peername[0] if peername else None  # the underlay address we see
        self.secret = secret  # the mesh secret this session was keyed with (rotation closes stale ones)
        self.sender = GossipSender(self._wake_writer)
        self._wake = asyncio.Event()
        self._loops: tuple[asyncio.Task, ...] = ()  # the read and write loops, once run
        self.close_reason: str | None = None
        self.closed_by_peer = False  # the peer ended the stream in order (its agent stopping or restarting)

    @property
    def info(self) -> str:
        cipher = "chacha20-poly1305" if self.encrypted else "unencrypted"
        return f"protocol v{self._session.version}, {cipher}"

    def _wake_writer(self) -> None:
        self._wake.set()

    def close(self, reason: str) -> None:
        """End the connection (its loops are cancelled; the first reason given is the one kept)."""
        if self.close_reason is None:
            self.close_reason = reason
        for task in self._loops:
            task.cancel()

    async def run(self) -> str:
        """Serve the connection until it ends; returns why it ended. Two tasks, the read and the write loop, and no
        third to wait for a close: ``close`` cancels them (a hundred connections' tasks are a good part of what
        an agent holds for its peers)."""
        tasks = self._loops = (asyncio.ensure_future(self._read_loop()), asyncio.ensure_future(self._write_loop()))
        if self.close_reason is not None:  # closed before it ran
            for task in tasks:
                task.cancel()
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._writer.close()
        return self.close_reason or "closed"

    async def _read_loop(self) -> None:
        settings = self._settings
        metrics = self._metrics
        opener = self._session.opener
        while True:
            try:
                # A timeout, not wait_for: on 3.11, wait_for swallows a cancel that comes as the read completes, and
                # the loop would outlive its connection (the agent then hung on SIGTERM). After a stall of our own
                # (a starved host), what the peer sent meanwhile is read before its silence is judged.
                async with Deadline(
                    settings.read_timeout, self._stalls, most=READ_STALL_ALLOWANCE * settings.read_timeout
                ):
                    body = await read_frame(self._reader, MAX_MESSAGE + 64)
            except TimeoutError as exc:
                if exc.errno is not None:  # the socket's ETIMEDOUT: keepalive or unacknowledged data, not our deadline
                    self.close(f"the peer's host stopped answering (TCP gave up after about {KEEPALIVE_AFTER:g}s)")
                else:
                    self.close(f"nothing heard for {settings.read_timeout:g}s (read timeout)")
                return
            except asyncio.IncompleteReadError:
                self.closed_by_peer = self.close_reason is None
                self.close("the peer closed the connection")
                return
            except DecodeError as exc:
                metrics.decode_errors.labels(exc.kind).inc()
                self.close(str(exc))
                return
            except OSError as exc:
                self.close(f"read failed: {exc}")
                return
            if opener is not None:
                try:
                    body = opener.open(body)
                except SealError:
                    metrics.decode_errors.labels("aead").inc()
                    self.close("a message failed authentication (wrong key, tampered or replayed)")
                    return
            try:
                msg = expect(unpack(body, "message"), dict, "message", "message")
            except DecodeError as exc:
                metrics.decode_errors.labels(exc.kind).inc()
                log.warning("dropped a malformed message from %s: %s", self.remote.label(), exc)
                continue
            if msg.get("t") == "hb":
                continue
            self._on_message(self, msg)

    async def _write_loop(self) -> None:
        settings = self._settings
        sealer = self._session.sealer
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settings.heartbeat_interval):  # not wait_for: see _read_loop
                    await self._wake.wait()
            self._wake.clear()
            messages = self.sender.take()
            self._on_sent(messages)
            if not messages:
                messages = [HEARTBEAT]
            for msg in messages:
                if self._writer.is_closing():  # the socket failed under a write: asyncio would drop (and log) the rest
                    self.close("the connection was lost")
                    return
                body = pack(msg)
                self._writer.write(frame(sealer.seal(body) if sealer else body))
            try:
                await self._writer.drain()
            except OSError as exc:
                self.close(f"write failed: {exc}")
                return


def _keep_alive(sock: Any, after: float) -> None:
    """TCP keepalive on a control connection: an idle one is probed after a quarter of ``after``, every quarter, and
    given up after three unanswered probes; data unacknowledged for ``after`` ends it too (TCP_USER_TIMEOUT).
    Best effort: a transport without a socket (a test's pipe) or a kernel without an option keeps the heartbeats.
    ``sock`` is what the stream's transport hands out (asyncio's wrapper of the socket)."""
    if sock is None:
        return
    step = max(1, int(after / 4))
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), step),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), step),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), 3),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), int(after * 1000)),
    ]
    for level, option, value in options:
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)
