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
import re
import socket

DEFAULT_SOCKET = "/run/weft/weft.sock"
DEFAULT_PORT = 6783
DEFAULT_TIMEOUT = 10.0
_MAX_HOST_NAME = 253  # RFC 1035: at most 253 characters of text
_MAX_LABEL = 63
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


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
    """HOST[:PORT], [V6]:PORT or a bare IPv6 address to the agent's canonical "host:port", so targets compare equal.

    The twin of weft.mesh.address.peer_address, which the agent reports its targets with: the same hosts accepted
    (IPv4 and IPv6 literals, RFC 1123 names, lower case), the same refused with the same one-line ValueError. Both
    run the cases in agent/tests/unit/data/peer_addresses.json.
    """
    host, port = split_address(text, default_port)
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def split_address(text, default_port=DEFAULT_PORT, what="peer address"):
    """(host, port) of a peer address, the host canonical; ValueError naming the address and what is wrong."""
    whole = text.strip()
    if not whole:
        raise ValueError("empty %s" % what)
    _refuse_zone(whole, whole, what)
    if whole.startswith("["):
        end = whole.find("]")
        if end < 0:
            raise ValueError("%s %s: missing ']'" % (what, _short(whole)))
        host, rest = whole[1:end], whole[end + 1 :]
        if not host or ":" not in host:
            raise ValueError("%s %s: [%s] is not an IPv6 address" % (what, _short(whole), host))
        if rest and not rest.startswith(":"):
            raise ValueError("%s %s: expected ':PORT' after ']'" % (what, _short(whole)))
        port_text = rest[1:] if rest else None
    elif whole.count(":") > 1:
        host, port_text = whole, None  # a bare IPv6 address, no port
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("%s %s is not HOST[:PORT] (write IPv6 as [ADDR]:PORT)" % (what, _short(whole))) from None
    elif ":" in whole:
        host, port_text = whole.split(":")
        if not host:
            raise ValueError("%s %s: missing host" % (what, _short(whole)))
    else:
        host, port_text = whole, None
    port = default_port if port_text is None else _port(port_text, whole, what)
    if any(c.isspace() for c in host):
        raise ValueError("%s %s: the host contains spaces" % (what, _short(whole)))
    return _host_name(host, what if host == whole else "%s %s: host" % (what, _short(whole))), port


def _host_name(text, what):
    """An IPv4 literal, an IPv6 literal or an RFC 1123 name, canonical and lower case (as the agent's host_name)."""
    host = text.strip()
    if not host:
        raise ValueError("%s: empty host" % what)
    _refuse_zone(host, host, what)
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError("%s %s is not an IPv6 address" % (what, _short(host))) from None
    labels = (host[:-1] if host.endswith(".") else host).split(".")
    if all(label.isdecimal() for label in labels):
        # Leading zeros are refused whatever this Python's ipaddress does (older ones took 010 as ten).
        try:
            if not host.isascii() or any(len(label) > 1 and label.startswith("0") for label in labels):
                raise ValueError(host)
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(
                "%s %s is not an IPv4 address (four numbers 0-255, no leading zeros)" % (what, _short(host))
            ) from None
    if not host.isascii():
        raise ValueError("%s %s is not ASCII: write an international name in its xn-- form" % (what, _short(host)))
    name = host.lower()
    name = name[:-1] if name.endswith(".") else name
    if len(name) > _MAX_HOST_NAME:
        raise ValueError("%s %s is %d characters long, the limit is 253" % (what, _short(host), len(name)))
    for label in name.split("."):
        if len(label) > _MAX_LABEL:
            raise ValueError("%s %s has a part of %d characters, the limit is 63" % (what, _short(host), len(label)))
        if not _LABEL.fullmatch(label):
            raise ValueError(
                "%s %s is not a host name (letters, digits and '-' between dots, not starting or ending with '-')"
                % (what, _short(host))
            )
    return name


def _refuse_zone(host, whole, what):
    if "%" in host:
        raise ValueError("%s %s: a scoped IPv6 address (with '%%') is not taken" % (what, _short(whole)))


def _short(text, limit=80):
    """The input, quoted, and cut so that a 300-character mistake still gives a one-line error."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _port(text, whole, what):
    if not text.isascii() or not text.isdecimal() or not 1 <= int(text) < 65536:
        raise ValueError("%s %s: port must be a number from 1 to 65535" % (what, _short(whole)))
    return int(text)


def direct_targets(status):
    """Addresses the agent dials because it was told to (config or API), not ones it discovered by gossip."""
    return sorted(t["address"] for t in status.get("targets") or [] if t.get("origin") != "discovered")
