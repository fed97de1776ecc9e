"""Configuration: file < WEFT_* variables < flags, errors that name the setting, and private secret files."""

from __future__ import annotations

from pathlib import Path

import pytest

from weft.config import ConfigError, load_config, read_secrets

SECRET = b"correct-horse-battery-staple-42"


def write(path: Path, text: str | bytes, mode: int = 0o600) -> Path:
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    path.chmod(mode)
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write(
        tmp_path / "weft.yaml",
        "nickname: from-file\nlog_level: debug\npeers: [10.0.0.1, 10.0.0.2]\nconn-limit: 7\nlisten: 0.0.0.0:7000\n",
    )


# -- layering -----------------------------------------------------------------------------------------


def test_file_settings_apply_over_defaults(config_file: Path) -> None:
    config = load_config(config_file, {}, {})
    assert config.nickname == "from-file"
    assert config.log_level == "debug"
    assert config.peers == ["10.0.0.1:6783", "10.0.0.2:6783"]
    assert config.conn_limit == 7  # dashes in file keys work too
    assert config.listen_host_port() == ("0.0.0.0", 7000)
    assert config.discovery is True  # untouched settings keep their defaults


def test_environment_overrides_the_file(config_file: Path) -> None:
    env = {"WEFT_LOG_LEVEL": "warning", "WEFT_PEERS": "10.0.0.9", "HOME": "/root", "WEFT_CONN_LIMIT": "9"}
    config = load_config(config_file, env, {})
    assert config.log_level == "warning"
    assert config.peers == ["10.0.0.9:6783"]
    assert config.conn_limit == 9
    assert config.nickname == "from-file"


def test_flags_override_the_environment_and_the_file(config_file: Path) -> None:
    env = {"WEFT_LOG_LEVEL": "warning", "WEFT_NICKNAME": "from-env"}
    flags = {"log_level": "error", "peers": ("10.0.0.8:7000",), "nickname": None, "secret_files": ()}
    config = load_config(config_file, env, flags)
    assert config.log_level == "error"
    assert config.peers == ["10.0.0.8:7000"]
    assert config.nickname == "from-env"  # a flag left unset (None) does not override


def test_env_list_values_split_on_commas_and_spaces(tmp_path: Path) -> None:
    empty = write(tmp_path / "weft.yaml", "")
    env = {"WEFT_PEERS": "a, b  c,d,,[fd00::1]:7000", "WEFT_SECRET_FILES": "/etc/weft/new,/etc/weft/old"}
    config = load_config(empty, env, {})
    assert config.peers == ["a:6783", "b:6783", "c:6783", "d:6783", "[fd00::1]:7000"]
    assert config.secret_files == [Path("/etc/weft/new"), Path("/etc/weft/old")]
    # The singular spellings work too.
    config = load_config(empty, {"WEFT_PEER": "x y", "WEFT_SECRET_FILE": "/s"}, {})
    assert config.peers == ["x:6783", "y:6783"]
    assert config.secret_files == [Path("/s")]


@pytest.mark.parametrize(("raw", "expected"), [("off", False), ("0", False), ("false", False), ("no", False)])
def test_discovery_can_be_switched_off_from_the_environment(tmp_path: Path, raw: str, expected: bool) -> None:
    config = load_config(write(tmp_path / "weft.yaml", ""), {"WEFT_DISCOVERY": raw}, {})
    assert config.discovery is expected
    config = load_config(write(tmp_path / "weft.yaml", ""), {"WEFT_DISCOVERY": "true"}, {})
    assert config.discovery is True


