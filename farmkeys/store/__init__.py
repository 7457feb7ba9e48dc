"""The node's local certificate store: the only place decrypted private keys touch disk.

:class:`Store` is the face of this package; what it composes has a module each:

- :mod:`~farmkeys.store.layout`: the folders, files and fixed links of a store (the
  first six lines of its layout are the federation service's interface), and the modes;
- :mod:`~farmkeys.store.manifest`: the manifest each generation holds, parsed and written;
- :mod:`~farmkeys.store.reader`: what is installed, and whether its files are intact;
- :mod:`~farmkeys.store.installer`: a new generation written whole and switched to
  atomically, so the federation service never sees half a rollover;
- :mod:`~farmkeys.store.folder`: the store folder prepared and guarded before an install;
- :mod:`~farmkeys.store.fs`: the file-system primitives (``O_NOFOLLOW`` opens, fsync,
  the install lock, the atomic switch of a link).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from farmkeys.store.folder import check_location, vanished
from farmkeys.store.fs import LOCK_TIMEOUT_SECONDS, Modes
from farmkeys.store.installer import Carried, CertificateFiles, Installer
from farmkeys.store.layout import (
    CURRENT_NAME,
    FILE_SUFFIXES,
    FIXED_LINKS,
    FOLDER_MODE,
    GENERATIONS_NAME,
    GROUP_FOLDER_MODE,
    GROUP_PRIVATE_FILE_MODE,
    LOCK_NAME,
    MANIFEST_NAME,
    PRIVATE_FILE_MODE,
    PUBLIC_FILE_MODE,
)
from farmkeys.store.manifest import MAX_MANIFEST_BYTES, Manifest, ManifestEntry
from farmkeys.store.reader import Installed, Reader

__all__ = [
    "CURRENT_NAME",
    "FILE_SUFFIXES",
    "FIXED_LINKS",
    "FOLDER_MODE",
    "GENERATIONS_NAME",
    "GROUP_FOLDER_MODE",
    "GROUP_PRIVATE_FILE_MODE",
    "LOCK_NAME",
    "LOCK_TIMEOUT_SECONDS",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "PRIVATE_FILE_MODE",
    "PUBLIC_FILE_MODE",
    "Carried",
    "CertificateFiles",
    "Installed",
    "Manifest",
    "ManifestEntry",
    "Store",
]


class Store:
    """The certificate store folder of this node (:mod:`farmkeys.store.layout`): a reader
    of what is installed and an installer of new generations, over one folder."""

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
        self._reader = Reader(self.path)
        self._installer = Installer(
            self._reader,
            node_id=node_id,
            lock_timeout_seconds=lock_timeout_seconds,
            modes=Modes.for_group(group),
        )

    # -- reading --------------------------------------------------------------

    def check_location(self) -> None:
        """Refuse a store below a folder that another account could change (every folder
        above it, up to ``/``: :func:`farmkeys.file_trust.check_folders_above`); the store
        folder itself is checked before each install. :class:`UnsafePathError`."""
        check_location(self.path)

    def vanished(
        self,
        installed: Installed | None,
        recorded: int | None,
        remembered: Iterable[str] = (),
    ) -> str | None:
        """Why this store seems to have vanished (missing, empty, unreadable) or been put
        back (older than ``recorded``, the generation this node last reported installing,
        or without revocations it reported remembering, ``remembered``), though this node
        installed into it before; None when it has not. ``installed``: :meth:`inspect`.
        For a warning only: ``recorded`` and ``remembered`` come from the config DB."""
        if installed is None:
            return vanished(self.path, None, recorded)
        manifest = installed.manifest
        forgot = len(set(remembered) - manifest.forgotten)
        return vanished(self.path, manifest.generation, recorded, forgot=forgot)

    def manifest(self) -> Manifest | None:
        """What is installed now; ``None`` if nothing yet. :class:`StoreError` if unreadable."""
        return self._reader.manifest()

    def public_certificates(self) -> tuple[Manifest, dict[str, bytes]] | None:
        """The installed set's manifest and its certificates (PEM, no key) by thumbprint, all
        read from one generation and each checked against the manifest's digest; None when
        nothing is installed. What publishing reads: no private key is opened."""
        return self._reader.public_certificates()

    def certificates_and_signing_key(self) -> tuple[Manifest, dict[str, bytes], bytes] | None:
        """:meth:`public_certificates` and, read from the same generation and checked against
        its manifest's digest the same way, the signing primary's private key (PKCS#8 PEM):
        what signs the metadata ([publish] sign_metadata). None when nothing is installed;
        :class:`StoreError` when the set has no signing primary or a file is not as
        installed (see :meth:`Reader.certificates_and_signing_key`)."""
        return self._reader.certificates_and_signing_key()

    def pkcs12_files(self) -> tuple[Manifest, dict[str, bytes]] | None:
        """The installed set's manifest and its .p12 files by thumbprint, read as
        :meth:`public_certificates` reads the certificates; None when nothing is installed.
        For a look at their protection: the store opens none of them."""
        return self._reader.files_of_kind("pkcs12")

    def inspect(self) -> Installed | None:
        """The installed generation and which of its certificates are intact; None when
        nothing is installed or the store cannot be read (see :meth:`Reader.inspect`)."""
        return self._reader.inspect()

    def verify_installed(self) -> Installed | None:
        """The installed generation as :meth:`inspect` finds it, for a health check: None
        only when nothing is installed, :class:`StoreError` when the store cannot be read.
        Cheap enough to run per request (see :meth:`Reader.verify_installed`)."""
        return self._reader.verify_installed()

    def matches(self, wanted: frozenset[tuple[str, str, str]]) -> bool:
        """Whether the installed set is exactly ``wanted`` and all of its files are in place
        (``wanted`` is ``{(purpose, role, thumbprint)}``, as :meth:`Manifest.identity`)."""
        installed = self.inspect()
        return installed is not None and installed.matches(wanted)

    # -- installing -----------------------------------------------------------

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
        """Install ``certificates`` as the new generation and switch to it atomically
        (:mod:`farmkeys.store.installer`).

        A :class:`Carried` certificate is taken from the installed generation by hard
        links, checked against the digests its manifest records, in its new role:
        only what changed is written.

        ``now`` becomes the manifest's ``installed_at``; ``dkm_group`` the farm the
        store is pinned to; ``state_version`` and ``state_digest`` the farm state
        record the set was checked against. ``forget``: thumbprints an urgent
        rollover replaced, added to those the store already forgot; after the switch,
        no generation holding a file of one is kept. ``pkcs12_password``: None when
        the .p12 files given have no password, else the marker of the password file
        they were encrypted under (:mod:`farmkeys.pkcs12_password`); the store never
        sees the password, and a :class:`Carried` certificate is refused unless the
        installed generation's .p12 files have the same protection. ``ValueError`` for a
        set that cannot be installed as given (before anything is written);
        :class:`StoreError` if the store cannot be written, in which case the
        installed set is left exactly as it was.
        """
        return self._installer.install(
            certificates,
            now=now,
            dkm_group=dkm_group,
            state_version=state_version,
            state_digest=state_digest,
            forget=forget,
            pkcs12_password=pkcs12_password,
        )

    def pin(self, dkm_group: uuid.UUID) -> None:
        """Record ``dkm_group`` in the installed manifest when it names no farm yet (a store
        installed before farms were pinned); the set installed does not change."""
        self._installer.pin(dkm_group)

    def note_state(self, *, version: int, digest: str, forget: Iterable[str] = ()) -> Manifest:
        """Record a newer farm state record for the set installed now (its live set is the
        same: no new generation), and forget ``forget`` (see :meth:`install`)."""
        return self._installer.note_state(version=version, digest=digest, forget=forget)

    def note_pkcs12_password(self, marker: str) -> Manifest:
        """Record that the installed .p12 files (which have a password) are encrypted under
        the password file whose marker is ``marker`` now: its file changed, not its
        password (the caller opened one with it). No new generation."""
        return self._installer.note_pkcs12_password(marker)
