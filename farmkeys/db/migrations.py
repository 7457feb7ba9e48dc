"""The config DB's schema: the numbered plain-SQL files of ``sql/``, applied in order
and recorded in ``farmkeys_migration``, under an advisory lock that serialises them (and
`init`) across every node that runs them at once."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from farmkeys.db.connection import Connection, Statements
from farmkeys.db.rows import Farm
from farmkeys.errors import DatabaseError

log = logging.getLogger(__name__)

MIGRATION_TABLE = "farmkeys_migration"
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Serialises migrations and `init` across every node that runs them at once.
_ADVISORY_LOCK = 0x666B_6579  # "fkey"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The migrations shipped with this farmkeys, in order."""
    found = []
    for entry in _migration_files():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    return found


def _migration_files() -> list[Path]:
    """The shipped migrations: the package farmkeys._sql, as installed (an editable install
    maps it to the repository's sql/). Only a checkout run without installing, recognised
    by its pyproject.toml, reads sql/ beside the package: never a folder that merely
    happens to lie next to an installed farmkeys (another package's sql/)."""
    try:
        packaged = resources.files("farmkeys._sql")
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parents[2]
        if not (root / "pyproject.toml").is_file():
            raise
        return sorted((root / "sql").iterdir())
    return sorted(Path(str(p)) for p in packaged.iterdir())


class MigrationQueries(Connection):
    """Which migrations the config DB has, applying the missing ones, and the lock."""

    def applied_migrations(self) -> set[int]:
        exists = self.fetch("SELECT to_regclass(%s) IS NOT NULL AS ok", (MIGRATION_TABLE,))
        if not exists[0]["ok"]:
            return set()
        return {r["version"] for r in self.fetch("SELECT version FROM farmkeys_migration")}

    def upgrade(self) -> list[str]:
        """Apply the migrations not yet applied, each in its own transaction; their names."""
        applied: list[str] = []
        self.fetch("SELECT pg_advisory_lock(%s)", (_ADVISORY_LOCK,))
        try:
            self.fetch(
                "CREATE TABLE IF NOT EXISTS farmkeys_migration ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = self.applied_migrations()
            known = migrations()
            newest = max((m.version for m in known), default=0)
            if done and max(done) > newest:
                raise DatabaseError(
                    f"the config DB at {self.endpoint} is at schema version {max(done)}, "
                    f"newer than this farmkeys knows ({newest})",
                    "upgrade farmkeys on this node",
                )
            for migration in known:
                if migration.version in done:
                    continue
                with self._transaction(Statements) as tx:
                    tx.execute(migration.sql)
                    tx.execute(
                        "INSERT INTO farmkeys_migration (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
                log.info("config DB %s: applied migration %s", self.endpoint, migration.name)
                applied.append(migration.name)
        finally:
            if self._conn is not None:
                self.fetch("SELECT pg_advisory_unlock(%s)", (_ADVISORY_LOCK,))
        return applied

    @contextmanager
    def init_lock(self) -> Iterator[None]:
        """Hold the farm-wide advisory lock that serialises `init` across nodes."""
        self.fetch("SELECT pg_advisory_lock(%s)", (_ADVISORY_LOCK,))
        try:
            yield
        finally:
            if self._conn is not None:
                self.fetch("SELECT pg_advisory_unlock(%s)", (_ADVISORY_LOCK,))

    def require_current_schema(self, farm: Farm) -> None:
        """Refuse to go on with a schema older than this farmkeys needs."""
        newest = max(m.version for m in migrations())
        if farm.schema_version < newest:
            raise DatabaseError(
                f"the config DB at {self.endpoint} is at schema version {farm.schema_version};"
                f" this farmkeys needs {newest}",
                "run `farmkeys db upgrade` once",
            )
