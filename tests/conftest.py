"""Shared fixtures, and the tiers.

The tests live in one folder per tier (registered as markers in pyproject.toml):
unit/ (pure modules, no server), integration/ (slapd and PostgreSQL), ad/
(Samba's AD DC) and system/ (serve processes, scale, failover, deployment, the
lab). Every test is marked with its folder's tier, so `pytest -m unit` runs the
quick one. The fixtures are grouped by the server they stand up; each group is
self-contained. The helpers they share live in tests/support/.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from farmtools import TestFarm, expect_ok

from farmkeys.config import DirectoryConfig, RetryConfig
from farmkeys.directory import Directory
from farmkeys_lab.samba import LocalSambaDC, SambaError, SambaTemplate, missing_samba
from farmkeys_lab.slapd import LocalSlapd, SlapdError, find_slapd

# PostgreSQL: a throwaway database per test (tests/support/pg.py).
pytest_plugins = ["pg"]

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "integration", "ad", "system")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with its tier: the folder of tests/ it lives in."""
    for item in items:
        item.add_marker(getattr(pytest.mark, tier_of(item.path)))


def tier_of(path: Path) -> str:
    """The tier of the test file ``path``; a usage error for a file outside every tier."""
    try:
        folder = path.resolve().relative_to(TESTS).parts[0]
    except ValueError:
        folder = ""
    if folder not in TIERS:
        raise pytest.UsageError(
            f"{path}: every test lives in its tier's folder, tests/{{{','.join(TIERS)}}}/"
        )
    return folder


# ---------------------------------------------------------------------------------
# Directory: a real slapd on loopback (farmkeys_lab.slapd.LocalSlapd)
# ---------------------------------------------------------------------------------

# Short enough that a test of "retries, then gives up" takes about a second.
FAST_RETRY = RetryConfig(total_seconds=2.0, initial_backoff_seconds=0.05, max_backoff_seconds=0.5)


def start_slapd(workdir: Path, **options: Any) -> LocalSlapd:
    """Start a LocalSlapd, failing the test (never skipping it) if slapd is unusable."""
    if find_slapd() is None:
        pytest.fail(
            "slapd is not installed (looked for /usr/sbin/slapd and $FARMKEYS_SLAPD); the "
            "directory tests need a real OpenLDAP server — apt-get install slapd ldap-utils",
            pytrace=False,
        )
    server = LocalSlapd(workdir, **options)
    try:
        server.start()
    except SlapdError as exc:
        pytest.fail(f"could not start the test slapd: {exc}", pytrace=False)
    return server


@pytest.fixture(scope="session")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlapd]:
    """One seeded slapd for the whole session, stopped at the end.

    A test that stops it must start it again before it returns.
    """
    server = start_slapd(tmp_path_factory.mktemp("slapd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_slapd(tmp_path: Path) -> Iterator[Callable[..., LocalSlapd]]:
    """Start extra slapds for one test: ``make_slapd(anonymous_read_dkm=True)``. Stopped after."""
    started: list[LocalSlapd] = []

    def make(**options: Any) -> LocalSlapd:
        server = start_slapd(tmp_path / f"slapd-{len(started)}", **options)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def fast_retry() -> RetryConfig:
    """A retry budget of 2 s, so tests of exhausted retries stay quick."""
    return FAST_RETRY


@pytest.fixture
def directory_config(slapd: LocalSlapd, tmp_path: Path) -> DirectoryConfig:
    """The farm's service account on the session slapd, its password in a 0600 file."""
    password_file = slapd.write_password_file(tmp_path / "directory.password")
    return DirectoryConfig(
        url=slapd.url,
        bind_dn=slapd.service_dn,
        container=slapd.container,
        password_file=str(password_file),
        timeout_seconds=2,
    )


MakeDirectory = Callable[..., Directory]


@pytest.fixture
def make_directory(
    directory_config: DirectoryConfig, fast_retry: RetryConfig
) -> Iterator[MakeDirectory]:
    """Build Directory objects from the service account's config with fields replaced.

    ``make_directory()`` is the service account; ``make_directory(bind_dn=...,
    password=..., password_file=None)`` another account. Closed at teardown.
    """
    made: list[Directory] = []

    def make(*, retry: RetryConfig | None = None, **changes: Any) -> Directory:
        config = dataclasses.replace(directory_config, **changes)
        directory = Directory(config, retry or fast_retry)
        made.append(directory)
        return directory

    yield make
    for directory in made:
        directory.close()


@pytest.fixture
def service_directory(make_directory: MakeDirectory) -> Directory:
    """A Directory bound (lazily) as the farm's service account."""
    return make_directory()


@pytest.fixture
def other_directory(make_directory: MakeDirectory, slapd: LocalSlapd) -> Directory:
    """A Directory bound (lazily) as alice, an ordinary account with no rights on ou=dkm."""
    return make_directory(bind_dn=slapd.other_dn, password=slapd.other_password, password_file=None)


# ---------------------------------------------------------------------------------
# A farm: three nodes' configs on a throwaway database and the session slapd
# (tests/support/farmtools.py's TestFarm). A test that needs other settings makes a
# fixture of its own, under another name, from one of these two.
# ---------------------------------------------------------------------------------


@pytest.fixture
def farm(tmp_path: Path, slapd: LocalSlapd, pg_dsn: str) -> TestFarm:
    """Farm "contoso", not initialised: nothing is in its database or the directory yet."""
    return TestFarm(root=tmp_path, slapd=slapd, dsn=pg_dsn)


@pytest.fixture
def initialised_farm(farm: TestFarm) -> TestFarm:
    """The farm once `farmkeys init` ran: its schema, DKM container and two primaries."""
    expect_ok(farm.run("init"))
    return farm


# ---------------------------------------------------------------------------------
# Active Directory: a real Samba AD DC on 127.0.0.1 (farmkeys_lab.samba.LocalSambaDC)
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def samba_template(tmp_path_factory: pytest.TempPathFactory) -> SambaTemplate:
    """The lab's domain, provisioned and seeded once per session (about 8 s); never started.

    Fails (never skips) when Samba is not installed: `make servers` installs it.
    """
    problem = missing_samba()
    if problem is not None:
        pytest.fail(f"the Active Directory tests need a real Samba DC: {problem}", pytrace=False)
    try:
        return SambaTemplate.provision(tmp_path_factory.mktemp("samba-template"))
    except SambaError as exc:
        pytest.fail(f"could not provision the test Samba domain: {exc}", pytrace=False)


@pytest.fixture
def samba_dc(samba_template: SambaTemplate, tmp_path: Path) -> Iterator[LocalSambaDC]:
    """A running copy of the template for one test, on 127.0.0.1:389/636; removed after.

    Samba's ports are fixed, so one runs at a time. A test may stop and start it.
    """
    dc = LocalSambaDC(samba_template, tmp_path / "samba-dc")
    try:
        dc.start()
    except SambaError as exc:
        dc.remove()
        pytest.fail(f"could not start the test Samba DC: {exc}", pytrace=False)
    try:
        yield dc
    finally:
        dc.remove()
