"""The ``weft`` commands that talk to a running agent through its local API, on click (``weft run``, the agent
itself, is ``weft.runcmd``: ``weft.cli`` sends it there before click is imported).

Only what every command needs is imported here: the commands that talk to the agent (attach above all, run by
orchestrators once per container) start in a fraction of the time that the agent's own modules (the config model,
asyncio, the store) take to import, so those are imported by the commands that use them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from weft import __version__
from weft.api import DEFAULT_SOCKET, render

if TYPE_CHECKING:
    from weft.api.client import Client


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--api-socket",
    envvar="WEFT_API_SOCKET",
    default=DEFAULT_SOCKET,
    show_default=True,
    help="The agent's API socket (also WEFT_API_SOCKET).",
)
@click.version_option(__version__, prog_name="weft")
@click.pass_context
def main(ctx: click.Context, api_socket: str) -> None:
    """Weft: an encrypted overlay mesh for hybrid clouds.

    `weft run` is the agent (one per host, usually started by systemd). The other commands talk to the
    agent on this host through its API socket.
    """
    if ctx.invoked_subcommand == "run":
        return  # the agent has no use for the API's client (http.client, the email package)
    from weft.api.client import Client

    ctx.obj = Client(api_socket)


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.pass_context
def run(ctx: click.Context) -> None:
    """Run the agent in the foreground until SIGTERM (weft run --help: its flags)."""
    from weft.runcmd import run as run_agent

    run_agent(ctx.args)  # `weft --api-socket ... run`: `weft run` itself never comes here (weft.cli)


@main.command()
@click.argument("section", required=False, type=click.Choice(list(render.SECTIONS)))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def status(client: Client, section: str | None, as_json: bool) -> None:
    """Show the agent's status, or one section of it: peers, connections, targets, ipam, dns or end_to_end."""
    data = _call(client.status)
    if as_json:
        click.echo(json.dumps(data[section] if section else data, indent=2))
    else:
        click.echo(render.SECTIONS[section](data) if section else render.summary(data))


@main.command()
@click.argument("addresses", nargs=-1, required=True)
@click.option("--replace", is_flag=True, help="Make these the only direct targets.")
@click.pass_obj
def connect(client: Client, addresses: tuple[str, ...], replace: bool) -> None:
    """Add peers HOST[:PORT] to connect to (kept across restarts with --resume)."""
    result = _call(lambda: client.connect(list(addresses), replace))
    click.echo(f"targets: {' '.join(result['targets'])}")


@main.command()
@click.argument("addresses", nargs=-1, required=True)
@click.pass_obj
def forget(client: Client, addresses: tuple[str, ...]) -> None:
    """Stop connecting to peers HOST[:PORT] (an established connection stays until it ends)."""
    result = _call(lambda: client.forget(list(addresses)))
    click.echo(f"forgotten: {' '.join(result['forgotten']) or 'none (they were not targets)'}")


def _container_options(fn):
    fn = click.option("--ifname", default="ethwe", show_default=True, help="Interface name inside the container.")(fn)
    fn = click.option("--pid", type=int, help="A process in the container's network namespace.")(fn)
    fn = click.option("--netns", help="The container's network namespace (a name from `ip netns list`).")(fn)
    return fn


def _overlay(client: Client, action: str, body: dict) -> None:
    client.timeout = max(client.timeout, 45.0)  # an allocation may wait up to 30 s for a first ring
    result = _call(lambda: client.request("POST", f"/{action}", body))
    if not result["changed"]:
        click.echo(f"{action}: nothing to do")
    elif action == "attach":
        named = f" as {result['name']}" if result.get("name") else ""
        click.echo(f"attached {result['interface']} ({result['mac']}): {' '.join(result['addresses'])}{named}")
    else:
        click.echo(f"{action}: {' '.join(result['addresses']) or 'done'}")


@main.command()
@_container_options
@click.option("--name", help="A DNS name for the container (web means web.weft.local), answered on every host.")
@click.argument("cidrs", nargs=-1)
@click.pass_obj
def attach(
    client: Client, netns: str | None, pid: int | None, ifname: str, name: str | None, cidrs: tuple[str, ...]
) -> None:
    """Put a container on the overlay; with no CIDR it gets a free address of the default subnet.

    CIDRS: net:SUBNET for a free address of that subnet of the allocation range (net:10.40.0.0/16), or an
    address (10.32.0.5/12): one inside the range is reserved in the ring and refused if another container
    holds it. The container keeps its address while attached, across agent restarts; detach frees it.

    Makes a veth pair: one end on the weft bridge, the other (ethwe) in the container with the
    addresses, the overlay MTU and a route for multicast (224.0.0.0/4). Running it again changes nothing.

    With --name, every container in the mesh resolves the name to this container's addresses while it is
    attached; a named network namespace's resolver is pointed at the agent (/etc/netns/NAME/resolv.conf).
    """
    body = {"netns": netns, "pid": pid, "ifname": ifname, "cidrs": list(cidrs)}
    if name is not None:
        body["name"] = name
    _overlay(client, "attach", body)


@main.command()
@_container_options
@click.argument("cidrs", nargs=-1)
@click.pass_obj
def detach(client: Client, netns: str | None, pid: int | None, ifname: str, cidrs: tuple[str, ...]) -> None:
    """Take addresses off a container; with no CIDR (or once none remain) remove its overlay interface."""
    _overlay(client, "detach", {"netns": netns, "pid": pid, "ifname": ifname, "cidrs": list(cidrs)})


