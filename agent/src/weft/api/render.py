"""Human-readable status, laid out like the status of the routers operators already know."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import cast

from weft.safetext import escape_all


def _escaped(render: Callable[[dict], str]) -> Callable[[dict], str]:
    """Render from a copy whose strings are escaped: peers choose their nicknames and addresses."""

    @functools.wraps(render)
    def wrapper(s: dict) -> str:
        return render(cast(dict, escape_all(s)))

    return wrapper


LATE_LOOP = 1.0  # seconds: an event loop this late (weft_event_loop_lag_seconds) is worth a line in the summary


def _field(label: str, value: object) -> str:
    return f"{label:>15}: {value}"


@_escaped
def summary(s: dict) -> str:
    established = [c for c in s["connections"] if c["state"] == "established"]
    pending = [c for c in s["connections"] if c["state"] == "pending"]
    targets = s["targets"]
    failing = [t for t in targets if t["state"] in ("retrying", "failed")]
    conn_parts = [f"{len(established)} established"]
    if pending:
        conn_parts.append(f"{len(pending)} pending")
    for state in ("connecting", "retrying", "failed", "held"):
        n = sum(1 for t in targets if t["state"] == state)
        if n:
            conn_parts.append(f"{n} {state}" if state != "held" else f"{n} discovered held at a connection limit")
    peer_links = sum(len(p["connections"]) for p in s["peers"])
    encryption = (
        f"enabled ({s['secrets']} secret{'s' if s['secrets'] != 1 else ''})"
        if s["encryption"] == "enabled"
        else "disabled: container traffic crosses the underlay in clear"
    )
    in_clear = [c for c in s["connections"] if c.get("datapath") and not c["datapath"].get("encrypted", True)]
    if s["encryption"] == "enabled" and in_clear:
        # Say it where people look: a secret is set, yet these peers get plaintext (trusted subnets).
        encryption += f"; {len(in_clear)} peer{'s' if len(in_clear) != 1 else ''} in clear on trusted subnets"
    lines = [
        _field("Version", s["version"]),
        "",
        _field("Service", "router"),
        _field("Protocol", s["protocol"]),
        _field("Name", f"{s['name']}({s['nickname']})"),
        _field("Encryption", encryption),
        _field("PeerDiscovery", "enabled" if s["discovery"] else "disabled"),
        _field("Targets", sum(1 for t in targets if t["origin"] != "discovered")),
        _field("Connections", f"{len(established) + len(pending) + len(failing)} ({', '.join(conn_parts)})"),
        _field("Peers", f"{len(s['peers'])} (with {peer_links} established connections)"),
    ]
    paths = [c["datapath"]["path"] for c in s["connections"] if c.get("datapath")]
    if paths:
        counts = ", ".join(f"{paths.count(p)} {p}" for p in ("fast", "sleeve", "relay", "down") if p in paths)
        lines.append(_field("DataPath", counts))
    sealed = [e for e in s.get("end_to_end", []) if e["sealing"] == "end-to-end"]  # absent from an older agent's
    if sealed:
        plural = "s" if len(sealed) != 1 else ""
        lines.append(_field("EndToEnd", f"{len(sealed)} relayed peer{plural} sealed end to end"))
    lag = s.get("loop_lag_s", 0.0)  # absent from an older agent's status
    if lag >= LATE_LOOP:
        late = f"ran {lag:.1f}s late lately: this host gives the agent too little CPU (deadlines allow for it)"
        lines.append(_field("EventLoop", late))
    for conflict in s.get("mac_conflicts", []):  # absent from an older agent's status
        claimants = ", ".join(conflict["peers"])
        lines.append(_field("MACConflict", f"{conflict['mac']} claimed by {claimants}; owner {conflict['owner']}"))
    return "\n".join(lines)


@_escaped
def peers(s: dict) -> str:
    lines = []
    for p in s["peers"]:
        lines.append(f"{p['name']}({p['nickname']})")
        for c in p["connections"]:
            arrow = "->" if c["outbound"] else "<-"
            state = "established" if c["established"] else "pending"
            lines.append(f"   {arrow} {c['address']:<21} {c['peer']}({c['nickname']}) {state}")
    return "\n".join(lines)


@_escaped
def connections(s: dict) -> str:
    """One line per connection: its control state, then the data path it carries traffic on and why."""
    lines = []
    for c in s["connections"]:
        arrow = {True: "->", False: "<-"}.get(c["outbound"], "..")
        enc = "encrypted" if c["encrypted"] else "unencrypted"
        who = f"{c['peer']}({c['nickname']})" if c["peer"] else ""
        address = c["address"] or "-"
        dp = c.get("datapath")
        if dp:
            path = f"{dp['path']:<6} {'encrypted' if dp['encrypted'] else 'plain':<9} mtu={dp['mtu']}"
            why = f"via {dp['via']}" if dp.get("via") else ""
            if dp.get("sealing"):
                why += f", sealed {dp['sealing']}"
            if dp["reason"] and dp["path"] != "fast":
                why = f"{why}; {dp['reason']}" if why else dp["reason"]
            lines.append(f"{arrow} {address:<21} {c['state']:<11} {path} {who} {why}".rstrip())
        else:
            lines.append(f"{arrow} {address:<21} {c['state']:<11} {enc:<11} {who} {c['info']}".rstrip())
    for t in s["targets"]:
        if t["state"] in ("connecting", "retrying", "failed"):
            detail = t["last_error"] or ""
            if t["state"] == "failed" and t["next_try"] is not None:
                detail += f", retry in {t['next_try']:.0f}s"
            lines.append(f"-> {t['address']:<21} {t['state']:<11} {detail}".rstrip())
    return "\n".join(lines)


@_escaped
def targets(s: dict) -> str:
    lines = []
    for t in s["targets"]:
        detail = ""
        if t["last_error"]:
            detail = t["last_error"]
        if t["next_try"] is not None and t["state"] not in ("connected", "connecting"):
            detail += f" (next try in {t['next_try']:.1f}s)"
        lines.append(f"{t['address']:<21} {t['origin']:<10} {t['state']:<10} {detail}".rstrip())
    return "\n".join(lines)


@_escaped
def ipam(s: dict) -> str:
    """The ring as operators read it: the state, then who owns how much of the range and how much is in use."""
    i = s["ipam"]
    subnet = f", default subnet {i['default_subnet']}" if i["default_subnet"] != i["range"] else ""
    lines = [
        _field("Range", i["range"] + subnet),
        _field("Init", i["init"]),
        _field("Status", i["state"]),
    ]
    if i["unreachable_ratio"]:
        lines.append(
            _field(
                "Unreachable",
                f"{100 * i['unreachable_ratio']:.1f}% of the range is owned by unreachable peers: "
                "weft rmpeer them if they are gone",
            )
        )
    for message in i["refused"]:
        lines.append(_field("Refused", message))
    if i["peers"]:
        lines.append("")
        lines.append(f"{'PEER':<30} {'ADDRESSES':>10} {'SHARE':>7} {'IN USE':>7} {'FREE':>8}  REACHABLE")
        for p in i["peers"]:
            who = f"{p['name']}({p['nickname']})" if p["nickname"] else p["name"]
            reach = "yes (this peer)" if p["ourself"] else ("yes" if p["reachable"] else "NO")
            lines.append(f"{who:<30} {p['addresses']:>10} {p['share']:>6.1f}% {p['in_use']:>7} {p['free']:>8}  {reach}")
    if i["allocations"]:
        lines.append("")
        lines.append("ALLOCATED HERE")
        for a in i["allocations"]:
            lines.append(f"{a['address']:<20} {a['holder']}")
    return "\n".join(lines)


@_escaped
def dns(s: dict) -> str:
    """The names the mesh answers, then where they come from."""
    d = s["dns"]
    if not d.get("enabled", True):
        return _field("Status", "off (dns: false)")
    e = d["entries"]
    lines = [
        _field("Domain", d["domain"]),
        _field("Address", f"{d['address']} on the bridge" + ("" if d["serving"] else " (not serving)")),
        _field("Upstreams", ", ".join(d.get("upstreams", [])) or "none"),
        _field("Entries", f"{e['answered']} answered, {e['hidden']} of peers out of reach, {e['tombstones']} removed"),
    ]
    for message in d["refused"]:
        lines.append(_field("Refused", message))
    if d["names"]:
        lines.append("")
        lines.append(f"{'NAME':<40} {'ADDRESS':<16} FROM")
        for n in d["names"]:
            lines.append(f"{n['name']:<40} {n['address']:<16} {n['origin']}")
    return "\n".join(lines)


@_escaped
def end_to_end(s: dict) -> str:
    """The peers reached through relays and how their frames are sealed: end to end, or hop by hop."""
    rows = s.get("end_to_end", [])
    if not rows:
        return "no peer is reached through a relay over hops that pass end-to-end datagrams"
    lines = [f"{'PEER':<30} {'VIA':<18} {'SEALING':<11} {'KEYS':<10} STATE"]
    for e in rows:
        who = f"{e['peer']}({e['nickname']})" if e.get("nickname") else e["peer"]
        keys = f"{e['keys_age']:.0f}s old" if e["keys"] else "none"
        lines.append(f"{who:<30} {e['via']:<18} {e['sealing']:<11} {keys:<10} {e['state']}")
    return "\n".join(lines)


SECTIONS = {
    "peers": peers,
    "connections": connections,
    "targets": targets,
    "ipam": ipam,
    "dns": dns,
    "end_to_end": end_to_end,
}
