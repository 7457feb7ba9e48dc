"""Randomized fault soak: `farmkeys serve` nodes rolling certificates over while things break.

Not part of the test run (pytest collects test_*.py only). From the repository root:

    make soak                                          # 3 nodes, 180 s, a random seed
    make soak SOAK_ARGS="--duration 1200 --seed 42"
    .venv/bin/python tests/soak/soak.py --nodes 5 --duration 600 --fault-interval 1 4 --keep

What it does. It starts a private slapd and PostgreSQL (farmkeys_lab, in a
temporary folder, on free loopback ports), creates a database, runs `farmkeys
init` and starts N `farmkeys serve` processes. Certificates live 30 s (a
"day" is one second: a secondary is generated 12 s before the primary
expires, promoted 6 s later), so the farm rolls over every 18 s or so. Once
every node has installed the farm and one of them leads, it injects a random
fault every few seconds (``--fault-interval``, uniform between its bounds),
one at a time, each undone before the next:

    kill        kill -9 of a node; the node is restarted (same store) after 0.2 .. 3 s
    stop        SIGSTOP of a node, SIGCONT after 1 .. 6 s (longer than the 3 s lease)
    terminate   pg_terminate_backend of every connection the farm has open
    directory   slapd stopped for 1 .. 5 s
    pg-restart  the private PostgreSQL stopped, started again 0 .. 3 s later (same port, data)

A node fault picks one of the nodes or "the leader" (whichever node holds the
lease at that moment; a spare pick when nobody does). Every choice comes from
``random.Random(seed)``: the same ``--seed`` gives the same fault sequence
(the timing, and so which node leads, is up to the machine).

What it checks. A thread reads the config DB every 0.2 s (a read-only
snapshot; samples taken while the DB is down or restarting are skipped and
counted), a second one records each set every node's store switches to
(farmtools.ManifestWatcher), and at the end it reads the audit log:

1. the config DB always holds, per purpose, exactly one primary, unexpired by
   the DB's clock, and at most one secondary (every sample);
2. the lease term never goes down (every sample); no event is committed under
   a term older than the lease had already reached (every sample: an event new
   since the last sample carries at least that sample's term); ordered by
   (at, id), the audit log's terms never go down; each term's events come from
   one node (the one whose `lead` event opened it, when there is one);
3. every set a node installed is one the farm had (the live sets replayed from
   the audit log), and each node only moves forward through them, across its
   kills and restarts; the replay ends at the config DB's live set;
4. once the faults stop, within ``--converge`` seconds every node's manifest
   equals the DB's live set and `farmkeys status` shows a leader;
5. master keys (they live 40 s here and are deleted 8 s after replacement,
   so a run rolls several): every second, when both answer, no live blob
   names a key the directory lacks and the directory holds no key the
   farm does not record; at the end, each key was added and made current
   at most once (one `master_key_add` and one `master_key_roll` event per
   key); and convergence (4) includes every node having opened the live
   blobs with the current key;

and, as a service manager would notice: no node exits unless the soak killed
it (one that does is restarted), and every node stops cleanly on SIGTERM at
the end.

It prints one line per fault as it goes and a summary at the end (seed, fault
counts, rollover steps, terms, samples, every break). Exit status: 0 when
nothing broke, 1 when something did (with the seed and the command line
that replays the same faults). Everything it started is stopped and the
temporary folder removed at the end (``--keep`` keeps the folder: node logs,
server logs), also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))  # farmtools
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))  # farmkeys_lab

import psycopg
from farmtools import REPO, TestFarm, audit_events, db_query, lease_row, wait_until
from psycopg.rows import dict_row
from serving import (
    BackgroundThread,
    Identity,
    ManifestWatcher,
    ServeNodes,
    live_identity,
    live_sets,
    manifest_identity,
)

from farmkeys.config import RetryConfig, load
from farmkeys.directory import Directory
from farmkeys.errors import DirectoryError
from farmkeys_lab.postgres import LocalPostgres
from farmkeys_lab.slapd import LocalSlapd

PURPOSES = ("signing", "decryption")
DATABASE = "farmkeys_soak"

# A day lasts a second: a certificate lives 30 s, its successor is made 12 s before it
# expires and promoted 6 s later; a primary 3 s from expiry is replaced at once.
OVERRIDES: dict[str, dict[str, Any]] = {
    "policy": {
        "threshold_unit_seconds": 1,
        "certificate_duration": 30,
        "generation_threshold": 12,
        "promotion_threshold": 6,
        "critical_threshold": 3,
        "rollover_interval_seconds": 1,
    },
    "master_key": {"lifetime": 40, "retain": 8},
    "lease": {"ttl_seconds": 3.0, "renew_seconds": 0.5},
    "node": {"poll_seconds": 5},
    "retry": {"total_seconds": 2.0, "initial_backoff_seconds": 0.05, "max_backoff_seconds": 0.3},
}

LEADER = "leader"  # a node fault's target: whichever node holds the lease
KINDS = ("kill", "stop", "terminate", "directory", "pg-restart")
# The random length, in seconds, of each kind's pause: restart delay, SIGSTOP, outages.
PAUSES: dict[str, tuple[float, float]] = {
    "kill": (0.2, 3.0),
    "stop": (1.0, 6.0),
    "terminate": (0.0, 0.0),
    "directory": (1.0, 5.0),
    "pg-restart": (0.0, 3.0),
}
LABELS = {
    "kill": "kill -9",
    "stop": "SIGSTOP",
    "terminate": "pg_terminate_backend",
    "directory": "directory outage",
    "pg-restart": "PostgreSQL restart",
}
# Leader writes, as the audit log names them (`lead` opens a term; `init` has none).
STEPS = ("generate", "promote", "retire", "archive", "generate_and_promote")
KEY_STEPS = ("master_key_add", "master_key_roll", "master_key_delete")
KEY_SAMPLE_SECONDS = 1.0  # the master-key sampler's period (it reads the directory)

SAMPLE_SECONDS = 0.2  # the invariant sampler's period
WATCH_SECONDS = 0.05  # the manifest watcher's period
START_SECONDS = 60.0  # N processes start and install on a loaded machine
STOP_SECONDS = 15.0  # a node stops after SIGTERM within this
RESPAWN_SECONDS = 2.0  # a node that exited by itself is restarted at most this often
TICK = 0.1  # the main loop's sleep granularity

TERMINATE_SQL = (
    "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    " AND application_name LIKE 'farmkeys%'"
)
LEASE_SQL = "SELECT term, holder_node, now() AS now FROM leader_lease"
ROLES_SQL = (
    "SELECT p.purpose,"
    " count(c.id) FILTER (WHERE c.role = 'primary') AS primaries,"
    " count(c.id) FILTER (WHERE c.role = 'primary' AND c.not_after > now()) AS unexpired,"
    " count(c.id) FILTER (WHERE c.role = 'secondary') AS secondaries"
    " FROM (VALUES ('signing'), ('decryption')) AS p (purpose)"
    " LEFT JOIN certificate c ON c.purpose = p.purpose GROUP BY p.purpose"
)
# Ids are taken at insert, not commit: look back far enough for a late commit's lower id.
NEW_EVENTS_SQL = (
    "SELECT id, at, node, term, action, purpose FROM audit_event"
    " WHERE id > %s AND term IS NOT NULL ORDER BY id"
)
ID_LOOKBACK = 500

_interrupted = threading.Event()


# -- the fault plan --------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One planned fault: drawn from the seed alone, whatever the farm is doing."""

    gap: float  # seconds after the previous fault was undone
    kind: str
    target: str  # a node, or LEADER (node faults only)
    spare: str  # the node hit when the target is LEADER and nobody leads
    pause: float  # seconds: restart delay, SIGSTOP length, directory outage; 0 otherwise


