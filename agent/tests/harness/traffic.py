"""Workloads for the data-path tests, run inside container namespaces: ``python traffic.py CMD ...``.

Each prints one JSON line with what it saw, so a test compares the two ends: bytes and SHA-256 of a
TCP transfer, or the sequence numbers of multicast datagrams a receiver got.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import struct
import sys
import time

CHUNK = 64 * 1024


def _data(seed: int, marker: bytes) -> bytes:
    """One chunk of deterministic, incompressible data, with a marker string repeated through it."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest() * (CHUNK // 32)
    if marker:
        block = (marker + block)[:CHUNK]
    return block


def recv(args: argparse.Namespace) -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", args.port))
    server.listen(1)
    print(json.dumps({"listening": args.port}), flush=True)
    conn, _ = server.accept()
    digest, total = hashlib.sha256(), 0
    while chunk := conn.recv(1 << 20):
        digest.update(chunk)
        total += len(chunk)
    print(json.dumps({"bytes": total, "sha256": digest.hexdigest()}), flush=True)


def send(args: argparse.Namespace) -> None:
    sock = socket.create_connection((args.ip, args.port), timeout=args.timeout)
    digest, total = hashlib.sha256(), 0
    chunk = _data(args.seed, args.marker.encode())
    chunks = max(1, args.size // CHUNK)
    pause = args.seconds / chunks if args.seconds else 0.0
    for i in range(chunks):
        sock.sendall(chunk)
        digest.update(chunk)
        total += len(chunk)
        if pause:
            time.sleep(pause)
        if i == 0:
            print(json.dumps({"started": True}), flush=True)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # wait for the receiver to close: everything arrived
    print(json.dumps({"bytes": total, "sha256": digest.hexdigest()}), flush=True)


def mcast_recv(args: argparse.Namespace) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", args.port))
    mreq = struct.pack("4s4s", socket.inet_aton(args.group), socket.inet_aton(args.local))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    print(json.dumps({"joined": args.group}), flush=True)
    seen: dict[int, int] = {}
    sock.settimeout(args.timeout)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(2048)
        except TimeoutError:
            break
        if data.startswith(b"END"):
            break
        (seq,) = struct.unpack_from(">I", data)
        seen[seq] = seen.get(seq, 0) + 1
    print(
        json.dumps({"unique": len(seen), "duplicates": sum(n - 1 for n in seen.values()), "seqs": sorted(seen)}),
        flush=True,
    )


def mcast_send(args: argparse.Namespace) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(args.local))
    payload = b"x" * 200
    for seq in range(args.count):
        sock.sendto(struct.pack(">I", seq) + payload, (args.group, args.port))
        time.sleep(args.interval)
    time.sleep(0.5)
    for _ in range(3):
        sock.sendto(b"END", (args.group, args.port))
    print(json.dumps({"sent": args.count}), flush=True)


def _multicast_parser(sub: argparse._SubParsersAction, name: str, fn: object) -> argparse.ArgumentParser:
    p = sub.add_parser(name)
    p.add_argument("group", help="multicast group, like 239.1.1.1")
    p.add_argument("port", type=int)
    p.add_argument("local", help="this container's overlay address (the interface to use)")
    p.set_defaults(fn=fn)
    return p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("recv")
    p.add_argument("port", type=int)
    p.set_defaults(fn=recv)
    p = sub.add_parser("send")
    p.add_argument("ip")
    p.add_argument("port", type=int)
    p.add_argument("size", type=int)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--marker", default="")
    p.add_argument("--seconds", type=float, default=0.0, help="stretch the transfer over this long")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(fn=send)
    p = _multicast_parser(sub, "mcast-recv", mcast_recv)
    p.add_argument("--timeout", type=float, default=30.0)
    p = _multicast_parser(sub, "mcast-send", mcast_send)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--interval", type=float, default=0.005)
    args = parser.parse_args()
    try:
        args.fn(args)
    except OSError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
