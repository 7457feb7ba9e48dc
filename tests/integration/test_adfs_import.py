"""`farmkeys import adfs` on a real farm (PostgreSQL + slapd): bringing AD FS certificates
across, keeping their key and thumbprint; every refusal changes nothing.

The EncryptedPfx vectors come from the test-only encoder of tests/support/adfs_encoder.py,
written from docs/blob-format.md. The Active Directory side (a DKM key read from a
Samba AD container laid out the AD FS way) is in tests/ad/test_ad_layout.py.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from adfs_encoder import encode
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from farmtools import (
    TestFarm,
    audit_events,
    db_query,
    expect_ok,
    lease_row,
    one_error_line,
    wait_until,
)
from serving import ServeNodes

from farmkeys.config import load
from farmkeys.directory import Directory
from farmkeys.errors import CertificateError
from farmkeys.formats import certificates as certificate_format

ADFS_KEY = bytes(range(7, 39))
ADFS_KEY_ID = uuid.UUID("0b6f3c1e-2d4a-4e5f-8a9b-c0d1e2f3a4b5")


def adfs_certificate(
    purpose: str = "signing",
    *,
    key_type: str = "rsa-2048",
    days: int = 365,
    starts: timedelta = timedelta(days=-30),
) -> certificate_format.Generated:
    """A certificate as AD FS makes one (self-signed, RSA 2048 by default)."""
    not_before = datetime.now(UTC).replace(microsecond=0) + starts
    return certificate_format.generate(
        farm_name="adfs.contoso.example",
        purpose=purpose,
        key_type=key_type,
        not_before=not_before,
        not_after=not_before + timedelta(days=days),
    )


def encrypted_pfx(
    made: certificate_format.Generated, *, key: bytes = ADFS_KEY, key_id: uuid.UUID = ADFS_KEY_ID
) -> bytes:
    """The base64 EncryptedPfx text AD FS's configuration would hold for ``made``."""
    pkcs12 = certificate_format.to_pkcs12(made.certificate, made.key, friendly_name="")
    return base64.b64encode(encode(pkcs12, dkm_key=key, key_id=key_id))


