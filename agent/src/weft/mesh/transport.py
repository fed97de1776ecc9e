"""Control connections over TCP: listening, dialling, admission (rate and connection limits) and
the handshake, handing finished connections to the router and results to the connection maker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from weft.limits import Episode
from weft.mesh.address import host_of, join_host_port, split_host_port
from weft.mesh.connection import ConnectionSettings, ControlConnection
from weft.mesh.connection_maker import ConnectionMaker
from weft.mesh.handshake import HandshakeError, handshake, refuse_full
from weft.mesh.peer import format_name
from weft.mesh.router import Router
from weft.mesh.stalls import LoopStalls, within
from weft.metrics import Metrics

log = logging.getLogger(__name__)

# One source address (a host, or every host behind one NAT) may take at most this share of the accept
# rate and this many handshakes at once, so a flood from one place cannot keep everyone else out.
SOURCE_SHARE = 2
SOURCE_PENDING = 8
SOURCES_TRACKED = 4096  # per-source buckets kept, least recently seen dropped first
# A handshake's deadline does not count the time this agent's own loop ran late (a starved host), up to this many
# times handshake_timeout in all. A target whose handshakes we dial keep timing out gets twice the time with each
# (a live but slow peer is reached at last), up to 2**SLOW_STEPS times; one that succeeds is back to the start.
STALL_ALLOWANCE = 12
SLOW_STEPS = 3

# Handshake failures that mean the remote sent something malformed (also counted as decode errors).
_MALFORMED = {"bad_magic", "short_handshake", "malformed_hello", "malformed_intro"}


class _TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


@dataclass
class PendingConnection:
    address: str
    outbound: bool
    started: float
    source: str = ""  # the remote IP of an inbound connection


class _SourceLimits:
    """Admission per source address: a token bucket each (a share of the accept rate) and a pending cap."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate / SOURCE_SHARE
        self.burst = max(1, burst // SOURCE_SHARE)
        self._buckets: OrderedDict[str, _TokenBucket] = OrderedDict()

    def take(self, source: str) -> bool:
        bucket = self._buckets.pop(source, None) or _TokenBucket(self.rate, self.burst)
        self._buckets[source] = bucket  # most recently seen last
        while len(self._buckets) > SOURCES_TRACKED:
            self._buckets.popitem(last=False)
        return bucket.take()


class ControlTransport:
    def __init__(
        self,
        router: Router,
        metrics: Metrics,
        settings: ConnectionSettings,
        secrets: Callable[[], list[bytes]],
        *,
        listen: tuple[str, int],
        advertise: str | None,
        stalls: LoopStalls | None = None,
    ) -> None:
        self.router = router
        self.metrics = metrics
        self.settings = settings
        self._secrets = secrets
        self.listen = listen
        self.advertise = advertise
        self.maker: ConnectionMaker | None = None
        self.stalls = stalls
        self.pending: dict[int, PendingConnection] = {}
        self._slow: OrderedDict[str, int] = OrderedDict()  # address we dial -> handshakes timed out in a row
        self._bucket = _TokenBucket(settings.accept_rate, settings.accept_burst)
        self._per_source = _SourceLimits(settings.accept_rate, settings.accept_burst)
        # A flood of connections is counted per connection but logged once per episode.
        self._refusals = Episode(
            log,
            "control listener: refusing new connections (accept rate or connection limit reached);"
            " see weft_connections_refused_total",
            "control listener: accepting connections again; refused",
        )
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        # Called with a peer's underlay address when it refuses us (or we it) for a secret mismatch: a
        # sign that it is up and will not talk to us as before.
        self.refusal_listeners: list[Callable[[str], None]] = []

    async def start(self) -> None:
        host, port = self.listen
        self._server = await asyncio.start_server(self._on_accept, host or None, port, reuse_address=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.router.connections.values()):
            conn.close("agent shutting down")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- dialling and accepting --------------------------------------------------------------------

    def dial(self, address: str) -> None:
        self._spawn(self._dial(address))

    async def _dial(self, address: str) -> None:
        host, port = split_host_port(address)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, local_addr=self._local_addr()),
                self.settings.dial_timeout,
            )
        except TimeoutError:
            # Not a sign of load (the kernel answers a connect for a busy agent): a host that is down or not routed.
            self._dial_finished(address, None, f"no answer within {self.settings.dial_timeout:g}s")
            return
        except ConnectionRefusedError:
            self._dial_finished(address, None, "connection refused (is the agent running there?)")
            return
        except OSError as exc:
            self._dial_finished(address, None, exc.strerror or str(exc))
            return
        except Exception as exc:  # e.g. a name the resolver cannot encode: a failed attempt, never a crash
            log.info("dial %s failed: %s: %s", address, type(exc).__name__, exc)
            self._dial_finished(address, None, f"cannot dial: {exc or type(exc).__name__}")
            return
        await self._serve(reader, writer, outbound=True, address=address)

    def handshake_timeout(self, address: str) -> float:
        """The deadline of our next handshake with ``address``: doubled for each of its last ones that timed out."""
        return self.settings.handshake_timeout * 2 ** min(self._slow.get(address, 0), SLOW_STEPS)

    def _local_addr(self) -> tuple[str, int] | None:
        """Dial from the address we listen on, so peers see (and gossip) the address that answers."""
        host = self.listen[0]
        return (host, 0) if host not in ("", "0.0.0.0", "::") else None

    async def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        pending_here = sum(1 for p in self.pending.values() if p.source == peer[0])
        if pending_here >= SOURCE_PENDING or not self._per_source.take(peer[0]):
            self.metrics.refused.labels("source_limit").inc()
            self._refusals.hit()
            writer.close()
            return
        if not self._bucket.take():
            self.metrics.refused.labels("rate_limit").inc()
            self._refusals.hit()
            writer.close()
            return
        full = len(self.router.connections) + len(self.pending) >= self.router.conn_limit
        if full:
            self.metrics.refused.labels("conn_limit").inc()
            self._refusals.hit()
        task = asyncio.current_task()
        if task is not None:  # so stop() can end it like the connections we dialled
            self._tasks.add(task)
        try:
            if full:
                # Say "full" only when established connections fill the limit: the dialler then holds a discovered
                # peer until it has room, which can be long. Handshakes in progress fill it only for a moment (a
                # dense mesh forming, near the limit, has many), so then the dialler just tries again later.
                if len(self.router.connections) >= self.router.conn_limit:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(
                            refuse_full(reader, writer, secrets=list(self._secrets())), self.settings.handshake_timeout
                        )
                writer.close()
                return
            await self._serve(reader, writer, outbound=False, address=join_host_port(peer[0], peer[1]))
        except asyncio.CancelledError:
            # stop() ends inbound connections by cancelling them; asyncio's stream server would log a
            # cancelled handler as an error, so end quietly instead.
            writer.close()
        finally:
            if task is not None:
                self._tasks.discard(task)

    # -- one connection, start to finish ------------------------------------------------------------

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, outbound: bool, address: str
    ) -> None:
        key = id(writer)
        source = "" if outbound else host_of(address)
        self.pending[key] = PendingConnection(address, outbound, time.monotonic(), source)
        secrets = list(self._secrets())
        timeout = self.handshake_timeout(address) if outbound else self.settings.handshake_timeout
        try:
            session = await within(
                handshake(
                    reader,
                    writer,
                    outbound=outbound,
                    ourself=self.router.ourself,
                    secrets=secrets,
                    port=self.listen[1],
                    advertise=self.advertise,
                ),
                timeout,
                self.stalls,
                most=STALL_ALLOWANCE * self.settings.handshake_timeout,
            )
        except HandshakeError as exc:
            self._handshake_failed(writer, address, outbound, exc.reason, exc.detail)
            return
        except TimeoutError:
            if outbound:
                self._slow[address] = self._slow.pop(address, 0) + 1  # most recent last
                while len(self._slow) > SOURCES_TRACKED:
                    self._slow.popitem(last=False)
            self._handshake_failed(writer, address, outbound, "timeout", f"no handshake within {timeout:g}s")
            return
        except (OSError, asyncio.IncompleteReadError) as exc:
            self._handshake_failed(writer, address, outbound, "io", str(exc) or exc.__class__.__name__)
            return
        finally:
            self.pending.pop(key, None)

        self._slow.pop(address, None)
        intro = session.intro
        if outbound:
            remote_address = address
        elif intro.advertise:
            remote_address = intro.advertise
        else:
            remote_address = join_host_port(host_of(address), intro.port)
        secret = secrets[session.secret_index] if session.secret_index is not None else None
        conn = ControlConnection(
            reader,
            writer,
            session,
            settings=self.settings,
            metrics=self.metrics,
            on_message=self.router.handle_message,
            on_sent=self.router.count_sent,
            outbound=outbound,
            remote_address=remote_address,
            secret=secret,
            stalls=self.stalls,
        )
        # The secrets may have changed (a reload) while this handshake ran with the old ones.
        refused = self.stale_reason(conn) or self.router.add_connection(conn)
        if outbound:
            self._dial_finished(address, intro.peer.name, refused)
        if refused is not None:
            log.info("closing connection with %s at %s: %s", intro.peer.label(), address, refused)
            writer.close()
            return
        if self.maker is not None:
            self.maker.connection_opened(intro.peer.name)
        reason = await conn.run()
        self.router.remove_connection(conn, reason)
        if self.maker is not None:
            self.maker.connection_closed(intro.peer.name, clean=conn.closed_by_peer)

    def _handshake_failed(
        self, writer: asyncio.StreamWriter, address: str, outbound: bool, reason: str, detail: str
    ) -> None:
        self.metrics.handshake_failures.labels(reason).inc()
        if reason in _MALFORMED:
            self.metrics.decode_errors.labels("handshake").inc()
        level = (
            logging.WARNING
            if reason in ("secret_mismatch", "encryption_mismatch", "version_mismatch")
            else logging.INFO
        )
        log.log(level, "handshake with %s failed (%s): %s", address, reason, detail)
        writer.close()
        if reason in ("secret_mismatch", "encryption_mismatch"):
            host = host_of(address)
            for listener in self.refusal_listeners:
                listener(host)
        if outbound:
            # The peer closing the connection mid-handshake is, mostly, its own handshake timeout.
            timed_out = reason in ("timeout", "short_handshake")
            self._dial_finished(address, None, f"{reason}: {detail}", full=reason == "peer_full", timed_out=timed_out)

    def _dial_finished(
        self, address: str, peer: int | None, error: str | None, *, full: bool = False, timed_out: bool = False
    ) -> None:
        if self.maker is not None:
            self.maker.dial_finished(address, peer, error, full=full, timed_out=timed_out)

    # -- secrets ----------------------------------------------------------------------------------

    def stale_reason(self, conn: ControlConnection) -> str | None:
        """Why a connection may no longer carry traffic under the current secrets, or None if it may.

        A connection keyed with a secret we no longer hold is stale, and so is any connection whose
        encryption differs from ours: plaintext while we hold a secret, or encrypted when we hold none.
        """
        current = self._secrets()
        if conn.secret is None:
            return "encryption is now required; reconnecting encrypted" if current else None
        if not current:
            return "encryption is now off; reconnecting unencrypted"
        if conn.secret not in current:
            return "mesh secret retired; reconnecting with a current one"
        return None

    def retire_stale_sessions(self) -> int:
        """Close every connection :meth:`stale_reason` refuses, at once; the maker reconnects them."""
        stale = [
            (c, reason)
            for c in self.router.connections.values()
            if isinstance(c, ControlConnection) and (reason := self.stale_reason(c)) is not None
        ]
        for conn, reason in stale:
            log.info("closing connection to %s: %s", conn.remote.label(), reason)
            conn.close(reason)
        return len(stale)

    def status(self) -> list[dict]:
        now = time.monotonic()
        secrets = list(self._secrets())
        rows = [
            {
                "peer": None,
                "nickname": None,
                "address": p.address,
                "outbound": p.outbound,
                "state": "pending",
                "encrypted": bool(secrets),
                "info": f"handshake for {now - p.started:.1f}s",
            }
            for p in self.pending.values()
        ]
        for conn in self.router.connections.values():
            rows.append(
                {
                    "peer": format_name(conn.remote.name),
                    "nickname": conn.remote.nickname,
                    "address": conn.remote_address,
                    "outbound": conn.outbound,
                    "state": "established",
                    "encrypted": conn.encrypted,
                    "info": conn.info,
                    "secret": _secret_label(conn.secret, secrets),
                }
            )
        return rows


def _secret_label(secret: bytes | None, secrets: list[bytes]) -> str | None:
    """Which of our secrets a session uses, by position: never anything derived from the secret."""
    if secret is None:
        return None
    return f"{secrets.index(secret) + 1} of {len(secrets)}" if secret in secrets else "retired"
