"""farmkeys.terminal: control characters from the config DB shown escaped, nothing else."""

from __future__ import annotations

import logging
import sys

import pytest
from farmtools import expect_ok, run_python

from farmkeys.terminal import EscapingFormatter, escape

C0 = [chr(c) for c in range(0x00, 0x20)]
C1 = [chr(c) for c in range(0x80, 0xA0)]
UNICODE = ["\u2028", "\u2029", *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))]
ESCAPED = [*C0, "\x7f", *C1, *UNICODE, "\u200e", "\u200f", "\u061c"]


def raw_controls(text: str) -> list[str]:
    """The characters of ``text`` that escape() would have escaped."""
    return [c for c in text if c in ESCAPED]


@pytest.mark.parametrize("char", ESCAPED, ids=lambda c: f"U+{ord(c):04X}")
def test_every_control_line_separator_and_bidi_control_is_escaped_visibly(char: str) -> None:
    shown = escape(f"a{char}b")
    assert raw_controls(shown) == []
    assert shown.startswith("a\\") and shown.endswith("b")
    assert shown.isascii() and shown.isprintable()


def test_the_escapes_read_as_python_writes_them() -> None:
    assert escape("\n\r\t") == "\\n\\r\\t"
    assert escape("\x00\x1b[8m\x7f") == "\\x00\\x1b[8m\\x7f"
    assert escape("\x85\x9b") == "\\x85\\x9b"  # NEL, 8-bit CSI
    assert escape("\u2028\u2029") == "\\u2028\\u2029"
    assert escape("\u202eabc\u202c \u2066x\u2069") == "\\u202eabc\\u202c \\u2066x\\u2069"
    forged = "node-x\n  health OK\x1b[8m"
    assert escape(forged) == "node-x\\n  health OK\\x1b[8m"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "node-a: in sync, generation 7",
        "Zoë, café, Ærøskøbing, naïve — ½ € ñ",
        "東京 München Ελληνικά עברית العربية",
        "CORP\\alice says \\n is not a newline",
        "emoji 🔑 and a non-breaking\u00a0space",
    ],
)
def test_ordinary_text_is_untouched(text: str) -> None:
    assert escape(text) == text


def test_the_formatter_escapes_message_and_arguments_but_keeps_the_format() -> None:
    formatter = EscapingFormatter("farmkeys: %(levelname)s: %(name)s: %(message)s")
    record = logging.LogRecord(
        "farmkeys.sync",
        logging.WARNING,
        __file__,
        1,
        "node %s failed: %s",
        ("evil\n  health OK\x1b[8m", "é\u202eKO"),
        None,
    )
    line = formatter.format(record)
    assert line == (
        "farmkeys: WARNING: farmkeys.sync: node evil\\n  health OK\\x1b[8m failed: é\\u202eKO"
    )
    assert record.getMessage() == "node evil\n  health OK\x1b[8m failed: é\u202eKO"


def test_a_traceback_keeps_its_lines_but_each_is_escaped() -> None:
    formatter = EscapingFormatter("%(message)s")
    try:
        raise ValueError("bad\x1b[2J row\nforged line")
    except ValueError:
        record = logging.LogRecord(
            "farmkeys", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    text = formatter.format(record)
    assert raw_controls(text.replace("\n", "")) == []
    assert text.startswith("failed\nTraceback (most recent call last):\n")
    assert "ValueError: bad\\x1b[2J row" in text


@pytest.mark.parametrize("service", [False, True])
def test_every_log_line_of_a_farmkeys_process_is_escaped(service: bool) -> None:
    # The logging farmkeys configures for every command (and `serve`), in a process of its
    # own: a message of any module, quoting the config DB, reaches stderr escaped.
    script = (
        "import logging\n"
        "from farmkeys import cli\n"
        f"cli._configure_logging(False, service={service})\n"
        "logging.getLogger('farmkeys.serve').warning(\n"
        "    '%s: sync failed: %s', 'node-b', 'node evil\\n  health OK\\x1b[8m \\u202eKO')\n"
    )
    result = run_python("-c", script)
    expect_ok(result)
    (line,) = result.err.splitlines()
    assert raw_controls(result.err.removesuffix("\n")) == []
    assert line.endswith("node-b: sync failed: node evil\\n  health OK\\x1b[8m \\u202eKO")
    # A service's journal names the module; a command's line reads like its errors.
    prefix = " farmkeys WARNING farmkeys.serve: " if service else "farmkeys: warning: node-b"
    assert prefix in line
