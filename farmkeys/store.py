"""The node's local certificate store: the only place decrypted private keys touch disk.

The federation service reads the store; it must never see half a rollover.
Every install therefore writes a complete new *generation* and switches to it
with one atomic rename of a symlink. The layout, of which the first six lines
are the federation service's interface and keep their names::

    <store>/                              0700
      manifest.json -> current/manifest.json
      signing -> current/signing
      decryption -> current/decryption
      signing/<THUMBPRINT>.pem            certificate, PEM (SHA-1 thumbprint, upper-case hex)
      signing/<THUMBPRINT>.key            private key, unencrypted PKCS#8 PEM, 0600
      signing/<THUMBPRINT>.p12            PKCS#12 with both, no password, 0600
      signing/primary.pem|.key|.p12       hard links to the primary's thumbprint files
      signing/secondary.pem|.key|.p12     the same for the secondary, when there is one
      decryption/...                      the same for the decryption certificates
      current -> .generations/<n>         the installed set, switched by one rename
      .generations/<n>/                   0700; manifest.json, signing/, decryption/
      .lock                               flock()ed by an install, serialising installs

An install, holding ``.lock``:

1. writes the whole set into ``.generations/.new-XXXXXXXX/``, fsyncing every
   file and folder, then renames it to ``.generations/<n>`` (n = previous + 1)
   and fsyncs ``.generations``;
2. creates the fixed links ``manifest.json``, ``signing`` and ``decryption``
   if they are missing (once, on the first install);
3. switches: a symlink ``.current-XXXXXXXX -> .generations/<n>`` replaces
   ``current`` with ``os.replace``; then fsyncs the store folder;
4. deletes every generation except the new one and the previous one, so a
   reader caught mid-switch can finish reading the previous set.

Anything failing before step 3 removes the partial generation and leaves the
installed set byte for byte as it was.

A reader opening one path always gets one generation's file. A reader that
needs several files from the same set should resolve ``<store>/current``
once (``os.path.realpath``) and read below that; since only the previous
generation is kept, such a path may vanish two installs later
(``FileNotFoundError``: start over), while files already open stay readable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import grp
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from farmkeys.errors import StoreError
from farmkeys.vocab import ALIASED_ROLES, LIVE_ROLES, PURPOSES

# Roles that get a role-named alias (primary.pem, ...); at most one per purpose.
# Manifest "files" key -> file name suffix.
FILE_SUFFIXES = {"cert": ".pem", "key": ".key", "pkcs12": ".p12"}

MANIFEST_NAME = "manifest.json"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
CURRENT_NAME = "current"
GENERATIONS_NAME = ".generations"
LOCK_NAME = ".lock"
# The fixed links in the store folder: name -> target.
FIXED_LINKS = {name: f"{CURRENT_NAME}/{name}" for name in (MANIFEST_NAME, *PURPOSES)}

FOLDER_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
# With node.store_group: the federation service's group reads the store, never writes it.
GROUP_FOLDER_MODE = 0o750
GROUP_PRIVATE_FILE_MODE = 0o640
# How long an install waits for another install on this node to finish.
LOCK_TIMEOUT_SECONDS = 60.0
# A manifest larger than this is corrupt, not read.
MAX_MANIFEST_BYTES = 1 << 20

_PKCS8_PEM_HEADER = b"-----BEGIN PRIVATE KEY-----"
_THUMBPRINT = re.compile(r"[0-9A-F]{40}")
_GENERATION = re.compile(r"[1-9][0-9]{0,17}")
_STAGING_PREFIX = ".new-"
_LINK_PREFIX = ".current-"
_SYNC_AGAIN = "run `farmkeys sync` to install the certificate set again"


@dataclass(frozen=True)
class CertificateFiles:
    """One certificate to install, with its decrypted private key.

    Validated when made: ``ValueError`` names the certificate, never the key.
    """

    purpose: str
    role: str
    thumbprint: str
    not_after: datetime
    certificate_pem: bytes
    private_key_pem: bytes = field(repr=False)
    pkcs12: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_names(self.purpose, self.role, self.thumbprint)
        _require_aware(self.not_after, f"not_after of certificate {self.thumbprint}")
        for name in ("certificate_pem", "private_key_pem", "pkcs12"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or not value:
                raise ValueError(f"{name} of certificate {self.thumbprint} must be non-empty bytes")
        if not self.private_key_pem.lstrip().startswith(_PKCS8_PEM_HEADER):
            raise ValueError(
                f"the private key of certificate {self.thumbprint} is not an unencrypted PKCS#8 PEM"
            )
        try:
            # Only an install needs cryptography: a sync with nothing new starts fast.
            from cryptography import x509
            from cryptography.hazmat.primitives.serialization import Encoding

            certificate = x509.load_pem_x509_certificate(self.certificate_pem)
        except ValueError:
            raise ValueError(
                f"certificate_pem of certificate {self.thumbprint} is not a PEM certificate"
            ) from None
        der = certificate.public_bytes(Encoding.DER)
        actual = hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()  # AD FS's FindValue
        if actual != self.thumbprint:
            raise ValueError(
                f"certificate_pem given for thumbprint {self.thumbprint} has thumbprint {actual}"
            )


@dataclass(frozen=True)
class Carried:
    """A certificate the installed generation already holds, carried into the next one by
    hard links to its files (which are never written again), in ``role``."""

    purpose: str
    role: str
    thumbprint: str

    def __post_init__(self) -> None:
        _check_names(self.purpose, self.role, self.thumbprint)


@dataclass(frozen=True)
class ManifestEntry:
    """One installed certificate; ``files`` maps cert/key/pkcs12 to paths relative to the store."""

    purpose: str
    role: str
    thumbprint: str
    not_after: datetime
    files: dict[str, str]
    sha256: dict[str, str] | None = None  # kind -> hex digest; None in older manifests


@dataclass(frozen=True)
class Manifest:
    """What one generation of the store holds; written as ``manifest.json``."""

    node: str
    generation: int
    installed_at: datetime
    certificates: tuple[ManifestEntry, ...]
    dkm_group: str | None = None  # the farm this store is pinned to (its DKM group)
    # The farm state record this set was installed under (farmkeys.formats.farm_state): the highest
    # version this node has installed, and the fingerprint of the record's stored bytes.
    state_version: int | None = None
    state_digest: str | None = None
    # Thumbprints an urgent rollover replaced: never installed here again, and no file of
    # theirs is kept in any generation.
    forgotten: frozenset[str] = frozenset()

    def to_json(self) -> str:
        document: dict[str, Any] = {} if self.dkm_group is None else {"dkm_group": self.dkm_group}
        if self.state_version is not None:
            document |= {"state_version": self.state_version, "state_digest": self.state_digest}
        if self.forgotten:
            document["forgotten"] = sorted(self.forgotten)
        document |= {
            "node": self.node,
            "generation": self.generation,
            "installed_at": self.installed_at.isoformat(),
            "certificates": [
                {
                    "purpose": entry.purpose,
                    "role": entry.role,
                    "thumbprint": entry.thumbprint,
                    "not_after": entry.not_after.isoformat(),
                    "files": dict(entry.files),
                    **({} if entry.sha256 is None else {"sha256": dict(entry.sha256)}),
                }
                for entry in self.certificates
            ],
        }
        return json.dumps(document, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and check a manifest; :class:`StoreError` says what is wrong with it."""
        return cls.from_bytes(text.encode("utf-8", "surrogatepass"))

    @classmethod
    def from_bytes(cls, raw: bytes, *, where: str = "the store manifest") -> Manifest:
        """Parse and check a manifest file's bytes; :class:`StoreError` (and nothing else)
        says what is wrong with them."""
        try:
            if len(raw) > MAX_MANIFEST_BYTES:
                raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes")
            return _parse_manifest(json.loads(raw.decode("utf-8")))
        except (ValueError, RecursionError) as exc:  # also UnicodeDecodeError, JSONDecodeError
            reason = "nested too deeply" if isinstance(exc, RecursionError) else _reason(exc)
            raise StoreError(f"{where} is malformed: {reason}", _SYNC_AGAIN) from None

    def identity(self) -> frozenset[tuple[str, str, str]]:
        """The installed set as ``{(purpose, role, thumbprint)}``."""
        return frozenset((e.purpose, e.role, e.thumbprint) for e in self.certificates)


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


