"""`farmkeys check`: the preflight an operator runs after writing a config, and monitoring
runs daily.

It does what the node's work will need, for real, and says for each part whether it
holds: the files farmkeys trusts (the StrictModes walk of :mod:`farmkeys.file_trust`),
the config DB (reached, the farm named as configured, this role's privileges, the
clock), the directory (bound as the service account, the current master key read), one
live blob opened with it, the store, the hook program and the ``[publish]`` settings.
A `sync` with nothing to do never binds to the directory, so a wrong password or a
wrong ``farm.name`` would otherwise surface months later, at the next rollover.

Each check is one :class:`Check`: ``ok``, ``warning`` or ``failed`` and, unless ok, the
fix. Nothing is written anywhere: no row, no file, no directory entry. It sits beside
`serve` in the layers: it reads every part, publishing included.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from psycopg.conninfo import conninfo_to_dict

from farmkeys import file_trust, pkcs12_password
from farmkeys.config import Config
from farmkeys.db import ConfigDB
from farmkeys.db.rows import Farm
from farmkeys.directory import Directory
from farmkeys.errors import Error, PublishError
from farmkeys.store import Store
from farmkeys.store.usable import installed_problems

Result = Literal["ok", "warning", "failed"]
RESULTS: tuple[Result, ...] = ("ok", "warning", "failed")

# The node's clock against the config DB's: leases and fences run on the DB's clock, but
# certificates are made and judged (not yet valid, expired) on the node's.
CLOCK_WARNING = timedelta(seconds=5)
CLOCK_FAILED = timedelta(seconds=60)


@dataclass(frozen=True)
class Check:
    """One line of `farmkeys check`: what was checked, its result, what was found, the fix."""

    name: str
    result: Result
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "result": self.result, "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True)
class Report:
    checks: tuple[Check, ...]

    @property
    def result(self) -> Result:
        """The worst of the checks' results."""
        return max((c.result for c in self.checks), key=RESULTS.index, default="ok")

    def to_json(self) -> dict[str, object]:
        return {"result": self.result, "checks": [c.to_json() for c in self.checks]}


def failed_to_load(exc: Error) -> Report:
    """The report of a configuration that does not load: nothing else can be checked."""
    return Report((Check("config", "failed", exc.what, exc.todo),))


