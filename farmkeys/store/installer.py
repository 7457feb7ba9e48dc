"""Installing a certificate set: a complete new generation, switched to atomically.

The federation service reads the store; it must never see half a rollover. Every
install therefore writes a complete new *generation* and switches to it with one
atomic rename of a symlink. An install, holding ``.lock``:

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from farmkeys.errors import StoreError
from farmkeys.store.folder import (
    check_layout,
    ensure_fixed_links,
    generation_numbers,
    prepare_folder,
    remove_generations,
    remove_leftovers,
)
from farmkeys.store.fs import (
    Modes,
    describe,
    fsync_folder,
    hint,
    holds,
    locked,
    read_checked,
    replace_with_link,
    write_file,
)
from farmkeys.store.layout import (
    CURRENT_NAME,
    FILE_SUFFIXES,
    FOLDER_MODE,
    GENERATIONS_NAME,
    LOCK_NAME,
    MANIFEST_NAME,
    PUBLIC_FILE_MODE,
    STAGING_PREFIX,
    SYNC_AGAIN,
    files_of,
    generation_dir,
    generation_target,
)
from farmkeys.store.manifest import (
    Manifest,
    ManifestEntry,
    check_names,
    check_set,
    digests,
    require_aware,
)
from farmkeys.store.reader import Reader
from farmkeys.vocab import ALIASED_ROLES, LIVE_ROLES, PURPOSES

_PKCS8_PEM_HEADER = b"-----BEGIN PRIVATE KEY-----"


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
        check_names(self.purpose, self.role, self.thumbprint)
        require_aware(self.not_after, f"not_after of certificate {self.thumbprint}")
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
        check_names(self.purpose, self.role, self.thumbprint)


class Installer:
    """Writes the store that ``reader`` reads: installs, and notes on the installed set.
    Each change holds the store's lock."""

    def __init__(
        self, reader: Reader, *, node_id: str, lock_timeout_seconds: float, modes: Modes
    ) -> None:
        self._reader = reader
        self.path = reader.path
        self.node_id = node_id
        self.lock_timeout_seconds = lock_timeout_seconds
        self._modes = modes

    def install(
        self,
        certificates: Sequence[CertificateFiles | Carried],
        *,
        now: datetime,
        dkm_group: uuid.UUID | None = None,
        state_version: int | None = None,
        state_digest: str | None = None,
        forget: Iterable[str] = (),
        pkcs12_password: str | None = None,
    ) -> Manifest:
        """:meth:`farmkeys.store.Store.install`, which says what each argument means."""
        require_aware(now, "now")
        ordered = validate_set(certificates)
        prepare_folder(self.path, self._modes)
        with self._locked():
            check_layout(self.path)
            previous = self._reader.current_generation()
            generation = (previous or 0) + 1
            forgotten = frozenset(forget)
            before: Manifest | None = None
            if previous is not None:
                with contextlib.suppress(StoreError):  # an unreadable one is being replaced
                    before = self._reader.read_manifest(previous)
                    forgotten |= before.forgotten
                    if state_version is None:
                        state_version, state_digest = before.state_version, before.state_digest
            if any(isinstance(c, Carried) for c in ordered) and (
                before is not None and before.pkcs12_password != pkcs12_password
            ):
                raise ValueError(
                    "cannot carry .p12 files into a generation whose .p12 files have another"
                    " protection: give every certificate as CertificateFiles"
                )
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
                pkcs12_password=pkcs12_password,
            )
            self._write_and_switch(manifest, ordered, previous)
            remove_generations(self.path, keep={generation, previous})
            self._remove_forgotten(manifest, generation)
        return manifest

    def pin(self, dkm_group: uuid.UUID) -> None:
        """:meth:`farmkeys.store.Store.pin`."""
        with self._locked():
            generation = self._reader.current_generation()
            if generation is None:
                return
            manifest = self._reader.read_manifest(generation)
            if manifest.dkm_group is not None:
                return
            pinned = dataclasses.replace(manifest, dkm_group=str(dkm_group))
            self._rewrite_manifest(generation, pinned, "pin the store to its farm")

    def note_state(self, *, version: int, digest: str, forget: Iterable[str] = ()) -> Manifest:
        """:meth:`farmkeys.store.Store.note_state`."""
        with self._locked():
            generation = self._reader.current_generation()
            if generation is None:
                raise StoreError(f"the store {self.path} holds no certificate set", SYNC_AGAIN)
            manifest = self._reader.read_manifest(generation)
            noted = dataclasses.replace(
                manifest,
                state_version=max(version, manifest.state_version or 0),
                state_digest=digest,
                forgotten=manifest.forgotten | frozenset(forget),
            )
            self._rewrite_manifest(generation, noted, "record the farm state")
            self._remove_forgotten(noted, generation)
        return noted

    def note_pkcs12_password(self, marker: str) -> Manifest:
        """:meth:`farmkeys.store.Store.note_pkcs12_password`."""
        with self._locked():
            generation = self._reader.current_generation()
            if generation is None:
                raise StoreError(f"the store {self.path} holds no certificate set", SYNC_AGAIN)
            manifest = self._reader.read_manifest(generation)
            if manifest.pkcs12_password is None:
                raise ValueError("the installed .p12 files have no password to note")
            noted = dataclasses.replace(manifest, pkcs12_password=marker)
            self._rewrite_manifest(generation, noted, "record the .p12 password file")
        return noted

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return locked(
            self.path / LOCK_NAME, store=self.path, timeout_seconds=self.lock_timeout_seconds
        )

    def _rewrite_manifest(self, generation: int, manifest: Manifest, doing: str) -> None:
        """Replace one generation's manifest atomically (the lock is held)."""
        folder = generation_dir(self.path, generation)
        staged = folder / f".{MANIFEST_NAME}.{os.urandom(6).hex()}"
        try:
            write_file(staged, manifest.to_json().encode("utf-8"), PUBLIC_FILE_MODE)
            os.replace(staged, folder / MANIFEST_NAME)
            fsync_folder(folder)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(staged)
            raise StoreError(f"cannot {doing} in {self.path}: {describe(exc)}", hint(exc)) from exc

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
        for other in generation_numbers(self.path):
            if other == generation:
                continue
            try:
                held = {e.thumbprint for e in self._reader.read_manifest(other).certificates}
            except StoreError:
                held = set(manifest.forgotten)  # unreadable: cannot tell, so it goes
            if not held & manifest.forgotten:
                keep.add(other)
        remove_generations(self.path, keep=keep)

    def _entry(
        self, certificate: CertificateFiles | Carried, before: Manifest | None, previous: int | None
    ) -> ManifestEntry:
        """The manifest entry of one certificate of the new generation. A carried one keeps
        the entry (and digests) the installed generation records for it, in its new role."""
        if isinstance(certificate, CertificateFiles):
            return entry_for(certificate)
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
            folder = generation_dir(self.path, previous)
            recorded = {
                kind: hashlib.sha256(read_checked(folder / rel, None)).hexdigest()
                for kind, rel in entry.files.items()
            }
            entry = dataclasses.replace(entry, sha256=recorded)
        return dataclasses.replace(entry, role=certificate.role)

    def _write_and_switch(
        self,
        manifest: Manifest,
        certificates: Sequence[CertificateFiles | Carried],
        previous: int | None,
    ) -> None:
        generations = self.path / GENERATIONS_NAME
        final = generation_dir(self.path, manifest.generation)
        staging: Path | None = None
        switched = False
        try:
            remove_leftovers(self.path, generations, stale=final)
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=generations))
            os.chmod(staging, self._modes.folder)
            self._modes.own(staging)
            carried_from = None if previous is None else generation_dir(self.path, previous)
            write_generation(staging, manifest, certificates, self._modes, carried_from)
            os.rename(staging, final)
            staging = None
            fsync_folder(generations)
            ensure_fixed_links(self.path)
            replace_with_link(self.path, CURRENT_NAME, generation_target(manifest.generation))
            switched = True
        except OSError as exc:
            outcome = (
                "the installed certificates were left as they were"
                if previous is not None
                else "nothing was installed"
            )
            raise StoreError(
                f"cannot write the new certificate set into {self.path}: {describe(exc)}",
                f"{hint(exc)}; {outcome}",
            ) from exc
        finally:
            if not switched:
                for partial in (staging, final):
                    if partial is not None:
                        shutil.rmtree(partial, ignore_errors=True)
        # The switch is visible; making it durable is best effort, as losing it
        # in a crash brings back the previous, complete set.
        with contextlib.suppress(OSError):
            fsync_folder(self.path)


