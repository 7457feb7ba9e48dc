"""`farmkeys serve`'s pure rules: how soon a failed sync is retried, and the environment an
on_change hook gets. The serving processes themselves are in tests/system/test_serve.py."""

from __future__ import annotations

from pathlib import Path

from farmkeys.serve import sync_retry_delay


def test_sync_retry_delay_doubles_from_one_second_up_to_the_cap_or_the_poll() -> None:
    delays = [sync_retry_delay(n, poll_seconds=60.0) for n in range(8)]
    assert delays == [60.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert sync_retry_delay(3, poll_seconds=2.5) == 2.5
    assert sync_retry_delay(10_000, poll_seconds=60.0) == 30.0


def test_the_hook_gets_no_farmkeys_setting_and_no_libpq_secret(tmp_path: Path) -> None:
    from farmkeys.serve import hook_environment

    environ = {
        "PATH": "/usr/bin",
        "FARMKEYS_DATABASE_DSN": "postgresql://f:secret@db/f",
        "FARMKEYS_DIRECTORY_PASSWORD": "secret",
        "FARMKEYS_CONFIG": "/etc/farmkeys/farmkeys.toml",
        "PGPASSWORD": "secret",
        "FARMKEYS_CHANGED": "stale",
    }
    env = hook_environment(environ, store=tmp_path, changed=["AB", "CD"])
    assert env == {"PATH": "/usr/bin", "FARMKEYS_STORE": str(tmp_path), "FARMKEYS_CHANGED": "AB CD"}