def run(
    config: Config,
    *,
    config_file: Path | None,
    db: ConfigDB,
    directory: Directory,
    store: Store,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Report:
    """Every check, in the order an operator fixes them: files, config DB, directory,
    blob, store, hook, publishing."""
    checks: list[Check] = list(_files(config, config_file))
    farm = _database(config, db, checks, now)
    if farm is None:
        checks.append(
            Check("directory", "failed", "not checked: the farm's DKM group comes from the DB")
        )
    else:
        _directory_and_blob(config, db, directory, farm, checks)
    checks.append(_store(store, now(), config.node.pkcs12_password_file))
    hook = _hook(config)
    if hook is not None:
        checks.append(hook)
    published = _publish(config, store, now())
    if published is not None:
        checks.append(published)
    return Report(tuple(checks))


# -- files ------------------------------------------------------------------------------


def _files(config: Config, config_file: Path | None) -> Iterator[Check]:
    """The StrictModes walk of every file farmkeys trusts, and of the store's folders."""
    named: list[tuple[str, str]] = []
    if config_file is not None:
        named.append(("config file", str(config_file)))
    password_file = config.directory.password_file
    if password_file and config.directory.password is None:
        # As a bind reads it: private, and only root or this account can change it.
        yield _trusted(
            "directory.password_file",
            lambda: config.directory.read_password() and password_file,
            ok=f"{password_file}: private; only root or this account can change it",
        )
    p12_file = config.node.pkcs12_password_file
    if p12_file:
        yield _trusted(
            pkcs12_password.WHAT,
            lambda: pkcs12_password.read(p12_file) and p12_file,
            ok=f"{p12_file}: private; only root or this account can change it",
        )
    passfile = conninfo_to_dict(config.database.dsn).get("passfile")
    if passfile:
        named.append(("database.dsn's passfile", str(passfile)))
    if config.directory.ca_file:
        named.append(("directory.ca_file", config.directory.ca_file))
    for what, path in named:
        yield _trusted(what, _walk(path, what))
    yield _trusted(
        "store folders",
        lambda: file_trust.check_folders_above(config.store, what="node.store"),
        ok=f"only root or this account can change the folders above {config.store}",
    )


def _walk(path: str | Path, what: str) -> Callable[[], Path]:
    return lambda: file_trust.check_file(path, what=what)


def _trusted(what: str, walk: Callable[[], object], *, ok: str | None = None) -> Check:
    try:
        found = walk()
    except Error as exc:
        return Check(what, "failed", exc.what, exc.todo)
    except OSError as exc:
        return Check(what, "failed", f"cannot read it: {exc.strerror} ({exc.filename})", "")
    return Check(what, "ok", ok or f"{found}: only root or this account can change it")


# -- the config DB ----------------------------------------------------------------------


def _database(
    config: Config, db: ConfigDB, checks: list[Check], now: Callable[[], datetime]
) -> Farm | None:
    try:
        farm = db.require_farm()
    except Error as exc:
        checks.append(Check("config DB", "failed", exc.what, exc.todo))
        return None
    checks.append(
        Check("config DB", "ok", f"{db.endpoint}: farm {farm.name}, schema {farm.schema_version}")
    )
    if farm.name != config.farm.name:
        checks.append(
            Check(
                "farm name",
                "failed",
                f"the config DB holds farm {farm.name!r}, the config names {config.farm.name!r}",
                "correct farm.name, or database.dsn if this is the wrong config DB",
            )
        )
    else:
        checks.append(Check("farm name", "ok", f"{farm.name}, DKM group {farm.dkm_group}"))
    checks.append(_privileges(db))
    checks.append(_clock(db, now))
    return farm


def _privileges(db: ConfigDB) -> Check:
    try:
        role, superuser = db.role()
        missing = db.missing_privileges()
    except Error as exc:
        return Check("DB privileges", "failed", exc.what, exc.todo)
    if missing:
        lacking = ", ".join(f"{privilege} on {name}" for name, privilege in missing)
        tables = sorted({name for name, p in missing if p != "USAGE"})
        sequences = sorted({name for name, p in missing if p == "USAGE"})
        grants = []
        if tables:
            grants.append(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {', '.join(tables)} TO {role}")
        if sequences:
            grants.append(f"GRANT USAGE ON SEQUENCE {', '.join(sequences)} TO {role}")
        return Check(
            "DB privileges",
            "failed",
            f"role {role} lacks {lacking}",
            "; ".join(grants) + " (docs/deploy-walkthrough.md, the DBA's step)",
        )
    if superuser:
        return Check(
            "DB privileges",
            "warning",
            f"role {role} is a superuser: far more than a node needs",
            "give the nodes a role of their own with SELECT, INSERT, UPDATE, DELETE on the"
            " farmkeys tables only",
        )
    return Check("DB privileges", "ok", f"role {role} may read and write every farmkeys table")


def _clock(db: ConfigDB, now: Callable[[], datetime]) -> Check:
    try:
        before = time.monotonic()
        local = now()
        server = db.server_time()
        trip = timedelta(seconds=time.monotonic() - before)
    except Error as exc:
        return Check("clock", "failed", exc.what, exc.todo)
    # The server read its clock about half a round trip after this node read its own.
    offset = server - (local + trip / 2)
    size = abs(offset)
    said = (
        f"this node's clock is {size.total_seconds():.1f} s"
        f" {'behind' if offset > timedelta(0) else 'ahead of'} the config DB's"
        f" (round trip {trip.total_seconds() * 1000:.0f} ms)"
    )
    if size >= CLOCK_FAILED:
        return Check("clock", "failed", said, "synchronise both clocks (NTP) and check again")
    if size >= CLOCK_WARNING:
        return Check("clock", "warning", said, "synchronise both clocks (NTP)")
    return Check("clock", "ok", said)


# -- the directory and one blob ----------------------------------------------------------


def _directory_and_blob(
    config: Config, db: ConfigDB, directory: Directory, farm: Farm, checks: list[Check]
) -> None:
    from farmkeys.sync import open_blob

    try:
        key_id = directory.current_key_id(farm.dkm_group)
        directory.master_key(farm.dkm_group, key_id)
    except Error as exc:
        checks.append(Check("directory", "failed", exc.what, exc.todo))
        checks.append(Check("live blob", "failed", "not checked: no master key was read"))
        return
    checks.append(
        Check(
            "directory",
            "ok",
            f"bound to {directory.last_server} as {config.directory.bind_dn}; read the current"
            f" master key {key_id}",
        )
    )
    try:
        rows = db.live_set(config.node.id).rows
    except Error as exc:
        checks.append(Check("live blob", "failed", exc.what, exc.todo))
        return
    # The signing primary's, or whichever live row comes first.
    rows.sort(key=lambda r: (r.purpose != "signing", r.role != "primary"))
    if not rows:
        checks.append(
            Check("live blob", "warning", "the farm has no live certificate", "run `farmkeys init`")
        )
        return
    row = rows[0]
    try:
        open_blob(farm, row, directory)
    except Error as exc:
        checks.append(Check("live blob", "failed", exc.what, exc.todo))
        return
    checks.append(
        Check(
            "live blob",
            "ok",
            f"opened the {row.purpose} {row.role} {row.thumbprint} under master key"
            f" {row.master_key}",
        )
    )


# -- the store, the hook, publishing ------------------------------------------------------


def _store(store: Store, now: datetime, p12_file: str | None) -> Check:
    try:
        installed, store_error = store.verify_installed(), None
    except Error as exc:
        installed, store_error = None, exc
    if installed is None and store_error is None:
        return Check(
            "store", "warning", f"nothing is installed in {store.path} yet", "run `farmkeys sync`"
        )
    problems = installed_problems(installed, store_error, now=now) or _pkcs12(store, p12_file)
    if problems:
        return Check("store", "failed", "; ".join(problems), "run `farmkeys sync`")
    assert installed is not None
    return Check(
        "store",
        "ok",
        f"{store.path}: generation {installed.manifest.generation}, every file as its"
        " manifest records",
    )


def _pkcs12(store: Store, p12_file: str | None) -> list[str]:
    """Why the installed .p12 files are not protected as ``node.pkcs12_password_file`` says:
    each must open with its password (one PBKDF2 each), or have none when it is unset."""
    try:
        found = store.pkcs12_files()
    except Error as exc:
        return [exc.what]
    if found is None:
        return []
    manifest, files = found
    if p12_file is None:
        if manifest.pkcs12_password is None:
            return []
        return ["the .p12 files have a password, but node.pkcs12_password_file is unset"]
    from farmkeys.formats import certificates

    try:
        password = pkcs12_password.read(p12_file)
    except Error as exc:
        return [f"the .p12 files cannot be checked: {exc.what}"]
    closed = sorted(t for t, data in files.items() if not certificates.pkcs12_opens(data, password))
    if closed:
        return [f".p12 files of {', '.join(closed)} do not open with {pkcs12_password.WHAT}"]
    return []


def _hook(config: Config) -> Check | None:
    command = config.hooks.on_change
    if not command:
        return None
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        return Check("hook", "failed", f"hooks.on_change cannot be split: {exc}", "")
    found = file_trust.program_path(argv[0], os.environ.get("PATH")) if argv else None
    if found is None or not found.is_file():
        return Check(
            "hook",
            "failed",
            f"hooks.on_change names {argv[0] if argv else 'nothing'}, which is not a program",
            "give the path of the program that makes the federation service reload",
        )
    if not os.access(found, os.X_OK):
        return Check("hook", "failed", f"{found} is not executable", f"chmod +x {found}")
    return _trusted("hook", _walk(found, "hooks.on_change program"))


def _publish(config: Config, store: Store, now: datetime) -> Check | None:
    publish = config.publish
    if publish.address is None:
        return None
    from farmkeys import publish as publishing

    host, port = publish.address
    try:
        entity_id, sso_url = publishing.metadata_settings(publish)
        document = publishing.metadata_of_store(publish, store, now=now)
    except PublishError as exc:
        return Check("publish", "warning", exc.what, exc.todo)
    except Error as exc:
        return Check("publish", "failed", exc.what, exc.todo)
    for name, url in (("entity_id", entity_id), ("sso_url", sso_url)):
        if not url.startswith("https://"):
            return Check(
                "publish",
                "warning",
                f"publish.{name} {url} is not an https:// URL; relying parties expect one",
                f"set publish.{name} to the https:// URL relying parties use",
            )
    return Check(
        "publish",
        "ok",
        f"serve answers on {host}:{port}; the metadata of the installed set is"
        f" {len(document)} bytes",
    )