def fault_plan(seed: int, nodes: Sequence[str], interval: tuple[float, float]) -> Iterator[Fault]:
    """The endless fault sequence of ``seed``: every fault draws the same five numbers."""
    rng = random.Random(seed)
    while True:
        gap = rng.uniform(*interval)
        kind = rng.choice(KINDS)
        target = rng.choice([*nodes, LEADER])
        spare = rng.choice(list(nodes))
        pause = rng.uniform(*PAUSES[kind])
        yield Fault(gap=gap, kind=kind, target=target, spare=spare, pause=pause)


# -- breaks ----------------------------------------------------------------------------------


class Clock:
    """Seconds since the faults began (negative before)."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def reset(self) -> None:
        self.start = time.monotonic()

    def offset(self) -> float:
        return time.monotonic() - self.start


@dataclass
class Break:
    invariant: str  # "1 primary", "2 terms", "3 installs", "4 converge", "process", "checker"
    text: str
    at: float  # seconds into the soak, first seen
    count: int = 1


class Breaks:
    """Every broken invariant, once per distinct key (a repeat only counts); thread-safe."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._by_key: dict[tuple[Any, ...], Break] = {}
        self._reported = 0

    def add(self, invariant: str, text: str, key: tuple[Any, ...] | None = None) -> None:
        with self._lock:
            key = (invariant, text) if key is None else (invariant, *key)
            found = self._by_key.get(key)
            if found is None:
                self._by_key[key] = Break(invariant, text, self._clock.offset())
            else:
                found.count += 1

    @property
    def items(self) -> list[Break]:
        with self._lock:
            return list(self._by_key.values())

    def unreported(self) -> list[Break]:
        """Breaks added since the last call (the main thread prints them; threads never do)."""
        with self._lock:
            found = list(self._by_key.values())[self._reported :]
            self._reported += len(found)
            return found


