"""`rollover --urgent` and `rollover --master-key --urgent` show what they will archive or
shred and ask at a terminal; `--yes` for scripts; no terminal and no `--yes` refuses.

The commands run as processes with a real stdin: /dev/null (a script, a timer) or a
pseudo-terminal an operator answers at.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import uuid

import pytest
from farmtools import REPO, TestFarm, clean_env, db_query, expect_ok


@pytest.fixture
def synced(initialised_farm: TestFarm) -> TestFarm:
    expect_ok(initialised_farm.run("sync"))
    return initialised_farm


def primary(farm: TestFarm, purpose: str = "signing") -> str:
    (row,) = db_query(
        farm.dsn,
        "SELECT thumbprint FROM certificate WHERE purpose = %s AND role = 'primary'",
        (purpose,),
    )
    return str(row["thumbprint"])


def requests(farm: TestFarm) -> int:
    return int(db_query(farm.dsn, "SELECT count(*) AS n FROM rollover_request")[0]["n"])


def run(farm: TestFarm, *argv: str, answer: str | None) -> tuple[int, str, str]:
    """``farmkeys argv``; stdin /dev/null when ``answer`` is None, else a terminal at which
    ``answer`` is typed. (exit code, stdout, stderr)."""
    command = [sys.executable, "-m", "farmkeys", *argv, "--config", str(farm.config())]
    if answer is None:
        done = subprocess.run(
            command,
            cwd=REPO,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return done.returncode, done.stdout, done.stderr
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=clean_env(),
            stdin=follower,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.write(leader, answer.encode() + b"\n")  # read when the question is asked
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(follower)
        os.close(leader)
    return proc.returncode, out, err


def test_urgent_without_a_terminal_or_yes_lists_what_it_would_archive_and_refuses(
    synced: TestFarm,
) -> None:
    old = primary(synced)
    code, out, err = run(synced, "rollover", "--urgent", "--purpose", "signing", answer=None)
    assert code == 1
    assert out.startswith("rollover --urgent will:\n")
    assert f"archive the signing primary {old}" in out
    assert "relying parties reject the tokens it signs" in out
    assert "needs confirmation and there is no terminal to ask at" in err
    assert "run it again with --yes; nothing was changed" in err
    assert primary(synced) == old and requests(synced) == 0


def test_urgent_at_a_terminal_does_nothing_unless_the_operator_says_yes(
    synced: TestFarm,
) -> None:
    old = primary(synced)
    code, out, _ = run(synced, "rollover", "--urgent", "--purpose", "signing", answer="n")
    assert code == 1
    assert "Replace them now? [y/N]" in out and "nothing was changed" in out
    assert primary(synced) == old and requests(synced) == 0

    code, out, err = run(synced, "rollover", "--urgent", "--purpose", "signing", answer="y")
    assert code == 0, err
    new = primary(synced)
    assert new != old
    # The answer names what was archived.
    assert f"signing: new primary {new}; archived {old}" in out


def test_urgent_master_key_roll_names_the_key_and_what_can_never_be_opened_again(
    synced: TestFarm,
) -> None:
    # An archived certificate sealed under the current key: an urgent rollover made one.
    archived = primary(synced)
    expect_ok(synced.run("rollover", "--urgent", "--yes", "--purpose", "signing"))
    (key,) = db_query(synced.dsn, "SELECT id FROM master_key WHERE state = 'current'")
    current = uuid.UUID(str(key["id"]))
    code, out, err = run(synced, "rollover", "--master-key", "--urgent", answer=None)
    assert code == 1
    assert out.startswith("rollover --urgent --master-key will:\n")
    assert f"delete master key {current} from the directory at once" in out
    assert f"the signing archived {archived} sealed under it can never be opened again" in out
    assert "needs confirmation" in err
    (still,) = db_query(synced.dsn, "SELECT id FROM master_key WHERE state = 'current'")
    assert uuid.UUID(str(still["id"])) == current  # nothing rolled
    expect_ok(synced.run("rollover", "--master-key", "--urgent", "--yes"))
    (rolled,) = db_query(synced.dsn, "SELECT id FROM master_key WHERE state = 'current'")
    assert uuid.UUID(str(rolled["id"])) != current
