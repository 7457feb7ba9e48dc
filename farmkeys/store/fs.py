"""The store's file-system primitives: descriptors, ``O_NOFOLLOW`` opens, fsync, the install
lock and the atomic switch of a link.

Nothing here follows a symbolic link where the store expects a file or a folder of its
own: files are opened with ``O_NOFOLLOW``, folders through descriptors opened with
``O_DIRECTORY | O_NOFOLLOW``. Errors of the operating system are shown by number and
name only (:func:`describe`), never with a path's contents, and each comes with what
the operator can do about it (:func:`hint`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import hashlib
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from farmkeys.errors import StoreError
from farmkeys.store.layout import (
    FOLDER_MODE,
    GROUP_FOLDER_MODE,
    GROUP_PRIVATE_FILE_MODE,
    LINK_PREFIX,
    PRIVATE_FILE_MODE,
    SYNC_AGAIN,
)

# How long an install waits for another install on this node to finish.
LOCK_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class Modes:
    """The modes and group of what an install writes: 0700 folders and 0600 keys, or with
    node.store_group, 0750 and 0640 owned by that group."""

    folder: int
    private: int
    gid: int | None

    @classmethod
    def for_group(cls, group: str | None) -> Modes:
        if group is None:
            return cls(FOLDER_MODE, PRIVATE_FILE_MODE, None)
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise StoreError(
                f"node.store_group names the group {group!r}, which this machine does not have",
                "create the group (groupadd) or correct node.store_group",
            ) from None
        return cls(GROUP_FOLDER_MODE, GROUP_PRIVATE_FILE_MODE, gid)

    def own(self, path: Path) -> None:
        """Give ``path`` (a folder just made, not a link) to the store group, if any."""
        if self.gid is not None:
            os.chown(path, -1, self.gid, follow_symlinks=False)


# -- writing ------------------------------------------------------------------


def write_file(path: Path, data: bytes, mode: int, *, gid: int | None = None) -> None:
    """Create ``path`` (never through a link, never over a file) holding ``data``, with
    ``mode`` whatever the umask and group ``gid``, and fsync it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(path, flags, mode & 0o600)  # no group bit before the group is set
    try:
        if gid is not None:
            os.fchown(descriptor, -1, gid)
        os.fchmod(descriptor, mode)  # whatever the umask
        view = memoryview(data)
        while view:
            written = os.write(descriptor, view)
            if written <= 0:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            view = view[written:]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_folder(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def make_folders(path: Path) -> None:
    """Create ``path`` and its missing parents, each 0700 whatever the umask. A folder that
    appeared meanwhile is left as it is (not chmod-ed): the caller checks it."""
    missing: list[Path] = []
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, FOLDER_MODE)
        except FileExistsError:
            continue
        os.chmod(folder, FOLDER_MODE, follow_symlinks=False)


def replace_with_link(folder: Path, name: str, target: str) -> None:
    """Make ``folder/name`` a symbolic link to ``target`` in one step: a new link under a
    random name replaces it with ``os.replace`` (removed again if that fails)."""
    temporary = folder / f"{LINK_PREFIX}{os.urandom(6).hex()}"
    os.symlink(target, temporary)
    try:
        os.replace(temporary, folder / name)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


# -- folders, through descriptors ---------------------------------------------