# -- the master-key sampler (invariant 5) ----------------------------------------------------


class KeySampler(BackgroundThread):
    """Every KEY_SAMPLE_SECONDS: the live blobs' keys and the recorded keys, the directory's
    keys, the recorded keys again.

    Read in that order, so a step between the reads cannot look like a break:
    a new key is recorded before the directory holds it (so the second record
    read has it), a key is deleted from the directory before its deletion
    commits (so the first record read still has it), and a key is deleted
    only `retain` (8 s) after no live blob names it. A sample that cannot
    read the config DB or the directory (a fault) is skipped.
    """

    name = "key-sampler"

    def __init__(self, farm: TestFarm, breaks: Breaks) -> None:
        self.farm = farm
        self.breaks = breaks
        self.samples = 0
        self.unavailable = 0
        config = load(farm.config())
        self._directory = Directory(config.directory, RetryConfig(total_seconds=0.0))
        self._group: uuid.UUID | None = None
        super().__init__()

    def _run(self) -> None:
        try:
            while not self._stop.wait(KEY_SAMPLE_SECONDS):
                try:
                    self.sample()
                except (psycopg.Error, DirectoryError):
                    self.unavailable += 1
                    self._directory.close()
        except Exception as exc:  # a bug here must not pass as "nothing broke"
            self.breaks.add("checker", f"the master-key sampler failed: {exc!r}")
        finally:
            self._directory.close()

    def sample(self) -> None:
        dsn = self.farm.dsn
        if self._group is None:
            self._group = db_query(dsn, "SELECT dkm_group FROM farm")[0]["dkm_group"]
        assert self._group is not None
        live = {
            r["k"]
            for r in db_query(
                dsn, "SELECT DISTINCT master_key AS k FROM certificate WHERE role <> 'archived'"
            )
        }
        held = {k.id for k in self._directory.list_keys(self._group)}
        known = {
            r["id"] for r in db_query(dsn, "SELECT id FROM master_key WHERE state <> 'deleted'")
        }
        self.samples += 1
        for key_id in sorted(live - held, key=str):
            self.breaks.add(
                "5 keys",
                f"live blobs name master key {key_id}, which the directory lacks",
                key=("live", key_id),
            )
        for key_id in sorted(held - known, key=str):
            self.breaks.add(
                "5 keys",
                f"the directory holds master key {key_id}, which the farm does not record",
                key=("held", key_id),
            )


# -- the invariant sampler -------------------------------------------------------------------


