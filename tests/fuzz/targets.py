"""The parsers of untrusted input, as fuzz targets: each takes bytes and may end only in
farmkeys' own :class:`~farmkeys.errors.Error` (or return).

Used by tests/unit/test_untrusted_input.py (Hypothesis, in every test run) and tests/fuzz/run.py
(`make fuzz`: atheris, coverage-guided). Adding a parser is one entry in TARGETS.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

from farmkeys import config
from farmkeys.formats import adfs_pfx, blob, escrow_file, farm_state, request
from farmkeys.store import CertificateFiles, Manifest, Store

FARM = uuid.UUID("4d3c2b1a-0f9e-4d8c-8b7a-6f5e4d3c2b1a")
KEY_ID = uuid.UUID("11111111-2222-4333-8444-555555555555")
KEY = bytes(range(32))
CONTEXT = blob.BlobContext(
    farm=str(FARM), certificate_id="9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a", purpose="signing"
)
PASSPHRASE = b"correct horse battery staple"
ESCROW_WORK_FACTOR = 2  # the seed's: kept tiny so each try costs microseconds


@dataclass(frozen=True)
class Target:
    """One parser: ``run(data)`` feeds it; ``seeds()`` gives valid inputs to mutate."""

    run: Callable[[bytes], object]
    seeds: Callable[[], list[bytes]]


# -- the native blob -------------------------------------------------------------------


def _blob(data: bytes) -> None:
    blob.master_key_id(data, context=CONTEXT)
    blob.open_blob(data, master_key=KEY, context=CONTEXT)


@cache
def _blob_seeds() -> list[bytes]:
    sealed = blob.seal(b"pkcs12 bytes" * 8, master_key=KEY, master_key_id=KEY_ID, context=CONTEXT)
    return [sealed, blob.seal(b"", master_key=KEY, master_key_id=KEY_ID, context=CONTEXT)]


# -- the farm state record -------------------------------------------------------------


def _state(data: bytes) -> None:
    farm_state.parse(data)
    # Past the parser, under a MAC that verifies: what a node does next with it.
    mac = hmac.new(farm_state.mac_key(KEY, FARM), data, hashlib.sha256).digest()
    state = farm_state.verify(data, mac, farm=FARM, key_for=lambda _: KEY)
    state.differences(())


@cache
def _state_seeds() -> list[bytes]:
    class Row:
        def __init__(self, n: int, purpose: str, role: str) -> None:
            self.id, self.purpose, self.role = uuid.UUID(int=n), purpose, role
            self.thumbprint, self.master_key = f"{n:040X}", KEY_ID

    rows = [Row(1, "signing", "primary"), Row(2, "decryption", "primary")]
    rows.append(Row(3, "signing", "secondary"))
    built = farm_state.FarmState.build(
        farm=FARM, version=5, term=2, master_key=KEY_ID, rows=rows, revoked=["A" * 40]
    )
    return [built.encode()]


# -- the store's manifest --------------------------------------------------------------


def _manifest(data: bytes) -> None:
    Manifest.from_bytes(data)


@cache
def _manifest_seeds() -> list[bytes]:
    from farmkeys.formats import certificates

    made = certificates.generate(
        farm_name="fuzz",
        purpose="signing",
        key_type="rsa-2048",
        not_before=datetime(2026, 1, 1, tzinfo=UTC),
        not_after=datetime(2027, 1, 1, tzinfo=UTC),
    )
    thumb = certificates.thumbprint(made.certificate)
    files = CertificateFiles(
        purpose="signing",
        role="primary",
        thumbprint=thumb,
        not_after=made.certificate.not_valid_after_utc,
        certificate_pem=certificates.certificate_pem(made.certificate),
        private_key_pem=certificates.private_key_pem(made.key),
        pkcs12=certificates.to_pkcs12(made.certificate, made.key, friendly_name="fuzz"),
    )
    with tempfile.TemporaryDirectory() as folder:
        store = Store(Path(folder) / "store", node_id="fuzz")
        manifest = store.install(
            [files],
            now=datetime(2026, 2, 1, tzinfo=UTC),
            dkm_group=FARM,
            state_version=3,
            state_digest="0" * 64,
            forget=["B" * 40],
        )
    return [manifest.to_json().encode()]


# -- the config file -------------------------------------------------------------------

_CONFIG_FOLDER = Path(tempfile.mkdtemp(prefix="farmkeys-fuzz-config-"))


def _config(data: bytes) -> None:
    path = _CONFIG_FOLDER / "farmkeys.toml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    config.load(path, environ={})


def _config_seeds() -> list[bytes]:
    return [
        b"""[farm]
