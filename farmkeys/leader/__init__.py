"""The leader: the one process that holds the lease, and every write it makes.

What to do is decided by :mod:`farmkeys.policy`, a pure function; the leader only
carries it out, inside fenced transactions (:mod:`farmkeys.leader.state`), so every step
is done once, by the one process that holds the lease, and is recorded in the audit log
with its term. Each transaction ends by NOTIFYing the nodes, which re-sync within a
second. The parts, each its own module:

- :mod:`~farmkeys.leader.keys`: the current master key in memory;
- :mod:`~farmkeys.leader.state`: the fence, and the farm state record it writes;
- :mod:`~farmkeys.leader.sealing`: the one writer of sealed certificates (`init` uses it);
- :mod:`~farmkeys.leader.certificates`: certificate rollover;
- :mod:`~farmkeys.leader.master_keys`: the master key's lifecycle;
- :mod:`~farmkeys.leader.requests` and :mod:`~farmkeys.leader.repair`: answering requests.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from farmkeys.config import Config
from farmkeys.db import ConfigDB, Farm
from farmkeys.directory import Directory
from farmkeys.election import Election
from farmkeys.leader.certificates import Applied, CertificateRollover
from farmkeys.leader.keys import CurrentKey
from farmkeys.leader.master_keys import MasterKeyLifecycle
from farmkeys.leader.requests import RequestAnswering
from farmkeys.leader.sealing import (
    CLOCK_SKEW_ALLOWANCE,
    Spares,
    generate_certificate,
    new_certificate,
    sealed_certificate,
)
from farmkeys.leader.state import StateFence, write_first_state

__all__ = [
    "CLOCK_SKEW_ALLOWANCE",
    "Applied",
    "Leader",
    "generate_certificate",
    "new_certificate",
    "sealed_certificate",
    "write_first_state",
]


class Leader:
    """The writes a lease holder makes, each in a fenced transaction.

    Every fenced transaction first checks the farm state record against the certificate
    rows: a leader never builds on rows that a config-DB writer changed behind its back.
    Before it commits, it writes the new record when the live set changed.
    """

    def __init__(
        self,
        config: Config,
        db: ConfigDB,
        directory: Directory,
        election: Election,
        *,
        on_step: Callable[[str, uuid.UUID], None] | None = None,
    ) -> None:
        """``on_step(step, key_id)`` is called after each committed step of a master-key
        roll (``recorded``, ``added``, ``resealed``, ``current``, ``deleted``)."""
        self._db = db
        self._key = CurrentKey(db, directory)
        state = StateFence(db, election, self._key)
        spares = Spares(config, db)
        self._certificates = CertificateRollover(config, db, election, state, self._key, spares)
        self._master_keys = MasterKeyLifecycle(
            config, db, directory, election, state, self._key, on_step=on_step
        )
        self._requests = RequestAnswering(
            config,
            db,
            directory,
            election,
            (state, self._key, spares, self._certificates, self._master_keys),
            refresh_key=self._refresh_key,
        )

    def tick(self) -> list[Applied]:
        """What `serve` runs on schedule: answer pending requests, then the certificate and
        master-key rollover checks, with one look at the master key for all."""
        farm = self._farm_and_key()
        self._requests.answer(farm)
        done = self._certificates.check(farm)
        return done + self._master_keys.check(farm)

    def check(self, *, farm: Farm | None = None) -> list[Applied]:
        """Run the rollover check: apply what the policy says is due, until nothing is."""
        return self._certificates.check(farm or self._farm_and_key())

    def check_master_keys(self, *, farm: Farm | None = None) -> list[Applied]:
        """The master-key part of the rollover check: finish a roll cut short, roll a key
        that reached its lifetime, re-seal, delete keys past their retention."""
        return self._master_keys.check(farm or self._farm_and_key())

    def roll_master_key(self, farm: Farm, *, urgent: bool, request: int | None) -> list[str]:
        """Roll the master key now (`farmkeys rollover --master-key`); the answer's lines."""
        if self._key.known is None:
            self._refresh_key(farm)
        return self._master_keys.roll(farm, urgent=urgent, request=request)

    def answer_requests(self, *, farm: Farm | None = None) -> int:
        """Carry out every pending request that is authentic, refuse the rest; how many
        were answered."""
        return self._requests.answer(farm or self._farm_and_key())

    def _refresh_key(self, farm: Farm) -> None:
        self._key.refresh(farm, adopt=self._master_keys.adopt)

    def _farm_and_key(self) -> Farm:
        """The farm, with the current master key and the one the farm state record names
        read (outside any transaction)."""
        farm = self._db.require_farm()
        self._refresh_key(farm)
        self._key.prefetch_record_key(farm)
        return farm
