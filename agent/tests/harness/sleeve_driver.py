"""Runs one Sleeve from a JSON description, for the netns tests and manual throughput runs.

    python sleeve_driver.py CONFIG.json

CONFIG: {"ourself": 1, "tap": "sleeve0", "listen": ["0.0.0.0", 6783], "workers": 1, "stats_file": "/tmp/h1.json",
         "links": [{"peer": 2, "addr": ["10.98.0.2", 6783], "keys": {"send": HEX, "receive": HEX} | null,
                    "datagram_size": 1472, "epoch": 1}],
         "next_hop": {"2": 2}, "flood_origins": [2], "bcast_children": {"1": [2], "2": []},
         "mac_owner": {"02:32:00:00:00:02": 2}, "local_macs": ["02:32:00:00:00:01"], "frame_mtu": {"2": 1376},
         "control_pad": 1200,
         "pairs": [{"peer": 3, "kid": 7, "keys": {"send": HEX, "receive": HEX}, "send": true, "datagram_size": 1472}]}
Links may say "e2e": true (the neighbour passes end-to-end datagrams on); "pairs" are end-to-end keys with peers
that are not neighbours.
Signals: SIGUSR1 writes the stats file (JSON with a rising "seq"), SIGUSR2 sends a CONTROL message to every link
(padded to control_pad), SIGTERM/SIGINT stop. The stats file is also written once when the sleeve is up.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from weft.datapath.sleeve import Forwarding, Link, Pair, open_sleeve
from weft.mesh.crypto import SessionKeys


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def forwarding(cfg: dict[str, Any]) -> Forwarding:
    links = {}
    for item in cfg["links"]:
        keys = item.get("keys")
        links[item["peer"]] = Link(
            peer=item["peer"],
            addr=(item["addr"][0], item["addr"][1]),
            keys=SessionKeys(bytes.fromhex(keys["send"]), bytes.fromhex(keys["receive"])) if keys else None,
            datagram_size=item.get("datagram_size", 1472),
            epoch=item.get("epoch", 1),
            e2e=item.get("e2e", False),
        )
    return Forwarding(
        links=links,
        next_hop={int(k): v for k, v in cfg.get("next_hop", {}).items()},
        flood_origins=frozenset(cfg.get("flood_origins", ())),
        bcast_children={int(k): tuple(v) for k, v in cfg.get("bcast_children", {}).items()},
        mac_owner={mac(k): v for k, v in cfg.get("mac_owner", {}).items()},
        local_macs=frozenset(mac(m) for m in cfg.get("local_macs", ())),
        frame_mtu={int(k): v for k, v in cfg.get("frame_mtu", {}).items()},
        pairs=tuple(
            Pair(
                p["peer"],
                p["kid"],
                SessionKeys(bytes.fromhex(p["keys"]["send"]), bytes.fromhex(p["keys"]["receive"])),
                p.get("send", True),
                p.get("datagram_size", 1472),
            )
            for p in cfg.get("pairs", ())
        ),
    )


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = json.loads(Path(sys.argv[1]).read_text())
    stats_file = Path(cfg["stats_file"])
    controls: list[dict[str, Any]] = []
    probes = [0]
    lock = threading.Lock()

    def on_control(peer: int, addr: tuple[str, int], payload: bytes, size: int) -> None:
        with lock:
            controls.append({"peer": peer, "addr": list(addr), "payload": payload.hex(), "size": size})

    def on_probe(frame: bytes) -> None:
        probes[0] += 1

    sleeve = open_sleeve(
        cfg["ourself"],
        tap=cfg["tap"],
        listen=(cfg["listen"][0], cfg["listen"][1]),
        workers=cfg.get("workers", 1),
        on_control=on_control,
        on_probe=on_probe,
    )
    fwd = forwarding(cfg)
    sleeve.update(fwd)
    wanted = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)  # before start(): the data thread inherits the mask
    sleeve.start()
    seq = 0
    sent: list[dict[str, Any]] = []

    def dump() -> None:
        stats = sleeve.totals()
        with lock:
            data = {
                "seq": seq,
                "pid": os.getpid(),
                "bytes": {f"{p}/{d}": n for (p, d), n in stats.bytes.items()},
                "dropped": stats.dropped,
                "workers": sleeve.worker_bytes(),
                "control": list(controls),
                "control_sent": list(sent),
                "probes": probes[0],
            }
        tmp = stats_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(stats_file)

    dump()
    try:
        while True:
            sig = signal.sigwait(wanted)
            if sig in (signal.SIGTERM, signal.SIGINT):
                break
            if sig == signal.SIGUSR2:
                for peer in fwd.links:
                    payload = f"hello {cfg['ourself']} -> {peer}".encode()
                    ok = sleeve.send_control(peer, payload, pad_to=cfg.get("control_pad", 0))
                    sent.append({"peer": peer, "ok": ok})
            seq += 1
            dump()
    finally:
        sleeve.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