# -- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file_text", "env", "flags", "setting"),
    [
        ("listen: nowhere\n", {}, {}, "listen"),
        ("", {"WEFT_LISTEN": "0.0.0.0:99999"}, {}, "listen"),
        ("", {}, {"metrics_addr": "localhost"}, "metrics_addr"),
        ("peers: [10.0.0.1, 'host:http']\n", {}, {}, "peers"),
        ("", {"WEFT_PEERS": "a b:0"}, {}, "peers"),
        ("", {}, {"peers": ["[fd00::1"]}, "peers"),
        ("name: not-a-mac\n", {}, {}, "name"),
        ("", {"WEFT_NAME": "00:00:00:00:00:00"}, {}, "name"),
        ("colour: blue\n", {}, {}, "colour"),
        ("log_level: chatty\n", {}, {}, "log_level"),
        ("heartbeat_interval: -1\n", {}, {}, "heartbeat_interval"),
        ("conn_limit: lots\n", {}, {}, "conn_limit"),
        ("advertise: 'h:0'\n", {}, {}, "advertise"),
        ("dns_address: 10.0.0.53\n", {}, {}, "dns_address"),  # routable: every host holds it on its bridge
        ("", {"WEFT_DNS_ADDRESS": "fe80::53"}, {}, "dns_address"),
        ("", {"WEFT_DNS_UPSTREAM": "dns.example"}, {}, "dns_upstream"),  # a name would need DNS to be found
        ("dns_domain: 'weft..local'\n", {}, {}, "dns_domain"),
        ("dns_ttl: -1\n", {}, {}, "dns_ttl"),
        ("datapath_workers: 0\n", {}, {}, "datapath_workers"),
        ("", {"WEFT_DATAPATH_WORKERS": "17"}, {}, "datapath_workers"),
        ("", {}, {"datapath_workers": "many"}, "datapath_workers"),
    ],
)
def test_a_bad_setting_is_a_config_error_naming_it(
    tmp_path: Path, file_text: str, env: dict[str, str], flags: dict[str, object], setting: str
) -> None:
    path = write(tmp_path / "weft.yaml", file_text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env, flags)
    assert setting in str(info.value)


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", {}, {})


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "listen: [\n"])
def test_a_config_file_that_is_not_a_mapping_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "weft.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path, {}, {})
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["1: 2\n", "null: x\n", "true: yes\n", "[a, b]: c\n"])
def test_a_config_file_with_non_string_keys_is_a_config_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        load_config(write(tmp_path / "weft.yaml", text), {}, {})


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path / "weft.yaml", b"nickname: caf\xe9\n")  # Latin-1, as some editors save it
    with pytest.raises(ConfigError) as info:
        load_config(path, {}, {})
    assert str(path) in str(info.value)


# -- secret files --------------------------------------------------------------------------------------


def test_secrets_are_read_in_order_without_surrounding_whitespace(tmp_path: Path) -> None:
    new = write(tmp_path / "new", SECRET + b"\n")
    old = write(tmp_path / "old", b"  the-old-secret-value \n")
    assert read_secrets([new, old]) == [SECRET, b"the-old-secret-value"]
    assert read_secrets([]) == []


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_secret_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "secret", SECRET, mode)
    with pytest.raises(ConfigError) as info:
        read_secrets([path])
    message = str(info.value)
    assert f"chmod 600 {path}" in message
    assert f"{mode:04o}" in message
    assert SECRET.decode() not in message


def test_a_missing_secret_file_is_a_config_error(tmp_path: Path) -> None:
    good = write(tmp_path / "good", SECRET)
    with pytest.raises(ConfigError) as info:
        read_secrets([good, tmp_path / "missing"])
    assert str(tmp_path / "missing") in str(info.value)
    assert SECRET.decode() not in str(info.value)


def test_a_directory_is_not_a_secret_file(tmp_path: Path) -> None:
    directory = tmp_path / "secrets.d"
    directory.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_secrets([directory])


@pytest.mark.parametrize("content", [b"", b"\n\n", b"Zq9!", b"  Zq9!xY7  \n"])
def test_a_too_short_secret_is_refused_without_echoing_it(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path / "secret", content)
    with pytest.raises(ConfigError) as info:
        read_secrets([path])
    message = str(info.value)
    assert str(path) in message
    if content.strip():
        assert content.strip().decode() not in message


def test_secrets_never_appear_in_config_errors(tmp_path: Path) -> None:
    secret = SECRET.decode()
    attempts = [
        (f"secret: {secret}\n", {}),  # an unknown key holding a secret
        (f"secret_files: {secret}\n", {}),  # the secret where a list of files belongs
        (f"secret_files: {{x: {secret}}}\n", {}),
        (f"nickname: [{secret}]\n", {}),
        (f"secret_files: [{{a: {secret}}}]\n", {}),
    ]
    for text, env in attempts:
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path / "weft.yaml", text), env, {})
        assert secret not in str(info.value), text or env