class InvariantSampler(BackgroundThread):
    """Reads the config DB every SAMPLE_SECONDS in one read-only snapshot (invariants 1 and 2).

    A sample that fails (the DB restarting, the connection terminated) is
    counted as unavailable and the connection opened again at the next one.
    """

    name = "invariant-sampler"

    def __init__(self, dsn: str, breaks: Breaks) -> None:
        self.dsn = dsn
        self.breaks = breaks
        self.samples = 0
        self.unavailable = 0
        self.first_term: int | None = None
        self.last_term: int | None = None  # the highest lease term any sample saw
        self._seen: set[int] = set()
        self._max_id = 0
        self._conn: psycopg.Connection[dict[str, Any]] | None = None
        self._began = self._ended = 0.0
        super().__init__()

    def ran_for(self) -> float:
        return max(0.0, (self._ended or time.monotonic()) - self._began)

    def _run(self) -> None:
        self._began = time.monotonic()
        try:
            while not self._stop.wait(SAMPLE_SECONDS):
                try:
                    self._sample()
                except psycopg.Error:
                    self.unavailable += 1
                    self._disconnect()
        except Exception as exc:  # a bug here must not pass as "nothing broke"
            self.breaks.add("checker", f"the invariant sampler failed: {exc!r}")
        finally:
            self._ended = time.monotonic()
            self._disconnect()

    def _connect(self) -> psycopg.Connection[dict[str, Any]]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=2,
                row_factory=dict_row,
                application_name="soak sampler",  # not "farmkeys...": spared by `terminate`
                options="-c TimeZone=UTC -c statement_timeout=2000",
            )
        return self._conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def _sample(self) -> None:
        conn = self._connect()
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            lease = conn.execute(LEASE_SQL).fetchall()[0]
            roles = conn.execute(ROLES_SQL).fetchall()
            events = conn.execute(NEW_EVENTS_SQL, (self._max_id - ID_LOOKBACK,)).fetchall()
        self.samples += 1
        term, previous = int(lease["term"]), self.last_term
        when = lease["now"].strftime("%H:%M:%S.%f")[:-3]

        # 1. One unexpired primary per purpose, at most one secondary.
        for r in roles:
            if r["primaries"] != 1 or r["unexpired"] != 1 or r["secondaries"] > 1:
                self.breaks.add(
                    "1 primary",
                    f"{r['purpose']}: {r['primaries']} primary ({r['unexpired']} unexpired),"
                    f" {r['secondaries']} secondary (DB time {when})",
                    key=(r["purpose"], r["primaries"], r["unexpired"], r["secondaries"]),
                )

        # 2. The lease term never goes down ...
        if previous is not None and term < previous:
            self.breaks.add(
                "2 terms",
                f"the lease term went down from {previous} to {term} (DB time {when})",
                key=("lease", previous, term),
            )
        # ... and no event commits under a term the lease had already left behind.
        for e in events:
            if e["id"] in self._seen:
                continue
            self._seen.add(e["id"])
            self._max_id = max(self._max_id, e["id"])
            what = " ".join(x for x in (e["action"], e["purpose"]) if x)
            what = f"event {e['id']} ({what} by {e['node']})"
            if e["term"] > term:
                self.breaks.add(
                    "2 terms",
                    f"{what} carries term {e['term']}, above the lease's {term} (DB time {when})",
                    key=("ahead", e["id"]),
                )
            if previous is not None and e["term"] < previous:
                self.breaks.add(
                    "2 terms",
                    f"{what} under term {e['term']} committed after the lease had reached"
                    f" term {previous} (seen by the sample of DB time {when})",
                    key=("stale", e["id"]),
                )
        if self.first_term is None:
            self.first_term = term
        self.last_term = term if previous is None else max(previous, term)


# -- the soak --------------------------------------------------------------------------------


@dataclass
class Figures:
    faults: Counter[str] = field(default_factory=Counter)
    steps: Counter[str] = field(default_factory=Counter)
    terms: int = 0
    lead_events: int = 0
    installs: dict[str, int] = field(default_factory=dict)
    converged_after: float | None = None
    faulted_for: float = 0.0
    key_samples: int = 0


