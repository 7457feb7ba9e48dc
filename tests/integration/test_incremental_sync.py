"""Incremental sync: only what changed is decrypted and written; nothing changed costs one
round trip and no directory request; the blob seals the exact bytes the node writes."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from farmtools import (
    TestFarm,
    add_certificate,
    db_query,
    expect_ok,
    one_error_line,
    run_python,
    seal_state,
    snapshot,
)

from farmkeys.config import Config, RetryConfig, load
from farmkeys.db import ConfigDB
from farmkeys.directory import Directory
from farmkeys.errors import StoreError
from farmkeys.formats import blob as blob_format
from farmkeys.formats import bundle, certificates
from farmkeys.formats.blob import blob_context
from farmkeys.store import Store
from farmkeys.sync import sync
from farmkeys_lab.servers import free_port


class Node:
    """One node's sync, in this process, counting statements and directory reads."""

    def __init__(self, farm: TestFarm, node: str = "node-a") -> None:
        self.cfg: Config = load(farm.config(node))
        self.store = Store(self.cfg.store, node_id=self.cfg.node.id)
        self.db = ConfigDB(self.cfg.database, self.cfg.retry)
        self.directory = Directory(self.cfg.directory, self.cfg.retry)

    def sync(self) -> bool:
        return sync(self.cfg, self.db, self.directory, self.store, now=datetime.now(UTC)).changed

    def close(self) -> None:
        self.db.close()
        self.directory.close()


@pytest.fixture
def node(initialised_farm: TestFarm) -> Iterator[Node]:
    node = Node(initialised_farm)
    try:
        yield node
    finally:
        node.close()


def inodes(store: Path) -> dict[str, int]:
    """Every certificate file of the installed generation by its path below it: its inode."""
    current = store / os.readlink(store / "current")
    return {
        str(path.relative_to(current)): path.stat().st_ino
        for path in current.rglob("*")
        if path.is_file() and path.name != "manifest.json"
    }


def test_a_sync_that_finds_nothing_changed_makes_one_round_trip_and_no_directory_request(
    initialised_farm: TestFarm, node: Node
) -> None:
    assert node.sync()
    before = db_query(initialised_farm.dsn, "SELECT last_sync FROM node WHERE id = 'node-a'")[0]
    statements = node.db.statements
    # A directory that is not there, with no key cached: any request would fail the sync.
    dead = dataclasses.replace(node.cfg.directory, url=f"ldap://127.0.0.1:{free_port()}")
    node.directory.close()
    node.directory = Directory(dead, RetryConfig(total_seconds=0.0))

    assert not node.sync()

    assert node.db.statements - statements == 1
    assert node.directory.key_reads == 0
    after = db_query(initialised_farm.dsn, "SELECT last_sync FROM node WHERE id = 'node-a'")[0]
    assert after["last_sync"] > before["last_sync"]  # the one statement recorded the sync


def test_the_read_withholds_the_blobs_of_certificates_the_store_holds(
    initialised_farm: TestFarm, node: Node
) -> None:
    assert node.sync()
    have = [e.thumbprint for e in node.store.inspect().manifest.certificates]  # type: ignore[union-attr]
    live = node.db.live_set("node-a", have=have)
    assert all(r.blob == b"" for r in live.rows)  # every blob withheld
    # A node that has not confirmed the master key gets every blob.
    other = node.db.live_set("node-b", have=have)
    assert all(r.blob for r in other.rows)


def test_a_new_secondary_is_written_and_the_primaries_are_carried_by_hard_link(
    initialised_farm: TestFarm, node: Node
) -> None:
    assert node.sync()
    first = inodes(node.store.path)
    thumb = add_certificate(initialised_farm, purpose="signing", role="secondary")

    assert node.sync()

    second = inodes(node.store.path)
    carried = {k: v for k, v in second.items() if thumb not in k and "secondary" not in k}
    assert carried and all(first[k] == v for k, v in carried.items())
    written = {k for k in second if thumb in k or "secondary" in k}
    assert written == {
        f"signing/{thumb}.pem",
        f"signing/{thumb}.key",
        f"signing/{thumb}.p12",
        "signing/secondary.pem",
        "signing/secondary.key",
        "signing/secondary.p12",
    }
    assert not written & first.keys()


def test_a_promotion_writes_no_certificate_file(initialised_farm: TestFarm, node: Node) -> None:
    thumb = add_certificate(initialised_farm, purpose="signing", role="secondary")
    assert node.sync()
    first = inodes(node.store.path)
    with psycopg.connect(initialised_farm.dsn) as conn:
        conn.execute(
            "UPDATE certificate SET role = CASE role WHEN 'primary' THEN 'retired'"
            " ELSE 'primary' END WHERE purpose = 'signing' AND role IN ('primary', 'secondary')"
        )
    seal_state(initialised_farm)

    assert node.sync()

    second = inodes(node.store.path)
    assert second["signing/primary.pem"] == first["signing/secondary.pem"]
    assert second[f"signing/{thumb}.key"] == first[f"signing/{thumb}.key"]
    assert set(second.values()) <= set(first.values())  # every file carried, none written
    assert "signing/secondary.pem" not in second
    assert node.store.inspect().complete  # type: ignore[union-attr]