# -- writing a generation -----------------------------------------------------


def write_generation(
    folder: Path,
    manifest: Manifest,
    certificates: Sequence[CertificateFiles | Carried],
    modes: Modes | None = None,
    carried_from: Path | None = None,
) -> None:
    """Write the files of ``certificates`` and ``manifest`` into the new generation's
    ``folder``, carrying each :class:`Carried` one from ``carried_from``; fsync it all."""
    modes = modes or Modes.for_group(None)
    for purpose in PURPOSES:
        os.mkdir(folder / purpose, FOLDER_MODE)
        os.chmod(folder / purpose, modes.folder)
        modes.own(folder / purpose)
    entries = {(e.purpose, e.thumbprint): e for e in manifest.certificates}
    for certificate in certificates:
        base = folder / certificate.purpose
        if isinstance(certificate, Carried):
            assert carried_from is not None  # Installer._entry refused a carry without one
            entry = entries[(certificate.purpose, certificate.thumbprint)]
            _carry(carried_from, folder, entry, modes)
        else:
            contents = {
                ".pem": (certificate.certificate_pem, PUBLIC_FILE_MODE),
                ".key": (certificate.private_key_pem, modes.private),
                ".p12": (certificate.pkcs12, modes.private),
            }
            for suffix, (data, mode) in contents.items():
                write_file(base / f"{certificate.thumbprint}{suffix}", data, mode, gid=modes.gid)
        if certificate.role in ALIASED_ROLES:
            for suffix in FILE_SUFFIXES.values():
                os.link(
                    base / f"{certificate.thumbprint}{suffix}",
                    base / f"{certificate.role}{suffix}",
                )
    write_file(folder / MANIFEST_NAME, manifest.to_json().encode("utf-8"), PUBLIC_FILE_MODE)
    for purpose in PURPOSES:
        fsync_folder(folder / purpose)
    fsync_folder(folder)


