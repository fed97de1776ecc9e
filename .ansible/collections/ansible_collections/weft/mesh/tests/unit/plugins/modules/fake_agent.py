"""A stand-in for the Weft agent's control API: HTTP over a unix socket, with the agent's semantics for
/status, /connect, /forget, /attach and /detach (see agent/src/weft/api/server.py), and a log of every
request so tests can check what a module sent, and that check mode sent nothing that changes state.
"""

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
        if not body.get("cidrs"):
            return 400, {"error": "give at least one address, like 10.32.0.5/12"}
        key = self._who(body)
        have = self.attached.setdefault(key, [])
        added = [c for c in body["cidrs"] if c not in have]
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
