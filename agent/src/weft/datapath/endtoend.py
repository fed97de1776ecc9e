"""End-to-end keys with the peers this host reaches only through relays, so relays carry their traffic unopened.

For each peer the controller reports as relayed, over a first hop that reads end-to-end datagrams (its handshake
named the "e2e" capability), this module runs a key agreement (agreement.py) whose two messages travel hop by hop
as sealed data-path CONTROL maps along the data's own route; each relay passes them on only towards a next hop with
the capability, and lowers the message's datagram size to its next link's, so an agreement that completes proves
the whole route reads the end-to-end form and tells both ends what datagram size fits every hop.

Then both ends send each other end-to-end heartbeats, sealed with the new keys and carried like data: the
initiator's keys are confirmed by the response, the responder's by the first heartbeat that opens under them (so a
replayed init leaves keys that are never used), and a side seals frames end to end only while the peer's heartbeats
say they hear it. Until then, and whenever that stops, frames go hop by hop as before. Heartbeats come in rounds
paced as the direct paths' are (paths.py): each asks the peer to answer at once (``rq``), every interval while the
pair carries frames, until the peer's own rounds show it paces itself, or while it never asks (an older version,
which expects one every interval), and every ``IDLE_EVERY`` intervals otherwise, each side judging the pair by its
own rounds. A hub relaying for a hundred quiet spokes then passes on a tenth of what it did.

Keys are agreed again when either side restarts (its uid in the topology changes), when the route's first hop or
its datagram size changes, every REKEY_AFTER seconds (by the initiator), and when the peer falls silent; they are
dropped when the peer becomes a direct neighbour or leaves, and when a reload retires the secret they came from.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from weft.datapath.agreement import (
    INIT,
    MAX_HOPS,
    AgreementError,
    Init,
    Offer,
    PairKeys,
    ReplayGuard,
    Response,
    complete,
    initiate,
    parse,
    respond,
)
from weft.datapath.paths import BUSY_FOR, IDLE_EVERY, JITTER
from weft.mesh.codec import DecodeError, expect, pack, unpack
from weft.mesh.peer import format_name

if TYPE_CHECKING:
    from weft.datapath.sleeve import Pair
    from weft.metrics import Metrics

log = logging.getLogger(__name__)

AGREEMENT_TYPES = (INIT, "kr")  # data-path control map types this module takes
HEARTBEAT = "eh"
REKEY_AFTER = 300.0  # seconds: the initiator agrees new keys this often
RETRY_MAX = 30.0  # seconds between unanswered inits, at most (they double from one dead interval)
MAX_OFFERS = 16  # first inits in flight at once: a host that learns of a hundred relayed peers agrees in turns
IN_FLIGHT_TRIES = 2  # an init counts as in flight for its first send and first retry (see _in_flight)
LOST_AFTER = 4  # dead intervals without a heartbeat from the peer before keys are agreed again
PENDING_FOR = 2  # dead intervals a responder's unconfirmed keys wait for the initiator's first heartbeat


class Io(Protocol):
    """What the module needs of the controller and the sleeve."""

    def send_hop(self, peer: int, payload: bytes) -> bool:
        """A data-path CONTROL map to the neighbour ``peer``, sealed with the link's keys."""

    def send_pair(self, peer: int, kid: int, payload: bytes) -> bool:
        """A CONTROL message to ``peer`` sealed end to end with the pair keys ``kid``."""

    def route(self, dst: int) -> tuple[int, int] | None:
        """The next hop to ``dst`` and its datagram size, if that hop reads end-to-end datagrams."""

    def peer_uid(self, peer: int) -> int | None:
        """The peer's current run, from the topology."""

    def changed(self) -> None:
        """The forwarding tables depend on something that changed here."""


@dataclass
class Session:
    keys: PairKeys
    created: float
    confirmed: bool
    back_size: int  # the datagram size the agreement found towards us: told to the peer in every heartbeat
    send_size: int = 0  # the peer's word on the datagram size towards it (0: not heard yet)
    heard_at: float | None = None
    peer_hears: bool = False
    answered: bool = False
    asks: bool = False  # the peer's heartbeats ask for answers: it paces its own rounds (not an older version)

    @property
    def kid(self) -> int:
        return self.keys.kid


