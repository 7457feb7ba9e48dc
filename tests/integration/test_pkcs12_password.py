"""`[node] pkcs12_password_file`: every .p12 the node installs has that password, as OpenSSL 3
and Java 17 (keytool) read it; turning it on or off, or changing the password, rewrites the
.p12 files of carried certificates too, while a sync that finds nothing changed stays one
statement; the .key beside them stays the bundle's bytes."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from farmtools import TestFarm, add_certificate, db_query, expect_ok, one_error_line

from farmkeys.config import Config, load
from farmkeys.db import ConfigDB
from farmkeys.directory import Directory
from farmkeys.formats import blob as blob_format
from farmkeys.formats import bundle, certificates
from farmkeys.store import Store
from farmkeys.sync import sync


class Node:
    """node-a's sync in this process, with ``node`` settings of the test's choosing."""

    def __init__(self, farm: TestFarm) -> None:
        self.farm = farm
        self.db: ConfigDB | None = None
        self.directory: Directory | None = None
        self.configure()

    def configure(self, **node: Any) -> None:
        self.close()
        self.cfg: Config = load(self.farm.config("node-a", node=node))
        self.store = Store(self.cfg.store, node_id=self.cfg.node.id)
        self.db = ConfigDB(self.cfg.database, self.cfg.retry)
        self.directory = Directory(self.cfg.directory, self.cfg.retry)

    def sync(self) -> bool:
        assert self.db is not None and self.directory is not None
        return sync(self.cfg, self.db, self.directory, self.store, now=datetime.now(UTC)).changed

    def close(self) -> None:
        for part in (self.db, self.directory):
            if part is not None:
                part.close()


@pytest.fixture
def node(initialised_farm: TestFarm) -> Iterator[Node]:
    node = Node(initialised_farm)
    try:
        yield node
    finally:
        node.close()


def with_option(farm: TestFarm, path: Path) -> None:
    """``[node] pkcs12_password_file = path`` in every config ``farm`` writes from now on
    (farm.run's own ``node`` names the node)."""
    farm.overrides["node"] = {"pkcs12_password_file": str(path)}


def password_file(farm: TestFarm, password: str, name: str = "p12.password") -> Path:
    path = farm.root / name
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


def files(store: Path, suffix: str) -> dict[str, bytes]:
    """Every installed certificate's file ending in ``suffix``, by thumbprint."""
    manifest = json.loads((store / "manifest.json").read_text())
    return {
        e["thumbprint"]: (
            store / e["files"][{".p12": "pkcs12", ".key": "key"}[suffix]]
        ).read_bytes()
        for e in manifest["certificates"]
    }


def generation(store: Path) -> int:
    return int(json.loads((store / "manifest.json").read_text())["generation"])


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("openssl")
    assert tool, "openssl must be on PATH (make tools installs it)"
    return subprocess.run(
        [tool, "pkcs12", *args], capture_output=True, text=True, check=False, timeout=30
    )


def test_with_the_option_openssl_opens_every_p12_with_the_password_only(
    initialised_farm: TestFarm,
) -> None:
    farm = initialised_farm
    secret = password_file(farm, "correct horse battery staple")
    with_option(farm, secret)
    expect_ok(farm.run("sync"))
    primary = farm.store() / "signing" / "primary.p12"

    info = openssl("-in", str(primary), "-passin", f"file:{secret}", "-noout", "-info")

    assert info.returncode == 0, info.stderr
    said = info.stdout + info.stderr
    assert "Shrouded Keybag: PBES2, PBKDF2, AES-256-CBC" in said
    assert "PKCS7 Encrypted data: PBES2, PBKDF2, AES-256-CBC" in said
    assert said.count("PRF hmacWithSHA256") == 2 and "MAC: sha256" in said
    wrong = password_file(farm, "wrong horse", "wrong.password")
    refused = openssl("-in", str(primary), "-passin", f"file:{wrong}", "-noout", "-info")
    assert refused.returncode != 0
    assert openssl("-in", str(primary), "-passin", "pass:", "-noout", "-info").returncode != 0
    # Its certificate is the one beside it; every .p12 of the store opens the same way.
    cert = openssl("-in", str(primary), "-passin", f"file:{secret}", "-nokeys")
    assert cert.returncode == 0, cert.stderr
    pem = (farm.store() / "signing" / "primary.pem").read_text()
    assert pem.strip().splitlines()[1] in cert.stdout
    assert all(
        certificates.pkcs12_opens(data, b"correct horse battery staple")
        for data in files(farm.store(), ".p12").values()
    )


def test_keytool_lists_the_signing_primary_with_the_password(initialised_farm: TestFarm) -> None:
    keytool = shutil.which("keytool")
    assert keytool, "keytool must be on PATH: `make servers` installs openjdk-17-jre-headless"
    farm = initialised_farm
    secret = password_file(farm, "correct horse battery staple")
    with_option(farm, secret)
    expect_ok(farm.run("sync"))
    primary = farm.store() / "signing" / "primary.p12"

    def listed(pwfile: Path) -> subprocess.CompletedProcess[str]:
        store = ("-storetype", "PKCS12", "-keystore", str(primary))
        return subprocess.run(
            [keytool, "-list", *store, "-storepass:file", str(pwfile)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    found = listed(secret)
    assert found.returncode == 0, found.stdout + found.stderr
    assert "Your keystore contains 1 entry" in found.stdout
    assert "PrivateKeyEntry" in found.stdout
    assert listed(password_file(farm, "wrong horse", "wrong.password")).returncode != 0


def test_turning_the_option_on_rewrites_the_carried_p12_and_keeps_each_key_byte_for_byte(
    initialised_farm: TestFarm,
    node: Node,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert node.sync()
    store = node.store.path
    keys, plain = files(store, ".key"), files(store, ".p12")
    secret = password_file(initialised_farm, "s3cret-one")
    node.configure(pkcs12_password_file=str(secret))

    with caplog.at_level(logging.DEBUG):
        assert node.sync()

    assert "installing every certificate again" in caplog.text
    assert "s3cret" not in caplog.text

    protected = files(store, ".p12")
    assert protected.keys() == plain.keys()
    assert all(protected[t] != plain[t] for t in plain)
    assert all(certificates.pkcs12_opens(p, b"s3cret-one") for p in protected.values())
    assert files(store, ".key") == keys  # the .key stays the bundle's unencrypted PKCS#8
    assert node.store.manifest().pkcs12_protection == "password"  # type: ignore[union-attr]
    # Nothing changed now: one statement, and no PBKDF2 (no .p12 opened or written).
    for name in ("pkcs12_opens", "protect_pkcs12", "to_pkcs12"):
        monkeypatch.setattr(certificates, name, lambda *a, **k: pytest.fail("PBKDF2 run"))
    assert node.db is not None
    statements = node.db.statements
    assert not node.sync()
    assert node.db.statements - statements == 1


def test_a_new_certificate_is_protected_and_the_carried_ones_keep_their_p12(
    initialised_farm: TestFarm, node: Node
) -> None:
    secret = password_file(initialised_farm, "s3cret-one")
    node.configure(pkcs12_password_file=str(secret))
    assert node.sync()
    before = files(node.store.path, ".p12")
    added = add_certificate(initialised_farm, purpose="signing", role="secondary")

    assert node.sync()

    after = files(node.store.path, ".p12")
    assert {t: after[t] for t in before} == before  # carried by hard link, not rewritten
    assert certificates.pkcs12_opens(after[added], b"s3cret-one")


def test_a_changed_password_rewrites_every_p12_and_a_rewritten_file_only_is_noted(
    initialised_farm: TestFarm, node: Node
) -> None:
    secret = password_file(initialised_farm, "s3cret-one")
    node.configure(pkcs12_password_file=str(secret))
    assert node.sync()
    first = generation(node.store.path)

    password_file(initialised_farm, "s3cret-two")  # the same path, another password
    assert node.sync()

    assert generation(node.store.path) == first + 1
    rewritten = files(node.store.path, ".p12")
    assert all(certificates.pkcs12_opens(p, b"s3cret-two") for p in rewritten.values())
    assert not any(certificates.pkcs12_opens(p, b"s3cret-one") for p in rewritten.values())

    # Written again with the same password (configuration management does that): one .p12
    # is opened, the new marker noted; no new generation, no .p12 rewritten.
    marker = node.store.manifest().pkcs12_password  # type: ignore[union-attr]
    password_file(initialised_farm, "s3cret-two")
    assert not node.sync()
    assert generation(node.store.path) == first + 1
    assert files(node.store.path, ".p12") == rewritten
    assert node.store.manifest().pkcs12_password not in (None, marker)  # type: ignore[union-attr]
    assert node.db is not None
    statements = node.db.statements
    assert not node.sync()
    assert node.db.statements - statements == 1


def test_turning_the_option_off_brings_back_the_bytes_of_today(
    initialised_farm: TestFarm, node: Node
) -> None:
    assert node.sync()
    plain = files(node.store.path, ".p12")
    node.configure(pkcs12_password_file=str(password_file(initialised_farm, "s3cret-one")))
    assert node.sync()
    assert files(node.store.path, ".p12") != plain

    node.configure()
    assert node.sync()

    assert files(node.store.path, ".p12") == plain
    assert node.store.manifest().pkcs12_protection == "none"  # type: ignore[union-attr]
    assert "pkcs12_password" not in (node.store.path / "manifest.json").read_text()


def test_a_password_file_others_may_read_is_refused_in_one_line(
    initialised_farm: TestFarm,
) -> None:
    farm = initialised_farm
    secret = password_file(farm, "s3cret-one")
    secret.chmod(0o644)

    with_option(farm, secret)
    result = farm.run("sync")

    assert result.code != 0
    line = one_error_line(result)
    assert "node.pkcs12_password_file" in line and "mode 0644" in line
    assert "s3cret" not in result.err + result.out
    assert not (farm.store() / "manifest.json").exists()  # nothing was installed


def test_check_reads_the_password_file_and_opens_the_installed_p12_with_it(
    initialised_farm: TestFarm,
) -> None:
    farm = initialised_farm
    secret = password_file(farm, "s3cret-one")
    with_option(farm, secret)
    expect_ok(farm.run("sync"))

    def checks() -> dict[str, dict[str, str]]:
        result = farm.run("check", "--json")
        return {c["name"]: c for c in json.loads(result.out)["checks"]}

    found = checks()
    assert found["node.pkcs12_password_file"]["result"] == "ok"
    assert found["store"]["result"] == "ok", found["store"]

    password_file(farm, "s3cret-two")  # changed, and no sync since
    found = checks()
    assert found["store"]["result"] == "failed"
    assert "do not open with node.pkcs12_password_file" in found["store"]["detail"]
    assert "s3cret" not in json.dumps(found)

    os.chmod(secret, 0o644)
    found = checks()
    assert found["node.pkcs12_password_file"]["result"] == "failed"
    assert "chmod 600" in found["node.pkcs12_password_file"]["fix"]

    farm.overrides.pop("node")  # the option unset, the .p12 files still with a password
    found = checks()
    assert "node.pkcs12_password_file" not in found
    assert found["store"]["result"] == "failed"
    assert "have a password, but node.pkcs12_password_file is unset" in found["store"]["detail"]


def reseal_signing_primary(farm: TestFarm, node: Node, change: Callable[[bytes], bytes]) -> None:
    """Seal ``change(plaintext)`` into the signing primary's blob under the real master key
    (what only a holder of the master key, such as an older leader, can do)."""
    assert node.directory is not None
    (row,) = db_query(
        farm.dsn,
        "SELECT f.dkm_group, c.id, c.blob, c.master_key FROM certificate c, farm f"
        " WHERE c.purpose = 'signing' AND c.role = 'primary'",
    )
    key = node.directory.master_key(row["dkm_group"], row["master_key"])
    context = blob_format.blob_context(row["dkm_group"], row["id"], "signing")
    plain = blob_format.open_blob(bytes(row["blob"]), master_key=key, context=context)
    sealed = blob_format.seal(
        change(plain), master_key=key, master_key_id=row["master_key"], context=context
    )
    with psycopg.connect(farm.dsn) as conn:
        conn.execute("UPDATE certificate SET blob = %s WHERE id = %s", (sealed, row["id"]))


def the_bundle(plain: bytes) -> bundle.Bundle:
    packed = bundle.unpack(plain, what="signing certificate")
    assert packed is not None
    return packed


def test_a_blob_from_before_bundles_gets_a_protected_p12_too(
    initialised_farm: TestFarm, node: Node
) -> None:
    reseal_signing_primary(initialised_farm, node, lambda plain: the_bundle(plain).pkcs12)
    node.configure(pkcs12_password_file=str(password_file(initialised_farm, "s3cret-one")))

    assert node.sync()

    primary = (node.store.path / "signing" / "primary.p12").read_bytes()
    assert certificates.pkcs12_opens(primary, b"s3cret-one")


def test_a_bundle_whose_pkcs12_cannot_be_re_encrypted_is_refused_and_nothing_installed(
    initialised_farm: TestFarm, node: Node
) -> None:
    def garbage_pkcs12(plain: bytes) -> bytes:
        return bundle.encode(dataclasses.replace(the_bundle(plain), pkcs12=b"not a PKCS#12"))

    reseal_signing_primary(initialised_farm, node, garbage_pkcs12)
    with_option(initialised_farm, password_file(initialised_farm, "s3cret-one"))

    result = initialised_farm.run("sync")

    assert result.code == 1
    assert "its PKCS#12 cannot be re-encrypted" in one_error_line(result)
    assert not (initialised_farm.store() / "manifest.json").exists()
