"""Whether a file farmkeys acts on could be changed by another account: OpenSSH's
StrictModes walk, for the config file, the password and passphrase files, the CA file,
the hook program and the folders above the store.

Whoever can change such a file, or rename or replace any folder above it, can make
farmkeys run their program as the service account, trust their directory server (and
hand it the bind password), or serve a store they put back. So, as sshd's ``safe_path``
does for ``authorized_keys``, :func:`check_file` refuses a file unless it and every
folder above it, up to ``/``:

- is owned by root or by the account farmkeys runs as (its effective uid), and
- is not writable by group or others.

One exception, which sshd does not make: a folder that others may write but that has
the sticky bit (``/tmp``) is accepted when the entry below it on the path is owned by
root or by this account, since then no one else can rename or remove that entry.

Symbolic links are followed, and both chains are checked: the folders of the path as
given (each folder that holds a link on the way, and the link's owner), and the folders
of the path it resolves to (``realpath``), which is what is opened. A link that someone
else could replace is as bad as a file they could write.

Each refusal is one :class:`~farmkeys.errors.UnsafePathError` naming the path and the
command that fixes it. Pure of the config DB and the directory: config loading, the
store, escrow and the hook use it.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Callable
from pathlib import Path

from farmkeys.errors import Error, UnsafePathError

# Group and other permission bits: a private file (a password, a passphrase) has none.
_EXPOSED = 0o077
_WRITABLE = 0o022


def check_file(path: str | os.PathLike[str], *, what: str) -> Path:
    """Refuse ``path`` (a regular file, named ``what`` in the refusal: "config file",
    "directory.ca_file") unless only root or this account can change it or any folder
    above it; the path it resolves to. :class:`UnsafePathError` for a refusal; an
    ``OSError`` of the file itself (missing, unreadable) passes through."""
    given = Path(os.path.abspath(path))
    real = Path(os.path.realpath(given, strict=True))
    status = os.stat(real)
    if not stat.S_ISREG(status.st_mode):
        raise UnsafePathError(f"{what} {given} is not a regular file", "give a file")
    _check_entry(real, status, what=what)
    _check_links(given, what=what)
    _check_folders(real, what=what)
    return real


def check_folders_above(path: str | os.PathLike[str], *, what: str) -> None:
    """Refuse ``path`` (a folder that may not exist yet, such as the store) when a folder
    above it could be changed by another account: renamed away, replaced, or filled. The
    folder itself is not judged here (the store has rules of its own). Only folders that
    exist are checked; those missing are made later by this account."""
    given = Path(os.path.abspath(path))
    existing = given.parent
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    _check_links(existing, what=what, below=given)
    real = Path(os.path.realpath(existing))
    status = os.stat(real)
    if not stat.S_ISDIR(status.st_mode):
        raise UnsafePathError(
            f"{existing}, above {what} {given}, is not a folder", f"correct {what}"
        )
    child = existing / given.relative_to(existing).parts[0]
    _check_folder(real, status, child=child, what=what, given=given)
    _check_folders(real, what=what, given=given)


def read_private_file(
    path: Path, *, what: str, error: Callable[[str, str], Error], limit: int = 64 * 1024
) -> bytes:
    """The first ``limit`` bytes of ``path``, a file holding a secret of the operator's (a
    passphrase, a DKM key): it must be a regular file reached without a symbolic link,
    have no group or other permission bits, and pass :func:`check_file`. ``error(what,
    todo)`` for a file that cannot be opened or is exposed, naming it as ``what``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
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
        checked = os.stat(check_file(path, what=what))
        if (checked.st_dev, checked.st_ino) != (info.st_dev, info.st_ino):
            raise UnsafePathError(
                f"{what} {path} was replaced while farmkeys read it",
                "find out who changes it, then try again",
            )
        return handle.read(limit)


def refuse_if_exposed(
    path: str | Path,
    mode: int,
    *,
    what: str,
    error: Callable[[str, str], Error],
    holding: str = "what it holds",
    holds: str | None = None,
    todo: str | None = None,
) -> None:
    """Raise ``error`` when ``mode`` gives group or others any permission on ``path``, a
    file holding a secret: ``holds`` names it in the sentence ("directory.password"),
    ``holding`` in the advice, unless ``todo`` replaces the advice."""
    if mode & _EXPOSED:
        held = f" holds {holds} but" if holds else ""
        raise error(
            f"{what} {path}{held} may be read or written by group or others"
            f" (mode {stat.S_IMODE(mode):04o})",
            todo or f"chmod 600 {path}, and consider {holding} seen",
        )


