"""``hooks.on_change``: the command serve runs after a sync changed its store.

The command line is split with :func:`shlex.split` and run without a shell, in
an environment without farmkeys' own settings (:func:`hook_environment`); its
outcome is logged and recorded in the node's row, never fatal and not retried. A program
that another account could change is refused, not run (:mod:`farmkeys.file_trust`).
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from farmkeys.config import HooksConfig
from farmkeys.db import ConfigDB
from farmkeys.errors import Error, UnsafePathError
from farmkeys.file_trust import check_file, program_path
from farmkeys.store import Manifest

# The name these lines have always carried, before serve became a package.
log = logging.getLogger("farmkeys.serve")

# libpq's own secrets, withheld from the on_change hook like every FARMKEYS_* variable.
_HOOK_WITHHELD = frozenset({"PGPASSWORD", "PGPASSFILE", "PGSERVICEFILE"})


def hook_environment(
    environ: Mapping[str, str], *, store: Path, changed: Sequence[str]
) -> dict[str, str]:
    """The environment of ``hooks.on_change``: this process's, without farmkeys' own
    settings (FARMKEYS_*, which may carry the DSN or the directory password) and libpq's
    secrets, plus ``FARMKEYS_STORE`` and ``FARMKEYS_CHANGED`` (the new thumbprints)."""
    kept = {
        k: v
        for k, v in environ.items()
        if k not in _HOOK_WITHHELD and not k.startswith("FARMKEYS_")
    }
    return {**kept, "FARMKEYS_STORE": str(store), "FARMKEYS_CHANGED": " ".join(changed)}


class OnChangeHook:
    """Runs ``hooks.on_change`` for one node, and records its outcome."""

    def __init__(self, config: HooksConfig, db: ConfigDB, *, store: Path, node_id: str) -> None:
        self.config = config
        self._db = db
        self._store = store
        self._node_id = node_id

    @property
    def enabled(self) -> bool:
        return bool(self.config.on_change)

    def run(self, before: Manifest | None, after: Manifest) -> None:
        """Run the hook for a store that went from ``before`` to ``after`` (if it is set)."""
        command = self.config.on_change
        if not command:
            return
        old = before.identity() if before else frozenset()
        changed = sorted({t for (_, _, t) in after.identity() - old})
        env = hook_environment(os.environ, store=self._store, changed=changed)
        error = self._execute(command, env)
        if error:
            log.warning("%s: %s", self._node_id, error)
        else:
            log.info("%s: on_change hook ran for %s", self._node_id, " ".join(changed))
        try:
            self._db.record_hook(self._node_id, error=error)
        except Error as exc:
            log.warning("%s could not record the hook's outcome: %s", self._node_id, exc.what)

    def _execute(self, command: str, env: dict[str, str]) -> str | None:
        """Run ``command``; None when it exited 0, else what went wrong. Its program, and
        every folder above it, must be root's or this account's alone
        (:func:`farmkeys.file_trust.check_file`), checked just before it runs, and the
        program checked is the one run."""
        try:
            argv = shlex.split(command)
            found = program_path(argv[0], env.get("PATH")) if argv else None
            program = None if found is None else check_file(found, what="hooks.on_change program")
        except UnsafePathError as exc:
            return f"on_change hook refused: {exc.diagnostics()}"
        except (OSError, ValueError) as exc:
            return f"on_change hook could not run: {exc}"
        try:
            done = subprocess.run(
                argv,
                executable=program,
                env=env,
                timeout=self.config.timeout_seconds,
                capture_output=True,
                text=True,
                check=False,
            )
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            return f"on_change hook could not run: {exc}"
        if done.returncode != 0:
            tail = " ".join((done.stderr or done.stdout).split())[-200:]
            return f"on_change hook exited {done.returncode}: {tail}"
        return None
