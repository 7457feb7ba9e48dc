"""The one error hierarchy of farmkeys.

Every error farmkeys raises on purpose derives from :class:`Error`. Each
carries two sentences for the operator, kept apart from any traceback:
``what`` (what is wrong) and ``todo`` (what to do about it). The CLI prints
``farmkeys: error: <what> — <todo>`` and exits non-zero; ``--debug`` adds
the traceback.

Neither sentence may ever contain key material or a password: errors name
certificates, master keys and endpoints by their ids, never by content.

    Error
    ├── ConfigError              the configuration is missing, malformed or invalid
    │   └── UnsafePathError      a file farmkeys trusts, or a folder above it, could be
    │                            changed by another account (farmkeys.file_trust)
    ├── UnreachableError         a server is out of reach (a mixin of the two below): the
    │                            installed set is kept; `sync` exits 75, `serve` waits it out
    ├── DatabaseError            the config DB cannot be reached, refused the login, or failed
    │   ├── NotInitialisedError  the config DB holds no farm yet
    │   └── DatabaseUnreachableError  it cannot be reached, or the connection was lost
    ├── FarmConflictError        the config DB holds a different farm than the config describes
    ├── LeaseLostError           this process no longer holds the leader lease it wrote under
    ├── LeaderTimeoutError       the leader did not answer a rollover request in time
    ├── DirectoryError           the directory cannot be reached or refused an operation
    │   ├── DirectoryUnreachableError  no server of it can be reached, or the connection was lost
    │   ├── DirectoryAuthError   the bind credentials were rejected (never retried)
    │   └── MasterKeyMissingError  a master key a blob names is not in the directory
    ├── InvalidBlobError         a blob is not authentic (tampered, truncated, wrong row, wrong key)
    │   └── AdfsBlobError        an AD FS EncryptedPfx is malformed, unknown, or badly padded
    │       └── AdfsKeyMismatchError  its MAC does not verify under the DKM key given
    ├── FarmStateError           the config DB's farm state record is missing, malformed,
    │                            not authentic, older than a node installed, or not the live set
    ├── RequestRefusedError      an operator request is not authentic, stale, already answered,
    │   │                        or its rows changed since the operator reviewed them
    │   └── RevertRefusedError   `rollover --revert` refused: no promotion to undo, the retired
    │                            certificate expired, archived or revoked, or a secondary exists
    ├── CertificateError         a certificate or key does not match what its row says
    ├── StoreError               the node's local store cannot be read or written
    ├── EscrowError              an escrow file or its passphrase is unusable, or names another farm
    ├── ImportRefusedError       `import adfs` refused: exposed key file, no key, certificate known
    ├── PublishError             the keys cannot be published: nothing installed, no JWK, no signing
    └── NodeInUseError           `nodes remove` refused: the node was heard from within the ttl
"""

from __future__ import annotations


class Error(Exception):
    """Base of every error farmkeys raises on purpose."""

    def __init__(self, what: str, todo: str) -> None:
        super().__init__(what, todo)
        self.what = what
        self.todo = todo

    def diagnostics(self) -> str:
        """The one line for the operator: what is wrong, then what to do."""
        return f"{self.what} — {self.todo}"

    def __str__(self) -> str:
        return self.diagnostics()


class ConfigError(Error):
    """The configuration file or an environment override is missing, malformed or invalid."""


class UnreachableError(Error):
    """A server (the config DB or the directory) is out of reach: not a refusal, an outage.

    Raised only as :class:`DatabaseUnreachableError` or :class:`DirectoryUnreachableError`.
    Nothing was decided: a sync keeps the installed set, serve tries again with backoff.
    """


class UnsafePathError(ConfigError):
    """A file farmkeys acts on (the config file, a password or passphrase file, the CA file,
    the hook program) or a folder above it or above the store could be changed by an
    account other than root and the one farmkeys runs as. Names the path and the fix."""


class DatabaseError(Error):
    """The config DB cannot be reached, refused the login, or a statement failed."""


class DatabaseUnreachableError(DatabaseError, UnreachableError):
    """The config DB cannot be reached within the retry budget, or the connection was lost."""


class NotInitialisedError(DatabaseError):
    """The config DB holds no farm: `farmkeys init` has not been run against it."""


class FarmConflictError(Error):
    """The config DB or directory holds a farm that differs from the configuration."""


class LeaseLostError(Error):
    """A leader write was refused: this process no longer holds the lease term it believed."""


class LeaderTimeoutError(Error):
    """The leader did not answer a `farmkeys rollover` request in time."""


class DirectoryError(Error):
    """The directory (LDAP) cannot be reached or refused an operation."""


class DirectoryUnreachableError(DirectoryError, UnreachableError):
    """No directory server can be reached within the retry budget, or the connection was lost."""


class DirectoryAuthError(DirectoryError):
    """The directory rejected the bind credentials. Never retried."""


class MasterKeyMissingError(DirectoryError):
    """A master key named by a blob is absent from the directory, or unreadable to this account."""


class InvalidBlobError(Error):
    """A blob is not authentic. Names the certificate, never the key."""


class AdfsBlobError(InvalidBlobError):
    """An AD FS ``EncryptedPfx`` (farmkeys.adfs) cannot be read: malformed, unknown or badly padded.

    Names the DKM key id at most, never key bytes, the nonce or the plaintext.
    """


class AdfsKeyMismatchError(AdfsBlobError):
    """An AD FS ``EncryptedPfx``'s MAC does not verify under the DKM key given.

    Wrong key, or an altered blob: the caller may try the farm's next DKM key.
    """


class FarmStateError(Error):
    """The config DB's farm state record (which certificate holds which role) cannot be
    trusted: missing, malformed, failing its MAC, another farm's, older than what this node
    installed, or not matching the certificate rows. Nothing is installed or written."""


class RequestRefusedError(Error):
    """An operator request the leader will not act on: it carries no valid MAC, names
    another farm or row, expired, was already answered, or (repair-state) the live rows
    differ from those the operator reviewed. Nothing is done but the refusal's audit."""


class RevertRefusedError(RequestRefusedError):
    """`farmkeys rollover --revert` will not undo the last promotion of a purpose: the farm
    state records none, it was urgent (the replaced certificate is revoked), the retired
    certificate is archived, expired or inside its critical threshold, or the purpose has
    a secondary. Decided by :func:`farmkeys.policy.revert`; nothing is changed."""


class CertificateError(Error):
    """A certificate or private key does not match what its row in the config DB says."""


class StoreError(Error):
    """The node's local certificate store cannot be read or written."""


class EscrowError(Error):
    """An escrow file or its passphrase is unusable: unreadable, not genuine, or another farm's."""


class ImportRefusedError(Error):
    """`farmkeys import adfs` refused its input: an unreadable or exposed key file, no DKM
    key to try, or a certificate the farm already has or has no room for."""


class PublishError(Error):
    """The node cannot publish its keys: nothing is installed yet, a key has no JWK form, or
    the metadata cannot be signed (the signing primary's key unreadable or not its
    certificate's, no deterministic ECDSA)."""


class NodeInUseError(Error):
    """`farmkeys nodes remove` refused a node heard from within the lease's ttl: it still
    runs, and its row would come back at its next heartbeat."""
