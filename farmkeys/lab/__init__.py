"""The lab: private servers on loopback for the tests, the soak, the benchmarks and `make demo`.

- :mod:`farmkeys.lab.slapd`: a seeded OpenLDAP ``slapd``;
- :mod:`farmkeys.lab.postgres`: a PostgreSQL cluster of its own (``initdb`` in
  a folder of its own, a free port, run as an unprivileged user when started
  by root);
- :mod:`farmkeys.lab.samba`: a Samba Active Directory domain controller (its
  LDAP service only, with a CA and server certificate of its own), provisioned
  once as a template and copied per test; Samba's LDAP ports are fixed, so one
  runs at a time, as root.

Nothing here is used by a production node; each server listens on
127.0.0.1 only and is stopped by whoever started it.
"""
