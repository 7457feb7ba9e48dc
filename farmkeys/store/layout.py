"""Where everything in a store lives: folder and file names, the fixed links, the modes.

The first six lines are the federation service's interface and keep their names::

    <store>/                              0700
      manifest.json -> current/manifest.json
      signing -> current/signing
      decryption -> current/decryption
      signing/<THUMBPRINT>.pem            certificate, PEM (SHA-1 thumbprint, upper-case hex)
      signing/<THUMBPRINT>.key            private key, unencrypted PKCS#8 PEM, 0600
      signing/<THUMBPRINT>.p12            PKCS#12 with both, 0600; no password unless
                                          node.pkcs12_password_file (manifest: pkcs12_password)
      signing/primary.pem|.key|.p12       hard links to the primary's thumbprint files
      signing/secondary.pem|.key|.p12     the same for the secondary, when there is one
      decryption/...                      the same for the decryption certificates
      current -> .generations/<n>         the installed set, switched by one rename
      .generations/<n>/                   0700; manifest.json, signing/, decryption/
      .lock                               flock()ed by an install, serialising installs

With ``node.store_group`` the folders are 0750 and the private files 0640, owned by
that group: the federation service reads the store and never writes it.
"""

from __future__ import annotations

import re
from pathlib import Path

from farmkeys.vocab import PURPOSES

# Manifest "files" key -> file name suffix.
FILE_SUFFIXES = {"cert": ".pem", "key": ".key", "pkcs12": ".p12"}

MANIFEST_NAME = "manifest.json"
CURRENT_NAME = "current"
GENERATIONS_NAME = ".generations"
LOCK_NAME = ".lock"
# The fixed links in the store folder: name -> target.
FIXED_LINKS = {name: f"{CURRENT_NAME}/{name}" for name in (MANIFEST_NAME, *PURPOSES)}
# A generation being written (in .generations), and a link about to replace another.
STAGING_PREFIX = ".new-"
LINK_PREFIX = ".current-"

FOLDER_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
# With node.store_group: the federation service's group reads the store, never writes it.
GROUP_FOLDER_MODE = 0o750
GROUP_PRIVATE_FILE_MODE = 0o640

THUMBPRINT = re.compile(r"[0-9A-F]{40}")
GENERATION = re.compile(r"[1-9][0-9]{0,17}")

# What an operator does about a store that is not as farmkeys made it.
SYNC_AGAIN = "run `farmkeys sync` to install the certificate set again"


def files_of(purpose: str, thumbprint: str) -> dict[str, str]:
    """Where a certificate's files live, relative to a generation (or to the store)."""
    return {kind: f"{purpose}/{thumbprint}{suffix}" for kind, suffix in FILE_SUFFIXES.items()}


def generation_dir(store: Path, generation: int) -> Path:
    """The folder of one generation of ``store``."""
    return store / GENERATIONS_NAME / str(generation)


def generation_target(generation: int) -> str:
    """What ``current`` says when it points at ``generation``."""
    return f"{GENERATIONS_NAME}/{generation}"


def generation_named(target: str) -> int | None:
    """The generation a ``current`` link's ``target`` names; None when it names none."""
    prefix = f"{GENERATIONS_NAME}/"
    name = target[len(prefix) :] if target.startswith(prefix) else ""
    return int(name) if GENERATION.fullmatch(name) else None
