"""The lab: private servers on loopback for the tests, the soak, the benchmarks, `make demo`
and `make lab`.

- :mod:`farmkeys_lab.slapd`: a seeded OpenLDAP ``slapd``;
- :mod:`farmkeys_lab.postgres`: a PostgreSQL cluster of its own (``initdb`` in
  a folder of its own, a free port, run as an unprivileged user when started
  by root), and its streaming standby;
- :mod:`farmkeys_lab.samba`: a Samba Active Directory domain controller (its
  LDAP service only, with a CA and server certificate of its own), provisioned
  once as a template and copied per test; Samba's LDAP ports are fixed, so one
  runs at a time, as root;
- :mod:`farmkeys_lab.tls`: a throwaway CA and the server certificates it issues;
- :mod:`farmkeys_lab.servers`: what every lab server shares (a free loopback
  port, a readiness probe, its log, stopping it);
- :mod:`farmkeys_lab.demo`: the demo farm of ``make demo``;
- :mod:`farmkeys_lab.lab`: the lab of ``make lab`` (``python -m farmkeys_lab up``):
  a slapd, a PostgreSQL and two node configs kept until Ctrl-C, to try farmkeys by hand;
- :mod:`farmkeys_lab.nodes`: the node configs the demo and the lab write.

This package lives in tools/, outside the wheel: an operator's install holds
only farmkeys. The tests find it through pytest's ``pythonpath``, the demo,
the bench, the soak and the fuzzer through the Makefile's ``PYTHONPATH``.
Nothing here is used by a production node; each server listens on
127.0.0.1 only and is stopped by whoever started it.
"""
