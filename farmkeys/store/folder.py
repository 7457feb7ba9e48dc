"""The store folder itself: made or checked before an install, its fixed links, and the
clearing of what crashed installs and replaced generations leave behind.

Before anything in a store is read for an install, written or deleted, the store must
be one that only this account can change (:func:`check_tree`); it must look like a
store or be empty (:func:`prepare_folder`); and only links farmkeys made are ever replaced
(:func:`check_layout`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

from farmkeys.errors import StoreError
from farmkeys.file_trust import check_folders_above
from farmkeys.store.fs import (
    Modes,
    check_folder,
    describe,
    hint,
    make_folders,
    open_folder,
    replace_with_link,
    stat_at,
)
from farmkeys.store.layout import (
    CURRENT_NAME,
    FIXED_LINKS,
    FOLDER_MODE,
    GENERATION,
    GENERATIONS_NAME,
    LINK_PREFIX,
    STAGING_PREFIX,
)


def prepare_folder(path: Path, modes: Modes) -> None:
    """Create the store (0700, or 0750 with a store group) or tighten it; refuse a folder
    that is not a store, one that someone else could change (see :func:`check_tree`), or
    one below a folder that someone else could change (:func:`check_location`).

    Nothing is created, chmod-ed or written until every check has passed: a folder
    refused is left exactly as it was (its mode, owner and contents)."""
    try:
        check_location(path)
        try:
            status = os.lstat(path)
        except FileNotFoundError:
            make_folders(path)
            check_location(path)  # a folder above, made meanwhile by someone else?
            status = os.lstat(path)
        if stat.S_ISLNK(status.st_mode):
            raise StoreError(
                f"the store {path} is a symbolic link",
                "point node.store at the real folder; farmkeys does not follow a link there",
            )
        if not stat.S_ISDIR(status.st_mode):
            raise StoreError(
                f"the store {path} is not a folder",
                "point node.store at a folder of its own",
            )
        check_tree(path)
        with os.scandir(path) as entries:
            names = {entry.name for entry in entries}
        if names and not _has_layout(path, names):
            raise StoreError(
                f"the store folder {path} holds other files and no farmkeys store",
                "point node.store at an empty or new folder; farmkeys will not clobber it",
            )
        # Every check passed: only now is anything changed.
        if stat.S_IMODE(status.st_mode) != modes.folder:
            os.chmod(path, modes.folder, follow_symlinks=False)
        modes.own(path)
        generations = path / GENERATIONS_NAME
        try:
            os.mkdir(generations, FOLDER_MODE)
        except FileExistsError:
            pass
        else:
            os.chmod(generations, modes.folder)
            modes.own(generations)
    except OSError as exc:
        raise StoreError(
            f"cannot prepare the store folder {path}: {describe(exc)}",
            f"{hint(exc)}; the installed certificates were left as they were",
        ) from exc


def check_location(path: Path) -> None:
    """Refuse a store below a folder that an account other than root and this one could
    change: whoever can rename the store away and put another (or an old one) back
    chooses what the federation service reads. Every folder above, up to ``/``
    (:func:`farmkeys.file_trust.check_folders_above`); :class:`UnsafePathError`."""
    try:
        check_folders_above(path, what="the store")
    except OSError as exc:
        raise StoreError(
            f"cannot check the folders above the store {path}: {describe(exc)}",
            f"{hint(exc)}; nothing was changed",
        ) from exc


def check_tree(path: Path) -> None:
    """Refuse a store that anyone but this account could change, before anything in it
    is read for an install, written or deleted: the store folder, ``.generations`` and
    every folder below must be real folders (not symbolic links), owned by this
    process's user, and not writable by group or others. Walked through directory
    descriptors opened with ``O_NOFOLLOW``, so a link swapped in is never followed.
    Once these hold, only this account (or root) can change what is in the store.
    """
    root = open_folder(path, None, path, top=True)
    try:
        check_folder(root, path)
        try:
            generations = open_folder(GENERATIONS_NAME, root, path / GENERATIONS_NAME)
        except FileNotFoundError:
            return
        try:
            check_folder(generations, path / GENERATIONS_NAME)
            for _, folders, _, fd in os.fwalk(dir_fd=generations, follow_symlinks=False):
                for name in folders:
                    check_folder(stat_at(fd, name), path / GENERATIONS_NAME / name)
        finally:
            os.close(generations)
    finally:
        os.close(root)


def _has_layout(path: Path, names: set[str]) -> bool:
    if CURRENT_NAME in names and (path / CURRENT_NAME).is_symlink():
        return True
    generations = path / GENERATIONS_NAME
    return GENERATIONS_NAME in names and generations.is_dir() and not generations.is_symlink()


def check_layout(path: Path) -> None:
    """Refuse to replace anything in the store that is not one of our links."""
    for name in (CURRENT_NAME, *FIXED_LINKS):
        link = path / name
        if os.path.lexists(link) and not link.is_symlink():
            raise StoreError(
                f"{link} in the store is not a link, as farmkeys made it",
                "move it out of the store folder, then sync again",
            )


def ensure_fixed_links(path: Path) -> None:
    """Make the fixed links (``manifest.json``, ``signing``, ``decryption``) that are
    missing or point elsewhere."""
    for name, target in FIXED_LINKS.items():
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(path / name) == target:
                continue
        replace_with_link(path, name, target)


def remove_leftovers(store: Path, generations: Path, *, stale: Path) -> None:
    """Remove what crashed installs left behind; called holding the lock, before the switch."""
    with os.scandir(store) as entries:
        for entry in entries:
            if entry.name.startswith(LINK_PREFIX) and entry.is_symlink():
                os.unlink(entry.path)
    with os.scandir(generations) as entries:
        for entry in entries:
            if entry.name.startswith(STAGING_PREFIX) and not entry.is_symlink():
                shutil.rmtree(entry.path)
    # The generation about to be written, if a crash left it between rename and switch.
    if os.path.lexists(stale):
        shutil.rmtree(stale)


def generation_numbers(path: Path) -> list[int]:
    """The generations in the store at ``path``, in no order; none when unreadable."""
    try:
        with os.scandir(path / GENERATIONS_NAME) as entries:
            return [int(e.name) for e in entries if GENERATION.fullmatch(e.name)]
    except OSError:
        return []


def remove_generations(path: Path, keep: set[int | None]) -> None:
    """Best effort: delete every generation but ``keep`` (the switch has happened)."""
    names = {str(generation) for generation in keep if generation is not None}
    try:
        fd = open_folder(GENERATIONS_NAME, None, path / GENERATIONS_NAME, base=path)
    except (OSError, StoreError):
        return
    try:
        doomed = [name for name in os.listdir(fd) if name not in names]
        for name in doomed:
            if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                shutil.rmtree(name, dir_fd=fd, ignore_errors=True)  # never follows a link
            else:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def vanished(
    path: Path,
    generation: int | None,
    recorded: int | None,
    *,
    forgot: int = 0,
) -> str | None:
    """Why a store that this node installed before seems to have vanished or been put back,
    or None: ``generation`` is what it holds now (None: nothing readable), ``recorded``
    the generation this node last reported installing (its row in the config DB, which
    anyone may have written: the answer is only ever a warning), ``forgot`` how many of
    the revocations the row says this node remembers the store does not. The store's own
    ``.generations`` is the other witness of an earlier install."""
    left = max(generation_numbers(path), default=None)
    if generation is not None:
        if recorded is not None and generation < recorded:
            return (
                f"the store {path} holds generation {generation}, older than generation"
                f" {recorded} this node installed (its row in the config DB says so): was an"
                " older store put back in its place?"
            )
        if forgot:
            return (
                f"the store {path} does not remember {forgot} urgently replaced"
                " certificate(s) that this node reported remembering (its row in the config"
                " DB says so): was an older store put back in its place?"
            )
        return None
    if recorded is None and left is None:
        return None  # never installed here: a first install
    witness = (
        f"its row in the config DB says it installed generation {recorded} there"
        if recorded is not None
        else f"its folder {GENERATIONS_NAME} holds generation {left}"
    )
    if not os.path.lexists(path):
        state = "is missing"
    elif left is None and not os.path.lexists(path / CURRENT_NAME):
        state = "is empty"
    else:
        state = "holds no readable installed set"
    return f"the store {path} {state}, but this node installed there before ({witness})"
