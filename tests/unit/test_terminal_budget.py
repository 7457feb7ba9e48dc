"""At a terminal a command gives up on an unreachable server within seconds, in two lines;
from a script (or with ``--wait-for-servers``) it waits out the configured budget.

The command runs in a real pseudo-terminal (stdin a tty) against a config DB port where
nothing listens: no server is needed. What is compared is the budget the command says
it retries for and the lines it writes, never a wall-clock time.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from farmtools import REPO, clean_env

from farmkeys.cli import TERMINAL_RETRY_SECONDS, at_a_terminal
from farmkeys.config import Config, DatabaseConfig, DirectoryConfig, FarmConfig, RetryConfig
from farmkeys_lab.servers import free_port

CONFIGURED = 20  # [retry] total_seconds in the file


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "farmkeys.toml"
    path.write_text(
        f"""
[farm]
name = "contoso"
[node]
id = "node-a"
store = "{tmp_path}/store"
[database]
dsn = "postgresql://farmkeys@127.0.0.1:{free_port()}/farmkeys"
[directory]
url = "ldap://127.0.0.1:{free_port()}"
bind_dn = "cn=svc-farm,ou=people,dc=example"
password_file = "{tmp_path}/directory-password"
container = "ou=dkm,dc=example"
[retry]
total_seconds = {CONFIGURED}
initial_backoff_seconds = 0.2
max_backoff_seconds = 0.5
"""
    )
    path.chmod(0o600)
    return path


@pytest.fixture
def terminal() -> Iterator[int]:
    """The follower side of a pseudo-terminal, open for the whole test."""
    leader, follower = pty.openpty()
    try:
        yield follower
    finally:
        os.close(follower)
        os.close(leader)


def first_stderr_line(*argv: str, stdin: int) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``farmkeys argv`` with ``stdin``; its first stderr line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "farmkeys", *argv],
        cwd=REPO,
        env=clean_env(),
        stdin=stdin,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    return proc, proc.stderr.readline().decode()


def test_at_a_terminal_an_unreachable_config_db_fails_in_seconds_in_two_lines(
    config_file: Path, terminal: int
) -> None:
    proc, first = first_stderr_line("status", "--config", str(config_file), stdin=terminal)
    assert proc.stderr is not None
    rest = proc.stderr.read().decode()
    assert proc.wait(60) == 3  # status: cannot tell
    assert first.startswith("farmkeys: warning: config DB 127.0.0.1:"), first
    assert first.rstrip().endswith(f"retrying for up to {TERMINAL_RETRY_SECONDS:.0f} s"), first
    (error,) = rest.splitlines()  # no line per attempt
    assert error.startswith("farmkeys: error: cannot reach the config DB at 127.0.0.1:"), error
    assert "attempts over" in error


@pytest.mark.parametrize(("tty", "flag"), [(False, ()), (True, ("--wait-for-servers",))])
def test_a_script_or_wait_for_servers_gets_the_configured_budget(
    config_file: Path, terminal: int, tty: bool, flag: tuple[str, ...]
) -> None:
    stdin = terminal if tty else subprocess.DEVNULL
    proc, first = first_stderr_line("status", *flag, "--config", str(config_file), stdin=stdin)
    try:
        assert first.rstrip().endswith(f"retrying for up to {CONFIGURED} s"), first
    finally:
        proc.kill()
        proc.wait()


def test_the_terminal_budget_only_ever_shortens_the_configured_one() -> None:
    config = Config(
        farm=FarmConfig(name="contoso"),
        database=DatabaseConfig(dsn="postgresql://db/farmkeys", connect_timeout_seconds=10),
        directory=DirectoryConfig(url="ldaps://dc", bind_dn="cn=x", container="ou=dkm"),
        retry=RetryConfig(total_seconds=30.0),
    )
    short = at_a_terminal(config, interactive=True)
    assert (short.retry.total_seconds, short.database.connect_timeout_seconds) == (3.0, 3)
    assert at_a_terminal(config, interactive=False) is config
    already = Config(
        farm=config.farm,
        database=DatabaseConfig(dsn="postgresql://db/farmkeys", connect_timeout_seconds=1),
        directory=config.directory,
        retry=RetryConfig(total_seconds=1.0),
    )
    kept = at_a_terminal(already, interactive=True)
    assert (kept.retry.total_seconds, kept.database.connect_timeout_seconds) == (1.0, 1)
