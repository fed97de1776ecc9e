"""The command line as an operator meets it: help, clear one-line errors, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")


def weft(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "weft.cli", *args], capture_output=True, text=True, env=full_env, timeout=60, check=False
    )


def test_help_explains_every_command() -> None:
    out = weft("--help").stdout
    for command in ("run", "status", "connect", "forget", "report", "attach", "detach", "expose", "hide", "reset"):
        assert command in out
    run_help = weft("run", "--help").stdout
    for flag in ("--peer", "--secret-file", "--advertise", "--resume", "--no-discovery", "WEFT_", "--trusted-subnet"):
        assert flag in run_help
    attach_help = weft("attach", "--help").stdout
    for flag in ("--netns", "--pid", "--ifname", "CIDR"):
        assert flag in attach_help


def test_attach_without_an_agent_says_what_to_do(tmp_path: Path) -> None:
    res = weft("--api-socket", str(tmp_path / "none.sock"), "attach", "--netns", "c1", "10.32.0.5/12")
    assert res.returncode == 1 and "is the agent running?" in res.stderr and "Traceback" not in res.stderr


def test_a_bad_trusted_subnet_is_one_clear_line(tmp_path: Path) -> None:
    res = weft("run", "--trusted-subnet", "10.0.0.0/33", "--state-dir", str(tmp_path))
    assert res.returncode == 1 and "trusted_subnets" in res.stderr and "CIDR" in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_config_is_one_clear_line(tmp_path: Path) -> None:
    res = weft("run", "--listen", "nowhere", "--state-dir", str(tmp_path))
    assert res.returncode != 0
    assert "listen" in res.stderr and "HOST:PORT" in res.stderr
    assert "Traceback" not in res.stderr

    res = weft("run", "--peer", "10.0.0.1:99999", "--state-dir", str(tmp_path))
    assert res.returncode != 0 and "port must be a number" in res.stderr

    res = weft("run", "--state-dir", str(tmp_path), env={"WEFT_LOG_LEVEL": "chatty"})
    assert res.returncode != 0 and "log_level" in res.stderr


def test_secret_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("a-very-secret-value")
    secret.chmod(0o644)
    res = weft(
        "run",
        "--secret-file",
        str(secret),
        "--state-dir",
        str(tmp_path / "state"),
        "--api-socket",
        str(tmp_path / "sock"),
        "--listen",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
    )
    assert res.returncode != 0
    assert f"chmod 600 {secret}" in res.stderr
    assert "a-very-secret-value" not in res.stderr + res.stdout


def test_status_without_an_agent_says_what_to_do(tmp_path: Path) -> None:
    res = weft("--api-socket", str(tmp_path / "none.sock"), "status")
    assert res.returncode != 0
    assert "is the agent running" in res.stderr and "Traceback" not in res.stderr
    res = weft("status", env={"WEFT_API_SOCKET": str(tmp_path / "env.sock")})
    assert str(tmp_path / "env.sock") in res.stderr


def test_the_commands_that_talk_to_the_agent_import_none_of_its_modules() -> None:
    """`weft attach` is run once per container: its start-up must not pay for the config model (pydantic), asyncio
    or the store, which only `weft run` and `weft reset` need."""
    probe = (
        "import sys, weft.cli, weft.commands\n"
        "heavy = ('pydantic', 'asyncio', 'yaml', 'sqlite3', 'aiohttp', 'pyroute2', 'weft.config', 'weft.store')\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy)))\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == []


def test_the_agent_loads_neither_click_nor_shutil(tmp_path: Path) -> None:
    """The agent keeps what it imports for as long as it runs: `weft run` reads its flags without click (1.3 MiB
    of an agent's memory) nor shutil (with bz2 and lzma), all the way to a start that fails on its state directory
    (a file, here)."""
    blocked = tmp_path / "state"
    blocked.write_text("not a directory")
    probe = (
        "import atexit, sys\n"
        "shown = {'click', 'bz2', 'weft'}  # bz2: shutil ran (it may be there deferred, see weft.footprint)\n"
        "atexit.register(lambda: print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & shown))))\n"
        "from weft.cli import main; main()\n"
    )
    args = ["run", "--no-datapath", "--no-dns", "--state-dir", str(blocked), "--api-socket", str(tmp_path / "s")]
    env = {**os.environ, "PYTHONPATH": SRC}
    res = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 1 and f"{blocked}" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert res.stdout.split() == ["weft"]
    # and the agent's modules were all there: it got as far as starting
    loaded = subprocess.run(
        [sys.executable, "-c", probe.replace("{'click', 'bz2', 'weft'}", "{'weft', 'asyncio', 'sqlite3'}"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert loaded.stdout.split() == ["asyncio", "sqlite3", "weft"], loaded.stderr


def test_weft_run_flags_are_checked_before_anything_starts(tmp_path: Path) -> None:
    """A mistyped or shortened flag, a word where a number goes, an unknown log level: usage error (2), one line
    that names the flag, and the agent never starts."""
    for args, says in (
        (["--mtu", "abc"], "argument --mtu: invalid int value: 'abc'"),
        (["--no-disc"], "unrecognized arguments: --no-disc"),
        (["--peerr", "10.0.0.1"], "unrecognized arguments: --peerr"),
        (["--log-level", "chatty"], "argument --log-level: invalid choice: 'chatty'"),
    ):
        res = weft("run", "--state-dir", str(tmp_path / "state"), *args)
        assert res.returncode == 2 and says in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
        assert not (tmp_path / "state").exists()


def test_weft_run_after_the_commands_options_is_the_same_agent(tmp_path: Path) -> None:
    """`weft --api-socket X run ...` (the commands' option before `run`) reaches the same flags."""
    res = weft("--api-socket", str(tmp_path / "x.sock"), "run", "--help")
    assert res.returncode == 0 and "--trusted-subnet" in res.stdout and "WEFT_" in res.stdout
    res = weft("--api-socket", str(tmp_path / "x.sock"), "run", "--listen", "nowhere", "--state-dir", str(tmp_path))
    assert res.returncode == 1 and "HOST:PORT" in res.stderr and "Traceback" not in res.stderr


def test_the_status_summary_says_when_the_agent_runs_late_and_only_then() -> None:
    """An agent whose host starves it says so where operators look first; an older agent's status has no such
    field, and an agent that keeps time shows no line."""
    from weft.api.render import summary

    base = {
        "version": "0", "protocol": "weft 1..1", "name": "02:00:00:00:00:01", "nickname": "h1",
        "encryption": "disabled", "secrets": 0, "discovery": True, "connections": [], "targets": [], "peers": [],
    }  # fmt: skip
    late = summary({**base, "loop_lag_s": 12.34})
    assert "EventLoop: ran 12.3s late lately: this host gives the agent too little CPU" in late
    assert "EventLoop" not in summary({**base, "loop_lag_s": 0.02})
    assert "EventLoop" not in summary(base)
