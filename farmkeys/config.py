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
import os
import re
import socket
import tomllib
import types
import typing
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from farmkeys._private_file import refuse_if_exposed
from farmkeys.errors import ConfigError
from farmkeys.vocab import KEY_TYPES, LAYOUT_NAMES, RSA_KEY_TYPES

ENV_PREFIX = "FARMKEYS_"
ENV_CONFIG = "FARMKEYS_CONFIG"
# Variables farmkeys sets for the hooks it runs; never configuration.
_ENV_NOT_CONFIG = frozenset({ENV_CONFIG, "FARMKEYS_STORE", "FARMKEYS_CHANGED"})

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
        """The bind password, from ``password`` or the first line of ``password_file``."""
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
    listen: str | None = None  # "127.0.0.1:9464": serve answers HTTP there; off when unset
    # "name" or "name=https://rp.example/...": whose fetches are recorded (publish.py).
    relying_parties: list[str] | None = None
    max_age_seconds: int = 300  # Cache-Control max-age of the metadata and the JWKS

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

    @property
    def store(self) -> Path:
        return Path(self.node.store)


_SECTIONS: dict[str, type[Any]] = {
    f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)
}


def load(
    path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> Config:
    """Read the TOML file at ``path`` (or ``$FARMKEYS_CONFIG``), apply overrides, validate.

    With neither a path nor ``FARMKEYS_CONFIG``, the configuration comes from
    the environment alone.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, dict[str, Any]] = {}
    source = path if path is not None else env.get(ENV_CONFIG)
    if source:
        raw = _read_file(Path(source))
        _check_private_if_secret(Path(source), raw)
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_CONFIG:
            continue
        section, key = _split_env_name(name)
        raw.setdefault(section, {})[key] = _EnvValue(name, value)
    return _build(raw, origin=str(source) if source else "the environment")


class _EnvValue(str):
    """A value that came from the environment, still a string, remembering its variable."""

    variable: str

    def __new__(cls, variable: str, value: str) -> _EnvValue:
        obj = super().__new__(cls, value)
        obj.variable = variable
        return obj


def _read_file(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist",
            "give the right path with --config or FARMKEYS_CONFIG",
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path}: {exc.strerror}",
            "check its path and that this account can read it",
        ) from None
    try:
        parsed = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"config file {path} is not valid TOML: {exc}",
            "fix the syntax (see the README's configuration section)",
        ) from None
    for section, body in parsed.items():
        if section not in _SECTIONS:
            raise ConfigError(
                f"config file {path} has an unknown section [{section}]",
                f"use only {', '.join(f'[{s}]' for s in _SECTIONS)}",
            )
        if not isinstance(body, dict):
            raise ConfigError(
                f"config file {path}: {section} must be a section, not a value",
                f"write it as [{section}] followed by its keys",
            )
    return {section: dict(body) for section, body in parsed.items()}


def _check_private_if_secret(path: Path, raw: dict[str, dict[str, Any]]) -> None:
    """A config file that holds a password (the directory's, or one in the DSN) must be
    readable by its owner alone, like a password file."""
    holds = []
    if raw.get("directory", {}).get("password") is not None:
        holds.append("directory.password")
    dsn = raw.get("database", {}).get("dsn")
    if isinstance(dsn, str) and _dsn_has_password(dsn):
        holds.append("a password in database.dsn")
    if not holds:
        return
    mode = path.stat().st_mode
    if mode & 0o077:
        raise ConfigError(
            f"config file {path} holds {' and '.join(holds)} but may be read or written by"
            f" group or others (mode {mode & 0o7777:04o})",
            f"chmod 600 {path}, or move the secret out (directory.password_file, a"
            " ~/.pgpass passfile)",
        )


def _dsn_has_password(dsn: str) -> bool:
    try:
        return bool(conninfo_to_dict(dsn).get("password"))
    except psycopg.ProgrammingError:
        return False  # not a DSN at all: the connection reports that


def _split_env_name(name: str) -> tuple[str, str]:
    rest = name[len(ENV_PREFIX) :].lower()
    for section in _SECTIONS:
        if rest.startswith(section + "_"):
            return section, rest[len(section) + 1 :]
    raise ConfigError(
        f"environment variable {name} names no configuration section",
        f"use FARMKEYS_<SECTION>_<KEY> with a section among {', '.join(_SECTIONS)}, or unset it",
    )


def _describe(section: str, key: str, value: object) -> str:
    if isinstance(value, _EnvValue):
        return f"environment variable {value.variable}"
    return f"{section}.{key}"


def _convert(section: str, key: str, value: object, kind: object) -> object:
    """Check ``value`` against the declared type, converting strings from the environment."""
    allowed = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    wants = next(t for t in allowed if t is not type(None))
    where = _describe(section, key, value)
    if list[str] in allowed:
        found = _string_or_list(where, value)
        return [found] if isinstance(found, str) and str not in allowed else found
    if isinstance(value, _EnvValue):
        text = str(value)
        try:
            if wants is bool:
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(text)
            return wants(text)
        except ValueError:
            raise ConfigError(
                f"{where} must be {_type_name(wants)}, not {_shown(key, text)}",
                "correct the value",
            ) from None
    ok = isinstance(value, wants) and not (wants is not bool and isinstance(value, bool))
    if wants is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ConfigError(
            f"{where} must be {_type_name(wants)}, not {type(value).__name__} {_shown(key, value)}",
            "correct the value in the config file",
        )
    return value


def _string_or_list(where: str, value: object) -> str | list[str]:
    """One string, or a list of them (from the environment: separated by spaces or commas)."""
    if isinstance(value, _EnvValue):
        items = [v for v in re.split(r"[\s,]+", str(value)) if v]
        return items[0] if len(items) == 1 else items
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(
        f"{where} must be a string or a non-empty list of strings, not {value!r}",
        'write one URL, or a list: ["ldaps://dc1.example", "ldaps://dc2.example"]',
    )


# Keys whose values may be secret: an error names their type, never their value.
_SECRET_KEYS = frozenset({"password", "dsn"})


def _shown(key: str, value: object) -> str:
    return "(value hidden)" if key in _SECRET_KEYS else repr(value)


def _type_name(kind: type[Any]) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[kind]


def _build_section(section: str, body: dict[str, Any], origin: str) -> object:
    cls = _SECTIONS[section]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, object] = {}
    for key, value in body.items():
        if key not in fields:
            where = (
                f"environment variable {value.variable}"
                if isinstance(value, _EnvValue)
                else f"{origin}: [{section}]"
            )
            raise ConfigError(
                f"{where} has an unknown key {key!r}",
                f"use only {', '.join(fields)} in [{section}]",
            )
        values[key] = _convert(section, key, value, hints[key])
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        key = missing[0]
        raise ConfigError(
            f"{section}.{key} is not set in {origin}",
            f"set it in [{section}] or with FARMKEYS_{section.upper()}_{key.upper()}",
        )
    return cls(**values)


def _build(raw: dict[str, dict[str, Any]], *, origin: str) -> Config:
    sections: dict[str, Any] = {
        name: _build_section(name, raw[name], origin) for name in _SECTIONS if name in raw
    }
    for required in ("farm", "database", "directory"):
        if required not in sections:
            # Build the empty section so the error names its first missing key.
            _build_section(required, {}, origin)
    config = Config(**sections)
    _validate(config)
    return config


def _require(condition: bool, what: str, todo: str) -> None:
    if not condition:
        raise ConfigError(what, todo)


def _validate(config: Config) -> None:
    name = config.farm.name
    _require(
        0 < len(name) <= MAX_FARM_NAME and name.isprintable() and name == name.strip(),
        f"farm.name must be 1 to {MAX_FARM_NAME} printable characters without surrounding "
        f"spaces, not {name!r}",
        "choose a short name; it appears in the certificate subjects",
    )
    if config.farm.dkm_group is not None:
        try:
            uuid.UUID(config.farm.dkm_group)
            pinned = True
        except ValueError:
            pinned = False
        _require(
            pinned,
            f"farm.dkm_group {config.farm.dkm_group!r} is not a GUID",
            "copy the farm's DKM group from `farmkeys status` (or from `farmkeys init`'s output)",
        )
    node = config.node
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
        config.database.dsn.strip() != "",
        "database.dsn is empty",
        "set it to a libpq connection string or postgresql:// URL",
    )
    _require(
        config.database.connect_timeout_seconds > 0,
        "database.connect_timeout_seconds must be positive",
        "set it to a few seconds",
    )
    d = config.directory
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
    p = config.policy
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
    m = config.master_key
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
    _require(node.poll_seconds > 0, "node.poll_seconds must be positive", "the default is 60")
    lease = config.lease
    _require(
        0 < lease.renew_seconds < lease.ttl_seconds,
        "lease.renew_seconds must be positive and shorter than lease.ttl_seconds",
        "renew well within the lease; the defaults are 5 and 15",
    )
    hooks = config.hooks
    _require(
        hooks.on_change is None or hooks.on_change.strip() != "",
        "hooks.on_change is empty",
        "give the command to run, or leave the key out",
    )
    _require(hooks.timeout_seconds > 0, "hooks.timeout_seconds must be positive", "correct it")
    _validate_publish(config.publish)
    r = config.retry
    _require(
        r.total_seconds >= 0 and 0 < r.initial_backoff_seconds <= r.max_backoff_seconds,
        "retry settings must satisfy total_seconds >= 0 and "
        "0 < initial_backoff_seconds <= max_backoff_seconds",
        "correct [retry]",
    )


_RP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _validate_publish(publish: PublishConfig) -> None:
    for key in ("entity_id", "sso_url"):
        value = getattr(publish, key)
        _require(
            value is None or (re.fullmatch(r"[a-zA-Z][a-zA-Z0-9+.-]*:\S+", value) is not None),
            f"publish.{key} must be an absolute URI without spaces, not {value!r}",
            "AD FS's entity ID looks like https://fs.example.com/adfs/services/trust",
        )
    _require(
        publish.sso_url is None or publish.sso_url.startswith(("https://", "http://")),
        f"publish.sso_url must be an http(s) URL, not {publish.sso_url!r}",
        "give the SingleSignOnService URL, for example https://fs.example.com/adfs/ls/",
    )
    if publish.listen is not None:
        host, sep, port = publish.listen.rpartition(":")
        _require(
            bool(sep and host and port.isdigit() and 0 < int(port) < 65536),
            f"publish.listen must be HOST:PORT, not {publish.listen!r}",
            'for example "127.0.0.1:9464" (Prometheus scrapes /metrics there)',
        )
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
    _require(
        publish.max_age_seconds >= 0,
        "publish.max_age_seconds must not be negative",
        "the default is 300",
    )