def test_dns_settings_from_every_source(tmp_path: Path) -> None:
    path = write(tmp_path / "weft.yaml", "dns_domain: Mesh.Example\ndns_ttl: 5\n")
    config = load_config(path, {"WEFT_DNS_UPSTREAM": "10.1.1.1, 10.1.1.2:5353"}, {"dns_address": "169.254.1.1"})
    assert (config.dns, config.dns_domain, config.dns_ttl) == (True, "mesh.example.", 5)
    assert config.dns_upstream == ["10.1.1.1:53", "10.1.1.2:5353"]
    assert config.dns_address == "169.254.1.1"
    assert load_config(None, {"WEFT_DNS": "off"}, {}).dns is False


def test_datapath_workers_default_to_the_cores_up_to_four_and_can_be_set(tmp_path: Path) -> None:
    import os

    empty = write(tmp_path / "empty.yaml", "")
    assert load_config(empty, {}, {}).workers() == min(4, len(os.sched_getaffinity(0)))
    assert load_config(empty, {"WEFT_DATAPATH_WORKERS": "3"}, {}).workers() == 3
    path = write(tmp_path / "weft.yaml", "datapath-workers: 2\n")
    assert load_config(path, {}, {"datapath_workers": 1}).workers() == 1
    assert load_config(path, {}, {}).workers() == 2


def test_every_flag_of_weft_run_reaches_the_configuration(tmp_path: Path) -> None:
    """What `weft run` is given on its command line is what the agent runs with; a flag not given leaves the
    environment's or the file's value (and a repeated flag is a list, in order)."""
    from weft.runcmd import parse

    argv = [
        "--name", "02:1f:aa:00:00:01", "--nickname", "dc1-a", "--listen", "10.0.0.1:6783",
        "--advertise", "198.51.100.7", "--peer", "10.0.0.2", "--peer", "10.0.0.3:7000",
        "--secret-file", str(tmp_path / "s1"), "--secret-file", str(tmp_path / "s2"),
        "--state-dir", str(tmp_path / "state"), "--api-socket", str(tmp_path / "api.sock"),
        "--metrics-addr", "127.0.0.1:9100", "--no-discovery", "--resume", "--no-datapath", "--bridge", "ovl",
        "--vxlan-port", "4789", "--mtu", "1400", "--datapath-workers", "2",
        "--trusted-subnet", "10.0.0.0/24", "--trusted-subnet", "10.1.0.0/24",
        "--ipalloc-range", "10.40.0.0/16", "--ipalloc-default-subnet", "10.40.1.0/24", "--ipalloc-init", "observer",
        "--no-dns", "--dns-domain", "corp.example", "--dns-address", "169.254.53.54", "--dns-ttl", "5",
        "--dns-upstream", "10.0.0.53", "--log-level", "debug",
    ]  # fmt: skip
    config_path, flags = parse(argv)
    c = load_config(config_path, {"WEFT_BRIDGE": "fromenv", "WEFT_MTU": "1300"}, flags)
    assert config_path is None
    assert (c.name, c.nickname, c.listen, c.advertise) == (
        "02:1f:aa:00:00:01",
        "dc1-a",
        "10.0.0.1:6783",
        "198.51.100.7:6783",
    )
    assert c.peers == ["10.0.0.2:6783", "10.0.0.3:7000"]
    assert c.secret_files == [tmp_path / "s1", tmp_path / "s2"]
    assert (c.state_dir, c.api_socket, c.metrics_addr) == (tmp_path / "state", tmp_path / "api.sock", "127.0.0.1:9100")
    assert (c.discovery, c.resume, c.datapath, c.dns) == (False, True, False, False)
    assert (c.bridge, c.vxlan_port, c.mtu, c.datapath_workers) == ("ovl", 4789, 1400, 2)
    assert c.trusted_subnets == ["10.0.0.0/24", "10.1.0.0/24"]
    assert (c.ipalloc_range, c.ipalloc_default_subnet, c.ipalloc_init) == ("10.40.0.0/16", "10.40.1.0/24", "observer")
    assert (c.dns_domain, c.dns_address, c.dns_ttl, c.dns_upstream) == (
        "corp.example.",
        "169.254.53.54",
        5,
        ["10.0.0.53:53"],
    )
    assert c.log_level == "debug"

    config_file = tmp_path / "weft.yaml"
    config_file.write_text("bridge: fromfile\nmtu: 1200\ndiscovery: false\n")
    config_path, flags = parse(["--config", str(config_file), "--datapath"])
    c = load_config(config_path, {"WEFT_MTU": "1300"}, flags)
    assert (c.bridge, c.mtu, c.discovery, c.datapath, c.dns) == ("fromfile", 1300, False, True, True)
