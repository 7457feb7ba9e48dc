"""Reading a file that holds a secret of the operator's: a passphrase, a DKM key."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from farmkeys.errors import Error


def read_private_file(
    path: Path, *, what: str, error: Callable[[str, str], Error], limit: int = 64 * 1024
) -> bytes:
    """The first ``limit`` bytes of ``path``, which must be a regular file reached without a
    symbolic link and have no group or other permission bits; else ``error(what, todo)``
    naming it as ``what`` ("passphrase file", "DKM key file")."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise error(
            f"cannot open {what} {path}: {exc.strerror}",
            "check the path (a symbolic link is not followed)",
        ) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} {path} is not a regular file", "give a file")
        refuse_if_exposed(path, info.st_mode, what=what, error=error)
        return handle.read(limit)


def refuse_if_exposed(
    path: str | Path,
    mode: int,
    *,
    what: str,
    error: Callable[[str, str], Error],
    holding: str = "what it holds",
) -> None:
    """Raise ``error`` when ``mode`` gives group or others any permission on ``path``."""
    if mode & 0o077:
        raise error(
            f"{what} {path} may be read or written by group or others"
            f" (mode {stat.S_IMODE(mode):04o})",
            f"chmod 600 {path}, and consider {holding} seen",
        )