def write(tmp_path: Path, name: str, data: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    path.chmod(mode)
    return path


def key_file(tmp_path: Path, key: bytes = ADFS_KEY, *, form: str = "hex") -> Path:
    text = key.hex() if form == "hex" else base64.b64encode(key).decode()
    return write(tmp_path, f"dkm-{form}.key", (text + "\n").encode())


def certificates(farm: TestFarm) -> list[dict[str, object]]:
    return db_query(
        farm.dsn, "SELECT purpose, role, thumbprint FROM certificate ORDER BY purpose, role"
    )


def run_import(farm: TestFarm, pfx: Path, *args: str) -> tuple[int, str, str]:
    result = farm.run("import", "adfs", "--encrypted-pfx", str(pfx), "--wait", "20", *args)
    return result.code, result.out, result.err


def test_import_as_secondary_keeps_key_and_thumbprint_and_every_node_installs_it(
    initialised_farm: TestFarm, tmp_path: Path
) -> None:
    made = adfs_certificate()
    thumb = certificate_format.thumbprint(made.certificate)
    pfx = write(tmp_path, "signing.pfx", encrypted_pfx(made))
    code, out, err = run_import(
        initialised_farm, pfx, "--purpose", "signing", "--dkm-key-file", str(key_file(tmp_path))
    )
    assert code == 0, err
    assert f"imported {thumb} as the secondary" in out
    rows = certificates(initialised_farm)
    assert {"purpose": "signing", "role": "secondary", "thumbprint": thumb} in rows
    events = [e for e in audit_events(initialised_farm) if e["action"] == "import"]
    assert len(events) == 1
    assert events[0]["thumbprint"] == thumb and events[0]["term"] is not None
    assert str(ADFS_KEY_ID) in events[0]["detail"]
    for node in ("node-a", "node-b"):
        expect_ok(initialised_farm.run("sync", node=node))
        store = initialised_farm.store(node)
        installed = x509.load_pem_x509_certificate((store / f"signing/{thumb}.pem").read_bytes())
        assert certificate_format.thumbprint(installed) == thumb
        assert (store / "signing/secondary.key").read_bytes() == certificate_format.private_key_pem(
            made.key
        )
    # The rollover policy treats it like any other certificate: status knows it.
    doc = initialised_farm.run("status", "--json").json
    assert thumb in {c["thumbprint"] for c in doc["certificates"]}


def test_import_as_primary_replaces_the_primary_at_once_and_retires_it(
    initialised_farm: TestFarm, tmp_path: Path
) -> None:
    before = {
        r["role"]: r["thumbprint"]
        for r in certificates(initialised_farm)
        if r["purpose"] == "signing"
    }
    made = adfs_certificate()
    thumb = certificate_format.thumbprint(made.certificate)
    pfx = write(tmp_path, "signing.pfx", encrypted_pfx(made))
    keyfile = key_file(tmp_path, form="base64")
    code, _, err = run_import(
        initialised_farm,
        pfx,
        "--purpose",
        "signing",
        "--role",
        "primary",
        "--dkm-key-file",
        str(keyfile),
    )
    assert code == 0, err
    after = {
        r["role"]: r["thumbprint"]
        for r in certificates(initialised_farm)
        if r["purpose"] == "signing"
    }
    assert after == {"primary": thumb, "retired": before["primary"]}
    expect_ok(initialised_farm.run("sync"))
    assert (
        initialised_farm.store() / "signing/primary.key"
    ).read_bytes() == certificate_format.private_key_pem(made.key)
    # A change of primary like a promotion: recorded, and so it can be reverted (issue 23).
    revert = initialised_farm.run("rollover", "--revert", "--yes")
    assert revert.code == 0, revert.err
    assert f"signing: primary {before['primary']} (reverted), secondary {thumb}" in revert.out


def test_an_rsa_decryption_certificate_imports_and_is_installed(
    initialised_farm: TestFarm, tmp_path: Path
) -> None:
    made = adfs_certificate("decryption")
    pfx = write(tmp_path, "decryption.pfx", encrypted_pfx(made))
    code, _, err = run_import(
        initialised_farm, pfx, "--purpose", "decryption", "--dkm-key-file", str(key_file(tmp_path))
    )
    assert code == 0, err
    expect_ok(initialised_farm.run("sync"))
    assert (initialised_farm.store() / "decryption/secondary.key").exists()


def test_the_dkm_key_is_found_in_the_directory_by_its_id_or_by_trying_each(
    initialised_farm: TestFarm, tmp_path: Path
) -> None:
    # An AD FS farm's DKM container, in this directory's layout, under directory.container.
    cfg = load(initialised_farm.config())
    adfs_group = uuid.uuid4()
    with Directory(cfg.directory, cfg.retry) as directory:
        directory.create_container(adfs_group, farm_name="adfs")
        directory.ensure_key(adfs_group, ADFS_KEY_ID, ADFS_KEY)
        try:
            made = adfs_certificate()
            pfx = write(tmp_path, "by-id.pfx", encrypted_pfx(made))
            code, _, err = run_import(initialised_farm, pfx, "--purpose", "signing")
            assert code == 0, err
            # A blob naming a key id the directory does not have: every key is tried.
            other = adfs_certificate("decryption")
            pfx = write(tmp_path, "other-id.pfx", encrypted_pfx(other, key_id=uuid.uuid4()))
            code, _, err = run_import(initialised_farm, pfx, "--purpose", "decryption")
            assert code == 0, err
            # A blob naming one key of the container but sealed under another (the id is
            # not authenticated): the named key fails its MAC, the next one opens it.
            second = bytes(range(100, 132))
            directory.ensure_key(adfs_group, uuid.uuid4(), second)
            third = adfs_certificate()
            pfx = write(tmp_path, "misnamed.pfx", encrypted_pfx(third, key=second))
            code, _, err = run_import(
                initialised_farm, pfx, "--purpose", "signing", "--role", "primary"
            )
            assert code == 0, err
        finally:
            directory.delete_container(adfs_group)
    roles = {(r["purpose"], r["thumbprint"]) for r in certificates(initialised_farm)}
    assert ("signing", certificate_format.thumbprint(made.certificate)) in roles
    assert ("decryption", certificate_format.thumbprint(other.certificate)) in roles


def test_through_a_running_leader(initialised_farm: TestFarm, tmp_path: Path) -> None:
    made = adfs_certificate()
    pfx = write(tmp_path, "signing.pfx", encrypted_pfx(made))
    with ServeNodes(initialised_farm) as nodes:
        nodes.start("node-b")
        wait_until(
            lambda: (
                lease_row(initialised_farm.dsn)["valid"]
                and lease_row(initialised_farm.dsn)["holder_node"] == "node-b"
            ),
            20,
            "node-b leads",
            detail=nodes.logs,
        )
        code, out, err = run_import(
            initialised_farm, pfx, "--purpose", "signing", "--dkm-key-file", str(key_file(tmp_path))
        )
        assert code == 0, err + nodes.logs()
        assert "answered by node-b" in out


def _refused(farm: TestFarm, pfx: Path, *args: str) -> str:
    before = db_query(farm.dsn, "SELECT id, role, master_key FROM certificate ORDER BY id")
    events = len(audit_events(farm))
    done = db_query(farm.dsn, "SELECT id FROM rollover_request WHERE ok")
    result = farm.run("import", "adfs", "--encrypted-pfx", str(pfx), "--wait", "20", *args)
    assert result.code != 0, result.out
    line = one_error_line(result)
    assert db_query(farm.dsn, "SELECT id, role, master_key FROM certificate ORDER BY id") == before
    assert len(audit_events(farm)) == events
    assert db_query(farm.dsn, "SELECT id FROM rollover_request WHERE ok") == done
    return line


def test_a_wrong_dkm_key_is_refused(initialised_farm: TestFarm, tmp_path: Path) -> None:
    pfx = write(tmp_path, "s.pfx", encrypted_pfx(adfs_certificate()))
    wrong = key_file(tmp_path, bytes(32))
    line = _refused(initialised_farm, pfx, "--purpose", "signing", "--dkm-key-file", str(wrong))
    assert "MAC verifies under none" in line and str(ADFS_KEY_ID) in line


def test_no_readable_dkm_key_in_the_directory_is_refused(
    initialised_farm: TestFarm, tmp_path: Path
) -> None:
    pfx = write(tmp_path, "s.pfx", encrypted_pfx(adfs_certificate()))
    line = _refused(initialised_farm, pfx, "--purpose", "signing", "--role", "primary")
    # The farm's own master key is tried too (the MAC decides), and does not fit.
    assert "MAC verifies under none" in line or "no DKM key" in line


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "MAC"),
        (lambda b: b[:150], "malformed"),
        (lambda b: b"\x00\x00\x00\x02" + b[4:], "version 2"),
        (lambda b: b[:4] + b"\x00\x00\x00\x01" + b[8:], "method 1"),
    ],
)
def test_a_tampered_truncated_or_unknown_blob_is_refused(
    initialised_farm: TestFarm, tmp_path: Path, edit: object, complaint: str
) -> None:
    made = adfs_certificate()
    raw = base64.b64decode(encrypted_pfx(made))
    pfx = write(tmp_path, "s.pfx", edit(raw))  # type: ignore[operator]
    line = _refused(
        initialised_farm, pfx, "--purpose", "signing", "--dkm-key-file", str(key_file(tmp_path))
    )
    assert complaint in line


