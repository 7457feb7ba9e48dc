"""Nothing near the store or the config can be swapped by another account (issue 21), on
a real farm (PostgreSQL and slapd): a store below a folder others may write is refused,
a config file others may write is refused in one line, and a store this node installed
into that is renamed away, or put back after an urgent rollover, is a warning in sync's
output and a problem in `status`, never a silent fresh install."""

from __future__ import annotations

import json
import os
import shutil

from farmtools import TestFarm, db_query, expect_ok, one_error_line, run_python, snapshot


def signing_primary(farm: TestFarm, node: str = "node-a") -> str:
    manifest = json.loads((farm.store(node) / "manifest.json").read_text())
    return next(
        c["thumbprint"]
        for c in manifest["certificates"]
        if (c["purpose"], c["role"]) == ("signing", "primary")
    )


def test_a_store_renamed_away_and_swapped_back_is_a_warning_and_a_problem(
    initialised_farm: TestFarm,
) -> None:
    farm = initialised_farm
    store = farm.store()
    expect_ok(farm.run("sync"))
    away = store.parent / "away"
    os.rename(store, away)  # what a local user who could write the store's parent did

    status = farm.run("status")
    missing = f"node node-a: the store {store} is missing, but this node installed there before"
    assert missing in " ".join(status.out.split()), status.out
    assert status.code == 1  # a warning

    synced = farm.spawn("sync")  # a separate process, as at a terminal or in the journal
    assert (
        f"farmkeys: warning: the store {store} is missing, but this node"
        " installed there before (its row in the config DB says it installed generation 1"
        " there); installing the farm's set afresh"
    ) in synced.err, synced.err
    assert (store / "current").is_symlink()  # the farm's set, installed as ever
    quiet = farm.spawn("sync")
    assert "WARNING" not in quiet.err, quiet.err

    # An urgent rollover replaces the signing key the old store still holds.
    replaced = signing_primary(farm)
    expect_ok(farm.run("rollover", "--purpose", "signing", "--urgent"))
    expect_ok(farm.run("sync"))
    assert signing_primary(farm) != replaced
    shutil.rmtree(store)
    os.rename(away, store)  # the old store is put back
    assert signing_primary(farm) == replaced

    status = farm.run("status")
    assert f"node node-a: the store {store} holds generation 1, older than generation 2" in (
        " ".join(status.out.split())
    ), status.out
    synced = farm.spawn("sync")
    assert "was an older store put back in its place?" in synced.err, synced.err
    assert signing_primary(farm) != replaced  # the sync put the farm's set back
    after = json.loads((store / "manifest.json").read_text())
    assert replaced in after["forgotten"]
    assert replaced not in {c["thumbprint"] for c in after["certificates"]}


def test_the_swapped_back_store_without_an_older_generation_is_told_by_its_revocations(
    initialised_farm: TestFarm,
) -> None:
    farm = initialised_farm
    store = farm.store()
    expect_ok(farm.run("sync"))
    shutil.copytree(store, store.parent / "copy", symlinks=True)
    expect_ok(farm.run("rollover", "--purpose", "signing", "--urgent"))
    expect_ok(farm.run("sync"))
    generation = json.loads((store / "manifest.json").read_text())["generation"]
    shutil.rmtree(store)
    os.rename(store.parent / "copy", store)
    # The row records the newer generation; forge it down, as anyone who can write the
    # config DB could: the forgotten revocation still tells the swap.
    db_query(farm.dsn, "UPDATE node SET generation = 1 WHERE id = 'node-a' RETURNING id")
    assert generation > 1
    synced = farm.spawn("sync")
    assert "does not remember 1 urgently replaced certificate(s)" in synced.err, synced.err


def test_a_store_whose_parent_others_may_write_is_refused_and_untouched(
    initialised_farm: TestFarm,
) -> None:
    farm = initialised_farm
    store = farm.store()
    expect_ok(farm.run("sync"))
    before = snapshot(store.parent)
    store.parent.chmod(0o777)
    try:
        refused = farm.run("sync")
        assert refused.code != 0
        assert one_error_line(refused) == (
            f"farmkeys: error: {store.parent}, on the way to the store {store}, is writable"
            f" by group and others (mode 0777) — chmod go-w {store.parent}"
        )
        assert snapshot(store.parent) == before
    finally:
        store.parent.chmod(0o755)
    expect_ok(farm.run("sync"))


def test_a_config_file_others_may_write_is_refused_in_one_line(
    initialised_farm: TestFarm,
) -> None:
    config = initialised_farm.config()
    config.chmod(0o620)  # holds no password: refused all the same
    result = run_python("-m", "farmkeys", "status", "--config", str(config))
    assert result.code != 0
    assert one_error_line(result) == (
        f"farmkeys: error: config file {config} is writable by group (mode 0620)"
        f" — chmod g-w {config}"
    )


def test_the_sync_report_carries_the_warning_and_a_first_install_has_none(
    initialised_farm: TestFarm,
) -> None:
    from datetime import UTC, datetime

    from farmkeys.config import load
    from farmkeys.db import ConfigDB
    from farmkeys.directory import Directory
    from farmkeys.store import Store
    from farmkeys.sync import sync

    cfg = load(initialised_farm.config())
    store = Store(cfg.store, node_id=cfg.node.id)
    with ConfigDB(cfg.database, cfg.retry) as db, Directory(cfg.directory, cfg.retry) as directory:
        first = sync(cfg, db, directory, store, now=datetime.now(UTC))
        assert first.changed and first.warnings == ()
        shutil.rmtree(store.path)
        again = sync(cfg, db, directory, store, now=datetime.now(UTC))
        assert again.changed and len(again.warnings) == 1
        assert again.warnings[0].startswith(f"the store {store.path} is missing, but this node")
        assert sync(cfg, db, directory, store, now=datetime.now(UTC)).warnings == ()