class Soak:
    """The farm, its nodes and servers, and the faults done to them."""

    def __init__(
        self,
        farm: TestFarm,
        nodes: ServeNodes,
        names: list[str],
        slapd: LocalSlapd,
        postgres: LocalPostgres,
        breaks: Breaks,
        clock: Clock,
    ) -> None:
        self.farm = farm
        self.nodes = nodes
        self.names = names
        self.slapd = slapd
        self.postgres = postgres
        self.breaks = breaks
        self.clock = clock
        self.figures = Figures()
        self._killed: set[str] = set()  # killed by the soak, restart pending
        self._stopping = False  # the end: nodes exit because the soak stopped them
        self._respawned_at: dict[str, float] = {}

    # -- waiting, and noticing what happens meanwhile ----------------------------------------

    def sleep(self, seconds: float) -> None:
        """Sleep, meanwhile printing new breaks and restarting nodes that exited by themselves."""
        deadline = time.monotonic() + seconds
        while True:
            self.poll()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(TICK, left))

    def poll(self) -> None:
        if _interrupted.is_set():
            raise KeyboardInterrupt
        for node in self.names:
            served = self.nodes.procs[node]
            if self._stopping or node in self._killed or served.alive():
                continue
            last = self._respawned_at.get(node, -RESPAWN_SECONDS)
            if time.monotonic() - last < RESPAWN_SECONDS:
                continue
            tail = " | ".join(served.tail(3).splitlines())
            self.breaks.add(
                "process",
                f"{node} (pid {served.pid}) exited by itself with status"
                f" {served.proc.returncode}; restarted. Its log ended: {tail}",
            )
            self._respawned_at[node] = time.monotonic()
            self.nodes.start(node)
        for found in self.breaks.unreported():
            say(f"[{found.at:7.1f}s] BREAK [{found.invariant}] {found.text}")

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        """Serve on every node; return once every store holds the farm and one node leads."""
        self.nodes.start_all(self.names)
        first = live_identity(self.farm.dsn)

        def ready() -> bool:
            self.poll()
            installed = all(manifest_identity(self.farm.store(n)) == first for n in self.names)
            return installed and bool(lease_row(self.farm.dsn)["valid"])

        wait_until(
            ready,
            START_SECONDS,
            "every node installed the farm and one leads",
            interval=0.2,
            detail=self.nodes.logs,
        )

    # -- faults ------------------------------------------------------------------------------

    def run_faults(self, plan: Iterator[Fault], duration: float) -> None:
        """Inject the plan's faults, one at a time, until ``duration`` seconds have passed."""
        self.clock.reset()
        for fault in plan:
            left = duration - self.clock.offset()
            if fault.gap >= left:
                self.sleep(max(0.0, left))
                break
            self.sleep(fault.gap)
            self.inject(fault)
        self.figures.faulted_for = self.clock.offset()

    def inject(self, fault: Fault) -> None:
        self.figures.faults[fault.kind] += 1
        label = f"{LABELS[fault.kind]:<21}"
        if fault.kind in ("kill", "stop"):
            node, why = self._resolve(fault)
            served = self.nodes.procs[node]
            if fault.kind == "kill":
                self._line(f"{label} {node}{why}; restart in {fault.pause:.1f} s")
                self._killed.add(node)
                served.proc.send_signal(signal.SIGKILL)
                served.proc.wait(10)
                self.sleep(fault.pause)
                self.nodes.start(node)
                self._killed.discard(node)
            else:
                self._line(f"{label} {node}{why}; SIGCONT in {fault.pause:.1f} s")
                served.proc.send_signal(signal.SIGSTOP)
                try:
                    self.sleep(fault.pause)
                finally:
                    with contextlib.suppress(ProcessLookupError):
                        served.proc.send_signal(signal.SIGCONT)
        elif fault.kind == "terminate":
            try:
                ended = len(db_query(self.farm.dsn, TERMINATE_SQL))
                self._line(f"{label} the farm's connections ({ended} ended)")
            except psycopg.Error as exc:
                self._line(f"{label} the farm's connections: failed, {_one_line(exc)}")
        elif fault.kind == "directory":
            self._line(f"{label} slapd; back in {fault.pause:.1f} s")
            self.slapd.stop()
            self.sleep(fault.pause)
            self.slapd.start()
        elif fault.kind == "pg-restart":
            self._line(f"{label} postgres; back in {fault.pause:.1f} s")
            began = time.monotonic()
            self.postgres.stop()
            try:
                self.sleep(fault.pause)
            finally:
                self.postgres.start()
            self._line(f"{'':<21} postgres back after {time.monotonic() - began:.1f} s")
        else:
            raise AssertionError(f"unknown fault kind {fault.kind}")

    def _resolve(self, fault: Fault) -> tuple[str, str]:
        """The node a node fault hits, and how it was picked (for the fault's line)."""
        if fault.target != LEADER:
            return fault.target, ""
        try:
            lease = lease_row(self.farm.dsn)
        except psycopg.Error:
            return fault.spare, " (the leader: the config DB did not answer, so the spare pick)"
        if lease["valid"] and lease["holder_node"] in self.names:
            return lease["holder_node"], f" (the leader, term {lease['term']})"
        return fault.spare, " (the leader: nobody leads, so the spare pick)"

    def _line(self, text: str) -> None:
        say(f"[{self.clock.offset():7.1f}s] {text}")

    # -- the end -----------------------------------------------------------------------------

    def converge(self, timeout: float) -> None:
        """4. Every node's manifest equals the live set and status shows a leader, in time."""
        began = time.monotonic()
        deadline = began + timeout
        while True:
            self.poll()
            try:
                problem = self._not_converged()
            except psycopg.Error as exc:
                problem = f"the config DB did not answer: {_one_line(exc)}"
            if problem is None:
                self.figures.converged_after = time.monotonic() - began
                return
            if time.monotonic() >= deadline:
                self.breaks.add(
                    "4 converge", f"not converged {timeout:g} s after the faults: {problem}"
                )
                self.poll()
                say(self.nodes.logs(15))
                return
            time.sleep(0.2)

    def _not_converged(self) -> str | None:
        live = live_identity(self.farm.dsn)
        lagging = {
            n: manifest_identity(self.farm.store(n))
            for n in self.names
            if manifest_identity(self.farm.store(n)) != live
        }
        if lagging:
            return f"live set {_show(live)}; " + "; ".join(
                f"{n} has {_show(m)}" for n, m in lagging.items()
            )
        result = self.farm.run("status", "--json", node="soak")
        if _interrupted.is_set():  # the CLI turns Ctrl-C into its exit status 130
            raise KeyboardInterrupt
        if not result.out.strip():
            return f"status failed ({result.code}): {_one_line(result.err)}"
        doc = result.json
        if not doc.get("leader"):
            return f"status shows no leader; its problems: {doc.get('problems')}"
        current = [k["id"] for k in doc["master_keys"] if k["state"] == "current"]
        unread = [
            n["id"] for n in doc["nodes"] if n["id"] in self.names and n["master_keys"] != current
        ]
        if unread:
            return f"{', '.join(unread)} have not opened the live blobs with master key {current}"
        return None

    def stop_nodes(self) -> None:
        """SIGTERM every node at once; each must stop cleanly (status 0) within STOP_SECONDS."""
        self._stopping = True
        running = [self.nodes.procs[n] for n in self.names]
        for served in running:
            served.proc.send_signal(signal.SIGTERM)
        for served in running:
            try:
                code: int | None = served.proc.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                code = None
            if code != 0:
                self.breaks.add(
                    "process",
                    f"{served.node} did not stop cleanly on SIGTERM"
                    f" ({'still running' if code is None else f'status {code}'})",
                )

    def check_checkers(self, sampler: InvariantSampler, watcher: ManifestWatcher) -> None:
        """The checker threads ran all along: a dead one must not pass for "nothing broke"."""
        expected = sampler.ran_for() / SAMPLE_SECONDS
        if sampler.samples + sampler.unavailable < expected / 4:
            self.breaks.add(
                "checker",
                f"the invariant sampler tried only {sampler.samples + sampler.unavailable}"
                f" samples in {sampler.ran_for():.0f} s (expected about {expected:.0f})",
            )
        # The nodes are stopped and the watcher took its last look after that.
        for node in self.names:
            if watcher.current(node) != manifest_identity(self.farm.store(node)):
                self.breaks.add(
                    "checker",
                    f"the manifest watcher's last record of {node} is not what its store holds:"
                    " it stopped watching early",
                )

    def check_keys(self, sampler: KeySampler) -> None:
        """5, at the end: the two key invariants once more, and each key added and made
        current once."""
        if sampler.samples == 0:
            self.breaks.add("checker", "the master-key sampler never took a sample")
        sampler.sample()
        found = audit_events(self.farm)
        for action in ("master_key_add", "master_key_roll"):
            seen = Counter(e["master_key"] for e in found if e["action"] == action)
            for key_id, count in seen.items():
                if count > 1:
                    self.breaks.add("5 keys", f"{count} {action} events for master key {key_id}")
        current = db_query(self.farm.dsn, "SELECT id FROM master_key WHERE state = 'current'")
        nodes = db_query(
            self.farm.dsn,
            "SELECT id, master_keys FROM node WHERE id = ANY(%s)",
            (list(self.names),),
        )
        for n in nodes:
            if n["master_keys"] != [current[0]["id"]]:
                self.breaks.add(
                    "5 keys", f"{n['id']} has not opened the live blobs with the current master key"
                )
        self.figures.key_samples = sampler.samples

    def check_audit(self, watcher: ManifestWatcher) -> None:
        """2 and 3, from the audit log: term order, one writer per term, installs replayed."""
        found = audit_events(self.farm)
        led = [e for e in found if e["term"] is not None]
        self.figures.steps = Counter(e["action"] for e in led if e["action"] != "lead")
        self.figures.terms = len({e["term"] for e in led})
        self.figures.lead_events = sum(1 for e in led if e["action"] == "lead")

        # 2. Ordered by (at, id), terms never go down.
        highest: dict[str, Any] | None = None
        for e in led:
            if highest is not None and e["term"] < highest["term"]:
                self.breaks.add(
                    "2 terms",
                    f"{_event(e)} comes after {_event(highest)}: its term is older",
                    key=("order", e["id"]),
                )
            elif highest is None or e["term"] > highest["term"]:
                highest = e
        # 2. Each term's events come from one node, the one whose `lead` event opened it.
        by_term: dict[int, list[dict[str, Any]]] = {}
        for e in led:
            by_term.setdefault(e["term"], []).append(e)
        for term, events in by_term.items():
            writers = sorted({e["node"] for e in events})
            if len(writers) == 1:
                continue
            leads = [e["node"] for e in events if e["action"] == "lead"]
            owner = leads[0] if leads else events[0]["node"]
            others = [e for e in events if e["node"] != owner]
            self.breaks.add(
                "2 terms",
                f"term {term} has events from {', '.join(writers)}, not only from {owner}"
                f" ({'whose lead event opened it' if leads else 'its first writer'}): "
                + "; ".join(_event(e) for e in others[:5])
                + (f"; and {len(others) - 5} more" if len(others) > 5 else ""),
                key=("writers", term),
            )

        # 3. Every node installed sets the farm had, in the farm's order.
        sets = live_sets(found)
        live = live_identity(self.farm.dsn)
        if not sets or sets[-1][1] != live:
            self.breaks.add(
                "3 installs",
                f"the audit log does not explain the live set {_show(live)}: its replay ends at"
                f" {_show(sets[-1][1]) if sets else 'nothing'}",
            )
        index = {identity: i for i, (_, identity) in enumerate(sets)}
        for node, changes in watcher.changes.items():
            self.figures.installs[node] = len(changes)
            previous: int | None = None
            for switched, identity in changes:
                when = datetime.fromtimestamp(switched).strftime("%H:%M:%S.%f")[:-3]
                i = index.get(identity)
                if i is None:
                    self.breaks.add(
                        "3 installs",
                        f"{node} installed a set the farm never had at {when}: {_show(identity)}",
                    )
                    continue
                if previous is not None and i < previous:
                    self.breaks.add(
                        "3 installs",
                        f"{node} went back at {when} from the farm's set #{previous} to #{i}"
                        f" (of {len(sets)})",
                    )
                previous = i if previous is None else max(previous, i)


