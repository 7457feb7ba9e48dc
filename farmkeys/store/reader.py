"""Reading the store: what is installed, and whether its files are as installed.

A reader opening one path always gets one generation's file. A reader that
needs several files from the same set resolves ``<store>/current`` once and
reads below that; since only the previous generation is kept, such a path may
vanish two installs later (``FileNotFoundError``: start over), while files
already open stay readable.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from farmkeys.errors import StoreError
from farmkeys.store.fs import describe, hint, read_checked, same_file
from farmkeys.store.fs import holds as _holds  # looked up here on each call: tests count reads
from farmkeys.store.layout import (
    CURRENT_NAME,
    FILE_SUFFIXES,
    FIXED_LINKS,
    MANIFEST_NAME,
    SYNC_AGAIN,
    generation_dir,
    generation_named,
)
from farmkeys.store.manifest import MAX_MANIFEST_BYTES, Manifest
from farmkeys.vocab import ALIASED_ROLES, Purpose, Role


@dataclass(frozen=True)
class Installed:
    """The installed generation as found on disk (:meth:`Store.inspect`)."""

    manifest: Manifest
    # (purpose, thumbprint) of every certificate whose files all hold the bytes the manifest
    # records: what the next install can carry (:class:`Carried`) instead of writing.
    intact: frozenset[tuple[str, str]]
    # Every certificate intact, the role aliases and the fixed links in place.
    complete: bool

    def matches(self, wanted: frozenset[tuple[str, str, str]]) -> bool:
        """Whether this is exactly ``wanted`` (as :meth:`Manifest.identity`), all in place."""
        return self.complete and self.manifest.identity() == wanted


class Reader:
    """Reads the store at ``path``; never writes, locks or repairs anything."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Files this object read and found holding their digest, by path: (device, inode, size,
        # mtime, ctime) when read. Any write to a file changes its ctime, which no one but
        # root can set back, so a file whose stat is unchanged needs no second read.
        self._verified: dict[str, tuple[tuple[int, ...], str | None]] = {}

    def manifest(self) -> Manifest | None:
        """What is installed now; ``None`` if nothing yet. :class:`StoreError` if unreadable."""
        generation = self.current_generation()
        if generation is None:
            return None
        return self.read_manifest(generation)

    def public_certificates(self) -> tuple[Manifest, dict[str, bytes]] | None:
        """The installed set's manifest and its certificates (PEM, no key) by thumbprint, all
        read from one generation and each checked against the manifest's digest; None when
        nothing is installed. What publishing reads: no private key is opened."""
        return self.files_of_kind("cert")

    def files_of_kind(self, kind: str) -> tuple[Manifest, dict[str, bytes]] | None:
        """The installed set's manifest and the file of each certificate of ``kind`` (cert,
        key, pkcs12) by thumbprint, all from one generation, each checked against its
        digest; None when nothing is installed."""
        found = self._read_set(kind, key_of=None)
        return None if found is None else (found[0], found[1])

    def certificates_and_signing_key(self) -> tuple[Manifest, dict[str, bytes], bytes] | None:
        """:meth:`public_certificates`, and from the same generation the signing primary's
        private key (PKCS#8 PEM), checked against the digest its manifest records like the
        certificates are; None when nothing is installed. :class:`StoreError` when the set
        has no signing primary or a file is not as installed. What signs the metadata: the
        only private key publishing opens. The key's bytes are never in an error."""
        found = self._read_set("cert", key_of=(Purpose.SIGNING, Role.PRIMARY))
        if found is None:
            return None
        manifest, certificates, key = found
        if key is None:
            raise StoreError(
                f"the certificate set installed in the store {self.path} has no signing primary",
                SYNC_AGAIN,
            )
        return manifest, certificates, key

    def _read_set(
        self, kind: str, *, key_of: tuple[str, str] | None
    ) -> tuple[Manifest, dict[str, bytes], bytes | None] | None:
        """The manifest, the ``kind`` file of every certificate by thumbprint, and the private
        key of the certificate of ``key_of`` (purpose, role) when asked, all from one
        generation, each checked against its digest; None when nothing is installed."""
        for _ in range(3):  # the generation read may be removed by two installs meanwhile
            generation = self.current_generation()
            if generation is None:
                return None
            manifest = self.read_manifest(generation)
            folder = generation_dir(self.path, generation)
            found: dict[str, bytes] = {}
            key: bytes | None = None
            try:
                for entry in manifest.certificates:
                    digests = entry.sha256 or {}
                    found[entry.thumbprint] = read_checked(
                        folder / entry.files[kind], digests.get(kind)
                    )
                    if key_of == (entry.purpose, entry.role):
                        key = read_checked(folder / entry.files["key"], digests.get("key"))
            except FileNotFoundError:
                continue
            return manifest, found, key
        raise StoreError(
            f"the store {self.path} changed three times while its files were read",
            "try again",
        )

    def inspect(self) -> Installed | None:
        """The installed generation and which of its certificates are intact; None when
        nothing is installed or the store cannot be read (an install repairs it or says
        why it cannot).

        ``current`` is resolved once. A certificate is intact when each of its files is a
        regular file holding the bytes whose SHA-256 the manifest records (any bytes in a
        manifest from before digests); a file changed in place is not.
        """
        try:
            generation = self.current_generation()
            if generation is None:
                return None
            return self._inspect(generation)
        except StoreError:
            return None

    def verify_installed(self) -> Installed | None:
        """The installed generation as :meth:`inspect` finds it, for a health check: None
        only when nothing is installed, :class:`StoreError` when the store cannot be read.

        Cheap enough to run per request: files whose stat is unchanged since this object
        last verified them are not read again (``_verified``), so a look costs a readlink,
        the manifest's read and one lstat per file. A generation that an install replaced
        during the look is looked at again, so a set switched under it is not reported
        damaged.
        """
        for attempt in range(3):
            last = attempt == 2
            generation = self.current_generation()
            if generation is None:
                return None
            try:
                found = self._inspect(generation)
            except StoreError:
                if last or self.current_generation() == generation:
                    raise
                continue  # its manifest went with two installs meanwhile
            if found.complete or last or self.current_generation() == generation:
                return found
        raise AssertionError("unreachable: the last attempt returns or raises")

    def current_generation(self) -> int | None:
        """The generation ``current`` points at, read once; ``None`` if there is none."""
        link = self.path / CURRENT_NAME
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise StoreError(
                    f"{link} in the store is not a link, as farmkeys made it",
                    "move it out of the store folder, then sync again",
                ) from None
            raise StoreError(
                f"cannot read the installed certificate set in {self.path}: {describe(exc)}",
                hint(exc),
            ) from exc
        generation = generation_named(target)
        if generation is None:
            raise StoreError(
                f"{link} points at {target!r}, not at a generation of the store",
                SYNC_AGAIN,
            )
        return generation

    def read_manifest(self, generation: int) -> Manifest:
        """The manifest of ``generation``, checked; :class:`StoreError` says why not."""
        path = generation_dir(self.path, generation) / MANIFEST_NAME
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            with os.fdopen(descriptor, "rb") as file:
                raw = file.read(MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            raise StoreError(
                f"cannot read the manifest of the store {self.path}: {describe(exc)}",
                hint(exc) if exc.errno in (errno.EACCES, errno.EPERM) else SYNC_AGAIN,
            ) from exc
        where = f"the manifest of the store {self.path}"
        manifest = Manifest.from_bytes(raw, where=where)
        if manifest.generation != generation:
            raise StoreError(
                f"{where} is malformed: says generation {manifest.generation} in generation"
                f" {generation}",
                SYNC_AGAIN,
            )
        return manifest

    def _inspect(self, generation: int) -> Installed:
        manifest = self.read_manifest(generation)
        complete = True
        store = str(self.path)
        for name, target in FIXED_LINKS.items():
            try:
                complete = complete and os.readlink(f"{store}/{name}") == target
            except OSError:
                complete = False
        # Plain strings, not Path objects: this runs on every sync, and pathlib's joins
        # cost more than the system calls they name.
        folder = str(generation_dir(self.path, generation))
        intact: set[tuple[str, str]] = set()
        for entry in manifest.certificates:
            digests = entry.sha256 or {}
            if all(
                self._holds(f"{folder}/{rel}", digests.get(kind))
                for kind, rel in entry.files.items()
            ):
                intact.add((entry.purpose, entry.thumbprint))
            else:
                complete = False
            if entry.role in ALIASED_ROLES and not all(
                same_file(f"{folder}/{rel}", f"{folder}/{entry.purpose}/{entry.role}{suffix}")
                for kind, rel in entry.files.items()
                if (suffix := FILE_SUFFIXES.get(kind)) is not None
            ):
                complete = False
        return Installed(manifest=manifest, intact=frozenset(intact), complete=complete)

    def _holds(self, path: str, digest: str | None) -> bool:
        """:func:`~farmkeys.store.fs.holds`, remembering what it verified (``_verified``)."""
        try:
            found = os.lstat(path)
        except OSError:
            return False
        key = (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns)
        if stat.S_ISREG(found.st_mode) and self._verified.get(path) == (key, digest):
            return True
        if not _holds(path, digest):
            return False
        if len(self._verified) > 4096:  # paths of generations long removed
            self._verified.clear()
        self._verified[path] = (key, digest)
        return True
