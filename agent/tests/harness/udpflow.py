"""A paced UDP flow with an echo, run inside container namespaces: ``python udpflow.py echo|send ...``.

``echo PORT`` sends every datagram back where it came from and records when datagrams arrived; ``send IP PORT
--rate N`` sends N numbered datagrams a second and records which came back and when. Both run until SIGINT or
SIGTERM, then print one JSON line: counts, the gaps in what arrived (each ``[last before, first after]``, wall
clock, so a caller can line them up with what it did meanwhile), and for the sender the runs of datagrams that
never came back (``[first sent, last sent, count]``). Two directions are told apart: the echo's gaps are the
sender-to-echo direction alone, the sender's are the round trip. With ``--progress S`` the sender also prints
``{"sent": N, "echoed": M}`` every S seconds while it runs, so a caller can see traffic flowing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import signal
import socket
import struct
import time

DATAGRAM = struct.Struct("!Qd")  # sequence number, send time (wall clock)
MIN_GAP = 0.02  # quieter stretches than this are reported; at 1,000 a second this is 20 datagrams
DRAIN = 0.5  # seconds the sender keeps listening for echoes after it stops sending

_stop = False


def _on_signal(signum: int, frame: object) -> None:
    global _stop
    _stop = True


class _Gaps:
    """Arrival times in, the gaps longer than ``MIN_GAP`` out."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last: float | None = None
        self.gaps: list[list[float]] = []

    def arrived(self, now: float) -> None:
        if self.first is None:
            self.first = now
        elif now - self.last > MIN_GAP:  # type: ignore[operator]
            self.gaps.append([round(self.last, 6), round(now, 6)])  # type: ignore[arg-type]
        self.last = now

    def report(self) -> dict:
        longest = max((e - s for s, e in self.gaps), default=0.0)
        return {"first": self.first, "last": self.last, "gaps": self.gaps, "longest_gap": round(longest, 6)}


def echo(args: argparse.Namespace) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", args.port))
    sock.settimeout(0.2)
    print(json.dumps({"listening": args.port}), flush=True)
    gaps, received = _Gaps(), 0
    while not _stop:
        try:
            data, addr = sock.recvfrom(65535)
        except TimeoutError:
            continue
        except InterruptedError:
            continue
        gaps.arrived(time.time())
        received += 1
        with contextlib.suppress(OSError):
            sock.sendto(data, addr)
    print(json.dumps({"done": True, "received": received, **gaps.report()}), flush=True)


def send(args: argparse.Namespace) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    interval = 1.0 / args.rate
    pad = bytes(max(0, args.size - DATAGRAM.size))
    sent_at: list[float] = []
    echoed = bytearray()
    gaps = _Gaps()
    send_errors = 0
    print(json.dumps({"sending": f"{args.ip}:{args.port}", "rate": args.rate}), flush=True)
    next_send = time.monotonic()
    next_progress = next_send + args.progress if args.progress else float("inf")
    stop_at: float | None = None
    while True:
        now = time.monotonic()
        if now >= next_progress:
            print(json.dumps({"sent": len(sent_at), "echoed": sum(echoed)}), flush=True)
            next_progress += args.progress
        if _stop and stop_at is None:
            stop_at = now + DRAIN
        if stop_at is not None and now >= stop_at:
            break
        if stop_at is None and now >= next_send:
            seq = len(sent_at)
            wall = time.time()
            sent_at.append(wall)
            echoed.append(0)
            try:
                sock.sendto(DATAGRAM.pack(seq, wall) + pad, (args.ip, args.port))
            except OSError:  # e.g. no route while an interface changes: the datagram is lost, keep pacing
                send_errors += 1
            next_send += interval
            if now - next_send > 1.0:  # descheduled for a long time: do not burst to catch up
                next_send = now
        wait = max(0.0, (stop_at if stop_at is not None else next_send) - time.monotonic())
        ready, _, _ = select.select([sock], [], [], wait)
        if not ready:
            continue
        while True:
            try:
                data = sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ICMP errors surface here (port unreachable): not an echo
                continue
            if len(data) < DATAGRAM.size:
                continue
            seq, _ = DATAGRAM.unpack_from(data)
            if seq < len(echoed) and not echoed[seq]:
                echoed[seq] = 1
                gaps.arrived(time.time())
    lost: list[list[float]] = []
    for seq, got in enumerate(echoed):
        if got:
            continue
        if lost and lost[-1][3] == seq - 1:
            lost[-1][1], lost[-1][2], lost[-1][3] = sent_at[seq], lost[-1][2] + 1, seq
        else:
            lost.append([sent_at[seq], sent_at[seq], 1, seq])
    result = {
        "done": True,
        "sent": len(sent_at),
        "echoed": sum(echoed),
        "send_errors": send_errors,
        "lost_runs": [[round(a, 6), round(b, 6), n] for a, b, n, _ in lost],
        **gaps.report(),
    }
    print(json.dumps(result), flush=True)


def main() -> None:
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("echo", help="send every datagram back")
    p.add_argument("port", type=int)
    p.set_defaults(fn=echo)
    p = sub.add_parser("send", help="send numbered datagrams at a steady rate and count the echoes")
    p.add_argument("ip")
    p.add_argument("port", type=int)
    p.add_argument("--rate", type=float, default=1000.0, help="datagrams a second")
    p.add_argument("--size", type=int, default=64, help="UDP payload bytes")
    p.add_argument("--progress", type=float, default=0.0, help="print the counts every this many seconds")
    p.set_defaults(fn=send)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
