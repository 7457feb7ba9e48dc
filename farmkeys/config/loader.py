"""Reading the configuration: a TOML file plus ``FARMKEYS_<SECTION>_<KEY>`` overrides.

The file is named by ``--config PATH`` or ``FARMKEYS_CONFIG``. Every key of
every section can be overridden from the environment, for example
``FARMKEYS_DATABASE_DSN`` or ``FARMKEYS_DIRECTORY_PASSWORD_FILE``. Unknown
sections and keys are errors, in the file and in the environment alike, so a
typo never silently falls back to a default. Values are checked against the
types of :mod:`farmkeys.config.model` here, and then validated
(:mod:`farmkeys.config.validate`), at start, so a bad value fails before any
server is touched. The config file, and every folder above it, must be root's or this
account's alone (:mod:`farmkeys.file_trust`); one that holds a password must be private.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from farmkeys.config.model import Config
from farmkeys.config.validate import validate
from farmkeys.errors import ConfigError
from farmkeys.file_trust import check_file, refuse_if_exposed

ENV_PREFIX = "FARMKEYS_"
ENV_CONFIG = "FARMKEYS_CONFIG"
# Variables farmkeys sets for the hooks it runs; never configuration.
_ENV_NOT_CONFIG = frozenset({ENV_CONFIG, "FARMKEYS_STORE", "FARMKEYS_CHANGED"})

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
        _check_trusted(Path(source))
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
                f"config file {path} has an unknown section [{section}]"
                + _did_you_mean(section, _SECTIONS, "[{}]"),
                f"use only {', '.join(f'[{s}]' for s in _SECTIONS)}",
            )
        if not isinstance(body, dict):
            raise ConfigError(
                f"config file {path}: {section} must be a section, not a value",
                f"write it as [{section}] followed by its keys",
            )
    return {section: dict(body) for section, body in parsed.items()}


def _check_trusted(path: Path) -> None:
    """The config file names the hook farmkeys runs and the servers it trusts with its
    passwords: it and every folder above it must be root's or this account's alone,
    whatever it holds (:func:`farmkeys.file_trust.check_file`)."""
    try:
        check_file(path, what="config file")
    except FileNotFoundError:
        pass  # _read_file says so
    except OSError as exc:
        raise ConfigError(
            f"cannot check config file {path}: {exc.strerror}",
            "check its path and that this account can read it",
        ) from None


def _check_passfile(dsn: str) -> None:
    """A passfile the DSN names holds the config DB's password: it must be private, and it
    and the folders above it root's or this account's alone. libpq reads it; a missing one
    it ignores, and so does this check."""
    try:
        named = str(conninfo_to_dict(dsn).get("passfile") or "")
    except psycopg.ProgrammingError:
        return
    if not named or not os.path.exists(named):
        return
    refuse_if_exposed(
        named,
        os.stat(named).st_mode,
        what="database.dsn's passfile",
        error=ConfigError,
        holding="the password",
    )
    check_file(named, what="database.dsn's passfile")


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
    refuse_if_exposed(
        path,
        path.stat().st_mode,
        what="config file",
        error=ConfigError,
        holds=" and ".join(holds),
        todo=f"chmod 600 {path}, or move the secret out (directory.password_file, a"
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
                f"{where} has an unknown key {key!r}" + _did_you_mean(key, fields, "'{}'"),
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
    validate(config)
    _check_passfile(config.database.dsn)
    return config


def _did_you_mean(given: str, known: typing.Iterable[str], shape: str) -> str:
    """``"; did you mean 'x'?"`` for the nearest of ``known`` to a mistyped name, else ""."""
    near = difflib.get_close_matches(given.lower(), list(known), n=1, cutoff=0.6)
    return f"; did you mean {shape.format(near[0])}?" if near else ""
