"""One established control connection: a reader, a writer and heartbeats over a TCP stream.

The writer drains the connection's GossipSender whenever it is woken, so gossip for a busy or slow
peer is merged while it waits instead of piling up. Silence longer than the read timeout ends the
connection; so does anything that breaks the framing or fails authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from weft.mesh.codec import MAX_MESSAGE, DecodeError, expect, pack, unpack
from weft.mesh.crypto import SealError
from weft.mesh.gossip import GossipSender
from weft.mesh.handshake import Session, frame, read_frame
from weft.mesh.stalls import Deadline, LoopStalls
from weft.metrics import Metrics

log = logging.getLogger(__name__)

HEARTBEAT = {"t": "hb"}
READ_STALL_ALLOWANCE = 3  # a peer's silence is judged by our loop's on-time seconds, within 3 x read_timeout in all


@dataclass
class ConnectionSettings:
    heartbeat_interval: float = 5.0
    read_timeout: float = 20.0
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
        peername = writer.get_extra_info("peername")
        self.remote_ip: str | None = peername[0] if peername else None  # the underlay address we see
        self.secret = secret  # the mesh secret this session was keyed with (rotation closes stale ones)
        self.sender = GossipSender(self._wake_writer)
        self._wake = asyncio.Event()
        self._closed = asyncio.Event()
        self.close_reason: str | None = None
        self.closed_by_peer = False  # the peer ended the stream in order (its agent stopping or restarting)

    @property
    def info(self) -> str:
        cipher = "chacha20-poly1305" if self.encrypted else "unencrypted"
        return f"protocol v{self._session.version}, {cipher}"

    def _wake_writer(self) -> None:
        self._wake.set()

    def close(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        self._closed.set()

    async def run(self) -> str:
        """Serve the connection until it ends; returns why it ended."""
        tasks = [
            asyncio.ensure_future(self._read_loop()),
            asyncio.ensure_future(self._write_loop()),
            asyncio.ensure_future(self._closed.wait()),
        ]
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
            except TimeoutError:
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