def open_folder(
    name: str | Path,
    dir_fd: int | None,
    shown: Path,
    *,
    top: bool = False,
    base: Path | None = None,
) -> int:
    """A descriptor of the folder ``name`` (relative to ``dir_fd``, or to ``base``),
    opened without following a link; :class:`StoreError` for a link or a non-folder."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        if base is not None:
            parent = open_folder(base, None, base, top=True)
            try:
                return os.open(name, flags, dir_fd=parent)
            finally:
                os.close(parent)
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            # O_DIRECTORY | O_NOFOLLOW on a link may say either: look at what it is.
            try:
                link = stat.S_ISLNK(os.lstat(shown).st_mode)
            except OSError:
                link = exc.errno == errno.ELOOP
            what = "a symbolic link" if link else "not a folder"
            raise StoreError(
                f"{shown} in the store is {what}, not the folder farmkeys made"
                if not top
                else f"the store {shown} is {what}",
                "move it away (someone may have tried to redirect the store), then sync again",
            ) from None
        raise


def stat_at(dir_fd: int, name: str) -> os.stat_result:
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def check_folder(folder: int | os.stat_result, shown: Path) -> None:
    """Refuse a folder (a descriptor, or its lstat) that is a link, is not this account's,
    or that group or others may write."""
    status = os.fstat(folder) if isinstance(folder, int) else folder
    if stat.S_ISLNK(status.st_mode) or not stat.S_ISDIR(status.st_mode):
        raise StoreError(
            f"{shown} in the store is not a folder but a link or a file",
            "move it away (someone may have tried to redirect the store), then sync again",
        )
    if status.st_uid != os.geteuid():
        raise StoreError(
            f"{shown} is owned by uid {status.st_uid}, not by this account (uid {os.geteuid()})",
            "give the store to the account farmkeys runs as (chown -R), or point node.store"
            " at a folder of its own; nothing was changed",
        )
    if stat.S_IMODE(status.st_mode) & 0o022:
        raise StoreError(
            f"{shown} may be written by group or others (mode {stat.S_IMODE(status.st_mode):o})",
            "chmod go-w it (farmkeys makes 0700, or 0750 with node.store_group); nothing was"
            " changed",
        )


# -- reading, checked ---------------------------------------------------------


def is_regular_file(path: str | Path) -> bool:
    """Whether ``path`` is a regular file itself (not a link to one)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def same_file(path: str | Path, alias: str | Path) -> bool:
    """Whether ``alias`` is a hard link to ``path`` (both regular files, never symlinks)."""
    try:
        one, two = os.lstat(path), os.lstat(alias)
    except OSError:
        return False
    return stat.S_ISREG(one.st_mode) and (one.st_dev, one.st_ino) == (two.st_dev, two.st_ino)


def holds(path: str | Path, digest: str | None) -> bool:
    """Whether ``path`` is a regular file itself (not a link) whose SHA-256 is ``digest``
    (any content when ``digest`` is None, as in a manifest from before digests)."""
    if not is_regular_file(path):
        return False
    if digest is None:
        return True
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        with os.fdopen(descriptor, "rb") as file:
            return hashlib.sha256(file.read()).hexdigest() == digest
    except OSError:
        return False


def read_checked(path: Path, digest: str | None) -> bytes:
    """A regular file's bytes (never through a link), refused unless its SHA-256 is
    ``digest`` (when the manifest recorded one). FileNotFoundError passes through."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        with os.fdopen(descriptor, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {describe(exc)}", hint(exc)) from exc
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise StoreError(f"{path} is not the file its manifest records", SYNC_AGAIN)
    return data


# -- the install lock ---------------------------------------------------------


@contextlib.contextmanager
def locked(lock: Path, *, store: Path, timeout_seconds: float) -> Iterator[None]:
    """Hold an exclusive ``flock()`` on the file ``lock`` of ``store`` (made if missing,
    never through a link), waiting at most ``timeout_seconds`` for another holder."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        descriptor = os.open(lock, flags, PRIVATE_FILE_MODE)
    except OSError as exc:
        raise StoreError(
            f"cannot open the store lock {lock}: {describe(exc)}",
            f"{hint(exc)}; the installed certificates were left as they were",
        ) from exc
    try:
        _acquire(descriptor, lock, store, timeout_seconds)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _acquire(descriptor: int, lock: Path, store: Path, timeout_seconds: float) -> None:
    deadline = time.monotonic() + timeout_seconds
    delay = 0.01
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError as exc:
            raise StoreError(
                f"cannot lock the store {lock}: {describe(exc)}",
                "check that the store's file system supports flock()",
            ) from exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StoreError(
                f"another install into {store} still held {lock} after {timeout_seconds:g} s",
                f"find the process holding it (fuser {lock}), let it finish, then sync again",
            )
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.25)


# -- errors -------------------------------------------------------------------


def describe(exc: OSError) -> str:
    """``[Errno 13] Permission denied``: the OS error, without file names or data."""
    if exc.errno is None:
        return exc.__class__.__name__
    return f"[Errno {exc.errno}] {exc.strerror or os.strerror(exc.errno)}"


_HINTS = {
    errno.EACCES: "make the store folder writable by the service account",
    errno.EPERM: "make the store folder writable by the service account",
    errno.ENOSPC: "free space on the store's file system",
    errno.EDQUOT: "raise the service account's disk quota on the store's file system",
    errno.EFBIG: "raise the service's file size limit (ulimit -f)",
    errno.EROFS: "mount the store's file system read-write",
    errno.ENOTDIR: "point node.store at a folder",
}


def hint(exc: OSError) -> str:
    """What the operator can do about ``exc``."""
    return _HINTS.get(exc.errno or 0, "check the store folder and its file system")
