"""ldaps:// and StartTLS for real, against a slapd with certificates the test makes
(issue 9, part 4): the right CA and host work; a certificate for another host name, or
from a CA other than directory.ca_file, is refused before the password is sent."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import FAST_RETRY
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from farmkeys.config import DirectoryConfig
from farmkeys.directory import Directory
from farmkeys.errors import DirectoryError
from farmkeys.lab.slapd import LocalSlapd

NOW = datetime.now(UTC)


@dataclass(frozen=True)
class Authority:
    name: str
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    def write(self, path: Path) -> Path:
        path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return path


def authority(name: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Authority(name, key, certificate)


def server_files(
    ca: Authority, folder: Path, *, names: list[x509.GeneralName]
) -> tuple[Path, Path]:
    """A server certificate from ``ca`` for ``names``, and its key, as slapd reads them."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "slapd")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


LOOPBACK = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
OTHER_HOST = [x509.DNSName("ldap.example.net")]


@pytest.fixture(scope="module")
def ca() -> Authority:
    return authority("farmkeys test CA")


@pytest.fixture
def tls_slapd(
    make_slapd: Callable[..., LocalSlapd], ca: Authority, tmp_path: Path
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
    tls_slapd: Callable[..., LocalSlapd], ca: Authority, tmp_path: Path, start_tls: bool
) -> None:
    server = tls_slapd(LOOPBACK)
    url = server.url if start_tls else server.ldaps_url
    directory = directory_for(
        server, tmp_path, ca.write(tmp_path / "ca.pem"), url=url, start_tls=start_tls
    )
    works(directory)
    assert directory.last_server == url


@pytest.mark.parametrize("start_tls", [False, True], ids=["ldaps", "starttls"])
def test_a_certificate_for_another_host_name_is_refused(
    tls_slapd: Callable[..., LocalSlapd], ca: Authority, tmp_path: Path, start_tls: bool
) -> None:
    server = tls_slapd(OTHER_HOST)
    url = server.url if start_tls else server.ldaps_url
    directory = directory_for(
        server, tmp_path, ca.write(tmp_path / "ca.pem"), url=url, start_tls=start_tls
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
    stranger = authority("another CA").write(tmp_path / "other-ca.pem")
    directory = directory_for(server, tmp_path, stranger, url=url, start_tls=start_tls)
    with pytest.raises(DirectoryError) as caught, directory:
        directory.bind()
    assert "certificate" in str(caught.value).lower(), caught.value


def test_a_server_whose_certificate_fails_is_passed_over_for_the_next(
    tls_slapd: Callable[..., LocalSlapd], ca: Authority, tmp_path: Path
) -> None:
    impostor, good = tls_slapd(OTHER_HOST), tls_slapd(LOOPBACK)
    directory = directory_for(
        good,
        tmp_path,
        ca.write(tmp_path / "ca.pem"),
        url=[impostor.ldaps_url, good.ldaps_url],
        start_tls=False,
    )
    works(directory)
    assert directory.last_server == good.ldaps_url
