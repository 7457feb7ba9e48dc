"""The .p12 password file (node.pkcs12_password_file): read as a secret, its marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from farmkeys import pkcs12_password
from farmkeys.errors import ConfigError
from farmkeys.pkcs12_password import Protection


def password_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> str:
    path = tmp_path / "p12-password"
    path.write_bytes(content)
    os.chmod(path, mode)
    return str(path)


def test_the_password_is_the_first_line(tmp_path: Path) -> None:
    assert pkcs12_password.read(password_file(tmp_path, b"s3cret pw\nignored\n")) == b"s3cret pw"


def test_a_password_file_others_may_read_is_refused_in_one_line(tmp_path: Path) -> None:
    path = password_file(tmp_path, b"s3cret\n", 0o644)

    with pytest.raises(ConfigError) as caught:
        pkcs12_password.read(path)

    line = caught.value.diagnostics()
    assert "node.pkcs12_password_file" in line and "mode 0644" in line and "chmod 600" in line
    assert "\n" not in line and "s3cret" not in line


@pytest.mark.parametrize(
    ("content", "complaint"),
    [(b"", "is empty"), (b"\n", "is empty"), ("pässwort\n".encode(), "printable ASCII")],
)
def test_an_unusable_password_is_refused_without_showing_it(
    tmp_path: Path, content: bytes, complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint) as caught:
        pkcs12_password.read(password_file(tmp_path, content))
    assert "\n" not in caught.value.diagnostics()
    assert "pässwort" not in caught.value.diagnostics()


def test_a_missing_password_file_is_one_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read node\.pkcs12_password_file"):
        Protection.configured(str(tmp_path / "missing"))


def test_the_marker_changes_when_the_file_is_written_even_with_the_same_bytes(
    tmp_path: Path,
) -> None:
    path = password_file(tmp_path, b"s3cret\n")
    first = pkcs12_password.marker(path)
    assert pkcs12_password.marker(path) == first

    Path(path).write_bytes(b"s3cret\n")

    assert pkcs12_password.marker(path) != first
    assert "s3cret" not in first


def test_the_password_is_read_once_and_not_without_the_option(tmp_path: Path) -> None:
    path = password_file(tmp_path, b"one\n")
    protection = Protection.configured(path)
    assert protection.password() == b"one"
    Path(path).write_bytes(b"two\n")
    assert protection.password() == b"one"
    assert "one" not in repr(protection)
    unset = Protection.configured(None)
    assert (unset.marker, unset.password()) == (None, None)
