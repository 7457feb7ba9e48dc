"""The leader lease and its fence, against the real config DB.

A "pause" is simulated by moving the lease's expiry into the past, which is
what the database's clock would show after a long stop: no sleeping.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from farmtools import TestFarm, add_certificate, expect_ok

from farmkeys.config import Config, LeaseConfig, load
from farmkeys.db import ConfigDB
from farmkeys.directory import Directory
from farmkeys.election import Election, read_lease
from farmkeys.errors import LeaseLostError
from farmkeys.leader import Leader
from farmkeys.serve import Service
from farmkeys_lab.slapd import LocalSlapd

LEASE = LeaseConfig(ttl_seconds=30, renew_seconds=10)


@pytest.fixture
def config(initialised_farm: TestFarm) -> Config:
    return load(initialised_farm.config())


@pytest.fixture
def db(config: Config) -> Iterator[ConfigDB]:
    with ConfigDB(config.database, config.retry) as db:
        yield db


def expire_lease(dsn: str) -> None:
    """What the database clock shows once the holder has been stopped for longer than the ttl."""
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE leader_lease SET expires_at = now() - interval '1 second'")


def certificate_table(dsn: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT id, role, role_since FROM certificate ORDER BY id").fetchall()


def test_one_process_leads_and_renewing_keeps_the_term(db: ConfigDB) -> None:
    a = Election(db, node_id="node-a", lease=LEASE)
    b = Election(db, node_id="node-b", lease=LEASE)
    assert a.try_acquire()
    assert not b.try_acquire()
    assert a.term == 1
    assert b.term is None
    assert a.try_acquire()
    assert a.term == 1
    lease = read_lease(db)
    assert lease.holder == a.identity
    assert lease.holder_node == "node-a"
    assert lease.valid


def test_two_processes_of_one_node_are_different_holders(db: ConfigDB) -> None:
    first = Election(db, node_id="node-a", lease=LEASE)
    second = Election(db, node_id="node-a", lease=LEASE)
    assert first.try_acquire()
    assert not second.try_acquire()


def test_an_expired_lease_is_taken_over_under_a_higher_term(
    db: ConfigDB, initialised_farm: TestFarm
) -> None:
    a = Election(db, node_id="node-a", lease=LEASE)
    b = Election(db, node_id="node-b", lease=LEASE)
    assert a.try_acquire()
    expire_lease(initialised_farm.dsn)
    assert b.try_acquire()
    assert b.term == 2
    assert not a.try_acquire()
    assert a.term is None


def test_a_lease_that_ran_out_is_a_new_term_even_for_its_own_holder(
    db: ConfigDB, initialised_farm: TestFarm
) -> None:
    """A leader cut off for longer than the ttl (a config DB failing over, a paused process)
    that takes its own lease back leads under a new term: what it began under the old one
    can no longer pass the fence."""
    a = Election(db, node_id="node-a", lease=LEASE)
    assert a.try_acquire()
    assert a.term == 1
    old = Election(db, node_id="node-a", lease=LEASE)
    old._term, old.identity = 1, a.identity  # the same process, as it was before the gap
    expire_lease(initialised_farm.dsn)
    assert a.try_acquire()
    assert a.term == 2
    refused = pytest.raises(LeaseLostError, match="no longer holds the leader lease of term 1")
    with refused, old.fenced():
        pass


def test_a_stale_leader_cannot_write_after_a_takeover(
    db: ConfigDB, initialised_farm: TestFarm, config: Config
) -> None:
    a = Election(db, node_id="node-a", lease=LEASE)
    b = Election(db, node_id="node-b", lease=LEASE)
    assert a.try_acquire()
    expire_lease(initialised_farm.dsn)
    assert b.try_acquire()
    # a wakes up still believing it leads under term 1.
    assert a.term == 1
    with (
        pytest.raises(LeaseLostError, match="no longer holds the leader lease of term 1"),
        a.fenced() as fence,
    ):
        fence.tx.audit(node="node-a", term=fence.term, action="must-not-happen")
    assert a.term is None  # it stepped down
    # Its rollover work is refused the same way, with a certificate due for a secondary.
    with psycopg.connect(initialised_farm.dsn) as conn:
        conn.execute("UPDATE certificate SET not_after = now() + interval '1 day'")
    before = certificate_table(initialised_farm.dsn)
    a._term = 1  # the stale belief again, as after SIGCONT
    with Directory(config.directory, config.retry) as directory, pytest.raises(LeaseLostError):
        Leader(config, db, directory, a).check()
    with psycopg.connect(initialised_farm.dsn) as conn:
        assert conn.execute(
            "SELECT count(*) FROM audit_event WHERE term = 1 OR action = 'must-not-happen'"
        ).fetchone() == (0,)
    assert certificate_table(initialised_farm.dsn) == before


def test_the_fence_refuses_an_expired_lease_even_before_a_takeover(
    db: ConfigDB, initialised_farm: TestFarm
) -> None:
    a = Election(db, node_id="node-a", lease=LEASE)
    assert a.try_acquire()
    expire_lease(initialised_farm.dsn)
    with pytest.raises(LeaseLostError, match="has expired"), a.fenced():
        pass


def test_the_fence_judges_the_expiry_after_waiting_for_the_lock(
    db: ConfigDB, initialised_farm: TestFarm
) -> None:
    # The lease row is locked by someone else (a renewal, another fenced write) for longer
    # than the lease has left: once the fence gets the lock, the lease has expired, and
    # the write must not happen, though it was valid when the transaction began.
    import threading
    import time

    a = Election(db, node_id="node-a", lease=LeaseConfig(ttl_seconds=1.0, renew_seconds=0.5))
    assert a.try_acquire()
    holder = psycopg.connect(initialised_farm.dsn)
    holder.execute("SELECT 1 FROM leader_lease FOR UPDATE")  # opens a transaction
    release = threading.Timer(2.0, holder.rollback)
    release.start()
    try:
        started = time.monotonic()
        with pytest.raises(LeaseLostError, match="has expired"), a.fenced():
            pass
        assert time.monotonic() - started >= 1.5  # it did wait for the lock
    finally:
        release.join()
        holder.close()


def test_the_leader_writes_under_its_term(
    db: ConfigDB, initialised_farm: TestFarm, config: Config
) -> None:
    a = Election(db, node_id="node-a", lease=LEASE)
    assert a.try_acquire()
    with psycopg.connect(initialised_farm.dsn) as conn:
        conn.execute("UPDATE certificate SET not_after = now() + interval '10 days'")
    with Directory(config.directory, config.retry) as directory:
        done = Leader(config, db, directory, a).check()
    assert sorted((d.action, d.purpose) for d in done) == [
        ("generate", "decryption"),
        ("generate", "signing"),
    ]
    with psycopg.connect(initialised_farm.dsn) as conn:
        rows = conn.execute(
            "SELECT action, term, node FROM audit_event WHERE action = 'generate'"
        ).fetchall()
    assert rows == [("generate", 1, "node-a"), ("generate", 1, "node-a")]


def test_release_frees_the_lease_and_the_next_holder_gets_a_new_term(db: ConfigDB) -> None:
    a = Election(db, node_id="node-a", lease=LEASE)
    b = Election(db, node_id="node-b", lease=LEASE)
    assert a.try_acquire()
    a.release()
    assert not read_lease(db).valid
    assert b.try_acquire()
    assert b.term == 2


def test_the_database_allows_one_primary_and_one_secondary_per_purpose(
    initialised_farm: TestFarm,
) -> None:
    copy = (
        "INSERT INTO certificate (id, purpose, role, thumbprint, sha256, subject, key_type,"
        " not_before, not_after, der, master_key, blob)"
        " SELECT gen_random_uuid(), purpose, %s, 'AB' || substr(thumbprint, 3), sha256,"
        " subject, key_type, not_before, not_after, der, master_key, blob"
        " FROM certificate WHERE purpose = 'signing'"
    )
    with (
        psycopg.connect(initialised_farm.dsn) as conn,
        pytest.raises(psycopg.errors.UniqueViolation, match="certificate_one_primary"),
    ):
        conn.execute(copy, ("primary",))
    with psycopg.connect(initialised_farm.dsn) as conn:
        conn.execute(copy, ("secondary",))
    second = copy.replace("'AB'", "'CD'").replace(
        "purpose = 'signing'", "purpose = 'signing' AND role = 'primary'"
    )
    with (
        psycopg.connect(initialised_farm.dsn) as conn,
        pytest.raises(psycopg.errors.UniqueViolation, match="certificate_one_secondary"),
    ):
        conn.execute(second, ("secondary",))


def test_a_due_promotion_waits_for_no_directory_retries_once_the_key_is_known(
    db: ConfigDB,
    initialised_farm: TestFarm,
    config: Config,
    slapd: LocalSlapd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A retry budget far longer than a promotion may wait: spending it would show below.
    patient = dataclasses.replace(config.retry, total_seconds=3.0)
    a = Election(db, node_id="node-a", lease=LEASE)
    assert a.try_acquire()
    with Directory(config.directory, patient) as directory:
        leader = Leader(dataclasses.replace(config, retry=patient), db, directory, a)
        assert leader.tick() == []  # nothing due; the master key is now known
        secondary = add_certificate(initialised_farm, purpose="signing", role="secondary")
        with psycopg.connect(
            initialised_farm.dsn
        ) as conn:  # generated 6 days ago: promotion is due
            conn.execute(
                "UPDATE certificate SET created_at = now() - interval '6 days'"
                " WHERE role = 'secondary'"
            )
        slapd.stop()
        try:
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                done = leader.tick()
        finally:
            slapd.start()
    assert [(d.action, d.purpose, d.thumbprint) for d in done] == [
        ("promote", "signing", secondary)
    ]
    retries = [r.getMessage() for r in caplog.records if "retrying for" in r.getMessage()]
    assert retries == [], retries  # one attempt, no retry budget spent
    # The master-key part of the check needs the directory: it waits, and says so.
    assert any("master-key check skipped" in r.getMessage() for r in caplog.records)


def test_a_lead_event_is_fenced_so_a_lost_term_is_never_recorded_late(
    db: ConfigDB, initialised_farm: TestFarm, config: Config
) -> None:
    service = Service(config)
    try:
        assert service.election.try_acquire()  # term 1 ...
        expire_lease(initialised_farm.dsn)
        other = Election(db, node_id="node-b", lease=LEASE)
        assert other.try_acquire()  # ... taken over (term 2) before its `lead` event was written
        service._record_leadership()
    finally:
        service.close()
    with psycopg.connect(initialised_farm.dsn) as conn:
        leads = conn.execute("SELECT term, node FROM audit_event WHERE action = 'lead'").fetchall()
    assert leads == []
    assert service.election.term is None  # it stepped down


def test_a_deleted_lease_row_heals_without_terms_going_back(
    db: ConfigDB, initialised_farm: TestFarm
) -> None:
    a = Election(db, node_id="node-a", lease=LEASE)
    assert a.try_acquire()
    with a.fenced() as fence:  # an audited write under the term
        fence.tx.audit(node="node-a", term=fence.term, action="test")
    highest = a.term
    assert highest is not None
    with psycopg.connect(initialised_farm.dsn) as conn:
        conn.execute("DELETE FROM leader_lease")
    assert not read_lease(db).valid  # no exception: nobody leads
    with pytest.raises(LeaseLostError, match="row is missing"), a.fenced():
        pass
    b = Election(db, node_id="node-b", lease=LEASE)
    assert b.try_acquire()
    assert b.term is not None and b.term > highest
    b.release()
    # And the operator's path (no node serves): a rollover takes the healed lease.
    expect_ok(initialised_farm.run("rollover", "--purpose", "signing"))


def test_the_schema_forbids_a_holder_without_an_expiry(initialised_farm: TestFarm) -> None:
    with (
        psycopg.connect(initialised_farm.dsn) as conn,
        pytest.raises(psycopg.errors.CheckViolation),
    ):
        conn.execute("UPDATE leader_lease SET holder = 'x', holder_node = 'x', expires_at = NULL")


def test_a_leader_check_reads_the_farm_state_record_once_outside_the_fence(
    db: ConfigDB, initialised_farm: TestFarm, config: Config
) -> None:
    """The key the record is under is learnt and prefetched from one read; the fence reads
    the record again under the lease row's lock, as it must."""
    a = Election(db, node_id="node-a", lease=LEASE)
    assert a.try_acquire()
    reads: list[int] = []
    original = db.stored_state

    def counted() -> Any:
        reads.append(1)
        return original()

    db.stored_state = counted  # type: ignore[method-assign]
    with Directory(config.directory, config.retry) as directory:
        leader = Leader(config, db, directory, a)
        assert leader.check() == []  # nothing due
        first = len(reads)
        assert leader.check() == []
    assert len(reads) - first == 1, reads
