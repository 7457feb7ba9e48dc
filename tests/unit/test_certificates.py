"""Key and certificate generation, fingerprints, PEM/DER and PKCS#12."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtensionOID, NameOID

from farmkeys.config import MAX_FARM_NAME
from farmkeys.errors import CertificateError
from farmkeys.formats import certificates

NOT_BEFORE = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
NOT_AFTER = NOT_BEFORE + timedelta(days=365)


def make(
    purpose: str = "signing", key_type: str = "rsa-2048", **kwargs: object
) -> certificates.Generated:
    args: dict[str, object] = {
        "farm_name": "Contoso",
        "purpose": purpose,
        "key_type": key_type,
        "not_before": NOT_BEFORE,
        "not_after": NOT_AFTER,
    }
    args.update(kwargs)
    return certificates.generate(**args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def rsa_signing() -> certificates.Generated:
    return make("signing", "rsa-2048")


@pytest.fixture(scope="module")
def rsa_decryption() -> certificates.Generated:
    return make("decryption", "rsa-2048")


@pytest.fixture(scope="module")
def ec_signing() -> certificates.Generated:
    return make("signing", "ec-p256")


@pytest.fixture(scope="module")
def ec_decryption() -> certificates.Generated:
    return make("decryption", "ec-p256")


@pytest.fixture(
    scope="module", params=["rsa_signing", "rsa_decryption", "ec_signing", "ec_decryption"]
)
def any_generated(request: pytest.FixtureRequest) -> certificates.Generated:
    """Each of the four kinds of certificate a farm can have."""
    generated: certificates.Generated = request.getfixturevalue(request.param)
    return generated


def key_usage(cert: x509.Certificate) -> tuple[x509.KeyUsage, bool]:
    extension = cert.extensions.get_extension_for_class(x509.KeyUsage)
    return extension.value, extension.critical


# --- keys --------------------------------------------------------------------


@pytest.mark.parametrize(("key_type", "bits"), [("rsa-2048", 2048), ("rsa-3072", 3072)])
def test_rsa_key_types_generate_keys_of_their_size_with_exponent_65537(
    key_type: str, bits: int
) -> None:
    key = certificates.generate_private_key(key_type)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == bits
    assert key.public_key().public_numbers().e == 65537


def test_rsa_4096_generates_a_working_certificate() -> None:
    generated = make("decryption", "rsa-4096")
    assert isinstance(generated.key, rsa.RSAPrivateKey)
    assert generated.key.key_size == 4096
    assert certificates.key_matches(generated.certificate, generated.key)
    assert key_usage(generated.certificate)[0].key_encipherment


def test_ec_p256_generates_a_secp256r1_key() -> None:
    key = certificates.generate_private_key("ec-p256")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)


@pytest.mark.parametrize("key_type", ["rsa-1024", "ec-p384", "RSA-2048", "ed25519", ""])
def test_unknown_key_type_is_refused(key_type: str) -> None:
    with pytest.raises(ValueError, match="key type"):
        certificates.generate_private_key(key_type)


def test_every_configurable_key_type_is_supported() -> None:
    from farmkeys.vocab import KEY_TYPES

    assert set(KEY_TYPES) == {"rsa-2048", "rsa-3072", "rsa-4096", "ec-p256"}
    for key_type in KEY_TYPES:
        certificates.generate_private_key(key_type)


# --- certificate contents ----------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "common_name"),
    [
        ("rsa_signing", "Contoso Token Signing"),
        ("rsa_decryption", "Contoso Token Decryption"),
        ("ec_signing", "Contoso Token Signing"),
        ("ec_decryption", "Contoso Token Decryption"),
    ],
)
def test_certificate_is_self_issued_to_the_farm_and_purpose(
    fixture: str, common_name: str, request: pytest.FixtureRequest
) -> None:
    cert = request.getfixturevalue(fixture).certificate
    expected = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    assert cert.subject == expected
    assert cert.issuer == expected


def test_certificate_is_v3_signed_with_sha256_by_its_own_key(
    any_generated: certificates.Generated,
) -> None:
    cert = any_generated.certificate
    assert cert.version == x509.Version.v3
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    cert.verify_directly_issued_by(cert)


def test_certificate_is_not_a_ca_and_says_so_critically(
    any_generated: certificates.Generated,
) -> None:
    extension = any_generated.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert extension.critical
    assert extension.value.ca is False
    assert extension.value.path_length is None


def test_certificate_has_a_subject_key_identifier_of_its_key(
    any_generated: certificates.Generated,
) -> None:
    extension = any_generated.certificate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    )
    assert not extension.critical
    assert extension.value == x509.SubjectKeyIdentifier.from_public_key(
        any_generated.key.public_key()
    )


def test_certificate_has_exactly_the_three_extensions(
    any_generated: certificates.Generated,
) -> None:
    oids = {extension.oid for extension in any_generated.certificate.extensions}
    assert oids == {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    }


@pytest.mark.parametrize("fixture", ["rsa_signing", "ec_signing"])
def test_signing_certificate_may_only_sign(fixture: str, request: pytest.FixtureRequest) -> None:
    usage, critical = key_usage(request.getfixturevalue(fixture).certificate)
    assert critical
    assert usage.digital_signature
    assert not usage.key_encipherment
    assert not usage.key_agreement
    assert not usage.key_cert_sign


def test_rsa_decryption_certificate_may_only_encipher_keys(
    rsa_decryption: certificates.Generated,
) -> None:
    usage, critical = key_usage(rsa_decryption.certificate)
    assert critical
    assert usage.key_encipherment
    assert not usage.digital_signature
    assert not usage.key_agreement


def test_ec_decryption_certificate_uses_key_agreement_because_ec_cannot_encipher(
    ec_decryption: certificates.Generated,
) -> None:
    usage, critical = key_usage(ec_decryption.certificate)
    assert critical
    assert usage.key_agreement
    assert not usage.key_encipherment
    assert not usage.digital_signature
    assert not usage.encipher_only
    assert not usage.decipher_only


def test_certificate_is_valid_exactly_for_the_times_passed(
    rsa_signing: certificates.Generated,
) -> None:
    assert rsa_signing.certificate.not_valid_before_utc == NOT_BEFORE
    assert rsa_signing.certificate.not_valid_after_utc == NOT_AFTER


def test_validity_beyond_2049_is_kept() -> None:
    # X.509 switches from UTCTime to GeneralizedTime in 2050.
    not_after = datetime(2051, 6, 1, tzinfo=UTC)
    cert = make("signing", "ec-p256", not_after=not_after).certificate
    assert cert.not_valid_after_utc == not_after


def test_times_in_another_zone_are_converted_to_utc() -> None:
    paris = timezone(timedelta(hours=1))
    cert = make(
        "signing",
        "ec-p256",
        not_before=datetime(2025, 3, 1, 13, 0, 0, tzinfo=paris),
        not_after=datetime(2026, 3, 1, 13, 0, 0, tzinfo=paris),
    ).certificate
    assert cert.not_valid_before_utc == NOT_BEFORE
    assert cert.not_valid_after_utc == NOT_AFTER


def test_fractions_of_a_second_are_dropped() -> None:
    cert = make(
        "signing",
        "ec-p256",
        not_before=NOT_BEFORE.replace(microsecond=999_999),
        not_after=NOT_AFTER.replace(microsecond=1),
    ).certificate
    assert cert.not_valid_before_utc == NOT_BEFORE
    assert cert.not_valid_after_utc == NOT_AFTER


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        make("signing", "ec-p256", not_before=datetime(2025, 3, 1))


@pytest.mark.parametrize("not_after", [NOT_BEFORE, NOT_BEFORE - timedelta(days=1)])
def test_not_after_must_be_after_not_before(not_after: datetime) -> None:
    with pytest.raises(ValueError, match="must be after"):
        make("signing", "ec-p256", not_after=not_after)


def test_serial_numbers_are_random_and_positive(ec_signing: certificates.Generated) -> None:
    again = certificates.build_certificate(
        farm_name="Contoso",
        purpose="signing",
        key=ec_signing.key,
        not_before=NOT_BEFORE,
        not_after=NOT_AFTER,
    )
    assert again.serial_number != ec_signing.certificate.serial_number
    assert again.serial_number > 0
    assert certificates.thumbprint(again) != certificates.thumbprint(ec_signing.certificate)


def test_unknown_purpose_is_refused_before_a_key_is_generated() -> None:
    with pytest.raises(ValueError, match="purpose"):
        make("encryption", "rsa-4096")


def test_longest_configurable_farm_name_fits_the_common_name() -> None:
    name = "F" * MAX_FARM_NAME
    cert = make("decryption", "ec-p256", farm_name=name).certificate
    assert cert.subject.rfc4514_string() == f"CN={name} Token Decryption"


def test_farm_name_too_long_for_a_common_name_is_refused() -> None:
    with pytest.raises(ValueError, match="64"):
        make("decryption", "ec-p256", farm_name="F" * (MAX_FARM_NAME + 1))


def test_empty_farm_name_is_refused() -> None:
    with pytest.raises(ValueError, match="farm_name"):
        make("signing", "ec-p256", farm_name=" ")


def test_generated_refuses_a_key_that_is_not_the_certificates(
    rsa_signing: certificates.Generated, ec_signing: certificates.Generated
) -> None:
    with pytest.raises(ValueError, match="not the key"):
        certificates.Generated(certificate=rsa_signing.certificate, key=ec_signing.key)


# --- fingerprints ------------------------------------------------------------


def test_thumbprint_is_the_upper_case_sha1_of_the_der(
    any_generated: certificates.Generated,
) -> None:
    cert = any_generated.certificate
    thumb = certificates.thumbprint(cert)
    assert re.fullmatch(r"[0-9A-F]{40}", thumb)
    assert thumb == hashlib.sha1(certificates.certificate_der(cert)).hexdigest().upper()


def test_sha256_fingerprint_is_the_upper_case_sha256_of_the_der(
    any_generated: certificates.Generated,
) -> None:
    cert = any_generated.certificate
    fingerprint = certificates.sha256_fingerprint(cert)
    assert re.fullmatch(r"[0-9A-F]{64}", fingerprint)
    assert fingerprint == hashlib.sha256(certificates.certificate_der(cert)).hexdigest().upper()


# --- key_matches -------------------------------------------------------------


def test_key_matches_its_own_certificate(any_generated: certificates.Generated) -> None:
    assert certificates.key_matches(any_generated.certificate, any_generated.key)


def test_key_does_not_match_another_certificate(
    rsa_signing: certificates.Generated,
    rsa_decryption: certificates.Generated,
    ec_signing: certificates.Generated,
    ec_decryption: certificates.Generated,
) -> None:
    assert not certificates.key_matches(rsa_signing.certificate, rsa_decryption.key)
    assert not certificates.key_matches(ec_signing.certificate, ec_decryption.key)
    assert not certificates.key_matches(rsa_signing.certificate, ec_signing.key)


# --- PEM and DER -------------------------------------------------------------


def test_certificate_der_loads_back(any_generated: certificates.Generated) -> None:
    der = certificates.certificate_der(any_generated.certificate)
    assert certificates.load_certificate_der(der) == any_generated.certificate


@pytest.mark.parametrize(
    "data", [b"", b"garbage", b"\x30\x03\x02\x01\x01", b"-----BEGIN CERTIFICATE-----"]
)
def test_garbage_is_not_a_der_certificate(data: bytes) -> None:
    with pytest.raises(CertificateError, match="not a valid DER"):
        certificates.load_certificate_der(data)


def test_certificate_pem_loads_back(any_generated: certificates.Generated) -> None:
    pem = certificates.certificate_pem(any_generated.certificate)
    assert pem.startswith(b"-----BEGIN CERTIFICATE-----\n")
    assert x509.load_pem_x509_certificate(pem) == any_generated.certificate


def test_private_key_pem_is_unencrypted_pkcs8(any_generated: certificates.Generated) -> None:
    pem = certificates.private_key_pem(any_generated.key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    loaded = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(loaded, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    assert certificates.key_matches(any_generated.certificate, loaded)


# --- PKCS#12 -----------------------------------------------------------------


def test_pkcs12_round_trips(any_generated: certificates.Generated) -> None:
    data = certificates.to_pkcs12(any_generated.certificate, any_generated.key, friendly_name="x")
    back = certificates.from_pkcs12(data)
    assert back.certificate == any_generated.certificate
    assert certificates.private_key_pem(back.key) == certificates.private_key_pem(any_generated.key)


def test_pkcs12_carries_the_friendly_name(rsa_signing: certificates.Generated) -> None:
    data = certificates.to_pkcs12(
        rsa_signing.certificate, rsa_signing.key, friendly_name="Contoso Token Signing ü"
    )
    loaded = pkcs12.load_pkcs12(data, None)
    assert loaded.cert is not None
    assert loaded.cert.friendly_name == "Contoso Token Signing ü".encode()


def test_pkcs12_refuses_a_key_that_is_not_the_certificates(
    rsa_signing: certificates.Generated, rsa_decryption: certificates.Generated
) -> None:
    with pytest.raises(ValueError, match="not the key"):
        certificates.to_pkcs12(rsa_signing.certificate, rsa_decryption.key, friendly_name="x")


@pytest.mark.parametrize("fixture", ["rsa_decryption", "ec_signing"])
def test_openssl_reads_the_pkcs12_without_a_password(
    fixture: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    openssl = shutil.which("openssl")
    assert openssl, "openssl must be on PATH for this test"
    generated = request.getfixturevalue(fixture)
    path = tmp_path / "f.p12"
    path.write_bytes(
        certificates.to_pkcs12(generated.certificate, generated.key, friendly_name="farm cert")
    )
    result = subprocess.run(
        [openssl, "pkcs12", "-in", str(path), "-passin", "pass:", "-nodes"],
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    out = result.stdout
    assert b"friendlyName: farm cert" in out
    cert = x509.load_pem_x509_certificate(
        out[out.index(b"-----BEGIN CERTIFICATE-----") : out.index(b"-----END CERTIFICATE-----")]
        + b"-----END CERTIFICATE-----\n"
    )
    assert cert == generated.certificate
    key = serialization.load_pem_private_key(
        out[out.index(b"-----BEGIN PRIVATE KEY-----") : out.index(b"-----END PRIVATE KEY-----")]
        + b"-----END PRIVATE KEY-----\n",
        password=None,
    )
    assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    assert certificates.key_matches(cert, key)


def test_a_protected_pkcs12_opens_with_its_password_only_and_keeps_its_name(
    rsa_signing: certificates.Generated,
) -> None:
    plain = certificates.to_pkcs12(rsa_signing.certificate, rsa_signing.key, friendly_name="farm x")

    protected = certificates.protect_pkcs12(plain, b"correct horse")

    assert certificates.pkcs12_opens(protected, b"correct horse")
    assert not certificates.pkcs12_opens(protected, b"wrong horse")
    assert not certificates.pkcs12_opens(protected, b"")
    loaded = pkcs12.load_pkcs12(protected, b"correct horse")
    assert loaded.cert is not None and loaded.cert.friendly_name == b"farm x"
    assert loaded.cert.certificate == rsa_signing.certificate
    assert loaded.key is not None and certificates.key_matches(rsa_signing.certificate, loaded.key)


@pytest.mark.parametrize("fixture", ["rsa_decryption", "ec_signing"])
def test_openssl_reads_a_protected_pkcs12_as_aes_256_cbc_pbkdf2_and_hmac_sha256(
    fixture: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    openssl = shutil.which("openssl")
    assert openssl, "openssl must be on PATH for this test"
    generated = request.getfixturevalue(fixture)
    path, password = tmp_path / "f.p12", tmp_path / "password"
    path.write_bytes(
        certificates.to_pkcs12(
            generated.certificate, generated.key, friendly_name="farm", password=b"s3cret"
        )
    )
    password.write_text("s3cret\n")

    def info(passin: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [openssl, "pkcs12", "-in", str(path), "-passin", passin, "-noout", "-info"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )

    good = info(f"file:{password}")
    assert good.returncode == 0, good.stderr
    said = good.stdout + good.stderr
    rounds = f"Iteration {certificates.PKCS12_KDF_ROUNDS}, PRF hmacWithSHA256"
    assert f"Shrouded Keybag: PBES2, PBKDF2, AES-256-CBC, {rounds}" in said
    assert f"PKCS7 Encrypted data: PBES2, PBKDF2, AES-256-CBC, {rounds}" in said
    assert "MAC: sha256" in said
    assert info("pass:wrong").returncode != 0


@pytest.mark.parametrize("data", [b"garbage", b"\x30\x80" + bytes(40)])
def test_protect_pkcs12_refuses_what_is_not_a_pkcs12(data: bytes) -> None:
    with pytest.raises(CertificateError, match="cannot be parsed"):
        certificates.protect_pkcs12(data, b"pw")


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x30\x80" + bytes(40)])
def test_garbage_is_not_a_pkcs12(data: bytes) -> None:
    with pytest.raises(CertificateError, match="cannot be parsed"):
        certificates.from_pkcs12(data)


def test_password_protected_pkcs12_is_refused(rsa_signing: certificates.Generated) -> None:
    data = pkcs12.serialize_key_and_certificates(
        b"x",
        rsa_signing.key,
        rsa_signing.certificate,
        None,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(CertificateError, match="cannot be parsed"):
        certificates.from_pkcs12(data)


def test_pkcs12_without_a_key_is_refused(rsa_signing: certificates.Generated) -> None:
    data = pkcs12.serialize_key_and_certificates(
        b"x", None, rsa_signing.certificate, None, serialization.NoEncryption()
    )
    with pytest.raises(CertificateError, match="no private key") as caught:
        certificates.from_pkcs12(data)
    assert certificates.thumbprint(rsa_signing.certificate) in caught.value.what


def test_pkcs12_without_a_certificate_is_refused(rsa_signing: certificates.Generated) -> None:
    data = pkcs12.serialize_key_and_certificates(
        b"x", rsa_signing.key, None, None, serialization.NoEncryption()
    )
    with pytest.raises(CertificateError, match="no certificate"):
        certificates.from_pkcs12(data)


def test_pkcs12_with_an_unsupported_key_type_is_refused() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Contoso Token Signing")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .sign(key, None)
    )
    data = pkcs12.serialize_key_and_certificates(
        b"x", key, cert, None, serialization.NoEncryption()
    )
    with pytest.raises(CertificateError, match="neither RSA nor EC"):
        certificates.from_pkcs12(data)


def test_pkcs12_never_puts_key_material_in_its_errors(rsa_signing: certificates.Generated) -> None:
    data = pkcs12.serialize_key_and_certificates(
        b"x", rsa_signing.key, None, None, serialization.NoEncryption()
    )
    with pytest.raises(CertificateError) as caught:
        certificates.from_pkcs12(data)
    der = rsa_signing.key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert der.hex().upper() not in str(caught.value).upper()
    assert caught.value.__cause__ is None
