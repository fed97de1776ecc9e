"""A stand-in for the Weft agent's control API: HTTP over a unix socket, with the agent's semantics for
/status, /connect, /forget, /attach and /detach (see agent/src/weft/api/server.py), and, once a test gives it a
ring (``ring``), /status/ipam, /rmpeer and attach with allocation; with ``serve_dns``, /status/dns, /dns/add and
/dns/remove; and a log of every request so tests can check
what a module sent, and that check mode sent nothing that changes state.
"""

import ipaddress
import json
import socketserver
import threading
from http.server import BaseHTTPRequestHandler


def normalize(address):
    """The agent's canonical HOST:PORT (enough of it for the tests: IPv4 and names, default port 6783)."""
    return address if ":" in address else address + ":6783"


class FakeAgent:
    def __init__(self, path):
        self.path = path
        self.ready = True
        self.version = "0.1.0"
        self.targets = {}  # address -> origin ("config", "api", "discovered")
        self.attached = {}  # (netns or pid, ifname) -> [cidrs]
        self.requests = []  # (method, path, body)
        self.datapath = True
        self.ipam = None  # None: an agent without IPAM (404); else ring(...) fills it
        self.allocated = {}  # (netns or pid, ifname, subnet) -> cidr
        self.dns = None  # None: an agent without DNS (404); {"enabled": False}: DNS off; else serve_dns() fills it

    def ring(self, *owners, range_="10.32.0.0/12", default_subnet=None, state="ready"):
        """Give the agent a ring: owners are (name, nickname, addresses, reachable), the first is ourself."""
        self.ipam = {
            "range": range_,
            "default_subnet": default_subnet or range_,
            "init": "seed=" + ",".join(sorted(o[0] for o in owners)),
            "state": state,
            "seed": sorted(o[0] for o in owners),
            "tokens": len(owners),
            "peers": [
                {
                    "name": name,
                    "nickname": nickname,
                    "addresses": addresses,
                    "share": 0.0,
                    "in_use": 0,
                    "free": addresses,
                    "ranges": 1 if addresses else 0,
                    "reachable": reachable,
                    "ourself": i == 0,
                }
                for i, (name, nickname, addresses, reachable) in enumerate(owners)
            ],
            "unreachable_ratio": 0.0,
            "allocations": [],
            "pending": 0,
            "refused": [],
        }

    def serve_dns(self, domain="weft.local.", registered=()):
        """DNS on: ``registered`` are this host's (name, address, key) entries."""
        self.dns = {"domain": domain, "registered": [dict(name=n, address=a, key=k) for n, a, k in registered]}

    # -- the API --------------------------------------------------------------------------------------

    def status(self):
        return {
            "version": self.version,
            "ready": self.ready,
            "name": "02:00:00:00:00:01",
            "nickname": "fake",
            "encryption": "enabled",
            "peers": [{"name": "02:00:00:00:00:01", "nickname": "fake", "connections": []}],
            "connections": [],
            "targets": [
                {"address": a, "origin": o, "state": "connecting", "last_error": None, "next_try": None}
                for a, o in sorted(self.targets.items())
            ],
        }

    def connect(self, body):
        addresses = [normalize(a) for a in body["addresses"]]
        if body.get("replace"):
            for address, origin in list(self.targets.items()):
                if origin != "discovered" and address not in addresses:
                    del self.targets[address]
        for address in addresses:
            if self.targets.get(address) in (None, "discovered", "config"):
                self.targets[address] = "api"
        return 200, {"targets": addresses}

    def forget(self, body):
        forgotten = []
        for address in [normalize(a) for a in body["addresses"]]:
            if self.targets.get(address) not in (None, "discovered"):
                del self.targets[address]
                forgotten.append(address)
        return 200, {"forgotten": forgotten}

    def _who(self, body):
        return (body.get("netns") or body.get("pid"), body.get("ifname") or "ethwe")

    def attach(self, body):
        if not self.datapath:
            return 409, {"error": "the data plane is off on this agent (datapath: false); enable it and restart"}
        cidrs = list(body.get("cidrs") or [])
        subnets = [c[4:] for c in cidrs if c.startswith("net:")] or ([] if cidrs else [None])
        if subnets and self.ipam is None:
            return 400, {"error": "give at least one address, like 10.32.0.5/12"}
        key = self._who(body)
        for subnet in subnets:
            subnet = subnet or self.ipam["default_subnet"]
            where = (*key, subnet)
            if where not in self.allocated:
                network = ipaddress.ip_network(subnet)
                taken = set(self.allocated.values())
                host = next(h for h in network.hosts() if "%s/%d" % (h, network.prefixlen) not in taken)
                self.allocated[where] = "%s/%d" % (host, network.prefixlen)
            cidrs.append(self.allocated[where])
        cidrs = [c for c in cidrs if not c.startswith("net:")]
        have = self.attached.setdefault(key, [])
        added = [c for c in cidrs if c not in have]
        have.extend(added)
        return 200, {
            "changed": bool(added),
            "interface": key[1],
            "host_interface": "vwe00000001",
            "mac": "a2:00:00:00:00:01",
            "addresses": list(have),
        }

    def detach(self, body):
        key = self._who(body)
        if key not in self.attached:
            return 200, {"changed": False, "addresses": []}
        have = self.attached[key]
        drop = body.get("cidrs") or []
        changed = any(c in have for c in drop)
        remaining = [c for c in have if c not in drop]
        if not drop or not remaining:
            del self.attached[key]
            return 200, {"changed": True, "addresses": []}
        self.attached[key] = remaining
        return 200, {"changed": changed, "addresses": remaining}

    def rmpeer(self, body):
        peers = self.ipam["peers"]
        found = []
        for text in body["peers"]:
            match = [p for p in peers if text in (p["name"], p["nickname"])]
            if not match:
                if ":" not in text:
                    return 400, {"error": "no peer named or nicknamed %r is known here (see weft status ipam)" % text}
                found.append({"name": text, "nickname": "", "addresses": 0, "reachable": False, "ourself": False})
                continue
            peer = match[0]
            if peer["ourself"]:
                return 409, {"error": "rmpeer names this peer itself: run it on another peer of the mesh"}
            if peer["reachable"] and not body.get("force"):
                return 409, {
                    "error": "%s(%s) is reachable: rmpeer is for peers that are gone for good"
                    % (peer["name"], peer["nickname"])
                }
            found.append(peer)
        reclaimed = {}
        for peer in found:
            reclaimed[peer["name"]] = peer["addresses"]
            peers[0]["addresses"] += peer["addresses"]
            peer["addresses"] = 0
        self.ipam["peers"] = [p for p in peers if p["ourself"] or p["addresses"]]
        return 200, {"reclaimed": reclaimed}

    def _dns_name(self, name):
        name = name.lower()
        return name if name.endswith(".") else (name + "." + self.dns["domain"] if "." not in name else name + ".")

    def dns_add(self, body):
        if self.dns.get("enabled") is False:
            return 409, {"error": "DNS is off on this agent (dns: false)"}
        name = self._dns_name(body["name"])
        key = "name:" + name
        have = [r for r in self.dns["registered"] if r["key"] == key]
        for address in body["addresses"]:
            if not any(r["address"] == address for r in have):
                self.dns["registered"].append({"name": name, "address": address, "key": key})
        held = sorted(r["address"] for r in self.dns["registered"] if r["key"] == key)
        return 200, {"name": name, "addresses": held}

    def dns_remove(self, body):
        if self.dns.get("enabled") is False:
            return 409, {"error": "DNS is off on this agent (dns: false)"}
        name = self._dns_name(body["name"])
        only = body.get("addresses") or None
        gone = [r for r in self.dns["registered"] if r["name"] == name and (only is None or r["address"] in only)]
        self.dns["registered"] = [r for r in self.dns["registered"] if r not in gone]
        removed = sorted({r["address"] for r in gone})
        return 200, {"name": name, "removed": removed, "changed": bool(removed)}

    def changes(self):
        """Requests that change the agent's state."""
        return [r for r in self.requests if r[0] == "POST"]

    # -- serving --------------------------------------------------------------------------------------

    def start(self):
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def address_string(self):
                return "unix"  # unix sockets have no client address

            def log_message(self, *args):
                pass

            def _answer(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                agent.requests.append(("GET", self.path, None))
                if self.path == "/status":
                    self._answer(200, agent.status())
                elif self.path == "/status/ipam" and agent.ipam is not None:
                    self._answer(200, agent.ipam)
                elif self.path == "/status/dns" and agent.dns is not None:
                    self._answer(200, agent.dns)
                else:
                    self._answer(404, {"error": "no such path"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"null")
                agent.requests.append(("POST", self.path, body))
                action = {
                    "/connect": agent.connect,
                    "/forget": agent.forget,
                    "/attach": agent.attach,
                    "/detach": agent.detach,
                    "/rmpeer": agent.rmpeer if agent.ipam is not None else None,
                    "/dns/add": agent.dns_add if agent.dns is not None else None,
                    "/dns/remove": agent.dns_remove if agent.dns is not None else None,
                }.get(self.path)
                if action is None:
                    self._answer(404, {"error": "no such path"})
                else:
                    self._answer(*action(body))

        self.server = socketserver.ThreadingUnixStreamServer(self.path, Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
        import os

        os.unlink(self.path)
