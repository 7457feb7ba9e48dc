"""`farmkeys check`: the preflight (:mod:`farmkeys.check`) as the command runs and prints it."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from farmkeys.cli.exit_codes import CHECK_EXIT
from farmkeys.cli.local import node_store
from farmkeys.cli.render import check_json, check_lines
from farmkeys.config import Config

if TYPE_CHECKING:
    from farmkeys.check import Report as CheckReport


def check_command(args: argparse.Namespace, config: Config) -> int:
    from farmkeys import check
    from farmkeys.db import ConfigDB
    from farmkeys.directory import Directory

    with (
        ConfigDB(config.database, config.retry) as db,
        Directory(config.directory, config.retry) as directory,
    ):
        report = check.run(
            config,
            config_file=config_file(args),
            db=db,
            directory=directory,
            store=node_store(config),
        )
    print_check(report, as_json=args.json)
    return CHECK_EXIT[report.result]


def config_file(args: argparse.Namespace) -> Path | None:
    """The config file this command read, as --config or FARMKEYS_CONFIG named it."""
    named = getattr(args, "config", None) or os.environ.get("FARMKEYS_CONFIG")
    return Path(named) if named else None


def print_check(report: CheckReport, *, as_json: bool) -> None:
    if as_json:
        print(check_json(report, pretty=sys.stdout.isatty()))
    else:
        for line in check_lines(report):
            print(line)
