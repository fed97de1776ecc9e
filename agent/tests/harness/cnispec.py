"""What the CNI spec requires of a plugin's result, checked by the plugin's tests with and without root."""

from __future__ import annotations

from typing import Any


def check_result(result: dict[str, Any], version: str = "1.0.0") -> None:
    """The spec's required fields and types of an ADD result (SPEC.md, "Success")."""
    assert result["cniVersion"] == version
    assert isinstance(result["interfaces"], list) and result["interfaces"]
    for iface in result["interfaces"]:
        assert isinstance(iface["name"], str) and iface["name"]
        assert isinstance(iface.get("mac", ""), str) and isinstance(iface.get("sandbox", ""), str)
    for ip in result["ips"]:
        assert isinstance(ip["address"], str) and "/" in ip["address"]
        assert isinstance(ip["interface"], int) and 0 <= ip["interface"] < len(result["interfaces"])
        assert ("version" in ip) == (version != "1.0.0")
    for route in result.get("routes", []):
        assert isinstance(route["dst"], str) and "/" in route["dst"]
    if "dns" in result:
        dns = result["dns"]
        assert all(isinstance(n, str) for n in dns.get("nameservers", []))
        assert isinstance(dns.get("domain", ""), str) and all(isinstance(s, str) for s in dns.get("search", []))
