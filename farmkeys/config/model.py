"""The configuration as farmkeys uses it: one frozen dataclass per section of the file.

:mod:`farmkeys.config.loader` builds a :class:`Config` from the TOML file and the
environment, and :mod:`farmkeys.config.validate` checks every value before anything
uses it: a :class:`Config` that :func:`farmkeys.config.load` returns holds only
values found valid.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from farmkeys.errors import ConfigError
from farmkeys.file_trust import check_file, refuse_if_exposed

# The longest farm name that keeps "CN=<name> Token Decryption" within X.520's
# 64-character upper bound for a common name.
MAX_FARM_NAME = 64 - len(" Token Decryption")


@dataclass(frozen=True)
class FarmConfig:
    name: str
    dkm_group: str | None = None  # pin: refuse a config DB that names another farm


@dataclass(frozen=True)
class NodeConfig:
    id: str = field(default_factory=socket.gethostname)
    store: str = "/var/lib/farmkeys/store"
    poll_seconds: float = 60.0  # `serve` re-checks this often even without a notification
    # A group (the federation service's) that may read the store: 0750 folders, 0640 keys.
    store_group: str | None = None
    # A private file whose first line is the password of every .p12 this node installs
    # (farmkeys.pkcs12_password); unset, the .p12 files have none.
    pkcs12_password_file: str | None = None


@dataclass(frozen=True)
class DatabaseConfig:
    dsn: str = field(repr=False)  # may carry a password
    connect_timeout_seconds: int = 5


@dataclass(frozen=True)
class DirectoryConfig:
    url: str | list[str]
    bind_dn: str
    container: str
    password: str | None = dataclasses.field(default=None, repr=False)
    password_file: str | None = None
    layout: str = "openldap"
    start_tls: bool = False
    allow_plaintext: bool = False  # ldap:// without StartTLS to a host that is not loopback
    ca_file: str | None = None
    timeout_seconds: int = 5

    @property
    def urls(self) -> tuple[str, ...]:
        """The directory servers to try, in order (``url`` is one URL or a list of them)."""
        return (self.url,) if isinstance(self.url, str) else tuple(self.url)

    def read_password(self) -> str:
        """The bind password, from ``password`` or the first line of ``password_file``,
        which must be private and, with every folder above it, be root's or this account's
        alone (:func:`farmkeys.file_trust.check_file`)."""
        if self.password is not None:
            return self.password
        assert self.password_file is not None  # guaranteed by validation
        try:
            refuse_if_exposed(
                self.password_file,
                os.stat(self.password_file).st_mode,
                what="directory.password_file",
                error=ConfigError,
                holding="the password",
            )
            check_file(self.password_file, what="directory.password_file")
            text = Path(self.password_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read directory.password_file {self.password_file}: {exc.strerror}",
                "check the path and that the service account can read it",
            ) from None
        password = text.splitlines()[0] if text else ""
        if not password:
            raise ConfigError(
                f"directory.password_file {self.password_file} is empty",
                "write the service account's directory password on its first line",
            )
        return password


@dataclass(frozen=True)
class PolicyConfig:
    """AD FS's AutoCertificateRollover settings, in threshold units (days by default)."""

    key: str = "rsa-2048"
    decryption_key: str | None = None
    certificate_duration: int = 365
    generation_threshold: int = 20
    promotion_threshold: int = 5
    critical_threshold: int = 2
    threshold_unit_seconds: int = 86400
    rollover_interval_seconds: float = 43200.0  # AD FS's 720 minutes
    # Hold a signing secondary's promotion until every [publish] relying party has fetched
    # keys that contain it (or until critical_threshold). False: AD FS's behaviour.
    require_fetch: bool = False

    def units(self, n: int) -> timedelta:
        """``n`` threshold units as a duration."""
        return timedelta(seconds=n * self.threshold_unit_seconds)

    def key_for(self, purpose: str) -> str:
        """The key type of new ``purpose`` certificates. Token decryption needs RSA (SAML
        and WS-Federation relying parties encrypt to RSA keys): ``decryption_key``, else
        ``key`` when it is RSA, else rsa-2048."""
        if purpose != "decryption":
            return self.key
        if self.decryption_key is not None:
            return self.decryption_key
        return self.key if self.key.startswith("rsa-") else "rsa-2048"


