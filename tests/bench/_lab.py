"""A benchmark's private servers: a PostgreSQL and a slapd of its own, and a farm on them."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from farmtools import TestFarm

from farmkeys_lab.postgres import LocalPostgres
from farmkeys_lab.slapd import LocalSlapd


@contextlib.contextmanager
def lab_farm(name: str) -> Iterator[TestFarm]:
    """A farm (not initialised) on a fresh PostgreSQL and slapd in a temporary folder,
    all stopped and removed at the end; ``name`` names the folder."""
    root = Path(tempfile.mkdtemp(prefix=f"farmkeys-bench-{name}-"))
    postgres = LocalPostgres(root / "postgres")
    slapd = LocalSlapd(root / "slapd")
    try:
        postgres.start()
        slapd.start()
        dsn = postgres.create_database(f"farmkeys_bench_{uuid.uuid4().hex[:12]}")
        farm_root = root / "farm"
        farm_root.mkdir()
        yield TestFarm(root=farm_root, slapd=slapd, dsn=dsn)
    finally:
        slapd.stop()
        postgres.remove()
        shutil.rmtree(root, ignore_errors=True)