def test_a_certificate_already_in_the_farm_is_refused(
    initialised_farm: TestFarm, tmp_path: Path
) -> None:
    pfx = write(tmp_path, "s.pfx", encrypted_pfx(adfs_certificate()))
    keyfile = str(key_file(tmp_path))
    assert (
        run_import(initialised_farm, pfx, "--purpose", "signing", "--dkm-key-file", keyfile)[0] == 0
    )
    line = _refused(
        initialised_farm,
        pfx,
        "--purpose",
        "signing",
        "--role",
        "primary",
        "--dkm-key-file",
        keyfile,
    )
    assert "already in the farm" in line


def test_a_second_secondary_is_refused(initialised_farm: TestFarm, tmp_path: Path) -> None:
    keyfile = str(key_file(tmp_path))
    first = write(tmp_path, "1.pfx", encrypted_pfx(adfs_certificate()))
    assert (
        run_import(initialised_farm, first, "--purpose", "signing", "--dkm-key-file", keyfile)[0]
        == 0
    )
    second = write(tmp_path, "2.pfx", encrypted_pfx(adfs_certificate()))
    line = _refused(initialised_farm, second, "--purpose", "signing", "--dkm-key-file", keyfile)
    assert "already has a secondary signing certificate" in line


def test_an_expired_certificate_is_refused(initialised_farm: TestFarm, tmp_path: Path) -> None:
    old = adfs_certificate(days=10, starts=timedelta(days=-20))
    pfx = write(tmp_path, "s.pfx", encrypted_pfx(old))
    line = _refused(
        initialised_farm, pfx, "--purpose", "signing", "--dkm-key-file", str(key_file(tmp_path))
    )
    assert "expired" in line