class Store:
    """The certificate store folder of this node. See the module docstring for its layout."""

    def __init__(
        self,
        path: Path,
        *,
        node_id: str,
        lock_timeout_seconds: float = LOCK_TIMEOUT_SECONDS,
        group: str | None = None,
    ) -> None:
        """``group``: node.store_group, the group that may read (never write) the store."""
        if not isinstance(node_id, str) or not node_id:
            raise ValueError("node_id must be a non-empty string")
        if lock_timeout_seconds < 0:
            raise ValueError("lock_timeout_seconds must not be negative")
        self.path = Path(path).absolute()
        self.node_id = node_id
        self.lock_timeout_seconds = lock_timeout_seconds
        self.group = group
        self._modes = _Modes.for_group(group)
        # Files this object read and found holding their digest, by path: (device, inode, size,
        # mtime, ctime) when read. Any write to a file changes its ctime, which no one but
        # root can set back, so a file whose stat is unchanged needs no second read.
        self._verified: dict[str, tuple[tuple[int, ...], str | None]] = {}

    # -- reading --------------------------------------------------------------

    def manifest(self) -> Manifest | None:
        """What is installed now; ``None`` if nothing yet. :class:`StoreError` if unreadable."""
        generation = self._current_generation()
        if generation is None:
            return None
        return self._read_manifest(generation)

    def public_certificates(self) -> tuple[Manifest, dict[str, bytes]] | None:
        """The installed set's manifest and its certificates (PEM, no key) by thumbprint, all
        read from one generation and each checked against the manifest's digest; None when
        nothing is installed. What publishing reads: no private key is opened."""
        for _ in range(3):  # the generation read may be removed by two installs meanwhile
            generation = self._current_generation()
            if generation is None:
                return None
            manifest = self._read_manifest(generation)
            folder = self._generation_dir(generation)
            found: dict[str, bytes] = {}
            try:
                for entry in manifest.certificates:
                    found[entry.thumbprint] = _read_checked(
                        folder / entry.files["cert"], (entry.sha256 or {}).get("cert")
                    )
            except FileNotFoundError:
                continue
            return manifest, found
        raise StoreError(
            f"the store {self.path} changed three times while its certificates were read",
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
            generation = self._current_generation()
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
            generation = self._current_generation()
            if generation is None:
                return None
            try:
                found = self._inspect(generation)
            except StoreError:
                if last or self._current_generation() == generation:
                    raise
                continue  # its manifest went with two installs meanwhile
            if found.complete or last or self._current_generation() == generation:
                return found
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _inspect(self, generation: int) -> Installed:
        manifest = self._read_manifest(generation)
        complete = True
        store = str(self.path)
        for name, target in FIXED_LINKS.items():
            try:
                complete = complete and os.readlink(f"{store}/{name}") == target
            except OSError:
                complete = False
        # Plain strings, not Path objects: this runs on every sync, and pathlib's joins
        # cost more than the system calls they name.
        folder = str(self._generation_dir(generation))
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
                _same_file(f"{folder}/{rel}", f"{folder}/{entry.purpose}/{entry.role}{suffix}")
                for kind, rel in entry.files.items()
                if (suffix := FILE_SUFFIXES.get(kind)) is not None
            ):
                complete = False
        return Installed(manifest=manifest, intact=frozenset(intact), complete=complete)

    def _holds(self, path: str, digest: str | None) -> bool:
        """:func:`_holds`, remembering what it verified (see ``_verified``)."""
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

    def matches(self, wanted: frozenset[tuple[str, str, str]]) -> bool:
        """Whether the installed set is exactly ``wanted`` and all of its files are in place
        (``wanted`` is ``{(purpose, role, thumbprint)}``, as :meth:`Manifest.identity`)."""
        installed = self.inspect()
        return installed is not None and installed.matches(wanted)

    # -- installing -----------------------------------------------------------

    def pin(self, dkm_group: uuid.UUID) -> None:
        """Record ``dkm_group`` in the installed manifest when it names no farm yet (a store
        installed before farms were pinned); the set installed does not change."""
        with self._locked():
            generation = self._current_generation()
            if generation is None:
                return
            manifest = self._read_manifest(generation)
            if manifest.dkm_group is not None:
                return
            pinned = dataclasses.replace(manifest, dkm_group=str(dkm_group))
            self._rewrite_manifest(generation, pinned, "pin the store to its farm")

    def note_state(self, *, version: int, digest: str, forget: Iterable[str] = ()) -> Manifest:
        """Record a newer farm state record for the set installed now (its live set is the
        same: no new generation), and forget ``forget`` (see :meth:`install`)."""
        with self._locked():
            generation = self._current_generation()
            if generation is None:
                raise StoreError(f"the store {self.path} holds no certificate set", _SYNC_AGAIN)
            manifest = self._read_manifest(generation)
            noted = dataclasses.replace(
                manifest,
                state_version=max(version, manifest.state_version or 0),
                state_digest=digest,
                forgotten=manifest.forgotten | frozenset(forget),
            )
            self._rewrite_manifest(generation, noted, "record the farm state")
            self._remove_forgotten(noted, generation)
        return noted

    def _rewrite_manifest(self, generation: int, manifest: Manifest, doing: str) -> None:
        """Replace one generation's manifest atomically (the lock is held)."""
        folder = self._generation_dir(generation)
        staged = folder / f".{MANIFEST_NAME}.{os.urandom(6).hex()}"
        try:
            _write_file(staged, manifest.to_json().encode("utf-8"), PUBLIC_FILE_MODE)
            os.replace(staged, folder / MANIFEST_NAME)
            _fsync_folder(folder)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(staged)
            raise StoreError(
                f"cannot {doing} in {self.path}: {_describe(exc)}", _hint(exc)
            ) from exc

    def _remove_forgotten(self, manifest: Manifest, generation: int) -> None:
        """Delete every other generation that holds a file of a forgotten thumbprint, so no
        file of an urgently replaced key stays in the store (the lock is held).

        Unlinking is what we do: on journaling and copy-on-write filesystems overwriting a
        file's blocks does not reach the copies the filesystem keeps, so it would promise
        more than it gives. Full-disk encryption covers what unlinking leaves.
        """
        if not manifest.forgotten:
            return
        keep: set[int | None] = {generation}
        for other in self._generation_numbers():
            if other == generation:
                continue
            try:
                held = {e.thumbprint for e in self._read_manifest(other).certificates}
            except StoreError:
                held = set(manifest.forgotten)  # unreadable: cannot tell, so it goes
            if not held & manifest.forgotten:
                keep.add(other)
        self._remove_generations(keep=keep)

    def _generation_numbers(self) -> list[int]:
        try:
            with os.scandir(self.path / GENERATIONS_NAME) as entries:
                return [int(e.name) for e in entries if _GENERATION.fullmatch(e.name)]
        except OSError:
            return []

    def install(
        self,
        certificates: Sequence[CertificateFiles | Carried],
        *,
        now: datetime,
        dkm_group: uuid.UUID | None = None,
        state_version: int | None = None,
        state_digest: str | None = None,
        forget: Iterable[str] = (),
    ) -> Manifest:
        """Install ``certificates`` as the new generation and switch to it atomically.

        A :class:`Carried` certificate is taken from the installed generation by hard
        links, checked against the digests its manifest records, in its new role:
        only what changed is written.

        ``now`` becomes the manifest's ``installed_at``; ``dkm_group`` the farm the
        store is pinned to; ``state_version`` and ``state_digest`` the farm state
        record the set was checked against. ``forget``: thumbprints an urgent
        rollover replaced, added to those the store already forgot; after the switch,
        no generation holding a file of one is kept. ``ValueError`` for a
        set that cannot be installed as given (before anything is written);
        :class:`StoreError` if the store cannot be written, in which case the
        installed set is left exactly as it was.
        """
        _require_aware(now, "now")
        ordered = _validate_set(certificates)
        self._prepare_folder()
        with self._locked():
            self._check_layout()
            previous = self._current_generation()
            generation = (previous or 0) + 1
            forgotten = frozenset(forget)
            before: Manifest | None = None
            if previous is not None:
                with contextlib.suppress(StoreError):  # an unreadable one is being replaced
                    before = self._read_manifest(previous)
                    forgotten |= before.forgotten
                    if state_version is None:
                        state_version, state_digest = before.state_version, before.state_digest
            entries = tuple(self._entry(c, before, previous) for c in ordered)
            manifest = Manifest(
                node=self.node_id,
                generation=generation,
                installed_at=now,
                certificates=entries,
                dkm_group=None if dkm_group is None else str(dkm_group),
                state_version=state_version,
                state_digest=state_digest,
                forgotten=forgotten,
            )
            self._write_and_switch(manifest, ordered, previous)
            self._remove_generations(keep={generation, previous})
            self._remove_forgotten(manifest, generation)
        return manifest

    def _entry(
        self, certificate: CertificateFiles | Carried, before: Manifest | None, previous: int | None
    ) -> ManifestEntry:
        """The manifest entry of one certificate of the new generation. A carried one keeps
        the entry (and digests) the installed generation records for it, in its new role."""
        if isinstance(certificate, CertificateFiles):
            return _entry_for(certificate)
        found = [
            e
            for e in (before.certificates if before is not None else ())
            if (e.purpose, e.thumbprint) == (certificate.purpose, certificate.thumbprint)
        ]
        if not found or previous is None:
            raise StoreError(
                f"the installed generation of {self.path} no longer holds {certificate.purpose}"
                f" certificate {certificate.thumbprint}, which the install would carry",
                "sync again: the certificate is then installed from the config DB",
            )
        entry = found[0]
        if entry.sha256 is None:  # a manifest from before digests: record them now
            folder = self._generation_dir(previous)
            digests = {
                kind: hashlib.sha256(_read_checked(folder / rel, None)).hexdigest()
                for kind, rel in entry.files.items()
            }
            entry = dataclasses.replace(entry, sha256=digests)
        return dataclasses.replace(entry, role=certificate.role)

    def _write_and_switch(
        self,
        manifest: Manifest,
        certificates: Sequence[CertificateFiles | Carried],
        previous: int | None,
    ) -> None:
        generations = self.path / GENERATIONS_NAME
        final = self._generation_dir(manifest.generation)
        staging: Path | None = None
        link: Path | None = None
        switched = False
        try:
            _remove_leftovers(self.path, generations, stale=final)
            staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=generations))
            os.chmod(staging, self._modes.folder)
            self._modes.own(staging)
            carried_from = None if previous is None else self._generation_dir(previous)
            _write_generation(staging, manifest, certificates, self._modes, carried_from)
            os.rename(staging, final)
            staging = None
            _fsync_folder(generations)
            self._ensure_fixed_links()
            link = self.path / f"{_LINK_PREFIX}{os.urandom(6).hex()}"
            os.symlink(f"{GENERATIONS_NAME}/{manifest.generation}", link)
            os.replace(link, self.path / CURRENT_NAME)
            switched = True
        except OSError as exc:
            outcome = (
                "the installed certificates were left as they were"
                if previous is not None
                else "nothing was installed"
            )
            raise StoreError(
                f"cannot write the new certificate set into {self.path}: {_describe(exc)}",
                f"{_hint(exc)}; {outcome}",
            ) from exc
        finally:
            if not switched:
                for partial in (staging, final):
                    if partial is not None:
                        shutil.rmtree(partial, ignore_errors=True)
                if link is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(link)
        # The switch is visible; making it durable is best effort, as losing it
        # in a crash brings back the previous, complete set.
        with contextlib.suppress(OSError):
            _fsync_folder(self.path)

    def _prepare_folder(self) -> None:
        """Create the store (0700, or 0750 with a store group) or tighten it; refuse a folder
        that is not a store, or one that someone else could change (see :meth:`_check_tree`)."""
        try:
            try:
                status = os.lstat(self.path)
            except FileNotFoundError:
                _make_folders(self.path, self._modes)
                status = os.lstat(self.path)
            if stat.S_ISLNK(status.st_mode):
                raise StoreError(
                    f"the store {self.path} is a symbolic link",
                    "point node.store at the real folder; farmkeys does not follow a link there",
                )
            if not stat.S_ISDIR(status.st_mode):
                raise StoreError(
                    f"the store {self.path} is not a folder",
                    "point node.store at a folder of its own",
                )
            self._check_tree()
            if stat.S_IMODE(status.st_mode) != self._modes.folder:
                os.chmod(self.path, self._modes.folder, follow_symlinks=False)
            self._modes.own(self.path)
            with os.scandir(self.path) as entries:
                names = {entry.name for entry in entries}
            if names and not self._has_layout(names):
                raise StoreError(
                    f"the store folder {self.path} holds other files and no farmkeys store",
                    "point node.store at an empty or new folder; farmkeys will not clobber it",
                )
            generations = self.path / GENERATIONS_NAME
            try:
                os.mkdir(generations, FOLDER_MODE)
            except FileExistsError:
                pass
            else:
                os.chmod(generations, self._modes.folder)
                self._modes.own(generations)
        except OSError as exc:
            raise StoreError(
                f"cannot prepare the store folder {self.path}: {_describe(exc)}",
                f"{_hint(exc)}; the installed certificates were left as they were",
            ) from exc

    def _check_tree(self) -> None:
        """Refuse a store that anyone but this account could change, before anything in it
        is read for an install, written or deleted: the store folder, ``.generations`` and
        every folder below must be real folders (not symbolic links), owned by this
        process's user, and not writable by group or others. Walked through directory
        descriptors opened with ``O_NOFOLLOW``, so a link swapped in is never followed.
        Once these hold, only this account (or root) can change what is in the store.
        """
        root = _open_folder(self.path, None, self.path, top=True)
        try:
            _check_folder(root, self.path)
            try:
                generations = _open_folder(GENERATIONS_NAME, root, self.path / GENERATIONS_NAME)
            except FileNotFoundError:
                return
            try:
                _check_folder(generations, self.path / GENERATIONS_NAME)
                for _, folders, _, fd in os.fwalk(dir_fd=generations, follow_symlinks=False):
                    for name in folders:
                        _check_folder(_stat_at(fd, name), self.path / GENERATIONS_NAME / name)
            finally:
                os.close(generations)
        finally:
            os.close(root)

    def _has_layout(self, names: set[str]) -> bool:
        if CURRENT_NAME in names and (self.path / CURRENT_NAME).is_symlink():
            return True
        generations = self.path / GENERATIONS_NAME
        return GENERATIONS_NAME in names and generations.is_dir() and not generations.is_symlink()

    def _check_layout(self) -> None:
        """Refuse to replace anything in the store that is not one of our links."""
        for name in (CURRENT_NAME, *FIXED_LINKS):
            path = self.path / name
            if os.path.lexists(path) and not path.is_symlink():
                raise StoreError(
                    f"{path} in the store is not a link, as farmkeys made it",
                    "move it out of the store folder, then sync again",
                )

    def _ensure_fixed_links(self) -> None:
        for name, target in FIXED_LINKS.items():
            path = self.path / name
            with contextlib.suppress(FileNotFoundError):
                if os.readlink(path) == target:
                    continue
            temporary = self.path / f"{_LINK_PREFIX}{os.urandom(6).hex()}"
            os.symlink(target, temporary)
            try:
                os.replace(temporary, path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise

    def _remove_generations(self, keep: set[int | None]) -> None:
        """Best effort: delete every generation but ``keep`` (the switch has happened)."""
        names = {str(generation) for generation in keep if generation is not None}
        try:
            fd = _open_folder(GENERATIONS_NAME, None, self.path / GENERATIONS_NAME, base=self.path)
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

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.path / LOCK_NAME
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            descriptor = os.open(lock, flags, PRIVATE_FILE_MODE)
        except OSError as exc:
            raise StoreError(
                f"cannot open the store lock {lock}: {_describe(exc)}",
                f"{_hint(exc)}; the installed certificates were left as they were",
            ) from exc
        try:
            self._acquire(descriptor, lock)
            yield
        finally:
            os.close(descriptor)  # releases the lock

    def _acquire(self, descriptor: int, lock: Path) -> None:
        deadline = time.monotonic() + self.lock_timeout_seconds
        delay = 0.01
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            except OSError as exc:
                raise StoreError(
                    f"cannot lock the store {lock}: {_describe(exc)}",
                    "check that the store's file system supports flock()",
                ) from exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StoreError(
                    f"another install into {self.path} still held {lock} after "
                    f"{self.lock_timeout_seconds:g} s",
                    f"find the process holding it (fuser {lock}), let it finish, then sync again",
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.25)

    # -- paths and generations ------------------------------------------------

    def _generation_dir(self, generation: int) -> Path:
        return self.path / GENERATIONS_NAME / str(generation)

    def _current_generation(self) -> int | None:
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
                f"cannot read the installed certificate set in {self.path}: {_describe(exc)}",
                _hint(exc),
            ) from exc
        prefix = f"{GENERATIONS_NAME}/"
        name = target[len(prefix) :] if target.startswith(prefix) else ""
        if not _GENERATION.fullmatch(name):
            raise StoreError(
                f"{link} points at {target!r}, not at a generation of the store",
                _SYNC_AGAIN,
            )
        return int(name)

    def _read_manifest(self, generation: int) -> Manifest:
        path = self._generation_dir(generation) / MANIFEST_NAME
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            with os.fdopen(descriptor, "rb") as file:
                raw = file.read(MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            raise StoreError(
                f"cannot read the manifest of the store {self.path}: {_describe(exc)}",
                _hint(exc) if exc.errno in (errno.EACCES, errno.EPERM) else _SYNC_AGAIN,
            ) from exc
        where = f"the manifest of the store {self.path}"
        manifest = Manifest.from_bytes(raw, where=where)
        if manifest.generation != generation:
            raise StoreError(
                f"{where} is malformed: says generation {manifest.generation} in generation"
                f" {generation}",
                _SYNC_AGAIN,
            )
        return manifest


# -- writing a generation -----------------------------------------------------


def _write_generation(
    folder: Path,
    manifest: Manifest,
    certificates: Sequence[CertificateFiles | Carried],
    modes: _Modes | None = None,
    carried_from: Path | None = None,
) -> None:
    modes = modes or _Modes.for_group(None)
    for purpose in PURPOSES:
        os.mkdir(folder / purpose, FOLDER_MODE)
        os.chmod(folder / purpose, modes.folder)
        modes.own(folder / purpose)
    entries = {(e.purpose, e.thumbprint): e for e in manifest.certificates}
    for certificate in certificates:
        base = folder / certificate.purpose
        if isinstance(certificate, Carried):
            assert carried_from is not None  # Store._entry refused a carry without one
            entry = entries[(certificate.purpose, certificate.thumbprint)]
            _carry(carried_from, folder, entry, modes)
        else:
            contents = {
                ".pem": (certificate.certificate_pem, PUBLIC_FILE_MODE),
                ".key": (certificate.private_key_pem, modes.private),
                ".p12": (certificate.pkcs12, modes.private),
            }
            for suffix, (data, mode) in contents.items():
                _write_file(base / f"{certificate.thumbprint}{suffix}", data, mode, gid=modes.gid)
        if certificate.role in ALIASED_ROLES:
            for suffix in FILE_SUFFIXES.values():
                os.link(
                    base / f"{certificate.thumbprint}{suffix}",
                    base / f"{certificate.role}{suffix}",
                )
    _write_file(folder / MANIFEST_NAME, manifest.to_json().encode("utf-8"), PUBLIC_FILE_MODE)
    for purpose in PURPOSES:
        _fsync_folder(folder / purpose)
    _fsync_folder(folder)


def _carry(source: Path, folder: Path, entry: ManifestEntry, modes: _Modes) -> None:
    """Hard-link one certificate's files from the generation ``source`` into ``folder``,
    check that each holds the bytes ``entry`` records (a file changed in place since the
    sync inspected it is refused, never carried), and give it the mode and group a
    written one would have (``node.store_group`` may have changed)."""
    for kind, rel in entry.files.items():
        os.link(source / rel, folder / rel, follow_symlinks=False)
        if not _holds(folder / rel, (entry.sha256 or {}).get(kind)):
            raise StoreError(
                f"{source / rel} changed since it was installed; it was not carried into the"
                " new generation",
                "sync again: the certificate is then installed from the config DB",
            )
        descriptor = os.open(folder / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if modes.gid is not None:
                os.fchown(descriptor, -1, modes.gid)
            os.fchmod(descriptor, PUBLIC_FILE_MODE if kind == "cert" else modes.private)
        finally:
            os.close(descriptor)


def _write_file(path: Path, data: bytes, mode: int, *, gid: int | None = None) -> None:
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


def _fsync_folder(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _make_folders(path: Path, modes: _Modes) -> None:
    """Create ``path`` and its missing parents, each 0700 (the store itself: its mode)."""
    missing: list[Path] = []
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, FOLDER_MODE)
        except FileExistsError:
            continue
        os.chmod(folder, FOLDER_MODE)
    if missing:
        os.chmod(missing[0], modes.folder)
        modes.own(missing[0])


@dataclass(frozen=True)
class _Modes:
    """The modes and group of what an install writes: 0700 folders and 0600 keys, or with
    node.store_group, 0750 and 0640 owned by that group."""

    folder: int
    private: int
    gid: int | None

    @classmethod
    def for_group(cls, group: str | None) -> _Modes:
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


def _open_folder(
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
            parent = _open_folder(base, None, base, top=True)
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


def _stat_at(dir_fd: int, name: str) -> os.stat_result:
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def _check_folder(folder: int | os.stat_result, shown: Path) -> None:
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


def _remove_leftovers(store: Path, generations: Path, *, stale: Path) -> None:
    """Remove what crashed installs left behind; called holding the lock, before the switch."""
    with os.scandir(store) as entries:
        for entry in entries:
            if entry.name.startswith(_LINK_PREFIX) and entry.is_symlink():
                os.unlink(entry.path)
    with os.scandir(generations) as entries:
        for entry in entries:
            if entry.name.startswith(_STAGING_PREFIX) and not entry.is_symlink():
                shutil.rmtree(entry.path)
    # The generation about to be written, if a crash left it between rename and switch.
    if os.path.lexists(stale):
        shutil.rmtree(stale)


def _is_regular_file(path: str | Path) -> bool:
    """Whether ``path`` is a regular file itself (not a link to one)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _entry_for(certificate: CertificateFiles) -> ManifestEntry:
    contents = {
        "cert": certificate.certificate_pem,
        "key": certificate.private_key_pem,
        "pkcs12": certificate.pkcs12,
    }
    return ManifestEntry(
        purpose=certificate.purpose,
        role=certificate.role,
        thumbprint=certificate.thumbprint,
        not_after=certificate.not_after,
        files=_files_of(certificate.purpose, certificate.thumbprint),
        sha256={kind: hashlib.sha256(data).hexdigest() for kind, data in contents.items()},
    )


def _same_file(path: str | Path, alias: str | Path) -> bool:
    """Whether ``alias`` is a hard link to ``path`` (both regular files, never symlinks)."""
    try:
        one, two = os.lstat(path), os.lstat(alias)
    except OSError:
        return False
    return stat.S_ISREG(one.st_mode) and (one.st_dev, one.st_ino) == (two.st_dev, two.st_ino)


def _holds(path: str | Path, digest: str | None) -> bool:
    """Whether ``path`` is a regular file itself (not a link) whose SHA-256 is ``digest``
    (any content when ``digest`` is None, as in a manifest from before digests)."""
    if not _is_regular_file(path):
        return False
    if digest is None:
        return True
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        with os.fdopen(descriptor, "rb") as file:
            return hashlib.sha256(file.read()).hexdigest() == digest
    except OSError:
        return False


def _read_checked(path: Path, digest: str | None) -> bytes:
    """A regular file's bytes (never through a link), refused unless its SHA-256 is
    ``digest`` (when the manifest recorded one). FileNotFoundError passes through."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        with os.fdopen(descriptor, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {_describe(exc)}", _hint(exc)) from exc
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise StoreError(f"{path} is not the file its manifest records", _SYNC_AGAIN)
    return data


def _files_of(purpose: str, thumbprint: str) -> dict[str, str]:
    return {kind: f"{purpose}/{thumbprint}{suffix}" for kind, suffix in FILE_SUFFIXES.items()}


# -- validation ---------------------------------------------------------------


def _check_names(purpose: object, role: object, thumbprint: object) -> None:
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}")
    if role not in LIVE_ROLES:
        raise ValueError(f"role must be one of {', '.join(LIVE_ROLES)}, not {role!r}")
    if not isinstance(thumbprint, str) or not _THUMBPRINT.fullmatch(thumbprint):
        raise ValueError(f"thumbprint must be 40 upper-case hex digits, not {thumbprint!r}")


def _require_aware(value: object, name: str) -> None:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime")


def _check_set(identities: Iterable[tuple[str, str, str]]) -> None:
    """At most one primary and one secondary per purpose; no certificate twice per purpose."""
    thumbprints: set[tuple[str, str]] = set()
    roles: set[tuple[str, str]] = set()
    for purpose, role, thumbprint in identities:
        if (purpose, thumbprint) in thumbprints:
            raise ValueError(f"{purpose} certificate {thumbprint} is listed twice")
        thumbprints.add((purpose, thumbprint))
        if role in ALIASED_ROLES:
            if (purpose, role) in roles:
                raise ValueError(f"more than one {role} {purpose} certificate")
            roles.add((purpose, role))


def _validate_set(
    certificates: Sequence[CertificateFiles | Carried],
) -> list[CertificateFiles | Carried]:
    for certificate in certificates:
        if not isinstance(certificate, CertificateFiles | Carried):
            raise TypeError(
                f"expected CertificateFiles or Carried, not {type(certificate).__name__}"
            )
    _check_set((c.purpose, c.role, c.thumbprint) for c in certificates)
    return sorted(
        certificates,
        key=lambda c: (PURPOSES.index(c.purpose), LIVE_ROLES.index(c.role), c.thumbprint),
    )


def _parse_manifest(document: object) -> Manifest:
    """The manifest in ``document`` (parsed JSON); ``ValueError`` says what is wrong."""
    top = _object(
        document,
        "the manifest",
        ("node", "generation", "installed_at", "certificates"),
        optional=("dkm_group", "state_version", "state_digest", "forgotten"),
    )
    state_version, state_digest = top.get("state_version"), top.get("state_digest")
    if state_version is not None and (
        type(state_version) is not int
        or not 1 <= state_version < 1 << 63
        or not isinstance(state_digest, str)
        or not _SHA256_HEX.match(state_digest)
    ):
        raise ValueError("state_version must be a positive integer with a SHA-256 state_digest")
    forgotten = top.get("forgotten", [])
    if not isinstance(forgotten, list) or not all(
        isinstance(t, str) and _THUMBPRINT.fullmatch(t) for t in forgotten
    ):
        raise ValueError("forgotten must be a list of thumbprints")
    dkm_group = top.get("dkm_group")
    if dkm_group is not None:
        try:
            dkm_group = str(uuid.UUID(dkm_group))
        except (TypeError, ValueError, AttributeError):
            raise ValueError("dkm_group must be a GUID") from None
    node = top["node"]
    if not isinstance(node, str) or not node:
        raise ValueError("node must be a non-empty string")
    generation = top["generation"]
    if type(generation) is not int or generation < 1:
        raise ValueError("generation must be a positive integer")
    installed_at = _timestamp(top["installed_at"], "installed_at")
    listed = top["certificates"]
    if not isinstance(listed, list):
        raise ValueError("certificates must be a list")
    entries: list[ManifestEntry] = []
    for index, item in enumerate(listed):
        where = f"certificates[{index}]"
        fields = _object(
            item, where, ("purpose", "role", "thumbprint", "not_after", "files"), ("sha256",)
        )
        sha256 = fields.get("sha256")
        if sha256 is not None and (
            not isinstance(sha256, dict)
            or set(sha256) != set(FILE_SUFFIXES)
            or not all(isinstance(v, str) and _SHA256_HEX.match(v) for v in sha256.values())
        ):
            raise ValueError(f"{where}.sha256 must map cert, key and pkcs12 to SHA-256 digests")
        try:
            _check_names(fields["purpose"], fields["role"], fields["thumbprint"])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        purpose, thumbprint = fields["purpose"], fields["thumbprint"]
        files = fields["files"]
        if files != _files_of(purpose, thumbprint):
            raise ValueError(f"{where}.files must name {purpose}/{thumbprint}.pem, .key and .p12")
        entries.append(
            ManifestEntry(
                purpose=purpose,
                role=fields["role"],
                thumbprint=thumbprint,
                not_after=_timestamp(fields["not_after"], f"{where}.not_after"),
                files=dict(files),
                sha256=None if sha256 is None else dict(sha256),
            )
        )
    _check_set((e.purpose, e.role, e.thumbprint) for e in entries)
    return Manifest(
        node=node,
        generation=generation,
        installed_at=installed_at,
        certificates=tuple(entries),
        dkm_group=dkm_group,
        state_version=state_version,
        state_digest=state_digest if state_version is not None else None,
        forgotten=frozenset(forgotten),
    )


def _object(
    value: object, where: str, keys: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object")
    if not set(keys) <= set(value) <= set(keys) | set(optional):
        also = f" (and may have {', '.join(optional)})" if optional else ""
        raise ValueError(f"{where} must have exactly the keys {', '.join(keys)}{also}")
    return value


def _timestamp(value: object, where: str) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"{where} must be an ISO 8601 string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{where} is not an ISO 8601 timestamp") from None
    if parsed.utcoffset() is None:
        raise ValueError(f"{where} has no time zone")
    return parsed


# -- errors -------------------------------------------------------------------


def _describe(exc: OSError) -> str:
    """``[Errno 13] Permission denied``: the OS error, without file names or data."""
    if exc.errno is None:
        return exc.__class__.__name__
    return f"[Errno {exc.errno}] {exc.strerror or os.strerror(exc.errno)}"


def _reason(exc: ValueError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8"
    return str(exc)


_HINTS = {
    errno.EACCES: "make the store folder writable by the service account",
    errno.EPERM: "make the store folder writable by the service account",
    errno.ENOSPC: "free space on the store's file system",
    errno.EDQUOT: "raise the service account's disk quota on the store's file system",
    errno.EFBIG: "raise the service's file size limit (ulimit -f)",
    errno.EROFS: "mount the store's file system read-write",
    errno.ENOTDIR: "point node.store at a folder",
}


def _hint(exc: OSError) -> str:
    return _HINTS.get(exc.errno or 0, "check the store folder and its file system")
