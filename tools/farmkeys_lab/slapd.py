"""A private OpenLDAP server on loopback, for the tests and the README's demo.

:class:`LocalSlapd` writes an old-style ``slapd.conf`` into a work directory,
runs Debian's ``/usr/sbin/slapd`` in the foreground as a child process,
listening on ``127.0.0.1`` only, and on its first start seeds a small tree::

    <suffix>                              dcObject + organization
    ├── ou=people                         organizationalUnit
    │   ├── cn=svc-farm                   inetOrgPerson, the farm's service account
    │   └── cn=alice                      inetOrgPerson, an ordinary account
    └── ou=dkm                            organizationalUnit, the DKM parent container

The access control is :func:`acl_lines`, the same text
``docs/directory-setup.md`` tells a directory administrator to apply.

The passwords are random, stored hashed in the directory and in clear only in
``<workdir>/passwords.json`` (mode 0600), so a later :class:`LocalSlapd` on
the same work directory finds the same accounts. Nothing here is meant for
production: it is a disposable server for tests and demonstrations.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from types import TracebackType
from typing import Self

import ldap3
from ldap3.utils.hashed import hashed

from farmkeys_lab.servers import free_port, stop_child, wait_until_serving

log = logging.getLogger(__name__)

SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")
SCHEMAS = ("core", "cosine", "nis", "inetorgperson")
SLAPD_CANDIDATES = (Path("/usr/sbin/slapd"), Path("/usr/local/libexec/slapd"))

# How long start() waits for slapd to accept connections, and stop() for it to exit.
START_TIMEOUT_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 10.0


class SlapdError(RuntimeError):
    """slapd is missing, or failed to start; the message carries its stderr."""


def find_slapd() -> Path | None:
    """The slapd binary: ``$FARMKEYS_SLAPD``, the usual paths, then ``$PATH``."""
    override = os.environ.get("FARMKEYS_SLAPD")
    if override:
        return Path(override) if Path(override).is_file() else None
    for candidate in SLAPD_CANDIDATES:
        if candidate.is_file():
            return candidate
    found = shutil.which("slapd")
    return Path(found) if found else None


def acl_lines(container: str, service_dn: str, *, anonymous_read: bool = False) -> str:
    """The slapd.conf access control for a farmkeys directory.

    ``container`` is the DKM parent (``directory.container``), ``service_dn``
    the farm's service account. Rules are tried in order, the first whose
    ``to`` matches decides, and within it the first matching ``by``:

    * the DKM parent itself: the service account may read it and add or
      delete entries directly beneath it (write on ``children``); nobody else
      sees it;
    * everything below the parent (the farm containers, the master keys and
      CryptoPolicy): the service account may write and read; nobody else
      sees it, so to anyone else the entries do not exist;
    * passwords: usable to authenticate, writable by their owner, unreadable;
    * the rest of the tree: readable by authenticated users.

    ``anonymous_read=True`` inserts ``by anonymous read`` into the DKM rules:
    a deliberately misconfigured directory, for the test proving that
    ``farmkeys init`` warns about it. Never apply that variant.
    """
    leak = "    by anonymous read\n" if anonymous_read else ""
    return (
        f'access to dn.base="{container}" attrs=children\n'
        f'    by dn.exact="{service_dn}" write\n'
        f"    by * none\n"
        f'access to dn.base="{container}"\n'
        f'    by dn.exact="{service_dn}" read\n'
        f"{leak}"
        f"    by * none\n"
        f'access to dn.children="{container}"\n'
        f'    by dn.exact="{service_dn}" write\n'
        f"{leak}"
        f"    by * none\n"
        f"access to attrs=userPassword\n"
        f"    by self write\n"
        f"    by anonymous auth\n"
        f"    by * none\n"
        f"access to *\n"
        f"    by users read\n"
        f"    by * none\n"
    )


class LocalSlapd:
    """A disposable slapd on ``ldap://127.0.0.1:<port>/``, seeded for farmkeys.

    ``start()`` again after ``stop()`` reuses the same data and port, so
    tests can take the directory away from running nodes and bring it back.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        suffix: str = "dc=farmkeys,dc=test",
        anonymous_read_dkm: bool = False,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """``tls``: a certificate (PEM, its chain after it) and its key; slapd then also
        listens on ``ldaps_url`` and offers StartTLS on ``url``."""
        self.tls = tls
        self.tls_port = 0
        self.workdir = Path(workdir).resolve()
        self.suffix = suffix
        self.anonymous_read_dkm = anonymous_read_dkm
        self.admin_dn = f"cn=admin,{suffix}"
        self.service_dn = f"cn=svc-farm,ou=people,{suffix}"
        self.other_dn = f"cn=alice,ou=people,{suffix}"
        self.container = f"ou=dkm,{suffix}"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._seeded = False
        passwords = self._load_or_make_passwords()
        self.admin_password = passwords["admin"]
        self.service_password = passwords["service"]
        self.other_password = passwords["other"]

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<LocalSlapd {self.url} {self.suffix} {state}>"

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        """The ldaps:// URL (only when started with ``tls``)."""
        return f"ldaps://127.0.0.1:{self.tls_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """slapd's pid; None when stopped."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def conf_path(self) -> Path:
        return self.workdir / "slapd.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "slapd.log"

    def write_password_file(self, path: Path, which: str = "service") -> Path:
        """Write the password of ``which`` (service, other or admin) to ``path``, mode 0600."""
        passwords = {
            "service": self.service_password,
            "other": self.other_password,
            "admin": self.admin_password,
        }
        if which not in passwords:
            raise ValueError(f"which must be one of {sorted(passwords)}, not {which!r}")
        path = Path(path)
        # Written beside it and renamed over it: a farmkeys process reading the file while
        # a test writes another node's config sees the old file or the new, never an empty
        # one (a truncate-and-write let a herd of syncs read it empty).
        partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(passwords[which] + "\n")
        os.replace(partial, path)
        return path

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Start slapd (a no-op if it runs) and seed the tree on the first start."""
        if self.running:
            return
        slapd = find_slapd()
        if slapd is None:
            raise SlapdError(
                "slapd not found (looked at $FARMKEYS_SLAPD, "
                + ", ".join(str(p) for p in SLAPD_CANDIDATES)
                + " and $PATH) — install Debian's slapd package (apt-get install slapd ldap-utils)"
            )
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port()
        if self.tls is not None and self.tls_port == 0:
            self.tls_port = free_port()
        self._write_conf()
        listen = f"ldap://127.0.0.1:{self.port}/"
        if self.tls is not None:
            listen += f" ldaps://127.0.0.1:{self.tls_port}/"
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                [str(slapd), "-d", "0", "-h", listen, "-f", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                cwd=self.workdir,
                start_new_session=True,  # a Ctrl-C of the caller's terminal is not its stop
            )
        wait_until_serving(
            self._process,
            name="slapd",
            port=self.port,
            ready=f"accepting connections on {self.url}",
            timeout=START_TIMEOUT_SECONDS,
            log_path=self.log_path,
            log_offset=log_offset,
            error=SlapdError,
            on_failure=self.stop,
        )
        log.info("slapd %d listening on %s", self._process.pid, self.url)
        if not self._seeded:
            self._seed()
            self._seeded = True

    def stop(self) -> None:
        """Stop slapd: SIGTERM, wait, then SIGKILL. Data and port are kept."""
        process, self._process = self._process, None
        stop_child(process, sig=signal.SIGTERM, timeout=STOP_TIMEOUT_SECONDS, name="slapd")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------

    def _load_or_make_passwords(self) -> dict[str, str]:
        path = self.workdir / "passwords.json"
        if path.exists():
            stored: dict[str, str] = json.loads(path.read_text(encoding="utf-8"))
            return stored
        self.workdir.mkdir(parents=True, exist_ok=True)
        passwords = {name: secrets.token_urlsafe(18) for name in ("admin", "service", "other")}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(passwords, f)
        return passwords

    def _write_conf(self) -> None:
        includes = "".join(f'include "{SCHEMA_DIR / name}.schema"\n' for name in SCHEMAS)
        modules = ""
        if (MODULE_DIR / "back_mdb.la").exists() or (MODULE_DIR / "back_mdb.so").exists():
            # Debian builds the backends as modules: only config, ldif and monitor are static.
            modules = f'modulepath "{MODULE_DIR}"\nmoduleload back_mdb\n'
        rootpw = hashed(ldap3.HASHED_SALTED_SHA, self.admin_password)
        if self.tls is not None:
            certificate, key = self.tls
            modules += f'TLSCertificateFile "{certificate}"\nTLSCertificateKeyFile "{key}"\n'
        acl = acl_lines(self.container, self.service_dn, anonymous_read=self.anonymous_read_dkm)
        text = (
            "# Written by farmkeys_lab.slapd.LocalSlapd; a disposable test directory.\n"
            f"{includes}"
            f'pidfile "{self.workdir / "slapd.pid"}"\n'
            f'argsfile "{self.workdir / "slapd.args"}"\n'
            f"{modules}"
            "\n"
            "database mdb\n"
            "maxsize 67108864\n"
            f'suffix "{self.suffix}"\n'
            f'rootdn "{self.admin_dn}"\n'
            f"rootpw {rootpw}\n"
            f'directory "{self.workdir / "data"}"\n'
            "index objectClass eq\n"
            "\n"
            f"{acl}"
        )
        fd = os.open(self.conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)

    def _seed(self) -> None:
        server = ldap3.Server(self.url, get_info=ldap3.NONE, connect_timeout=5)
        with ldap3.Connection(
            server,
            user=self.admin_dn,
            password=self.admin_password,
            auto_bind=ldap3.AUTO_BIND_NO_TLS,
            raise_exceptions=False,
            receive_timeout=10,
        ) as conn:
            if conn.search(self.suffix, "(objectClass=*)", ldap3.BASE):
                return  # seeded by an earlier LocalSlapd on this work directory
            dc = self.suffix.split(",")[0].split("=", 1)[1]
            entries: list[tuple[str, list[str], dict[str, object]]] = [
                (self.suffix, ["dcObject", "organization"], {"dc": dc, "o": "farmkeys test"}),
                (f"ou=people,{self.suffix}", ["organizationalUnit"], {"ou": "people"}),
                (
                    self.container,
                    ["organizationalUnit"],
                    {"ou": "dkm", "description": "farmkeys DKM containers"},
                ),
                self._person(self.service_dn, "svc-farm", self.service_password),
                self._person(self.other_dn, "alice", self.other_password),
            ]
            for dn, classes, attributes in entries:
                if not conn.add(dn, classes, attributes):
                    raise SlapdError(f"seeding {dn} failed: {conn.result['description']}")

    @staticmethod
    def _person(dn: str, cn: str, password: str) -> tuple[str, list[str], dict[str, object]]:
        attributes: dict[str, object] = {
            "cn": cn,
            "sn": cn,
            "userPassword": hashed(ldap3.HASHED_SALTED_SHA, password),
        }
        return dn, ["inetOrgPerson"], attributes
