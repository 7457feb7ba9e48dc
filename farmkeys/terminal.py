"""Text from the config DB made safe to show: every control character escaped, visibly.

The config DB is attacker-writable (docs/security.md): a node id, an error text, a
requester's name or an audit detail may hold a newline that starts a line of its own
("health OK"), an ESC sequence that hides or repaints text (``ESC[8m``, ``ESC[2J``), or a
bidi override that shows text in another order than it is. :func:`escape` turns each such
character into a visible escape (``\\n``, ``\\x1b``, ``\\u202e``) and leaves every other
character, non-ASCII letters included, as it is. It is applied where text leaves the
program (`status` and `events` rendering, the CLI's printed answers and errors, and every
log line through :class:`EscapingFormatter`), not where strings are made.

A backslash is left as it is (``CORP\\alice`` stays readable), so a DB string may *show*
``\\n`` literally; it can never *be* a line break or a terminal control.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Final, TypeAlias

_ExcInfo: TypeAlias = (
    tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]
)

_NAMED: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

# C0 (with newline, tab, ESC), DEL and C1 (with NEL, CSI and OSC's 8-bit forms).
_CONTROLS: Final = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)]
# Line and paragraph separators, and the bidi controls of Unicode's "Trojan Source" list:
# embeddings and overrides (U+202A-202E), isolates (U+2066-2069) and the marks.
_UNICODE: Final = [
    *(0x2028, 0x2029),
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
    *(0x200E, 0x200F, 0x061C),
]


def _escaped(code: int) -> str:
    char = chr(code)
    if char in _NAMED:
        return _NAMED[char]
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


_TABLE: Final = {code: _escaped(code) for code in (*_CONTROLS, *_UNICODE)}


def escape(text: str) -> str:
    """``text`` with every control, line-separator and bidi-control character escaped.

    Escaped: C0 controls (U+0000-001F: ``\\n``, ``\\r``, ``\\t`` by name, the others as
    ``\\xNN``), DEL, C1 controls (U+0080-009F), U+2028 and U+2029, the bidi embeddings,
    overrides and isolates (U+202A-202E, U+2066-2069) and the marks U+200E, U+200F, U+061C
    (as ``\\uNNNN``). Everything else is returned unchanged.
    """
    if text.isprintable():  # every escaped character is non-printable: the common case
        return text
    return text.translate(_TABLE)


class EscapingFormatter(logging.Formatter):
    """A log formatter whose every line is escaped, so no message can forge another.

    The message (with its arguments) is escaped whole; the rest of the format is the
    caller's. A traceback or stack keeps its own line breaks, each line escaped on its own.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        # format() sets record.message afresh for every formatter: no other handler is touched.
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: _ExcInfo) -> str:
        return _escape_lines(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _escape_lines(super().formatStack(stack_info))


def _escape_lines(text: str) -> str:
    return "\n".join(escape(line) for line in text.split("\n"))