def test_an_ec_certificate_cannot_be_a_decryption_certificate(
    initialised_farm: TestFarm, tmp_path: Path
) -> None:
    pfx = write(tmp_path, "d.pfx", encrypted_pfx(adfs_certificate(key_type="ec-p256")))
    keyfile = str(key_file(tmp_path))
    line = _refused(initialised_farm, pfx, "--purpose", "decryption", "--dkm-key-file", keyfile)
    assert "cannot decrypt" in line


def test_a_purpose_the_key_usage_forbids_is_refused(
    initialised_farm: TestFarm, tmp_path: Path
) -> None:
    # farmkeys' own decryption certificates allow keyEncipherment only.
    pfx = write(tmp_path, "d.pfx", encrypted_pfx(adfs_certificate("decryption")))
    line = _refused(
        initialised_farm, pfx, "--purpose", "signing", "--dkm-key-file", str(key_file(tmp_path))
    )
    assert "lacks digitalSignature" in line


def test_a_key_that_is_not_the_certificates_is_refused() -> None:
    # OpenSSL will not write such a PKCS#12, so the check itself is shown here, and the
    # CLI's refusal of a PKCS#12 whose certificate is not its key's just below.
    made = adfs_certificate()
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(CertificateError, match="is not its key"):
        certificate_format.check_importable(
            made.certificate, stranger, purpose="signing", now=datetime.now(UTC)
        )