name = "contoso"
dkm_group = "6f1c5a0e-2b1d-4c53-9a3e-0d7f3b2a9c11"

[node]
id = "node-a"
store = "/var/lib/farmkeys/store"

[database]
dsn = "host=127.0.0.1 dbname=farmkeys user=farmkeys"

[directory]
url = ["ldaps://dc1.example.net", "ldaps://dc2.example.net"]
bind_dn = "cn=svc,dc=example,dc=net"
password_file = "/etc/farmkeys/password"
container = "ou=dkm,dc=example,dc=net"
ca_file = "/etc/farmkeys/ca.pem"

[policy]
key = "ec-p256"
certificate_duration = 365
generation_threshold = 20
promotion_threshold = 15
critical_threshold = 2

[lease]
ttl_seconds = 15
renew_seconds = 5
"""
    ]


# -- AD FS's EncryptedPfx --------------------------------------------------------------


def _adfs(data: bytes) -> None:
    adfs_pfx.parse(data)
    adfs_pfx.open_pfx(data, KEY)


@cache
def _adfs_seeds() -> list[bytes]:
    from adfs_encoder import encode  # the tests' own (tests/support/ is on sys.path)

    return [encode(b"pkcs12 bytes" * 10, dkm_key=KEY)]


# -- the escrow file (age) -------------------------------------------------------------


def _escrow(data: bytes) -> None:
    escrow_file.decrypt(data, PASSPHRASE, max_work_factor=ESCROW_WORK_FACTOR + 2)


@cache
def _escrow_seeds() -> list[bytes]:
    return [escrow_file.encrypt(b'{"keys": []}', PASSPHRASE, work_factor=ESCROW_WORK_FACTOR)]


# -- an operator request ------------------------------------------------------------------


def _request(data: bytes) -> None:
    request.parse(data)
    key = request.mac_key(KEY, FARM)
    mac = hmac.new(key, data, hashlib.sha256).digest()
    parsed = request.verify(
        data, mac, farm=FARM, row_id=request.parse(data).id, key_for=lambda _: KEY
    )
    assert parsed.encode() == data


def _request_seeds() -> list[bytes]:
    base = request.Request(
        id=7,
        nonce=uuid.UUID(int=9),
        farm=FARM,
        kind="rollover",
        purpose="all",
        urgent=True,
        requested_by="node-a",
        created=1_700_000_000,
        expires=1_700_000_180,
        master_key=KEY_ID,
    )
    repair = request.RepairTerms("ab" * 32, ("A" * 40,), True, 3)
    terms = request.ImportTerms(uuid.UUID(int=4), "secondary", "AD FS", "cd" * 32)
    who = request.Requester("alice via sudo as root", "web1", "CHG-42")
    return [
        base.encode(),  # format 1, as a farmkeys before issue 22 made it
        request.Request(**{**base.__dict__, "requester": who}).encode(),
        request.Request(**{**base.__dict__, "kind": "repair_state", "repair": repair}).encode(),
        request.Request(
            **{**base.__dict__, "kind": "import", "purpose": "signing", "import_": terms}
        ).encode(),
    ]


TARGETS: dict[str, Target] = {
    "request": Target(_request, _request_seeds),
    "blob": Target(_blob, _blob_seeds),
    "state": Target(_state, _state_seeds),
    "manifest": Target(_manifest, _manifest_seeds),
    "config": Target(_config, _config_seeds),
    "adfs": Target(_adfs, _adfs_seeds),
    "escrow": Target(_escrow, _escrow_seeds),
}

DEADLINE = timedelta(seconds=2)
