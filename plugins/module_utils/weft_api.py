# -*- coding: utf-8 -*-
# Copyright: (c) 2026, Weft engineers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Talk to the Weft agent's control API (HTTP over a unix socket) from modules.

Modules run on the managed host with the system python3, where the agent's own package is not importable
(it lives in its venv), so this is a standard-library twin of weft.api.client. Every failure becomes one
WeftApiError whose message says what to do.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import http.client
import ipaddress
import json
import socket

DEFAULT_SOCKET = "/run/weft/weft.sock"
DEFAULT_PORT = 6783
DEFAULT_TIMEOUT = 10.0


def api_argument_spec():
    """Options every weft_* module takes (documented in the weft.mesh.api doc fragment)."""
    return dict(
        api_socket=dict(type="path", default=DEFAULT_SOCKET),
        timeout=dict(type="float", default=DEFAULT_TIMEOUT),
    )


class WeftApiError(Exception):
    """The agent could not be reached or refused the request (``status``: the HTTP status, None if unreached)."""

    def __init__(self, message, status=None):
        Exception.__init__(self, message)
        self.status = status


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        http.client.HTTPConnection.__init__(self, "localhost", timeout=timeout)
        self._path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except Exception:
            sock.close()
            raise
        self.sock = sock


class WeftApi:
    def __init__(self, api_socket=DEFAULT_SOCKET, timeout=DEFAULT_TIMEOUT):
        self.api_socket = api_socket
        self.timeout = timeout

    @classmethod
    def from_module(cls, module):
        return cls(module.params["api_socket"], module.params["timeout"])

    def request(self, method, path, body=None):
        conn = _UnixHTTPConnection(self.api_socket, self.timeout)
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except socket.timeout:
            raise WeftApiError("the agent at %s did not answer within %gs" % (self.api_socket, self.timeout)) from None
        except (IOError, OSError, http.client.HTTPException) as exc:
            raise WeftApiError(self._describe(exc)) from None
        finally:
            conn.close()
        try:
            decoded = json.loads(data.decode("utf-8")) if data else None
        except ValueError:
            decoded = None
        if response.status >= 400:
            reason = decoded.get("error") if isinstance(decoded, dict) else None
            raise WeftApiError(
                "the agent refused %s %s (HTTP %d): %s"
                % (method, path, response.status, reason or data.decode("utf-8", "replace")[:200] or response.reason),
                response.status,
            )
        if decoded is None:
            raise WeftApiError("the agent's answer to %s %s is not JSON: %r" % (method, path, data[:200]))
        return decoded

    def _describe(self, exc):
        code = getattr(exc, "errno", None)
        where = self.api_socket
        if code == errno.ENOENT:
            return "no agent API at %s: is weft running? (systemctl status weft)" % where
        if code == errno.ECONNREFUSED:
            return "nothing answers on %s (a socket left by a stopped agent?): is weft running?" % where
        if code in (errno.EACCES, errno.EPERM):
            return "permission denied on %s: the agent's API is for root only (use become: true)" % where
        return "cannot talk to the agent at %s: %s" % (where, exc)

    def status(self):
        return self.request("GET", "/status")

    def connect(self, addresses, replace=False):
        return self.request("POST", "/connect", {"addresses": list(addresses), "replace": bool(replace)})

    def forget(self, addresses):
        return self.request("POST", "/forget", {"addresses": list(addresses)})

    def attach(self, body):
        return self.request("POST", "/attach", body)

    def detach(self, body):
        return self.request("POST", "/detach", body)

    def ipam_status(self):
        """The address ring as this agent sees it (``weft status ipam --json``)."""
        try:
            return self.request("GET", "/status/ipam")
        except WeftApiError as exc:
            if exc.status == 404:
                raise WeftApiError(
                    "the agent at %s has no IPAM (GET /status/ipam: not found): it runs a version before address "
                    "management; upgrade it" % self.api_socket,
                    404,
                ) from None
            raise

    def dns_status(self):
        """The name table as this agent sees it (``weft status dns --json``); fails when the agent serves no DNS."""
        try:
            answer = self.request("GET", "/status/dns")
        except WeftApiError as exc:
            if exc.status == 404:
                raise WeftApiError(
                    "the agent at %s has no DNS (GET /status/dns: not found): it runs a version before names; upgrade "
                    "it" % self.api_socket,
                    404,
                ) from None
            raise
        if answer.get("enabled") is False:
            raise WeftApiError("DNS is off on the agent at %s (dns: false; the role's weft_dns)" % self.api_socket, 409)
        return answer

    def dns_add(self, name, addresses):
        """``name`` also has ``addresses`` (kept across restarts): {"name": fqdn, "addresses": all it has here}."""
        return self.request("POST", "/dns/add", {"name": name, "addresses": list(addresses)})

    def dns_remove(self, name, addresses=None):
        """``name`` no longer has ``addresses`` on this host (all of them when None): {"name", "removed", "changed"}."""
        body = {"name": name}
        if addresses is not None:
            body["addresses"] = list(addresses)
        return self.request("POST", "/dns/remove", body)

    def rmpeer(self, peers, force=False):
        """Take the ranges of dead peers over: {"reclaimed": {name: addresses}}."""
        return self.request("POST", "/rmpeer", {"peers": list(peers), "force": bool(force)})


def normalize_address(text, default_port=DEFAULT_PORT):
    """HOST[:PORT] or [V6]:PORT to the agent's canonical "host:port", so targets compare equal.

    Mirrors weft.mesh.connection_maker.normalize_address: the agent reports its targets in this form.
    Raises ValueError with a message naming the address.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty peer address")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("peer address %r: missing ']'" % text)
        after = end + 1
        host, rest = text[1:end], text[after:]
        _ipv6(host, text)
        port = default_port
        if rest:
            if not rest.startswith(":"):
                raise ValueError("peer address %r: expected ':PORT' after ']'" % text)
            port = _port(rest[1:], text)
        return "[%s]:%d" % (host, port)
    colons = text.count(":")
    if colons > 1:  # a bare IPv6 address, no port
        _ipv6(text, text)
        return "[%s]:%d" % (text, default_port)
    host, port = text, default_port
    if colons == 1:
        host, port_text = text.split(":")
        port = _port(port_text, text)
    if not host or any(c.isspace() for c in host):
        raise ValueError("peer address %r: missing host" % text)
    return "%s:%d" % (host, port)


def _ipv6(host, whole):
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError("peer address %r is not HOST[:PORT] (write IPv6 as [ADDR]:PORT)" % whole) from None


def _port(text, whole):
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError("peer address %r: port must be a number from 1 to 65535" % whole)
    return int(text)


def direct_targets(status):
    """Addresses the agent dials because it was told to (config or API), not ones it discovered by gossip."""
    return sorted(t["address"] for t in status.get("targets") or [] if t.get("origin") != "discovered")