# -- output ----------------------------------------------------------------------------------


def say(text: str) -> None:
    print(text, flush=True)


def _one_line(value: object) -> str:
    return " ".join(str(value).split())[:300]


def _show(identity: Identity | None) -> str:
    if identity is None:
        return "nothing"
    return "{" + ", ".join(f"{p} {r} {t[:8]}" for p, r, t in sorted(identity)) + "}"


def _event(e: dict[str, Any]) -> str:
    what = " ".join(x for x in (e["action"], e["purpose"]) if x)
    return (
        f"event {e['id']} ({what} by {e['node']}, term {e['term']},"
        f" at {e['at'].strftime('%H:%M:%S.%f')})"
    )


def summary(
    args: argparse.Namespace, seed: int, figures: Figures, sampler: InvariantSampler, breaks: Breaks
) -> str:
    faults = sum(figures.faults.values())
    steps = sum(figures.steps.values())
    lines = [
        "",
        f"farmkeys soak: seed {seed}, {args.nodes} nodes, {args.duration:g} s of faults"
        f" (ran {figures.faulted_for:.1f} s)",
        f"  faults          {faults}: "
        + ", ".join(f"{kind} {figures.faults[kind]}" for kind in KINDS),
        f"  rollover steps  {steps}: "
        + ", ".join(f"{action} {figures.steps[action]}" for action in STEPS + KEY_STEPS),
        f"  terms           {figures.terms} with events ({figures.lead_events} lead events);"
        f" lease term {sampler.first_term} -> {sampler.last_term}",
        f"  samples         {sampler.samples} invariant samples"
        f" ({sampler.unavailable} more skipped while the config DB did not answer),"
        f" {figures.key_samples} master-key samples",
        "  installs seen   " + ", ".join(f"{n} {c}" for n, c in figures.installs.items()),
        "  converged       "
        + (
            f"{figures.converged_after:.1f} s after the faults stopped"
            if figures.converged_after is not None
            else "no"
        ),
    ]
    found = breaks.items
    if not found:
        lines.append("  breaks          none")
        return "\n".join(lines)
    lines.append(f"  breaks          {len(found)}:")
    for b in found:
        times = f" (x{b.count})" if b.count > 1 else ""
        lines.append(f"    [{b.at:7.1f}s] [{b.invariant}]{times} {b.text}")
    replay = [
        "--seed",
        str(seed),
        "--duration",
        f"{args.duration:g}",
        "--nodes",
        str(args.nodes),
        "--fault-interval",
        *(f"{x:g}" for x in args.fault_interval),
        "--converge",
        f"{args.converge:g}",
    ]
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(REPO)
    lines += [
        "",
        f"BROKEN with seed {seed}. The same faults again (from {REPO}):",
        f"  make soak SOAK_ARGS={shlex.quote(shlex.join(replay))}",
        f"  {shlex.join([str(python), 'tests/soak/soak.py', *replay])}",
    ]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


