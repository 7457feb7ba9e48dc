"""The `farmkeys` command: a thin shell over the modules that do the work.

:mod:`~farmkeys.cli.parser` says what the command line accepts,
:mod:`~farmkeys.cli.commands` runs each command, and :mod:`~farmkeys.cli.render`
turns status, events and the leader's answers into text or JSON. Asking the
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

import logging
import os
import sys
import traceback
from collections.abc import Sequence

from farmkeys import config as config_module
from farmkeys.cli.commands import HANDLERS
from farmkeys.cli.exit_codes import EXIT_ERROR, STATUS_UNKNOWN
from farmkeys.cli.parser import parse_args
from farmkeys.cli.process import forbid_core_dumps
from farmkeys.errors import Error
from farmkeys.terminal import EscapingFormatter, escape


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process's exit code."""
    args = parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    _configure_logging(debug, service=args.command == "serve")
    try:
        config = config_module.load(getattr(args, "config", None))
        return HANDLERS[args.command](args, config)
    except Error as exc:
        _report(exc, debug)
        # For monitoring, a status that failed is a status that cannot tell.
        return STATUS_UNKNOWN if args.command == "status" else EXIT_ERROR
    except KeyboardInterrupt:
        print("farmkeys: interrupted", file=sys.stderr)
        return 130


def _report(exc: Error, debug: bool) -> None:
    # An error's text may quote the config DB (a lease holder, a leader's answer).
    if debug:
        for chunk in traceback.format_exception(exc):
            sys.stderr.write("\n".join(escape(line) for line in chunk.split("\n")))
    print(f"farmkeys: error: {escape(exc.diagnostics())}", file=sys.stderr)


def _configure_logging(debug: bool, *, service: bool = False) -> None:
    # A service tells what it does; a command speaks only when something is wrong.
    level = logging.DEBUG if debug else logging.INFO if service else logging.WARNING
    fmt = (
        "%(asctime)s farmkeys %(levelname)s %(name)s: %(message)s"
        if service
        else "farmkeys: %(levelname)s: %(name)s: %(message)s"
    )
    # Every message escaped, from whichever module: it may quote the config DB.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])
    # Libraries' own debug output may echo requests and responses: keep them quiet.
    for noisy in ("ldap3", "psycopg", "tenacity", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