@dataclass(slots=True)
class _PeerState:
    peer: int
    uid: int | None
    via: int
    hop_size: int
    current: Session | None = None
    pending: Session | None = None  # the responder's, until the initiator's first heartbeat opens under it
    previous: Session | None = None  # the keys before a rekey: still opened for a moment
    previous_until: float = 0.0
    want: bool = True  # keys are to be agreed (again)
    offer: Offer | None = None
    offered_at: float = 0.0
    tries: int = 0
    sending: bool = False
    since: float = 0.0  # when keys were first wanted with none held: the higher name waits for the lower's init
    pace_s: float = 0.0  # seconds between our heartbeat rounds (0: none yet)
    next_round: float = 0.0
    traffic_mark: int = 0  # the sleeve's count of frames sealed or opened with this peer's keys, when last read
    last_traffic: float | None = None

    def sessions(self) -> list[Session]:
        return [s for s in (self.current, self.pending, self.previous) if s is not None]


class EndToEnd:
    def __init__(
        self,
        ourself: int,
        uid: int,
        secrets: Callable[[], list[bytes]],
        metrics: Metrics,
        io: Io,
        *,
        interval: float,
        dead: float,
        rng: random.Random | None = None,
    ) -> None:
        self.ourself = ourself
        self.uid = uid
        self._secrets = secrets
        self._metrics = metrics
        self._io = io
        self._interval = interval
        self._dead = dead
        self._peers: dict[int, _PeerState] = {}
        self._guard = ReplayGuard()
        self._seq = itertools.count(1)
        self._hello: set[int] = set()  # peers with new keys: a heartbeat goes as soon as the sleeve has them
        self._rng = rng or random.Random()  # the jitter of heartbeat rounds
        self._offers = 0  # inits in flight, as of the last pass (see MAX_OFFERS)

    # -- from the controller ------------------------------------------------------------------------

    def update(self, relayed: dict[int, int], now: float) -> None:
        """The peers reached only through relays now (peer -> first hop): agree keys with those whose route reads
        end-to-end datagrams; drop the keys of every other peer."""
        self._offers = self._in_flight()
        for peer in [p for p in self._peers if p not in relayed]:
            self._drop(peer, "it is no longer reached through a relay")
        for peer, via in relayed.items():
            route = self._io.route(peer)
            if route is None or route[0] != via:
                if peer in self._peers:
                    self._drop(peer, f"its route's first hop {format_name(via)} does not pass end-to-end datagrams")
                continue
            uid = self._io.peer_uid(peer)
            ps = self._peers.get(peer)
            if ps is None:
                ps = self._peers[peer] = _PeerState(peer, uid, via, route[1], since=now)
            elif ps.uid != uid:
                self._forget_keys(ps, "the peer restarted")
                ps.uid, ps.via, ps.hop_size, ps.want, ps.since = uid, via, route[1], True, now
            elif (ps.via, ps.hop_size) != route:
                # The route changed, and what fits it may too: agree over the new one now, not after a backoff.
                ps.via, ps.hop_size, ps.want, ps.offer, ps.tries = via, route[1], True, None, 0
            self._drive(ps, now)

    def after_update(self, now: float) -> None:
        """The sleeve has the tables with the new keys: greet the peers that got some, rather than wait a round."""
        for peer in self._hello:
            ps = self._peers.get(peer)
            if ps is not None and ps.current is not None and ps.current.heard_at is None:
                self._round(ps, ps.current, now)
        self._hello.clear()

    def tick(self, now: float, traffic: Mapping[int, int] | None = None) -> None:
        """Once an interval: the heartbeat rounds due, retries, rekeys, and the end of keys that outlived their use.
        ``traffic``: the sleeve's per-peer count of frames sealed or opened end to end (``Sleeve.pair_traffic``)."""
        traffic = traffic or {}
        secrets = self._secrets()
        self._offers = self._in_flight()
        for ps in list(self._peers.values()):
            for session in ps.sessions():
                if session.keys.secret not in secrets:
                    self._forget_keys(ps, "a reload retired the mesh secret they came from")
                    ps.want = True
                    break
            if ps.previous is not None and now >= ps.previous_until:
                ps.previous = None
                self._io.changed()
            if ps.pending is not None and now - ps.pending.created > PENDING_FOR * self._dead:
                ps.pending = None  # never confirmed: the init was a replay, or the initiator moved on
                ps.want = ps.want or ps.current is None  # then agree from this side
                self._io.changed()
            count = traffic.get(ps.peer, 0)
            if count != ps.traffic_mark:
                ps.traffic_mark, ps.last_traffic = count, now
            cur = ps.current
            if cur is not None and not ps.want:
                last = cur.heard_at if cur.heard_at is not None else cur.created
                if now - last > LOST_AFTER * self._dead_for(ps):
                    ps.want = True  # the peer lost its keys, or the route stopped carrying them
                elif cur.keys.initiator and now - cur.created > REKEY_AFTER:
                    ps.want = True
            # A responder's pending keys wait for the initiator to speak first.
            if ps.current is not None and self._due(ps, ps.current, now):
                self._round(ps, ps.current, now)
            self._refresh(ps, now)
            self._drive(ps, now)
        self._metrics.e2e_peers.set(sum(1 for ps in self._peers.values() if ps.sending))

    def pairs(self) -> tuple[Pair, ...]:
        """Every key set the sleeve should open, and which one seals frames for each peer."""
        from weft.datapath.sleeve import Pair

        out = []
        for ps in self._peers.values():
            for session in ps.sessions():
                size = min(session.send_size, ps.hop_size) if session.send_size else ps.hop_size
                send = session is ps.current and ps.sending
                out.append(Pair(ps.peer, session.kid, session.keys.keys, send, size))
        return tuple(out)

    def knows(self, peer: int) -> bool:
        """Keys, or an agreement under way, with ``peer``."""
        return peer in self._peers

    def sealing(self, peer: int) -> bool:
        """Frames for ``peer`` are sealed end to end now."""
        ps = self._peers.get(peer)
        return ps is not None and ps.sending

    def status(self, now: float) -> list[dict[str, Any]]:
        """Per peer with end-to-end keys or an agreement under way: never the keys themselves."""
        rows = []
        for ps in sorted(self._peers.values(), key=lambda p: p.peer):
            cur = ps.current or ps.pending
            if cur is None:
                state = f"agreeing ({ps.tries} tries)" if ps.offer is not None else "waiting"
            elif ps.sending:
                state = "sealing end to end"
            else:
                state = "keys agreed, waiting for the peer's heartbeat"
            rows.append(
                {
                    "peer": format_name(ps.peer),
                    "via": format_name(ps.via),
                    "keys": cur is not None,
                    "sealing": "end-to-end" if ps.sending else "hop-by-hop",
                    "state": state,
                    "initiator": cur.keys.initiator if cur is not None else None,
                    "keys_age": round(now - cur.created, 1) if cur is not None else None,
                    "datagram_size": (min(cur.send_size, ps.hop_size) if cur and cur.send_size else ps.hop_size),
                    "heartbeat_every_s": ps.pace_s or None,
                }
            )
        return rows

    # -- from the sleeve ------------------------------------------------------------------------------

    def on_hop_message(self, from_peer: int, msg: dict[str, Any], now: float) -> None:
        """An agreement message from the neighbour ``from_peer``: ours to answer or take, or to pass on."""
        try:
            parsed = parse(msg)
        except DecodeError as exc:
            self._metrics.decode_errors.labels(exc.kind).inc()
            log.debug("bad agreement message from %s: %s", format_name(from_peer), exc)
            return
        if parsed.dst != self.ourself:
            self._pass_on(from_peer, msg, parsed)
        elif isinstance(parsed, Init):
            self._on_init(parsed, now)
        else:
            self._on_response(parsed, now)

    def on_pair_message(self, peer: int, kid: int, payload: bytes, now: float) -> None:
        """A CONTROL message that opened under pair keys ``kid`` with ``peer``: proof the peer holds them."""
        ps = self._peers.get(peer)
        if ps is None:
            return
        session = next((s for s in ps.sessions() if s.kid == kid), None)
        if session is None:
            return
        if session is ps.pending:
            session.confirmed = True
            self._install(ps, session, now)
            log.info("peer %s: end-to-end keys confirmed (via %s)", format_name(peer), format_name(ps.via))
        try:
            msg = expect(unpack(payload, "datapath"), dict, "datapath", "message")
        except DecodeError as exc:
            self._metrics.decode_errors.labels(exc.kind).inc()
            return
        if msg.get("t") == HEARTBEAT:
            session.heard_at = now
            session.peer_hears = msg.get("rx") is True
            size = msg.get("ds")
            if isinstance(size, int) and not isinstance(size, bool) and 0 < size <= 0xFFFF:
                session.send_size = size
            if msg.get("rq") is True:  # its round: answer now, so its evidence comes at its own pace
                session.asks = session.answered = True
                self._heartbeat(ps, session, now, ask=False)
            elif not session.answered:  # the peer hears from us now, not at our next round
                session.answered = True
                self._heartbeat(ps, session, now, ask=False)
        self._refresh(ps, now)

    # -- the agreement ------------------------------------------------------------------------------

    def _count(self, event: str) -> None:
        self._metrics.e2e_agreements.labels(event).inc()

    def _in_flight(self) -> int:
        """Inits awaiting a timely answer: sent once or retried once. One still unanswered after that (a peer that
        cannot answer, such as an older agent behind the relay) no longer holds a turn from the others."""
        return sum(1 for ps in self._peers.values() if ps.offer is not None and ps.tries <= IN_FLIGHT_TRIES)

    def _retry_after(self, tries: int) -> float:
        """From one dead interval, doubling: through a busy relay an answer can take seconds, and a retry too soon
        replaces the offer the answer is for (it is then refused, and the relay carried both for nothing)."""
        return min(RETRY_MAX, self._dead * 2 ** max(0, tries - 1))

    def _drive(self, ps: _PeerState, now: float) -> None:
        """Send an init if keys are wanted and none is in flight (or the one in flight went unanswered).

        A first agreement with a peer is the lower name's to start: the higher waits a dead interval for its init
        (both sending one made every hub carry two per pair, one of them refused as crossed). And at most
        MAX_OFFERS first inits are in flight at once: a spoke that learns of a hundred peers behind its hub agrees
        with them in turns rather than all at once, so the hub's backlog never outgrows the retries' patience."""
        if not ps.want or (ps.offer is not None and now - ps.offered_at < self._retry_after(ps.tries)):
            return
        if ps.offer is None:
            fresh = ps.current is None and ps.pending is None
            if fresh and self.ourself > ps.peer and now - ps.since < self._dead:
                return
            if self._offers >= MAX_OFFERS:
                return
            self._offers += 1
        secrets = self._secrets()
        route = self._io.route(ps.peer)
        if not secrets or route is None:
            return
        offer = initiate(self.ourself, self.uid, ps.peer, next(self._seq), secrets, route[1])
        ps.offer, ps.offered_at = offer, now
        ps.tries += 1
        if self._io.send_hop(route[0], pack(offer.init.encode())):
            self._count("sent")

    def _pass_on(self, from_peer: int, msg: dict[str, Any], parsed: Init | Response) -> None:
        """A relay's part: on towards the destination, over a hop that reads end-to-end datagrams only, with the
        datagram size lowered to that hop's."""
        route = self._io.route(parsed.dst)
        if route is None:
            self._count("unroutable")
            return
        hop, size = route
        if hop == from_peer or parsed.hops + 1 >= MAX_HOPS:
            self._count("loop")
            return
        out = dict(msg)
        out["ds"] = min(parsed.ds, size) if parsed.ds else size
        out["h"] = parsed.hops + 1
        if self._io.send_hop(hop, pack(out)):
            self._count("passed_on")

    def _on_init(self, init: Init, now: float) -> None:
        ps = self._peers.get(init.src)
        route = self._io.route(init.src)
        if ps is None or route is None:
            self._count("not_relayed")  # we reach it directly, or over a hop without the capability: no keys
            return
        if ps.offer is not None and self.ourself < init.src:
            self._count("crossed")  # both sent an init: the lower name's goes on, the peer answers ours
            return
        try:
            resp, keys = respond(
                init, self.ourself, self.uid, self._secrets(), self._guard, self._io.peer_uid(init.src), route[1]
            )
        except AgreementError as exc:
            self._count(exc.reason)
            log.debug("init from %s refused: %s", format_name(init.src), exc)
            return
        ps.offer, ps.want, ps.tries = None, False, 0
        ps.pending = Session(keys, now, confirmed=False, back_size=init.ds)
        if self._io.send_hop(route[0], pack(resp.encode())):
            self._count("answered")
        # The sleeve opens with the new keys from now; it seals with them once the initiator's first heartbeat
        # (sent when the response arrives) opens under them. Our own would race the response and could arrive first.
        self._io.changed()

    def _on_response(self, resp: Response, now: float) -> None:
        ps = self._peers.get(resp.src)
        if ps is None or ps.offer is None:
            self._count("stale")
            return
        try:
            keys = complete(ps.offer, resp, self._io.peer_uid(resp.src))
        except AgreementError as exc:
            self._count(exc.reason)
            log.debug("response from %s refused: %s", format_name(resp.src), exc)
            return
        first = ps.current is None
        ps.offer, ps.want, ps.tries = None, False, 0
        self._install(ps, Session(keys, now, confirmed=True, back_size=resp.ds), now)
        self._count("completed")
        log.log(
            logging.INFO if first else logging.DEBUG,
            "peer %s: end-to-end keys agreed (via %s, datagrams of up to %d bytes)",
            format_name(ps.peer),
            format_name(ps.via),
            ps.hop_size,
        )
        self._hello.add(ps.peer)

    def _install(self, ps: _PeerState, session: Session, now: float) -> None:
        """``session`` becomes the current keys; the ones before still open what is on its way for a moment."""
        if ps.current is not None and ps.current is not session:
            ps.previous, ps.previous_until = ps.current, now + self._dead
        ps.current = session
        if ps.pending is session or session.keys.initiator:
            ps.pending = None
        self._io.changed()

    # -- heartbeats and the sealing decision ----------------------------------------------------------

    def _dead_for(self, ps: _PeerState) -> float:
        """Silence after which the peer counts as not hearing us: as many of our rounds as ``dead`` is intervals."""
        return self._dead * max(ps.pace_s, self._interval) / self._interval

    def _due(self, ps: _PeerState, cur: Session, now: float) -> bool:
        """Choose the time between our rounds to ``ps``; True if one is due now. Idle only once the peer paces
        itself (its round asked us) and frames are sealed end to end; speeding up brings a round at once, and what
        was still fresh at the slow pace counts from now at the fast one."""
        busy = ps.last_traffic is not None and now - ps.last_traffic <= BUSY_FOR * self._interval
        idle = cur.asks and ps.sending and not busy
        pace = self._interval * IDLE_EVERY if idle else self._interval
        if pace < ps.pace_s:
            if cur.heard_at is not None and now - cur.heard_at <= self._dead_for(ps):
                cur.heard_at = now
            ps.next_round = now
        ps.pace_s = pace
        return now >= ps.next_round

    def _round(self, ps: _PeerState, session: Session, now: float) -> None:
        """A heartbeat that asks the peer to answer at once."""
        ps.next_round = now + max(ps.pace_s, self._interval) * self._rng.uniform(1 - JITTER, 1.0)
        self._heartbeat(ps, session, now, ask=True)

    def _heartbeat(self, ps: _PeerState, session: Session, now: float, *, ask: bool) -> None:
        hears = session.heard_at is not None and now - session.heard_at <= self._dead_for(ps)
        msg: dict[str, Any] = {"t": HEARTBEAT, "rx": hears, "ds": session.back_size}
        if ask:
            msg["rq"] = True
        self._io.send_pair(ps.peer, session.kid, pack(msg))

    def _refresh(self, ps: _PeerState, now: float) -> None:
        cur = ps.current
        sending = (
            cur is not None
            and cur.confirmed
            and cur.peer_hears
            and cur.heard_at is not None
            and now - cur.heard_at <= self._dead_for(ps)
        )
        if sending != ps.sending:
            ps.sending = sending
            log.info(
                "peer %s: frames now sealed %s",
                format_name(ps.peer),
                f"end to end (relays via {format_name(ps.via)} cannot open them)"
                if sending
                else "hop by hop (no end-to-end heartbeat from the peer)",
            )
            self._io.changed()

    def _forget_keys(self, ps: _PeerState, why: str) -> None:
        had = bool(ps.sessions())
        ps.current = ps.pending = ps.previous = None
        ps.offer = None
        ps.tries = 0
        if ps.sending:
            ps.sending = False
        if had:
            log.info("peer %s: end-to-end keys dropped: %s", format_name(ps.peer), why)
            self._io.changed()

    def _drop(self, peer: int, why: str) -> None:
        self._forget_keys(self._peers.pop(peer), why)