def program_path(argv0: str, search_path: str | None) -> Path | None:
    """Where a command's program is, as ``execvp`` finds it: ``argv0`` itself when it names
    a path, else the first executable of that name in ``search_path``; None if none."""
    if os.sep in argv0:
        return Path(argv0)
    for folder in (search_path or os.defpath).split(os.pathsep):
        candidate = Path(folder or ".") / argv0
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


# -- the walk -----------------------------------------------------------------------------


def _check_entry(path: Path, status: os.stat_result, *, what: str) -> None:
    """The file (or folder) itself: owned by root or this account, not writable by others."""
    _check_owner(path, status, what=what, given=path)
    if stat.S_IMODE(status.st_mode) & _WRITABLE:
        raise UnsafePathError(_writable(path, status, what, path), _chmod(path, status))


def _check_folders(real: Path, *, what: str, given: Path | None = None) -> None:
    """Every folder above ``real`` (a resolved path), up to ``/``."""
    child = real
    for folder in real.parents:
        _check_folder(folder, os.stat(folder), child=child, what=what, given=given or real)
        child = folder


def _check_folder(
    folder: Path, status: os.stat_result, *, child: Path | None, what: str, given: Path
) -> None:
    """One folder on the way to ``given``; ``child``: the entry below it on the way, whose
    owner decides whether a sticky folder that others may write is acceptable."""
    _check_owner(folder, status, what=what, given=given)
    mode = stat.S_IMODE(status.st_mode)
    if not mode & _WRITABLE:
        return
    if mode & stat.S_ISVTX and child is not None:
        try:
            owner = os.lstat(child).st_uid
        except FileNotFoundError:
            owner = os.geteuid()  # made later, by this account
        if owner in _trusted_uids():
            return
        shown = f"{what} {given}" if child == given else f"{child}, on the way to {what} {given},"
        raise UnsafePathError(
            f"{shown} is in the sticky folder {folder} (mode {mode:04o}) but owned by"
            f" {_account(owner)}, who can therefore replace it",
            f"chown {_name(os.geteuid())} {child}, or move {what} out of {folder}",
        )
    raise UnsafePathError(_writable(folder, status, what, given), _chmod(folder, status))


def _check_links(given: Path, *, what: str, below: Path | None = None) -> None:
    """Each symbolic link on the path as given: owned by root or this account, in a folder
    (resolved) that only they can change."""
    here = Path(given.anchor)
    for part in given.parts[1:]:
        here = here / part
        try:
            status = os.lstat(here)
        except FileNotFoundError:
            return
        if not stat.S_ISLNK(status.st_mode):
            continue
        shown = below or given
        _check_owner(here, status, what=what, given=shown, link=True)
        holder = Path(os.path.realpath(here.parent))
        _check_folder(holder, os.stat(holder), child=here, what=what, given=shown)
        _check_folders(holder / here.name, what=what, given=shown)


def _check_owner(
    path: Path, status: os.stat_result, *, what: str, given: Path, link: bool = False
) -> None:
    if status.st_uid in _trusted_uids():
        return
    if path == given:
        shown = f"{what} {path}, a symbolic link," if link else f"{what} {path}"
    else:
        kind = "the symbolic link " if link else ""
        shown = f"{kind}{path}, on the way to {what} {given},"
    raise UnsafePathError(
        f"{shown} is owned by {_account(status.st_uid)}, not by root or the"
        f" account farmkeys runs as ({_account(os.geteuid())})",
        f"chown {'-h ' if link else ''}root {path}, or move {what} to a folder of root's",
    )


def _trusted_uids() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


def _writable(path: Path, status: os.stat_result, what: str, given: Path) -> str:
    mode = stat.S_IMODE(status.st_mode)
    who = {0o020: "group", 0o002: "others", 0o022: "group and others"}[mode & _WRITABLE]
    where = "" if path == given else f", on the way to {what} {given},"
    named = f"{what} " if path == given else ""
    return f"{named}{path}{where} is writable by {who} (mode {mode:04o})"


def _chmod(path: Path, status: os.stat_result) -> str:
    bits = status.st_mode & _WRITABLE
    who = {0o020: "g", 0o002: "o", 0o022: "go"}[bits]
    return f"chmod {who}-w {path}"


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _account(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