@main.command()
@click.argument("cidrs", nargs=-1)
@click.pass_obj
def expose(client: Client, cidrs: tuple[str, ...]) -> None:
    """Give this host itself addresses on the overlay (on the weft bridge); with no CIDR, a free one of the
    default subnet (net:SUBNET and addresses work as for attach)."""
    _overlay(client, "expose", {"cidrs": list(cidrs)})


@main.command()
@click.argument("cidrs", nargs=-1)
@click.pass_obj
def hide(client: Client, cidrs: tuple[str, ...]) -> None:
    """Remove addresses that `weft expose` gave this host (with no CIDR, every address it allocated)."""
    _overlay(client, "hide", {"cidrs": list(cidrs)})


@main.command()
@click.argument("peers", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Reclaim even a peer that is reachable (it must never allocate again).")
@click.pass_obj
def rmpeer(client: Client, peers: tuple[str, ...], force: bool) -> None:
    """Take the address ranges of dead peers (NAME or NICKNAME) over, and tell the mesh.

    For peers that are gone for good (a terminated instance, a decommissioned host): their space would
    otherwise stay unusable. Refused while a peer is reachable, unless --force. Run it on one peer only.
    """
    result = _call(lambda: client.request("POST", "/rmpeer", {"peers": list(peers), "force": force}))
    for name, count in result["reclaimed"].items():
        click.echo(f"{name}: {count} address(es) reclaimed" if count else f"{name}: owned nothing (already reclaimed)")


@main.command("dns-add")
@click.argument("name")
@click.argument("addresses", nargs=-1, required=True)
@click.pass_obj
def dns_add(client: Client, name: str, addresses: tuple[str, ...]) -> None:
    """Give NAME (web means web.weft.local) these IPv4 ADDRESSES in the mesh's DNS, for what is no container
    (a host's exposed address, a service). Kept across agent restarts; dns-remove takes it back."""
    result = _call(lambda: client.request("POST", "/dns/add", {"name": name, "addresses": list(addresses)}))
    click.echo(f"{result['name']} {' '.join(result['addresses'])}")


@main.command("dns-remove")
@click.argument("name")
@click.argument("addresses", nargs=-1)
@click.pass_obj
def dns_remove(client: Client, name: str, addresses: tuple[str, ...]) -> None:
    """Take ADDRESSES (all of them if none given) from NAME, as this host registered it (dns-add or attach --name)."""
    result = _call(lambda: client.request("POST", "/dns/remove", {"name": name, "addresses": list(addresses)}))
    if result["changed"]:
        click.echo(f"{result['name']}: removed {' '.join(result['removed'])}")
    else:
        click.echo(f"{result['name']}: nothing to remove (this host gave it no such address)")


@main.command("dns-lookup")
@click.argument("name")
@click.pass_obj
def dns_lookup(client: Client, name: str) -> None:
    """The addresses the mesh's DNS gives NAME now (as every container asking this host is told)."""
    from urllib.parse import quote

    result = _call(lambda: client.request("GET", f"/dns/lookup?name={quote(name)}"))
    if not result["addresses"]:
        raise click.ClickException(f"{result['name']}: no such name in the mesh")
    click.echo("\n".join(result["addresses"]))


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), envvar="WEFT_CONFIG", help="Config file.")
@click.option("--bridge", help="The bridge to remove (default: from the config, else weft).")
@click.option("--state-dir", type=click.Path(path_type=Path), help="Also remove this state dir (default: keep it).")
@click.pass_obj
def reset(client: Client, config_path: Path | None, bridge: str | None, state_dir: Path | None) -> None:
    """Remove this host's overlay: containers' interfaces, the bridge, the fast-path and sleeve devices.

    Refuses while the agent runs (stop it first: systemctl stop weft). Traffic between containers stops.
    """
    from weft.api.client import ApiError
    from weft.config import ConfigError, load_config

    try:
        client.status()
    except ApiError:
        pass
    else:
        raise click.ClickException("the agent is running: stop it first (systemctl stop weft), then run weft reset")
    try:
        config = load_config(config_path, os.environ, {"bridge": bridge})
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    from weft.datapath.attach import reset as reset_devices
    from weft.datapath.fastguard import remove as remove_guard
    from weft.datapath.fastguard import table_name
    from weft.datapath.netdev import NetDev
    from weft.datapath.plane import device_names

    vxlan, tap = device_names(config.bridge, config.vxlan_port)
    nd = NetDev()
    try:
        removed = reset_devices(nd, bridge=config.bridge, vxlan=vxlan, tap=tap)
    finally:
        nd.close()
    if remove_guard(config.vxlan_port):
        removed.append(f"nftables table inet {table_name(config.vxlan_port)}")
    from weft.datapath import dnsaddr
    from weft.datapath.portguard import NftError, remove_table

    try:
        if remove_table():
            removed.append("nftables table bridge weft_portguard")
        if dnsaddr.remove():
            removed.append(f"nftables table bridge {dnsaddr.TABLE}")
    except NftError as exc:
        raise click.ClickException(f"cannot remove the container port guard: {exc}") from None
    click.echo(f"removed: {' '.join(removed)}" if removed else "nothing to remove")
    if state_dir is not None and state_dir.is_dir():
        import shutil

        shutil.rmtree(state_dir)
        click.echo(f"removed state dir {state_dir}")


@main.command()
@click.pass_obj
def report(client: Client) -> None:
    """Everything the agent knows, as JSON (what `weft status --json` prints): for support requests and scripts."""
    click.echo(json.dumps(_call(lambda: client.request("GET", "/report")), indent=2))


def _call(fn):
    from weft.api.client import ApiError

    try:
        return fn()
    except ApiError as exc:
        raise click.ClickException(str(exc)) from None
