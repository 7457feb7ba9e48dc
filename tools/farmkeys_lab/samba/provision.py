"""Provisioning the lab's domain: samba-tool, then a brief run of the DC to seed it over LDAP.

:func:`provision` leaves a provisioned, seeded domain in a work directory and
returns what :class:`~farmkeys_lab.samba.template.SambaTemplate` records of it.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import ldap3
from ldap3.core.exceptions import LDAPException, LDAPNoSuchObjectResult

from farmkeys_lab.samba.domain import (
    ADFS_PARENT,
    BASE_DN,
    DNS_DOMAIN,
    DOMAIN,
    DOMAIN_DIR_NAME,
    HOST_NAME,
    LDAPS_PORT,
    OTHER_ACCOUNT,
    PROGRAM_DATA,
    PROVISION_TIMEOUT_SECONDS,
    REALM,
    SERVICE_ACCOUNT,
    STOP_TIMEOUT_SECONDS,
    UNDELEGATED_PARENT,
    SambaError,
)
from farmkeys_lab.samba.files import write_smb_conf, write_tls
from farmkeys_lab.samba.ldap import connect, sid_text
from farmkeys_lab.samba.process import MachineLock, launch, stop_group, wait_until_ready
from farmkeys_lab.samba.sockets import wait_ports_free
from farmkeys_lab.servers import LOOPBACK

ADMIN_DN = f"CN=Administrator,CN=Users,{BASE_DN}"

Account = tuple[str, str, str]  # (DN, SID, UPN)


def _password() -> str:
    """A random password Samba's complexity rules accept (and no option-looking leading -)."""
    return "Lab1" + secrets.token_urlsafe(18)


def provision(workdir: Path, samba: Path, tool: Path) -> dict[str, str]:
    """Provision and seed the lab's domain in ``workdir`` (about 7 s); what a template records.

    The record is every field of a template but its work directory: names, SIDs,
    UPNs and the three accounts' passwords.
    """
    domain_dir = workdir / DOMAIN_DIR_NAME
    if domain_dir.exists():
        shutil.rmtree(domain_dir)  # left by an interrupted provision
    workdir.mkdir(parents=True, exist_ok=True)
    tool_log = workdir / "provision.log"
    admin_password, service_password, other_password = _password(), _password(), _password()
    conf = _provision_domain(tool, workdir, admin_password, log_path=tool_log)
    sam = domain_dir / "private" / "sam.ldb"
    local = (f"--configfile={conf}", f"-H{sam}")
    for name, password in ((SERVICE_ACCOUNT, service_password), (OTHER_ACCOUNT, other_password)):
        _run_tool(
            tool, f"creating {name}", "user", "create", name, password, *local, log_path=tool_log
        )
    domain_sid, service, other = _seed(samba, workdir, conf, admin_password)
    _delegate_adfs_parent(tool, local, service, log_path=tool_log)
    version = subprocess.run(
        [str(samba), "--version"], capture_output=True, text=True, check=False, timeout=30
    ).stdout.strip()
    service_dn, service_sid, service_upn = service
    other_dn, other_sid, other_upn = other
    return {
        "realm": REALM,
        "dns_domain": DNS_DOMAIN,
        "base_dn": BASE_DN,
        "domain_sid": domain_sid,
        "admin_dn": ADMIN_DN,
        "admin_password": admin_password,
        "service_dn": service_dn,
        "service_upn": service_upn,
        "service_password": service_password,
        "service_sid": service_sid,
        "other_dn": other_dn,
        "other_upn": other_upn,
        "other_password": other_password,
        "other_sid": other_sid,
        "adfs_parent": ADFS_PARENT,
        "undelegated_parent": UNDELEGATED_PARENT,
        "samba_version": version,
    }


def _provision_domain(tool: Path, workdir: Path, admin_password: str, *, log_path: Path) -> Path:
    """``samba-tool domain provision`` into ``workdir``, then TLS and our smb.conf; its path."""
    domain_dir = workdir / DOMAIN_DIR_NAME
    # An empty configuration, so nothing of the machine's /etc/samba/smb.conf leaks in.
    empty = workdir / "empty.conf"
    empty.write_text("", encoding="utf-8")
    _run_tool(
        tool,
        "provisioning the domain",
        "domain",
        "provision",
        f"--configfile={empty}",
        "--use-rfc2307",
        f"--realm={REALM}",
        f"--domain={DOMAIN}",
        f"--host-name={HOST_NAME}",
        "--server-role=dc",
        "--dns-backend=NONE",
        f"--adminpass={admin_password}",
        f"--targetdir={domain_dir}",
        log_path=log_path,
    )
    write_tls(domain_dir / "private" / "tls")
    return write_smb_conf(domain_dir)