def node_names(count: int) -> list[str]:
    return [f"node-{chr(ord('a') + i)}" for i in range(count)]


def soak(args: argparse.Namespace, seed: int, top: Path) -> int:
    clock = Clock()
    breaks = Breaks(clock)
    names = node_names(args.nodes)
    interval = (args.fault_interval[0], args.fault_interval[1])
    with LocalSlapd(top / "slapd") as slapd, LocalPostgres(top / "postgres") as postgres:
        dsn = postgres.create_database(DATABASE)
        root = top / "farm"
        root.mkdir()
        farm = TestFarm(root=root, slapd=slapd, dsn=dsn, overrides=copy.deepcopy(OVERRIDES))
        result = farm.run("init")
        if result.code != 0:
            raise RuntimeError(f"farmkeys init failed ({result.code}): {result.err}")
        stores = {n: farm.store(n) for n in names}
        with ServeNodes(farm, root / "logs") as nodes:
            run = Soak(farm, nodes, names, slapd, postgres, breaks, clock)
            with (
                InvariantSampler(dsn, breaks) as sampler,
                KeySampler(farm, breaks) as key_sampler,
                ManifestWatcher(stores, interval=WATCH_SECONDS) as watcher,
            ):
                run.start()
                say(f"{len(names)} nodes serving; faults for {args.duration:g} s")
                run.run_faults(fault_plan(seed, names, interval), args.duration)
                say(
                    f"[{clock.offset():7.1f}s] faults stopped; every node must converge"
                    f" within {args.converge:g} s"
                )
                run.converge(args.converge)
                run.stop_nodes()
            run.check_checkers(sampler, watcher)
            run.check_audit(watcher)
            run.check_keys(key_sampler)
            run.poll()
    say(summary(args, seed, run.figures, sampler, breaks))
    return 1 if breaks.items else 0


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    """The first Ctrl-C (or SIGTERM) stops the soak; further ones are ignored while it cleans up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _interrupted.set()
    raise KeyboardInterrupt


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be more than 0")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        epilog="See the module docstring (tests/soak/soak.py) for the faults and invariants.",
    )
    parser.add_argument("--nodes", type=int, default=3, help="serve processes (1-26; default 3)")
    parser.add_argument(
        "--duration", type=_positive, default=180.0, help="seconds of faults (default 180)"
    )
    parser.add_argument(
        "--fault-interval",
        type=_positive,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=[2.0, 6.0],
        help="seconds between faults, uniform in MIN..MAX (default 2 6)",
    )
    parser.add_argument("--seed", type=int, help="the fault sequence's seed (default: random)")
    parser.add_argument(
        "--converge",
        type=_positive,
        default=10.0,
        help="seconds every node has to converge after the faults (default 10)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (logs, data) at the end"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.nodes <= 26:
        parser.error("--nodes must be 1 to 26")
    if args.fault_interval[0] > args.fault_interval[1]:
        parser.error("--fault-interval MIN must not exceed MAX")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    top = Path(tempfile.mkdtemp(prefix="farmkeys-soak-"))
    say(
        f"farmkeys soak: seed {seed}, {args.nodes} nodes, {args.duration:g} s of faults"
        f" every {args.fault_interval[0]:g}..{args.fault_interval[1]:g} s; in {top}"
    )
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return soak(args, seed, top)
    except KeyboardInterrupt:
        say(f"farmkeys soak: interrupted (seed {seed}); everything it started is stopped")
        return 130
    finally:
        if args.keep:
            say(f"kept {top}")
        else:
            shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