def test_a_pkcs12_without_the_keys_certificate_is_refused(
    initialised_farm: TestFarm, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives.serialization import NoEncryption, pkcs12

    made = adfs_certificate()
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    data = pkcs12.serialize_key_and_certificates(
        None, stranger, None, [made.certificate], NoEncryption()
    )
    pfx = write(
        tmp_path, "s.pfx", base64.b64encode(encode(data, dkm_key=ADFS_KEY, key_id=ADFS_KEY_ID))
    )
    line = _refused(
        initialised_farm, pfx, "--purpose", "signing", "--dkm-key-file", str(key_file(tmp_path))
    )
    assert "no certificate for its private key" in line


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_dkm_key_file_others_may_read_is_refused(
    initialised_farm: TestFarm, tmp_path: Path, mode: int
) -> None:
    pfx = write(tmp_path, "s.pfx", encrypted_pfx(adfs_certificate()))
    exposed = write(tmp_path, "exposed.key", ADFS_KEY.hex().encode(), mode)
    line = _refused(initialised_farm, pfx, "--purpose", "signing", "--dkm-key-file", str(exposed))
    assert "may be read or written by group or others" in line and "chmod 600" in line
    assert ADFS_KEY.hex() not in line


def test_a_dkm_key_file_without_a_key_is_refused(
    initialised_farm: TestFarm, tmp_path: Path
) -> None:
    pfx = write(tmp_path, "s.pfx", encrypted_pfx(adfs_certificate()))
    short = write(tmp_path, "short.key", b"00ff\n")
    line = _refused(initialised_farm, pfx, "--purpose", "signing", "--dkm-key-file", str(short))
    assert "does not hold a 32-byte key" in line


def test_the_key_never_reaches_output_or_logs(
    initialised_farm: TestFarm, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made = adfs_certificate()
    pfx = write(tmp_path, "s.pfx", encrypted_pfx(made))
    caplog.set_level("DEBUG")
    result = initialised_farm.run(
        "import",
        "adfs",
        "--encrypted-pfx",
        str(pfx),
        "--purpose",
        "signing",
        "--dkm-key-file",
        str(key_file(tmp_path)),
        "--debug",
    )
    expect_ok(result)
    pem = certificate_format.private_key_pem(made.key).decode()
    for text in (result.out, result.err, caplog.text):
        for secret in (ADFS_KEY.hex(), base64.b64encode(ADFS_KEY).decode(), pem[40:100]):
            assert secret not in text
    blob = db_query(initialised_farm.dsn, "SELECT import_blob FROM rollover_request")[0][
        "import_blob"
    ]
    assert pem.encode()[40:100] not in bytes(blob)


def _forged_request(
    farm: TestFarm, made: certificate_format.Generated, master_key: bytes | None
) -> int:
    """An import request written straight into the config DB, as its writer could: sealed
    under ``master_key`` (a guess, without the farm's key), or under the farm's own key."""
    from farmkeys.db import ConfigDB
    from farmkeys.formats import blob as blob_format
    from farmkeys.formats.blob import blob_context

    cfg = load(farm.config())
    pkcs12 = certificate_format.to_pkcs12(made.certificate, made.key, friendly_name="")
    with ConfigDB(cfg.database, cfg.retry) as db, Directory(cfg.directory, cfg.retry) as dirx:
        found = db.farm()
        assert found is not None
        key_id = dirx.current_key_id(found.dkm_group)
        cert_id = uuid.uuid4()
        blob = blob_format.seal(
            pkcs12,
            master_key=master_key or dirx.master_key(found.dkm_group, key_id),
            master_key_id=key_id,
            context=blob_context(found.dkm_group, cert_id, "signing"),
        )
        if master_key is not None:  # the writer's own row: it cannot sign the request
            return int(
                db.fetch(
                    "INSERT INTO rollover_request (requested_by, purpose, urgent, master_key,"
                    " import_certificate, import_blob, import_role, import_source) VALUES"
                    " ('intruder', 'signing', false, false, %s, %s, 'primary', 'forged')"
                    " RETURNING id",
                    (cert_id, blob),
                )[0]["id"]
            )
        from farmkeys.formats import request as request_format
        from farmkeys.requesting import file_request

        terms = request_format.ImportTerms(
            cert_id, "primary", "forged", request_format.blob_digest(blob)
        )
        return file_request(
            cfg,
            db,
            dirx,
            kind="import",
            purpose="signing",
            urgent=False,
            lifetime_seconds=60,
            import_=(terms, blob),
        )


def test_a_config_db_writer_without_the_master_key_cannot_slip_a_certificate_in(
    initialised_farm: TestFarm,
) -> None:
    made = adfs_certificate()
    request = _forged_request(initialised_farm, made, master_key=bytes(32))
    # The next time anyone leads, the pending request is answered: refused.
    expect_ok(initialised_farm.run("rollover", "--purpose", "decryption"))
    row = db_query(
        initialised_farm.dsn, "SELECT ok, result FROM rollover_request WHERE id = %s", (request,)
    )
    assert row[0]["ok"] is False and "carries no MAC" in row[0]["result"]
    thumb = certificate_format.thumbprint(made.certificate)
    assert not db_query(
        initialised_farm.dsn, "SELECT 1 FROM certificate WHERE thumbprint = %s", (thumb,)
    )
    assert not [e for e in audit_events(initialised_farm) if e["action"] == "import"]


def test_the_leader_checks_again_and_refuses_what_arrived_meanwhile(
    initialised_farm: TestFarm, tmp_path: Path
) -> None:
    # The same certificate twice, the second past the CLI's own checks (a race): the
    # leader refuses it in its fenced transaction; the CLI reports that in one line.
    made = adfs_certificate()
    pfx = write(tmp_path, "s.pfx", encrypted_pfx(made))
    keyfile = str(key_file(tmp_path))
    assert (
        run_import(initialised_farm, pfx, "--purpose", "signing", "--dkm-key-file", keyfile)[0] == 0
    )
    request = _forged_request(initialised_farm, made, master_key=None)
    expect_ok(initialised_farm.run("rollover", "--purpose", "decryption"))
    row = db_query(
        initialised_farm.dsn, "SELECT ok, result FROM rollover_request WHERE id = %s", (request,)
    )
    assert row[0]["ok"] is False and "already in the farm" in row[0]["result"]
    roles = db_query(
        initialised_farm.dsn,
        "SELECT role FROM certificate WHERE thumbprint = %s",
        (certificate_format.thumbprint(made.certificate),),
    )
    assert roles == [{"role": "secondary"}]


def test_an_oversized_or_missing_input_file_is_refused(
    initialised_farm: TestFarm, tmp_path: Path
) -> None:
    huge = write(tmp_path, "huge.pfx", b"A" * (4 * 1024 * 1024 + 1))
    line = _refused(
        initialised_farm, huge, "--purpose", "signing", "--dkm-key-file", str(key_file(tmp_path))
    )
    assert "larger than" in line
    line = _refused(initialised_farm, tmp_path / "absent.pfx", "--purpose", "signing")
    assert "cannot read the EncryptedPfx file" in line
