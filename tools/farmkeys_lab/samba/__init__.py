"""A private Samba Active Directory domain controller on loopback, for the tests.

Provisioning a domain takes seconds, so it happens once: :meth:`SambaTemplate.provision`
runs ``samba-tool domain provision`` (realm ``FARMKEYS.LAB``, NetBIOS domain
``FARMKEYS``) into a work directory and seeds it::

    DC=farmkeys,DC=lab
    ├── CN=Users
    │   ├── CN=Administrator          the domain's administrator
    │   ├── CN=svc-farm               the farm's service account (svc-farm@farmkeys.lab)
    │   └── CN=alice                  an ordinary user (alice@farmkeys.lab)
    └── CN=Program Data
        ├── CN=Microsoft
        │   └── CN=ADFS               the AD FS parent: svc-farm has full control of it,
        │                             inherited by what is created beneath it
        └── CN=Undelegated            a parent on which svc-farm has no extra rights

:class:`LocalSambaDC` copies that template into a directory of its own and runs
``samba`` on the copy with only its LDAP service (``server services = ldap``),
listening on 127.0.0.1 only. Every path of its smb.conf is inside its own
directory: nothing is written to /etc/samba, /var/lib/samba or /run/samba.

- **Fixed ports.** Samba's LDAP server has no port setting: it listens on 389
  (LDAP), 636 (LDAPS) and, the provisioned DC being a global catalog, 3268 and
  3269. ``interfaces`` accepts only addresses configured on an interface (not
  127.0.0.2), so one lab DC runs at a time on 127.0.0.1. A running DC holds an
  flock on :data:`LOCK_PATH`: another test run's ``start()`` waits for it, a
  second DC in the same process fails at once. ``start()`` then checks the four
  ports and names whatever holds one; ``stop()`` kills the whole process group
  and waits until the ports are free again.
- **Process.** ``samba -i -M single``: the foreground, one process (no forked
  workers), its own process group, only its LDAP service. Starting a copy takes
  about 0.6 s (Samba's own start-up), copying the template (33 MB) 0.03 s.
- **TLS.** The template has a CA of its own (``cryptography``) and a server
  certificate for ``IP:127.0.0.1, DNS:localhost``; clients verify the DC with
  ``ca_file``. Simple binds need TLS (Samba's default
  ``ldap server require strong auth = yes``): ldaps on 636, or StartTLS on 389.
- **Secrets.** The passwords are random and kept in clear only in
  ``<template>/lab.json`` (mode 0600) with the DNs, SIDs and UPNs a test needs.

Nothing here is meant for production: it is a disposable server for tests, run
as root (``samba-tool domain provision`` and ``samba`` need it).

The modules, each importing only those above it:

- :mod:`~farmkeys_lab.samba.domain`: the domain's fixed names, Samba's binaries
  and ports, the timeouts, :class:`SambaError`;
- :mod:`~farmkeys_lab.samba.sockets`: who listens where (``/proc/net``), and
  whether the DC's fixed ports are free;
- :mod:`~farmkeys_lab.samba.ldap`: a verified-TLS ldap3 connection, SIDs as text;
- :mod:`~farmkeys_lab.samba.files`: the TLS files, smb.conf, private files;
- :mod:`~farmkeys_lab.samba.process`: one DC per machine, its process group,
  start-up and stop;
- :mod:`~farmkeys_lab.samba.provision`: samba-tool and the LDAP seeding;
- :mod:`~farmkeys_lab.samba.template`: :class:`SambaTemplate`;
- :mod:`~farmkeys_lab.samba.dc`: :class:`LocalSambaDC`.

What the tests and the bench use is imported here.
"""

from farmkeys_lab.samba.dc import LocalSambaDC
from farmkeys_lab.samba.domain import (
    LDAP_PORT,
    LDAPS_PORT,
    LOCK_PATH,
    PORTS,
    SambaError,
    find_samba,
    find_samba_tool,
    missing_samba,
)
from farmkeys_lab.samba.files import write_ca_certificate
from farmkeys_lab.samba.ldap import connect, sid_text, tls_for
from farmkeys_lab.samba.sockets import Listener, listeners
from farmkeys_lab.samba.template import SambaTemplate

__all__ = [
    "LDAPS_PORT",
    "LDAP_PORT",
    "LOCK_PATH",
    "PORTS",
    "Listener",
    "LocalSambaDC",
    "SambaError",
    "SambaTemplate",
    "connect",
    "find_samba",
    "find_samba_tool",
    "listeners",
    "missing_samba",
    "sid_text",
    "tls_for",
    "write_ca_certificate",
]
