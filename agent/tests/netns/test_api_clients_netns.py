"""The agent's API as its clients use it, against a real agent: the CLI's client, the Ansible modules' client
(plugins/module_utils/weft_api.py) and a scraper of the metrics address all get the answers they expect, and the
limits of both listeners hold."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from pathlib import Path

import pytest
from lab import METRICS_PORT, Lab, metric_value

from weft.api.client import ApiError, Client

pytestmark = pytest.mark.netns

MODULE_UTILS = Path(__file__).resolve().parents[3] / "plugins" / "module_utils" / "weft_api.py"


def module_utils():
    """The collection's client module, loaded from its file (it needs nothing of Ansible)."""
    spec = importlib.util.spec_from_file_location("weft_module_utils_api", MODULE_UTILS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def raw_unix(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_every_client_of_the_api_gets_what_it_expects(lab: Lab) -> None:
    h1, h2 = lab(2)
    h2.start_agent()
    h2.wait_ready()
    h1.start_agent()
    h1.wait_ready()
    client = Client(str(h1.api_socket))

    # The CLI's client: status, its sections, connect and forget, the metrics.
    status = client.status()
    assert status["ready"] is True and status["name"] == h1.agent_name
    assert client.request("GET", "/status/targets") == status["targets"]
    assert client.connect([h2.listen_addr]) == {"targets": [h2.listen_addr]}
    assert client.forget(["10.99.9.9"]) == {"forgotten": []}
    text = client.request("GET", "/metrics")
    assert metric_value(text, "weft_peers") >= 1
    with pytest.raises(ApiError, match="no status section 'nope'"):
        client.request("GET", "/status/nope")
    with pytest.raises(ApiError, match="no such API endpoint: GET /nowhere"):
        client.request("GET", "/nowhere")
    with pytest.raises(ApiError, match="POST is not served at /status"):
        client.request("POST", "/status", {})
    with pytest.raises(ApiError, match="'addresses' must be a list"):
        client.request("POST", "/connect", {"addresses": "10.0.0.1"})

    # The modules' client: the same calls, and a name through dns/add, dns/lookup and dns/remove.
    utils = module_utils()
    api = utils.WeftApi(str(h1.api_socket), 10.0)
    assert api.status()["name"] == h1.agent_name
    assert api.ipam_status()["range"] == "10.32.0.0/12"
    added = api.dns_add("db", ["10.32.0.99"])
    assert added == {"name": "db.weft.local.", "addresses": ["10.32.0.99"]}
    assert client.request("GET", "/dns/lookup?name=db") == {"name": "db.weft.local.", "addresses": ["10.32.0.99"]}
    assert api.dns_remove("db")["changed"] is True
    with pytest.raises(utils.WeftApiError) as info:
        api.rmpeer([], force=False)
    assert info.value.status == 400

    # A kept-alive connection serves two requests; the second closes it.
    first = b"GET /status/peers HTTP/1.1\r\nHost: x\r\n\r\n"
    two = raw_unix(h1.api_socket, first + b"GET /status/targets HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert two.count(b"HTTP/1.1 200 OK") == 2

    # A scraper of the metrics address: text/plain Prometheus text, one request a connection; nothing else served.
    scrape = f"""
import json, urllib.request, urllib.error
out = {{}}
with urllib.request.urlopen("http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as r:
    out["type"] = r.headers["Content-Type"]; out["close"] = r.headers["Connection"]; out["body"] = r.read().decode()
with urllib.request.urlopen("http://127.0.0.1:{METRICS_PORT}/status/peers", timeout=10) as r:
    out["peers"] = json.loads(r.read())
for path, method in (("/connect", "POST"), ("/nowhere", "GET")):
    try:
        urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:{METRICS_PORT}" + path, method=method,
                                                      data=b"{{}}" if method == "POST" else None), timeout=10)
    except urllib.error.HTTPError as e:
        out[path] = e.code
print(json.dumps(out))
"""
    out = json.loads(h1.exec(sys.executable, "-c", scrape).stdout)
    assert out["type"].startswith("text/plain; version=0.0.4") and out["close"] == "close"
    assert metric_value(out["body"], "weft_api_connections", listener="metrics") >= 1
    assert {p["name"] for p in out["peers"]} >= {h1.agent_name}
    assert (out["/connect"], out["/nowhere"]) == (405, 404)

    # A request over the metrics address's header limit is a 431, counted; the agent is fine.
    big = f"""
import socket
s = socket.create_connection(("127.0.0.1", {METRICS_PORT}), timeout=10)
s.sendall(b"GET /metrics HTTP/1.1\\r\\nHost: x\\r\\nX: " + b"a" * 9000 + b"\\r\\n\\r\\n")
print(s.recv(100).split(b"\\r\\n")[0].decode())
"""
    assert h1.exec(sys.executable, "-c", big).stdout.strip() == "HTTP/1.1 431 Request Header Fields Too Large"
    text = client.request("GET", "/metrics")
    assert metric_value(text, "weft_api_connections_refused", listener="metrics", reason="too_large") == 1
    assert h1.agent_running()
    assert "Traceback" not in h1.agent_log()
