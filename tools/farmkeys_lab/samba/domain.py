"""The lab domain's fixed names, Samba's binaries and ports, and the lab DC's timeouts."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

REALM = "FARMKEYS.LAB"
DOMAIN = "FARMKEYS"
DNS_DOMAIN = "farmkeys.lab"
BASE_DN = "DC=farmkeys,DC=lab"
HOST_NAME = "labdc"  # fixed, so the provision does not depend on the machine's name
SERVICE_ACCOUNT = "svc-farm"
OTHER_ACCOUNT = "alice"
PROGRAM_DATA = f"CN=Program Data,{BASE_DN}"
ADFS_PARENT = f"CN=ADFS,CN=Microsoft,{PROGRAM_DATA}"
UNDELEGATED_PARENT = f"CN=Undelegated,{PROGRAM_DATA}"

LDAP_PORT = 389
LDAPS_PORT = 636
# Everything the DC listens on: Samba fixes these (no smb.conf setting moves them).
PORTS = (LDAP_PORT, LDAPS_PORT, 3268, 3269)

SAMBA_CANDIDATES = (Path("/usr/sbin/samba"),)
SAMBA_TOOL_CANDIDATES = (Path("/usr/bin/samba-tool"),)
PROVISION_SETUP_DIR = Path("/usr/share/samba/setup")  # Debian's samba-ad-provision

RECORD_NAME = "lab.json"  # in a template's work directory: what the tests need to know
DOMAIN_DIR_NAME = "domain"  # in a template's or a DC's work directory: the provisioned tree

# One lab DC per machine (the ports are fixed): a DC holds an flock on this file from
# start() to stop(), and another test run's start() waits for it rather than failing.
LOCK_PATH = Path(tempfile.gettempdir()) / "farmkeys-lab-samba.lock"

# How long the template's samba-tool runs may take, start() waits for another run's DC
# to stop and then for an ldaps bind, and stop() for the processes to exit and the ports
# to be free.
PROVISION_TIMEOUT_SECONDS = 300.0
LOCK_TIMEOUT_SECONDS = 600.0
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0


class SambaError(RuntimeError):
    """Samba is missing, failed to provision or to start; the message carries its output."""


def find_samba() -> Path | None:
    """The ``samba`` server binary: the usual path, then ``$PATH``."""
    return _find("samba", SAMBA_CANDIDATES)


def find_samba_tool() -> Path | None:
    """The ``samba-tool`` binary: the usual path, then ``$PATH``."""
    return _find("samba-tool", SAMBA_TOOL_CANDIDATES)


def _find(name: str, candidates: Sequence[Path]) -> Path | None:
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise SambaError(
            f"{what} needs root: samba-tool domain provision chowns the domain's files, and "
            "Samba's LDAP ports (389, 636, 3268, 3269) are privileged"
        )


def missing_samba() -> str | None:
    """What of Samba's AD DC is not installed, as a sentence; None when all of it is."""
    missing = [
        name
        for name, found in (
            ("samba", find_samba() is not None),
            ("samba-tool", find_samba_tool() is not None),
            (str(PROVISION_SETUP_DIR), PROVISION_SETUP_DIR.is_dir()),
        )
        if not found
    ]
    if not missing:
        return None
    return (
        f"Samba's AD DC is not installed (missing: {', '.join(missing)}); run `make servers`, "
        "which installs Debian's samba, samba-ad-dc, samba-ad-provision and samba-dsdb-modules"
    )
