"""ldaps:// and StartTLS for real, against a slapd with certificates the test makes
(issue 9, part 4): the right CA and host work; a certificate for another host name, or
from a CA other than directory.ca_file, is refused before the password is sent."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import FAST_RETRY
from cryptography import x509

from farmkeys.config import DirectoryConfig
from farmkeys.directory import Directory
from farmkeys.errors import DirectoryError
from farmkeys_lab import tls
from farmkeys_lab.slapd import LocalSlapd


def server_files(
    ca: tls.Authority, folder: Path, *, names: list[x509.GeneralName]
) -> tuple[Path, Path]:
    """A server certificate from ``ca`` for ``names``, and its key, as slapd reads them."""
    key, certificate = tls.issue_server(ca, names)
    folder.mkdir(parents=True, exist_ok=True)
    return tls.write_pem(folder / "server.pem", certificate), tls.write_key(
        folder / "server.key", key
    )


LOOPBACK = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
OTHER_HOST = [x509.DNSName("ldap.example.net")]


@pytest.fixture(scope="module")
def ca() -> tls.Authority:
    return tls.new_ca("farmkeys test CA")


@pytest.fixture
def tls_slapd(
    make_slapd: Callable[..., LocalSlapd], ca: tls.Authority, tmp_path: Path
) -> Callable[[list[x509.GeneralName]], LocalSlapd]:
    def make(names: list[x509.GeneralName]) -> LocalSlapd:
        folder = tmp_path / f"tls-{uuid.uuid4().hex[:6]}"
        return make_slapd(tls=server_files(ca, folder, names=names))

    return make


def directory_for(
    server: LocalSlapd, tmp_path: Path, ca_file: Path, *, url: str | list[str], start_tls: bool
) -> Directory:
    password = server.write_password_file(tmp_path / f"pw-{uuid.uuid4().hex[:6]}")
    config = DirectoryConfig(
        url=url,
        bind_dn=server.service_dn,
        container=server.container,
        password_file=str(password),
        ca_file=str(ca_file),
        start_tls=start_tls,
        timeout_seconds=2,
    )
    return Directory(config, FAST_RETRY)


def works(directory: Directory) -> None:
    with directory:
        directory.bind()
        assert directory.container_exists(uuid.uuid4()) is False


@pytest.mark.parametrize("start_tls", [False, True], ids=["ldaps", "starttls"])
def test_the_right_ca_and_host_work(
    tls_slapd: Callable[..., LocalSlapd], ca: tls.Authority, tmp_path: Path, start_tls: bool
) -> None:
    server = tls_slapd(LOOPBACK)
    url = server.url if start_tls else server.ldaps_url
    directory = directory_for(
        server, tmp_path, tls.write_pem(tmp_path / "ca.pem", ca[1]), url=url, start_tls=start_tls
    )
    works(directory)
    assert directory.last_server == url


@pytest.mark.parametrize("start_tls", [False, True], ids=["ldaps", "starttls"])
def test_a_certificate_for_another_host_name_is_refused(
    tls_slapd: Callable[..., LocalSlapd], ca: tls.Authority, tmp_path: Path, start_tls: bool
) -> None:
    server = tls_slapd(OTHER_HOST)
    url = server.url if start_tls else server.ldaps_url
    directory = directory_for(
        server, tmp_path, tls.write_pem(tmp_path / "ca.pem", ca[1]), url=url, start_tls=start_tls
    )
    with pytest.raises(DirectoryError) as caught, directory:
        directory.bind()
    message = str(caught.value).lower()
    assert "certificate" in message or "hostname" in message or "host name" in message, message
    assert server.service_password not in str(caught.value)


@pytest.mark.parametrize("start_tls", [False, True], ids=["ldaps", "starttls"])
def test_a_certificate_from_an_unknown_ca_is_refused(
    tls_slapd: Callable[..., LocalSlapd], tmp_path: Path, start_tls: bool
) -> None:
    server = tls_slapd(LOOPBACK)
    url = server.url if start_tls else server.ldaps_url
    stranger = tls.write_pem(tmp_path / "other-ca.pem", tls.new_ca("another CA")[1])
    directory = directory_for(server, tmp_path, stranger, url=url, start_tls=start_tls)
    with pytest.raises(DirectoryError) as caught, directory:
        directory.bind()
    assert "certificate" in str(caught.value).lower(), caught.value


def test_a_server_whose_certificate_fails_is_passed_over_for_the_next(
    tls_slapd: Callable[..., LocalSlapd], ca: tls.Authority, tmp_path: Path
) -> None:
    impostor, good = tls_slapd(OTHER_HOST), tls_slapd(LOOPBACK)
    directory = directory_for(
        good,
        tmp_path,
        tls.write_pem(tmp_path / "ca.pem", ca[1]),
        url=[impostor.ldaps_url, good.ldaps_url],
        start_tls=False,
    )
    works(directory)
    assert directory.last_server == good.ldaps_url
