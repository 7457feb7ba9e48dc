"""The checks of every configured value: one validator per section.

:func:`validate` runs them in one fixed order (the order farmkeys has always
checked in, so a file with several mistakes is told about the same one first),
and each raises :class:`~farmkeys.errors.ConfigError` saying what is wrong and
what to do. Types were checked when the sections were built
(:mod:`farmkeys.config.loader`); these check values and how they fit together.

The directory's settings are checked further, without ldap3, by
:func:`farmkeys.directory.settings.validate` when a directory is made (a
:class:`~farmkeys.directory.Deferred` one included); the configuration sits below
the directory and never imports it.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from farmkeys.config.model import (
    MAX_FARM_NAME,
    Config,
    DatabaseConfig,
    DirectoryConfig,
    FarmConfig,
    HooksConfig,
    LeaseConfig,
    MasterKeyConfig,
    NodeConfig,
    PolicyConfig,
    PublishConfig,
    RetryConfig,
    StatusConfig,
)
from farmkeys.errors import ConfigError
from farmkeys.vocab import KEY_TYPES, LAYOUT_NAMES, RSA_KEY_TYPES

_RP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate(config: Config) -> None:
    """Check every section of ``config``; :class:`ConfigError` for the first bad value."""
    _farm(config.farm)
    _node(config.node)
    _database(config.database)
    _directory(config.directory)
    _policy(config.policy)
    _master_key(config.master_key)
    _node_polling(config.node)  # checked here, after the master key, as it always was
    _lease(config.lease)
    _hooks(config.hooks)
    _publish(config.publish)
    _retry(config.retry)
    _status(config.status)


def _require(condition: bool, what: str, todo: str) -> None:
    if not condition:
        raise ConfigError(what, todo)


def _farm(farm: FarmConfig) -> None:
    name = farm.name
    _require(
        0 < len(name) <= MAX_FARM_NAME and name.isprintable() and name == name.strip(),
        f"farm.name must be 1 to {MAX_FARM_NAME} printable characters without surrounding "
        f"spaces, not {name!r}",
        "choose a short name; it appears in the certificate subjects",
    )
    if farm.dkm_group is not None:
        try:
            uuid.UUID(farm.dkm_group)
            pinned = True
        except ValueError:
            pinned = False
        _require(
            pinned,
            f"farm.dkm_group {farm.dkm_group!r} is not a GUID",
            "copy the farm's DKM group from `farmkeys status` (or from `farmkeys init`'s output)",
        )


def _node(node: NodeConfig) -> None:
    _require(
        0 < len(node.id) <= 255 and node.id.isprintable(),
        f"node.id must be 1 to 255 printable characters, not {node.id!r}",
        "set node.id to this server's name",
    )
    _require(
        Path(node.store).is_absolute(),
        f"node.store must be an absolute path, not {node.store!r}",
        "give the full path of the store folder",
    )
    _require(
        node.pkcs12_password_file is None or Path(node.pkcs12_password_file).is_absolute(),
        f"node.pkcs12_password_file must be an absolute path, not {node.pkcs12_password_file!r}",
        "give the full path of the file whose first line is the .p12 password",
    )


def _node_polling(node: NodeConfig) -> None:
    _require(node.poll_seconds > 0, "node.poll_seconds must be positive", "the default is 60")


def _database(database: DatabaseConfig) -> None:
    _require(
        database.dsn.strip() != "",
        "database.dsn is empty",
        "set it to a libpq connection string or postgresql:// URL",
    )
    _require(
        database.connect_timeout_seconds > 0,
        "database.connect_timeout_seconds must be positive",
        "set it to a few seconds",
    )


def _directory(d: DirectoryConfig) -> None:
    for url in d.urls:
        _require(
            url.startswith(("ldap://", "ldaps://")),
            f"directory.url must start with ldap:// or ldaps://, not {url!r}",
            "give the directory's LDAP URL, for example ldaps://dc1.example:636",
        )
    _require(
        len(set(d.urls)) == len(d.urls),
        "directory.url lists the same server twice",
        "list each domain controller once, in the order to try them",
    )
    _require(
        (d.password is None) != (d.password_file is None),
        "give exactly one of directory.password and directory.password_file",
        "prefer password_file, readable by the service account alone",
    )
    _require(
        d.layout in LAYOUT_NAMES,
        f"directory.layout {d.layout!r} is not supported",
        f"use one of {', '.join(LAYOUT_NAMES)}",
    )
    _require(
        d.layout != "ad" or d.start_tls or all(u.startswith("ldaps://") for u in d.urls),
        "directory.layout 'ad' needs TLS: Active Directory refuses a simple bind in clear text",
        "use ldaps:// URLs, or ldap:// with start_tls = true, and set directory.ca_file",
    )
    _require(
        d.ca_file is None or d.start_tls or all(u.startswith("ldaps://") for u in d.urls),
        "directory.ca_file is set but the connection is not encrypted",
        "use an ldaps:// URL or set directory.start_tls = true",
    )
    _require(
        d.timeout_seconds > 0,
        "directory.timeout_seconds must be positive",
        "set it to a few seconds",
    )


def _policy(p: PolicyConfig) -> None:
    _require(
        p.key in KEY_TYPES,
        f"policy.key {p.key!r} is not supported",
        f"use one of {', '.join(KEY_TYPES)}",
    )
    _require(
        p.decryption_key is None or p.decryption_key in RSA_KEY_TYPES,
        f"policy.decryption_key {p.decryption_key!r} is not an RSA key type",
        f"token decryption needs RSA: use one of {', '.join(RSA_KEY_TYPES)}",
    )
    for key in ("certificate_duration", "threshold_unit_seconds"):
        _require(getattr(p, key) > 0, f"policy.{key} must be positive", "correct the value")
    for key in ("generation_threshold", "promotion_threshold", "critical_threshold"):
        _require(getattr(p, key) >= 0, f"policy.{key} must not be negative", "correct the value")
    _require(
        p.critical_threshold <= p.generation_threshold < p.certificate_duration,
        "policy thresholds must satisfy critical_threshold <= generation_threshold "
        "< certificate_duration",
        "correct [policy]; AD FS's defaults are 2, 20 and 365 days",
    )
    _require(
        p.rollover_interval_seconds > 0,
        "policy.rollover_interval_seconds must be positive",
        "AD FS checks every 43200 seconds (720 minutes)",
    )


def _master_key(m: MasterKeyConfig) -> None:
    _require(
        m.lifetime > 0,
        "master_key.lifetime must be positive",
        "set it in the policy's threshold units; the default is 365 (a year)",
    )
    _require(
        m.retain >= 0,
        "master_key.retain must not be negative",
        "set it in the policy's threshold units; the default is 365 (a year)",
    )


def _lease(lease: LeaseConfig) -> None:
    _require(
        0 < lease.renew_seconds < lease.ttl_seconds,
        "lease.renew_seconds must be positive and shorter than lease.ttl_seconds",
        "renew well within the lease; the defaults are 5 and 15",
    )


def _status(status: StatusConfig) -> None:
    _require(
        status.stopped_warning_seconds > 0,
        "status.stopped_warning_seconds must be positive",
        "give the seconds after which a node whose serve stopped is a warning (default 3600)",
    )


def _hooks(hooks: HooksConfig) -> None:
    _require(
        hooks.on_change is None or hooks.on_change.strip() != "",
        "hooks.on_change is empty",
        "give the command to run, or leave the key out",
    )
    _require(hooks.timeout_seconds > 0, "hooks.timeout_seconds must be positive", "correct it")


def _publish(publish: PublishConfig) -> None:
    for key in ("entity_id", "sso_url", "passive_url"):
        value = getattr(publish, key)
        _require(
            value is None
            or (
                re.fullmatch(r"[a-zA-Z][a-zA-Z0-9+.-]*:\S+", value) is not None
                and value.isprintable()
            ),
            f"publish.{key} must be an absolute URI without spaces, not {value!r}",
            "AD FS's entity ID looks like https://fs.example.com/adfs/services/trust",
        )
    for key, what in (
        ("sso_url", "the SingleSignOnService URL"),
        ("passive_url", "the WS-Federation passive endpoint"),
    ):
        value = getattr(publish, key)
        _require(
            value is None or value.startswith(("https://", "http://")),
            f"publish.{key} must be an http(s) URL, not {value!r}",
            f"give {what}, for example https://fs.example.com/adfs/ls/",
        )
    if publish.listen is not None:
        host, sep, port = publish.listen.rpartition(":")
        _require(
            bool(sep and host and port.isdigit() and 0 < int(port) < 65536),
            f"publish.listen must be HOST:PORT, not {publish.listen!r}",
            'for example "127.0.0.1:9464" (Prometheus scrapes /metrics there)',
        )
    _relying_parties(publish)
    _require(
        publish.max_age_seconds >= 0,
        "publish.max_age_seconds must not be negative",
        "the default is 300",
    )
    for key, low, high, default in (
        ("threads", 1, 256, 8),
        ("max_queued", 0, 100_000, 256),
        ("connection_limit", 1, 100_000, 512),
        ("backlog", 128, 65_535, 1024),
    ):
        value = getattr(publish, key)
        _require(
            low <= value <= high,
            f"publish.{key} must be from {low} to {high}, not {value}",
            f"the default is {default}",
        )
    _require(
        0 < publish.request_timeout_seconds <= 3600,
        f"publish.request_timeout_seconds must be more than 0 and at most 3600,"
        f" not {publish.request_timeout_seconds}",
        "the default is 10",
    )


def _relying_parties(publish: PublishConfig) -> None:
    names = []
    for item in publish.relying_parties or ():
        name = item.partition("=")[0].strip()
        _require(
            _RP_NAME.fullmatch(name) is not None,
            f"publish.relying_parties has {item!r}, whose name is not 1 to 64 letters, digits,"
            " '.', '_' or '-'",
            'write "name" or "name=https://rp.example/..."; the name goes in ?rp=<name>',
        )
        names.append(name)
    _require(
        len(set(names)) == len(names),
        "publish.relying_parties names a relying party twice",
        "list each relying party once",
    )


def _retry(r: RetryConfig) -> None:
    _require(
        r.total_seconds >= 0 and 0 < r.initial_backoff_seconds <= r.max_backoff_seconds,
        "retry settings must satisfy total_seconds >= 0 and "
        "0 < initial_backoff_seconds <= max_backoff_seconds",
        "correct [retry]",
    )