def test_a_file_changed_in_place_is_not_carried_but_installed_again(
    initialised_farm: TestFarm, node: Node
) -> None:
    assert node.sync()
    primary_key = node.store.path / "signing" / "primary.key"
    good = primary_key.read_bytes()
    add_certificate(initialised_farm, purpose="decryption", role="secondary")
    with primary_key.open("r+b") as file:  # someone edits the installed key in place
        file.write(b"X")
    statements = node.db.statements

    assert node.sync()

    assert primary_key.read_bytes() == good  # decrypted from its blob again
    assert node.db.statements - statements == 2  # the read (with that blob), the record
    assert node.store.inspect().complete  # type: ignore[union-attr]


class RacedStore(Store):
    """A store in which someone changes a file right after the sync inspected it."""

    victim: Path | None = None

    def inspect(self):  # type: ignore[no-untyped-def]
        found = super().inspect()
        if self.victim is not None:
            with self.victim.open("r+b") as file:
                file.write(b"X")
            self.victim = None
        return found


def test_a_file_changed_after_the_inspection_is_never_carried(
    initialised_farm: TestFarm, node: Node
) -> None:
    assert node.sync()
    add_certificate(initialised_farm, purpose="decryption", role="secondary")
    store = RacedStore(node.cfg.store, node_id="node-a")
    store.victim = store.path / "signing" / "primary.p12"
    current, generations = (
        os.readlink(store.path / "current"),
        os.listdir(store.path / ".generations"),
    )

    with pytest.raises(StoreError, match="changed since it was installed"):
        sync(node.cfg, node.db, node.directory, store, now=datetime.now(UTC))

    # The switch never happened and the partial generation is gone.
    assert os.readlink(store.path / "current") == current
    assert os.listdir(store.path / ".generations") == generations
    assert node.sync()  # the next sync installs it from its blob
    assert node.store.inspect().complete  # type: ignore[union-attr]


def test_the_node_writes_the_exact_bytes_the_blob_seals(
    initialised_farm: TestFarm, node: Node
) -> None:
    assert node.sync()
    (row,) = db_query(
        initialised_farm.dsn,
        "SELECT f.dkm_group, c.id, c.blob, c.master_key, c.thumbprint FROM certificate c, farm f"
        " WHERE c.purpose = 'signing' AND c.role = 'primary'",
    )
    key = node.directory.master_key(row["dkm_group"], row["master_key"])
    plain = blob_format.open_blob(
        bytes(row["blob"]),
        master_key=key,
        context=blob_context(row["dkm_group"], row["id"], "signing"),
    )
    packed = bundle.unpack(plain, what="signing certificate")
    assert packed is not None
    folder = node.store.path / "signing"
    assert (folder / "primary.p12").read_bytes() == packed.pkcs12
    assert (folder / "primary.key").read_bytes() == packed.private_key_pem
    assert (folder / "primary.pem").read_bytes() == packed.certificate_pem
    assert (
        certificates.from_pkcs12(packed.pkcs12)
        .certificate.fingerprint(certificates.hashes.SHA1())
        .hex()
        .upper()
        == row["thumbprint"]
    )


def reseal_signing(farm: TestFarm, node: Node, plaintext_of: object) -> None:
    """Seal another plaintext into the signing primary's blob, under the real master key
    (what only a holder of the master key can do), and make node-a reinstall."""
    (row,) = db_query(
        farm.dsn,
        "SELECT f.dkm_group, c.id, c.blob, c.master_key FROM certificate c, farm f"
        " WHERE c.purpose = 'signing' AND c.role = 'primary'",
    )
    key = node.directory.master_key(row["dkm_group"], row["master_key"])
    context = blob_context(row["dkm_group"], row["id"], "signing")
    plain = blob_format.open_blob(bytes(row["blob"]), master_key=key, context=context)
    assert callable(plaintext_of)
    blob = blob_format.seal(
        plaintext_of(plain), master_key=key, master_key_id=row["master_key"], context=context
    )
    with psycopg.connect(farm.dsn) as conn:
        conn.execute("UPDATE certificate SET blob = %s WHERE id = %s", (blob, row["id"]))


