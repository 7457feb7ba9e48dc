"""A private PostgreSQL cluster on loopback, for the tests, the soak, the benchmarks and the demo.

:class:`LocalPostgres` runs ``initdb`` once in a folder of its own, then runs
the server (``postgres``, in the foreground, as a child process) on a free
port of 127.0.0.1 with Unix sockets turned off. It never touches a cluster
of the machine's own: no ``pg_ctlcluster``, no port 5432 unless it happens to
be free, no shared socket folder.

- Run as root, the server runs as an unprivileged account (``postgres`` when
  the machine has one, else ``nobody``), because PostgreSQL refuses to run as
  root. Its data folder is then a fresh ``/tmp/farmkeys-pg-*`` folder (0700,
  owned by that account), since the caller's folder (pytest's, say) is
  usually closed to other accounts; ``<workdir>/data`` is a symlink to it.
- The superuser ``postgres`` has a random password (SCRAM), kept in
  ``<workdir>/pgpass`` (0600) and handed to libpq as ``passfile=``, so
  connection strings carry no secret.
- ``stop()`` / ``start()`` (or ``restart()``) keep the data and the port, so a
  test can take the config DB away from running nodes and bring it back.
- ``standby()`` makes a streaming standby of a running server (``pg_basebackup``,
  by default synchronous: a commit returns once the standby applied it),
  ``promote()`` turns it into a primary, and :func:`multi_host_dsn` names both
  the way a config DB that fails over is configured.
- Durability is relaxed (``fsync = off``): a crash of the server loses
  nothing (the kernel keeps the writes), only a crash of the machine would.

Nothing here is meant for production.

The modules: :mod:`~farmkeys_lab.postgres.cluster` (one server: initdb, start,
stop, databases) and :mod:`~farmkeys_lab.postgres.replication` (its standby,
promotion, and a DSN naming both). What the tests and the bench use is
imported here.
"""

from farmkeys_lab.postgres.cluster import PostgresError, find_bindir
from farmkeys_lab.postgres.replication import LocalPostgres, multi_host_dsn

__all__ = ["LocalPostgres", "PostgresError", "find_bindir", "multi_host_dsn"]