@dataclass(frozen=True)
class MasterKeyConfig:
    """The master key's life, in the policy's threshold units (days by default)."""

    lifetime: int = 365  # the leader rolls the current master key when it is this old
    retain: int = 365  # a replaced key stays in the directory this long after no live blob names it


@dataclass(frozen=True)
class LeaseConfig:
    """The leader lease, judged by the config DB's clock."""

    ttl_seconds: float = 15.0
    renew_seconds: float = 5.0


@dataclass(frozen=True)
class StatusConfig:
    """What `farmkeys status` calls a problem beyond the farm's own rules."""

    # A node whose `serve` stopped cleanly this long ago is a warning (an hour by default:
    # a maintenance window, not a node forgotten).
    stopped_warning_seconds: float = 3600.0


@dataclass(frozen=True)
class HooksConfig:
    """Commands `serve` runs when this node's store changed."""

    on_change: str | None = None  # a command line, run without a shell
    timeout_seconds: float = 60.0


@dataclass(frozen=True)
class RelyingParty:
    """One relying party that fetches the farm's keys: ``?rp=<name>`` in its metadata URL."""

    name: str
    url: str | None = None  # what the operator noted for it (its entity ID or metadata URL)


@dataclass(frozen=True)
class PublishConfig:
    """SAML metadata, JWKS, metrics: what `farmkeys metadata`, `jwks` and serve's HTTP publish."""

    entity_id: str | None = None  # the IdP's entityID (AD FS: https://<fs>/adfs/services/trust)
    sso_url: str | None = None  # the SingleSignOnService location
    # The WS-Federation passive requestor endpoint (AD FS: https://<fs>/adfs/ls/) in the
    # metadata's fed:SecurityTokenServiceType role; sso_url when unset.
    passive_url: str | None = None
    # Sign the metadata with the installed signing primary (publish/metadata.py); false
    # publishes the unsigned document farmkeys published before (no ID, validUntil,
    # signature or WS-Federation role), byte for byte.
    sign_metadata: bool = True
    listen: str | None = None  # "127.0.0.1:9464": serve answers HTTP there; off when unset
    # "name" or "name=https://rp.example/...": whose fetches are recorded (publish.py).
    relying_parties: list[str] | None = None
    max_age_seconds: int = 300  # Cache-Control max-age of the metadata and the JWKS
    # serve's HTTP server (farmkeys/publish/server.py): what a crowd of clients may hold.
    threads: int = 8  # handler threads: requests answered at once
    max_queued: int = 256  # requests waiting for a handler beyond which a request gets 503
    connection_limit: int = 512  # open connections; more wait in the listen backlog
    backlog: int = 1024  # the listen backlog (the kernel caps it at net.core.somaxconn)
    # From a connection's accept (or its previous response) to a whole request received;
    # also how long a connection may sit idle, or a client leave its answer unread.
    request_timeout_seconds: float = 10.0

    @property
    def parties(self) -> tuple[RelyingParty, ...]:
        """The relying parties, parsed (validated when the configuration was loaded)."""
        found = []
        for item in self.relying_parties or ():
            name, _, url = item.partition("=")
            found.append(RelyingParty(name.strip(), url.strip() or None))
        return tuple(found)

    @property
    def address(self) -> tuple[str, int] | None:
        """``listen`` as (host, port), or None when serve publishes nothing over HTTP."""
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class RetryConfig:
    """How transient failures to reach the config DB or the directory are retried."""

    total_seconds: float = 30.0
    initial_backoff_seconds: float = 0.5
    max_backoff_seconds: float = 5.0


@dataclass(frozen=True)
class Config:
    farm: FarmConfig
    database: DatabaseConfig
    directory: DirectoryConfig
    node: NodeConfig = field(default_factory=NodeConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    master_key: MasterKeyConfig = field(default_factory=MasterKeyConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    status: StatusConfig = field(default_factory=StatusConfig)

    @property
    def store(self) -> Path:
        return Path(self.node.store)