def _carry(source: Path, folder: Path, entry: ManifestEntry, modes: Modes) -> None:
    """Hard-link one certificate's files from the generation ``source`` into ``folder``,
    check that each holds the bytes ``entry`` records (a file changed in place since the
    sync inspected it is refused, never carried), and give it the mode and group a
    written one would have (``node.store_group`` may have changed)."""
    for kind, rel in entry.files.items():
        os.link(source / rel, folder / rel, follow_symlinks=False)
        if not holds(folder / rel, (entry.sha256 or {}).get(kind)):
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


# -- the set to install -------------------------------------------------------


def validate_set(
    certificates: Sequence[CertificateFiles | Carried],
) -> list[CertificateFiles | Carried]:
    """The set in install order; ``TypeError`` or ``ValueError`` for one not installable."""
    for certificate in certificates:
        if not isinstance(certificate, CertificateFiles | Carried):
            raise TypeError(
                f"expected CertificateFiles or Carried, not {type(certificate).__name__}"
            )
    check_set((c.purpose, c.role, c.thumbprint) for c in certificates)
    return sorted(
        certificates,
        key=lambda c: (PURPOSES.index(c.purpose), LIVE_ROLES.index(c.role), c.thumbprint),
    )


def entry_for(certificate: CertificateFiles) -> ManifestEntry:
    """The manifest entry of a certificate written afresh, with its files' digests."""
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
        files=files_of(certificate.purpose, certificate.thumbprint),
        sha256=digests(contents),
    )