def test_a_bundle_whose_key_is_not_the_certificates_is_refused(initialised_farm: TestFarm) -> None:
    other = certificates.generate(
        farm_name="x",
        purpose="signing",
        key_type="rsa-2048",
        not_before=datetime(2026, 1, 1, tzinfo=UTC),
        not_after=datetime(2027, 1, 1, tzinfo=UTC),
    )

    def swap_key(plain: bytes) -> bytes:
        packed = bundle.unpack(plain, what="x")
        assert packed is not None
        return bundle.encode(
            dataclasses.replace(packed, private_key_pem=certificates.private_key_pem(other.key))
        )

    node = Node(initialised_farm, "node-b")
    try:
        reseal_signing(initialised_farm, node, swap_key)
        result = initialised_farm.run("sync", node="node-b")
        assert result.code == 1
        assert "does not match the certificate" in one_error_line(result)
        assert not (initialised_farm.store("node-b") / "manifest.json").exists()
    finally:
        node.close()


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[:-1], lambda b: b + b"\0", lambda b: b[:4] + b"\xff\xff\xff\xff" + b[8:]],
    ids=["truncated", "trailing byte", "overlong length"],
)
def test_a_malformed_bundle_is_refused(initialised_farm: TestFarm, damage: object) -> None:
    node = Node(initialised_farm, "node-b")
    try:
        reseal_signing(initialised_farm, node, damage)
        result = initialised_farm.run("sync", node="node-b")
        assert result.code == 1
        assert "malformed bundle" in one_error_line(result)
    finally:
        node.close()


def test_a_blob_from_before_bundles_still_installs(initialised_farm: TestFarm) -> None:
    """A farm whose blobs hold a bare PKCS#12 (sealed by an earlier farmkeys)."""

    def bare(plain: bytes) -> bytes:
        packed = bundle.unpack(plain, what="x")
        assert packed is not None
        return packed.pkcs12

    node = Node(initialised_farm, "node-b")
    try:
        reseal_signing(initialised_farm, node, bare)
        expect_ok(initialised_farm.run("sync", node="node-b"))
        key = (initialised_farm.store("node-b") / "signing" / "primary.key").read_bytes()
        assert key.startswith(b"-----BEGIN PRIVATE KEY-----")
    finally:
        node.close()


def test_a_failed_incremental_install_leaves_the_store_as_it_was(
    initialised_farm: TestFarm, node: Node
) -> None:
    assert node.sync()
    before = snapshot(node.store.path)
    add_certificate(initialised_farm, purpose="signing", role="secondary")
    with psycopg.connect(initialised_farm.dsn) as conn:  # the new certificate's blob does not open
        conn.execute(
            "UPDATE certificate SET blob = overlay(blob placing '\\x00'::bytea from 40 for 1)"
            " WHERE role = 'secondary'"
        )
    result = initialised_farm.run("sync")
    assert result.code == 1
    assert "not authentic" in one_error_line(result)
    assert snapshot(node.store.path) == before


def test_a_store_moved_to_a_new_group_gets_the_group_on_carried_files(
    initialised_farm: TestFarm, tmp_path: Path
) -> None:
    """node.store_group changed between installs: carried files take the new group."""
    import grp

    group = grp.getgrgid(os.getgid()).gr_name if os.getgid() != 0 else "daemon"
    expect_ok(initialised_farm.run("sync"))
    add_certificate(initialised_farm, purpose="signing", role="secondary")
    initialised_farm.overrides["node"] = {"store_group": group}
    expect_ok(initialised_farm.run("sync"))
    gid = grp.getgrnam(group).gr_gid
    key = initialised_farm.store() / "signing" / "primary.key"
    assert key.stat().st_gid == gid
    assert key.stat().st_mode & 0o777 == 0o640


def test_a_sync_with_nothing_to_do_loads_neither_ldap3_nor_cryptography(
    initialised_farm: TestFarm, node: Node
) -> None:
    """What keeps `farmkeys sync` at a service's start about as cheap as importing its
    libraries (tests/bench/bench_cold.py measures it): nothing it does not need."""
    assert node.sync()
    code = (
        "import sys; from farmkeys import cli; code = cli.main(sys.argv[1:]);"
        " print(sorted(m for m in ('ldap3', 'cryptography', 'apscheduler', 'farmkeys.leader',"
        " 'farmkeys.formats.certificates') if m in sys.modules)); sys.exit(code)"
    )
    done = run_python("-c", code, "sync", "--config", str(initialised_farm.config("node-a")))
    expect_ok(done)
    assert done.out.splitlines()[-1] == "[]"
    # A sync that installs does load them.
    add_certificate(initialised_farm, purpose="signing", role="secondary")
    done = run_python("-c", code, "sync", "--config", str(initialised_farm.config("node-a")))
    expect_ok(done)
    assert "ldap3" in done.out.splitlines()[-1] and "cryptography" in done.out.splitlines()[-1]


def test_bad_directory_settings_fail_a_sync_at_start_even_with_nothing_to_do(
    initialised_farm: TestFarm, node: Node
) -> None:
    assert node.sync()
    initialised_farm.overrides["directory"] = {"start_tls": True}
    result = initialised_farm.run("sync")
    assert result.code == 1
    assert "directory.start_tls is set but directory.ca_file is not" in one_error_line(result)
    initialised_farm.overrides["directory"] = {"bind_dn": "svc-farm"}
    result = initialised_farm.run("sync")
    assert result.code == 1
    assert "is not a distinguished name" in one_error_line(result)
