"""The `farmkeys` command: a thin shell over the modules that do the work.

:mod:`~farmkeys.cli.parser` says what the command line accepts,
:mod:`~farmkeys.cli.commands` runs each command (`check` in :mod:`~farmkeys.cli.preflight`,
`nodes` in :mod:`~farmkeys.cli.nodes`), and :mod:`~farmkeys.cli.render` turns status,
events and the leader's answers into text or JSON. Asking the
leader (file a request, await its answer) is :mod:`farmkeys.requesting`.

Expected failures (every :class:`farmkeys.errors.Error`) print one line,
``farmkeys: error: <what is wrong> — <what to do>``, to stderr and exit 1;
``--debug`` adds the traceback. `status` exits 0 / 1 / 2 for ok / warning /
critical, and 3 when it cannot tell because the config DB is out of reach.

The config DB is attacker-writable: every text this package prints that may hold a DB
string (status, events, a leader's answer, an error, a log line) passes through
:func:`farmkeys.terminal.escape` on its way out, one line at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from farmkeys import config as config_module
from farmkeys.cli.commands import HANDLERS
from farmkeys.cli.exit_codes import CHECK_EXIT, EXIT_ERROR, STATUS_UNKNOWN
from farmkeys.cli.parser import parse_args
from farmkeys.cli.preflight import print_check
from farmkeys.cli.process import forbid_core_dumps
from farmkeys.cli.render import unknown_status_json
from farmkeys.config import Config
from farmkeys.errors import Error
from farmkeys.terminal import EscapingFormatter, escape


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process's exit code."""
    args = parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    _configure_logging(debug, service=args.command == "serve")
    try:
        try:
            config = config_module.load(getattr(args, "config", None))
        except Error as exc:
            if args.command != "check":
                raise
            # A preflight reports a config that does not load as its one failed check.
            from farmkeys import check

            report = check.failed_to_load(exc)
            print_check(report, as_json=args.json)
            return CHECK_EXIT[report.result]
        if args.command != "serve" and not getattr(args, "wait_for_servers", False):
            config = at_a_terminal(config, interactive=sys.stdin.isatty())
        return HANDLERS[args.command](args, config)
    except Error as exc:
        _report(exc, debug)
        if args.command != "status":
            return EXIT_ERROR
        # For monitoring, a status that failed is a status that cannot tell; a program
        # reading --json still gets a document.
        if getattr(args, "json", False):
            print(unknown_status_json(exc.diagnostics(), pretty=sys.stdout.isatty()))
        return STATUS_UNKNOWN
    except KeyboardInterrupt:
        print("farmkeys: interrupted", file=sys.stderr)
        return 130


# At a terminal, an operator learns within seconds that a server is away; a script, a
# unit's ExecStartPre= or --wait-for-servers waits out the whole configured budget.
TERMINAL_RETRY_SECONDS = 3.0
TERMINAL_CONNECT_TIMEOUT_SECONDS = 3


def at_a_terminal(config: Config, *, interactive: bool) -> Config:
    """``config`` with a retry budget of a few seconds when ``interactive`` (stdin is a
    terminal); unchanged otherwise."""
    if not interactive:
        return config
    retry = config.retry
    database = config.database
    return dataclasses.replace(
        config,
        retry=dataclasses.replace(
            retry, total_seconds=min(retry.total_seconds, TERMINAL_RETRY_SECONDS)
        ),
        database=dataclasses.replace(
            database,
            connect_timeout_seconds=min(
                database.connect_timeout_seconds, TERMINAL_CONNECT_TIMEOUT_SECONDS
            ),
        ),
    )


def _report(exc: Error, debug: bool) -> None:
    # An error's text may quote the config DB (a lease holder, a leader's answer).
    if debug:
        for chunk in traceback.format_exception(exc):
            sys.stderr.write("\n".join(escape(line) for line in chunk.split("\n")))
    print(f"farmkeys: error: {escape(exc.diagnostics())}", file=sys.stderr)


def _configure_logging(debug: bool, *, service: bool = False) -> None:
    # A service tells what it does; a command speaks only when something is wrong.
    level = logging.DEBUG if debug else logging.INFO if service else logging.WARNING
    # A command's lines read like its errors ("farmkeys: warning: ..."); the module that
    # wrote one is for --debug and for a service's journal.
    if service:
        fmt = "%(asctime)s farmkeys %(levelname)s %(name)s: %(message)s"
    elif debug:
        fmt = "farmkeys: %(level)s: %(name)s: %(message)s"
    else:
        fmt = "farmkeys: %(level)s: %(message)s"
    # Every message escaped, from whichever module: it may quote the config DB.
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_lower_level)
    handler.setFormatter(EscapingFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])
    # Libraries' own debug output may echo requests and responses: keep them quiet.
    for noisy in ("ldap3", "psycopg", "tenacity", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _lower_level(record: logging.LogRecord) -> bool:
    record.level = record.levelname.lower()
    return True


def entry() -> None:
    """The console script (and ``python -m farmkeys``): no core dumps, then exit with
    main's code; a closed pipe (`| head`) is not an error."""
    forbid_core_dumps()  # before any secret is read
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would complain again when it flushes stdout at exit: point it elsewhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_ERROR
    sys.exit(code)
