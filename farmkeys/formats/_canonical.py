"""Canonical JSON: the bytes of the records farmkeys authenticates under a master key.

The farm state record (:mod:`farmkeys.formats.farm_state`) and an operator request
(:mod:`farmkeys.formats.request`) are each one JSON object in canonical form: keys
sorted, no white space, ASCII only (:func:`encode`). A MAC covers exactly those bytes,
so a reader accepts exactly what the writer makes: :meth:`Reader.parse` decodes the
bytes, builds the record, encodes it again and refuses the input if the two differ
(keys in another order, spaces, escapes, ``1.0`` for ``1``). What a reader refuses
carries its codec's own error and wording: each codec makes one :class:`Reader` with the
function that makes that error.

Private to :mod:`farmkeys.formats`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from uuid import UUID

from farmkeys.errors import Error

MAX_INTEGER: Final = (1 << 63) - 1
"""The largest integer a record holds: the config DB's bigint."""

_Record = TypeVar("_Record")


def encode(document: Mapping[str, object]) -> bytes:
    """The canonical bytes of ``document``: sorted keys, no white space, ASCII."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(
        "ascii"
    )


@dataclass(frozen=True)
class Reader:
    """The checks one codec makes of its canonical records, each refusal as that codec's
    error: ``malformed(why)`` makes it, ``integers`` says in its messages what an
    integer field must be (every one is from 0 to :data:`MAX_INTEGER`)."""

    malformed: Callable[[str], Error]
    integers: str

    def parse(
        self,
        body: bytes,
        *,
        limit: int,
        build: Callable[[object], _Record],
        encode: Callable[[_Record], bytes],
    ) -> _Record:
        """The record ``build`` makes of ``body``, once ``body`` is at most ``limit``
        bytes of ASCII JSON and exactly the bytes ``encode`` makes of that record."""
        if len(body) > limit:
            raise self.malformed(f"it is {len(body)} bytes, more than {limit}")
        try:
            document = json.loads(body.decode("ascii"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise self.malformed("it is not ASCII JSON") from None
        record = build(document)
        if encode(record) != body:
            raise self.malformed("it is not in canonical form")
        return record

    def fields(self, value: object, keys: set[str], what: str) -> dict[str, Any]:
        """``value`` as an object with exactly the fields ``keys``."""
        if not isinstance(value, dict) or set(value) != keys:
            raise self.malformed(f"{what} does not have exactly the fields {sorted(keys)}")
        return value

    def integer(self, value: object, what: str) -> int:
        """``value`` as an integer from 0 to :data:`MAX_INTEGER` (never a boolean)."""
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INTEGER:
            raise self.malformed(f"its {what} is not {self.integers}")
        return value

    def uuid(self, value: object, what: str) -> UUID:
        """``value`` as a UUID written in canonical form (lower-case, hyphenated)."""
        if not isinstance(value, str):
            raise self.malformed(f"{what} is not a UUID")
        try:
            parsed = UUID(value)
        except ValueError:
            raise self.malformed(f"{what} is not a UUID") from None
        if str(parsed) != value:
            raise self.malformed(f"{what} is not a UUID in canonical form")
        return parsed
