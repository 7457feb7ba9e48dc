"""A running lab DC: a copy of the template, started and stopped by the tests."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self

import ldap3

from farmkeys_lab.samba.domain import (
    DOMAIN_DIR_NAME,
    LDAP_PORT,
    LDAPS_PORT,
    STOP_TIMEOUT_SECONDS,
    SambaError,
    find_samba,
    missing_samba,
    require_root,
)
from farmkeys_lab.samba.files import copy_ignoring_sockets, write_private, write_smb_conf
from farmkeys_lab.samba.ldap import connect
from farmkeys_lab.samba.process import (
    MachineLock,
    group_members,
    launch,
    stop_group,
    wait_until_ready,
)
from farmkeys_lab.samba.sockets import Listener, listeners, wait_ports_free
from farmkeys_lab.samba.template import SambaTemplate
from farmkeys_lab.servers import LOOPBACK

log = logging.getLogger(__name__)


class LocalSambaDC:
    """A disposable Samba AD DC on ``ldaps://127.0.0.1:636``, a copy of a :class:`SambaTemplate`.

    The copy is made when the object is built (if ``workdir`` holds none yet);
    ``start()`` again after ``stop()`` reuses it, so tests can take the directory
    away from running nodes and bring it back.
    """

    url = f"ldaps://{LOOPBACK}:{LDAPS_PORT}"
    ldap_url = f"ldap://{LOOPBACK}:{LDAP_PORT}"  # for StartTLS; a plain simple bind is refused

    def __init__(self, template: SambaTemplate, workdir: Path) -> None:
        self.template = template
        self.workdir = Path(workdir).resolve()
        self.realm = template.realm
        self.dns_domain = template.dns_domain
        self.base_dn = template.base_dn
        self.domain_sid = template.domain_sid
        self.adfs_parent = template.adfs_parent
        self.undelegated_parent = template.undelegated_parent
        self.admin_dn = template.admin_dn
        self.admin_password = template.admin_password
        self.service_dn = template.service_dn
        self.service_upn = template.service_upn
        self.service_password = template.service_password
        self.service_sid = template.service_sid
        self.other_dn = template.other_dn
        self.other_upn = template.other_upn
        self.other_password = template.other_password
        self.other_sid = template.other_sid
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = MachineLock()
        if not self.conf_path.is_file():
            self._copy_template()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<LocalSambaDC {self.url} {self.base_dn} {state}>"

    @property
    def domain_dir(self) -> Path:
        return self.workdir / DOMAIN_DIR_NAME

    @property
    def conf_path(self) -> Path:
        return self.domain_dir / "etc" / "smb.conf"

    @property
    def ca_file(self) -> Path:
        """The lab CA's certificate (PEM), which issued the DC's: give it to every client."""
        return self.domain_dir / "private" / "tls" / "ca.pem"

    @property
    def log_path(self) -> Path:
        return self.workdir / "samba.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """samba's pid, also its process group's id; None when stopped."""
        return self._process.pid if self.running and self._process is not None else None

    def connect(self, user: str, password: str, *, start_tls: bool = False) -> ldap3.Connection:
        """An ldap3 connection bound as ``user`` (DN or UPN), over ldaps or ldap + StartTLS."""
        url = self.ldap_url if start_tls else self.url
        return connect(url, user, password, self.ca_file, start_tls=start_tls)

    def admin_connection(self) -> ldap3.Connection:
        """An ldap3 connection bound as the domain's Administrator over ldaps (CA verified)."""
        return self.connect(self.admin_dn, self.admin_password)

    def listeners(self) -> list[Listener]:
        """The sockets samba's process group listens on (TCP) or has bound (UDP)."""
        pid = self.pid
        if pid is None:
            return []
        group = {member for member, _ in group_members(pid)}
        return [s for s in listeners() if s.pid in group]

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
        write_private(path, (passwords[which] + "\n").encode())
        return path

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start samba on the copy (a no-op if it runs); return once an ldaps bind works."""
        if self.running:
            return
        samba = find_samba()
        if samba is None:
            raise SambaError(missing_samba() or "samba not found")
        require_root("running the lab's Samba DC")
        self._lock.acquire(self.workdir)
        try:
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            process = launch(samba, self.conf_path, self.log_path)
            wait_until_ready(
                process,
                log_path=self.log_path,
                offset=offset,
                ca_file=self.ca_file,
                user=self.admin_dn,
                password=self.admin_password,
            )
        except BaseException:
            self._lock.release()
            raise
        self._process = process
        log.info("samba %d answering on %s", process.pid, self.url)

    def stop(self) -> None:
        """Stop samba's whole process group and wait until its ports are free. Data is kept."""
        process, self._process = self._process, None
        try:
            if process is not None:
                stop_group(process)
                wait_ports_free(STOP_TIMEOUT_SECONDS)
        finally:
            self._lock.release()

    def restart(self) -> None:
        """Stop, then start again on the same copy."""
        self.stop()
        self.start()

    def remove(self) -> None:
        """Stop samba and delete the copy of the domain (the log is kept)."""
        self.stop()
        shutil.rmtree(self.domain_dir, ignore_errors=True)

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

    # -- internals ----------------------------------------------------------------------

    def _copy_template(self) -> None:
        partial = self.workdir / f"{DOMAIN_DIR_NAME}.partial"
        for leftover in (partial, self.domain_dir):  # from a copy that was interrupted
            if leftover.exists():
                shutil.rmtree(leftover)
        self.workdir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(
            self.template.domain_dir, partial, symlinks=True, ignore=copy_ignoring_sockets
        )
        # The template's smb.conf names the template's directory everywhere: write our own.
        write_smb_conf(self.domain_dir, into=partial)
        partial.rename(self.domain_dir)
