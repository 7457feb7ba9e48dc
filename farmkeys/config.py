"""Settings: a TOML file plus ``FARMKEYS_<SECTION>_<KEY>`` environment overrides.

The file is named by ``--config PATH`` or ``FARMKEYS_CONFIG``. Every key of
every section can be overridden from the environment, for example
``FARMKEYS_DATABASE_DSN`` or ``FARMKEYS_DIRECTORY_PASSWORD_FILE``. Unknown
sections and keys are errors, in the file and in the environment alike, so a
typo never silently falls back to a default. Everything is validated here, at
start, so a bad value fails before any server is touched.
"""

from __future__ import annotations

import dataclasses
import socket
import typing
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from farmkeys.errors import ConfigError

ENV_PREFIX = "FARMKEYS_"
ENV_CONFIG = "FARMKEYS_CONFIG"
# Variables farmkeys sets for the hooks it runs; never configuration.
_ENV_NOT_CONFIG = frozenset({ENV_CONFIG, "FARMKEYS_STORE", "FARMKEYS_CHANGED"})

KEY_TYPES = ("rsa-2048", "rsa-3072", "rsa-4096", "ec-p256")
LAYOUTS = ("openldap",)
# The longest farm name that keeps "CN=<name> Token Decryption" within X.520's
# 64-character upper bound for a common name.
MAX_FARM_NAME = 64 - len(" Token Decryption")


@dataclass(frozen=True)
class FarmConfig:
    name: str


@dataclass(frozen=True)
class NodeConfig:
    id: str = field(default_factory=socket.gethostname)
    store: str = "/var/lib/farmkeys/store"


@dataclass(frozen=True)
class DatabaseConfig:
    dsn: str
    connect_timeout_seconds: int = 5


@dataclass(frozen=True)
class DirectoryConfig:
    url: str
    bind_dn: str
    container: str
    password: str | None = dataclasses.field(default=None, repr=False)
    password_file: str | None = None
    layout: str = "openldap"
    start_tls: bool = False
    ca_file: str | None = None
    timeout_seconds: int = 5

    def read_password(self) -> str:
        """The bind password, from ``password`` or the first line of ``password_file``."""
        if self.password is not None:
            return self.password
        assert self.password_file is not None  # guaranteed by validation
        try:
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
    certificate_duration: int = 365
    generation_threshold: int = 20
    promotion_threshold: int = 5
    critical_threshold: int = 2
    threshold_unit_seconds: int = 86400

    def units(self, n: int) -> timedelta:
        """``n`` threshold units as a duration."""
        return timedelta(seconds=n * self.threshold_unit_seconds)


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
    retry: RetryConfig = field(default_factory=RetryConfig)

    @property
    def store(self) -> Path:
        return Path(self.node.store)


_SECTIONS: dict[str, type[Any]] = {
    f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)
}