def _seed(
    samba: Path, workdir: Path, conf: Path, admin_password: str
) -> tuple[str, Account, Account]:
    """Add the containers and read the SIDs: (domain SID, service account, other account).

    The containers need an LDAP add, which samba-tool has no command for: the DC
    runs briefly, holding the machine's lab-DC lock like any other.
    """
    ca_file = workdir / DOMAIN_DIR_NAME / "private" / "tls" / "ca.pem"
    log_path = workdir / "samba.log"
    lock = MachineLock()
    lock.acquire(workdir)
    process: subprocess.Popen[bytes] | None = None
    try:
        process = launch(samba, conf, log_path)
        wait_until_ready(
            process,
            log_path=log_path,
            offset=0,
            ca_file=ca_file,
            user=ADMIN_DN,
            password=admin_password,
        )
        url = f"ldaps://{LOOPBACK}:{LDAPS_PORT}"
        with connect(url, ADMIN_DN, admin_password, ca_file) as admin:
            for dn in (f"CN=Microsoft,{PROGRAM_DATA}", ADFS_PARENT, UNDELEGATED_PARENT):
                if not _exists(admin, dn):
                    admin.add(dn, ["top", "container"])
            domain_sid = _read(admin, BASE_DN)[1]
            return (
                domain_sid,
                _read_account(admin, SERVICE_ACCOUNT),
                _read_account(admin, OTHER_ACCOUNT),
            )
    except LDAPException as exc:
        raise SambaError(f"seeding the template over LDAP failed: {exc}") from exc
    finally:
        try:
            if process is not None:
                stop_group(process)
                wait_ports_free(STOP_TIMEOUT_SECONDS)
        finally:
            lock.release()


def _delegate_adfs_parent(
    tool: Path, local: tuple[str, ...], service: Account, *, log_path: Path
) -> None:
    """Full control of the AD FS parent for the service account, inherited beneath it.

    Samba stores the ACE as two: (A;;RPWPCRCCDCLCLORCWOWDSDDTSW;;;SID), GA mapped
    to the directory's full control on the parent itself, and (A;CIIO;GA;;;SID)
    for its children.
    """
    service_dn, service_sid, _ = service
    _run_tool(
        tool,
        "delegating the AD FS parent",
        "dsacl",
        "set",
        *local,
        f"--objectdn={ADFS_PARENT}",
        f"--trusteedn={service_dn}",
        f"--sddl=(A;CI;GA;;;{service_sid})",
        log_path=log_path,
    )


def _run_tool(tool: Path, what: str, *args: str, log_path: Path) -> None:
    """Run samba-tool; its output goes to ``log_path``. The arguments (passwords) are not logged."""
    started = time.monotonic()
    try:
        done = subprocess.run(
            [str(tool), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=PROVISION_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired as exc:
        raise SambaError(
            f"samba-tool ({what}) did not finish within {PROVISION_TIMEOUT_SECONDS:.0f} s"
        ) from exc
    output = (done.stdout + done.stderr).strip()
    with log_path.open("a", encoding="utf-8") as f:
        f.write(f"== samba-tool {args[0]} {args[1]} ({what}): status {done.returncode}, ")
        f.write(f"{time.monotonic() - started:.1f} s\n{output}\n")
    if done.returncode != 0:
        raise SambaError(
            f"samba-tool failed {what} with status {done.returncode}: {output[-2000:]}"
        )


def _exists(conn: ldap3.Connection, dn: str) -> bool:
    try:
        return bool(conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=["1.1"]))
    except LDAPNoSuchObjectResult:
        return False


def _search_one(
    conn: ldap3.Connection, base: str, scope: str, search: str, attributes: list[str]
) -> dict[str, Any]:
    conn.search(base, search, scope, attributes=attributes)
    entries: list[dict[str, Any]] = [r for r in conn.response if r.get("type") == "searchResEntry"]
    if len(entries) != 1:
        raise SambaError(f"expected one entry for {search} under {base}, found {len(entries)}")
    return entries[0]


def _read(conn: ldap3.Connection, dn: str) -> tuple[str, str]:
    entry = _search_one(conn, dn, ldap3.BASE, "(objectClass=*)", ["objectSid"])
    return str(entry["dn"]), sid_text(entry["raw_attributes"]["objectSid"][0])


def _read_account(conn: ldap3.Connection, name: str) -> Account:
    """(DN, SID, UPN) of the account whose sAMAccountName is ``name``."""
    entry = _search_one(
        conn,
        BASE_DN,
        ldap3.SUBTREE,
        f"(sAMAccountName={name})",
        ["objectSid", "userPrincipalName"],
    )
    raw = entry["raw_attributes"]
    if not raw.get("userPrincipalName"):
        raise SambaError(f"samba-tool user create gave {entry['dn']} no userPrincipalName")
    return str(entry["dn"]), sid_text(raw["objectSid"][0]), raw["userPrincipalName"][0].decode()
