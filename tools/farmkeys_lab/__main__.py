"""``python -m farmkeys_lab up [--dir DIR]``: the lab of ``make lab`` (:mod:`farmkeys_lab.lab`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from farmkeys_lab import lab


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run its command; the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m farmkeys_lab",
        description="The farmkeys lab: private servers on 127.0.0.1 to try farmkeys by hand.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = commands.add_parser(
        "up",
        help="start a private slapd and PostgreSQL, init a farm, write two node configs,"
        " and keep them running until Ctrl-C",
        description=lab.__doc__.split("\n\n")[1] if lab.__doc__ else None,
    )
    up.add_argument(
        "--dir",
        type=Path,
        default=Path("lab"),
        help="the lab's folder, made if missing (default: ./lab)",
    )
    args = parser.parse_args(argv)
    return lab.up(args.dir)


if __name__ == "__main__":
    sys.exit(main())
