"""Secrets stay secret: no private key in the config DB, no key or password in any output."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from farmtools import TestFarm, add_certificate, hold_lease, one_error_line

from farmkeys.config import load
from farmkeys.directory import Directory
from farmkeys.lab.postgres import LocalPostgres, find_bindir
from farmkeys.lab.slapd import LocalSlapd


@pytest.fixture
def farm(tmp_path: Path, slapd: LocalSlapd, pg_dsn: str) -> TestFarm:
    farm = TestFarm(root=tmp_path, slapd=slapd, dsn=pg_dsn)
    assert farm.run("init").code == 0
    return farm


def private_key_ders(store: Path) -> set[bytes]:
    """Every installed private key, as PKCS#8 and as traditional DER."""
    found = set()
    for path in sorted(store.glob("*/*.key")):
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        for fmt in (
            serialization.PrivateFormat.PKCS8,
            serialization.PrivateFormat.TraditionalOpenSSL,
        ):
            found.add(
                key.private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption())
            )
    return found


def test_a_pg_dump_of_the_config_db_holds_no_private_key(
    farm: TestFarm, postgres: LocalPostgres
) -> None:
    add_certificate(farm, purpose="signing", role="secondary")
    assert farm.run("sync").code == 0
    ders = private_key_ders(farm.store())
    assert len(ders) == 6  # three certificates installed, two encodings each

    bindir = find_bindir()
    assert bindir is not None
    dump = subprocess.run(
        [str(bindir / "pg_dump"), "--no-password", "--dbname", farm.dsn],
        capture_output=True,
        check=True,
    ).stdout
    assert b"COPY public.certificate" in dump  # the dump really holds the certificate rows
    assert b"PRIVATE KEY" not in dump
    for der in ders:
        assert der not in dump
        assert der.hex().encode() not in dump  # bytea is dumped as hex
        assert base64.b64encode(der) not in dump


def test_no_output_or_log_line_carries_a_master_key_or_a_password(farm: TestFarm) -> None:
    cfg = load(farm.config())
    (group,) = psycopg.connect(farm.dsn).execute("SELECT dkm_group FROM farm").fetchone() or ()
    with Directory(cfg.directory, cfg.retry) as directory:
        key = directory.master_key(group, directory.current_key_id(group))
    secrets = [
        key.hex(),
        key.hex().upper(),
        base64.b64encode(key).decode(),
        key.decode("latin-1"),
        farm.slapd.service_password,
        farm.slapd.admin_password,
    ]

    hold_lease(farm)
    outputs = []
    for args in (("init",), ("sync",), ("status",), ("status", "--json"), ("db", "upgrade")):
        result = farm.spawn("--debug", *args)
        assert result.code == 0, result.err
        outputs += [result.out, result.err]
    # Failures too: a corrupted blob, a wrong directory password, a DSN with a password.
    add_certificate(farm, purpose="decryption", role="secondary")
    with psycopg.connect(farm.dsn) as conn:
        conn.execute("UPDATE certificate SET blob = substr(blob, 1, 80) WHERE role = 'secondary'")
    failures = [
        farm.spawn("--debug", "sync"),
        farm.spawn(
            "--debug",
            "sync",
            directory={"password": "wrong-" + farm.slapd.service_password, "password_file": None},
        ),
        farm.spawn(
            "--debug", "status", database={"dsn": "postgresql://u:hunter2-secret@127.0.0.1:1/x"}
        ),
    ]
    for result in failures:
        assert result.code != 0
        one_error_line(result)
        outputs += [result.out, result.err]
    secrets.append("hunter2-secret")

    text = "\n".join(outputs)
    assert "DEBUG" in text  # --debug really produced log lines to search
    for secret in secrets:
        assert secret not in text
