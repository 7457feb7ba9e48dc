"""The node store: layout, permissions, the atomic switch, and failures that change nothing."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import grp
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from farmkeys.errors import StoreError, UnsafePathError
from farmkeys.store import Carried, CertificateFiles, Manifest, Store
from farmkeys.store import reader as store_module

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534


@dataclass(frozen=True)
class Issued:
    """A real self-signed certificate with its key, in the forms the store writes."""

    thumbprint: str
    not_after: datetime
    certificate_pem: bytes
    private_key_pem: bytes
    pkcs12: bytes

    def as_(self, purpose: str, role: str) -> CertificateFiles:
        return CertificateFiles(
            purpose=purpose,
            role=role,
            thumbprint=self.thumbprint,
            not_after=self.not_after,
            certificate_pem=self.certificate_pem,
            private_key_pem=self.private_key_pem,
            pkcs12=self.pkcs12,
        )


def issue(common_name: str, days: int) -> Issued:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_after = (NOW + timedelta(days=days)).replace(microsecond=0)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    return Issued(
        thumbprint=certificate.fingerprint(hashes.SHA1()).hex().upper(),
        not_after=not_after,
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
        private_key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        pkcs12=pkcs12.serialize_key_and_certificates(
            common_name.encode(), key, certificate, None, serialization.NoEncryption()
        ),
    )


@pytest.fixture(scope="module")
def pki() -> dict[str, Issued]:
    return {
        "signing-1": issue("farm Token Signing", 365),
        "signing-2": issue("farm Token Signing", 385),
        "signing-3": issue("farm Token Signing", 405),
        "decryption-1": issue("farm Token Decryption", 365),
        "decryption-2": issue("farm Token Decryption", 385),
    }


@pytest.fixture
def first_set(pki: dict[str, Issued]) -> list[CertificateFiles]:
    """A primary and a secondary signing certificate, a primary decryption certificate."""
    return [
        pki["signing-1"].as_("signing", "primary"),
        pki["signing-2"].as_("signing", "secondary"),
        pki["decryption-1"].as_("decryption", "primary"),
    ]


@pytest.fixture
def rolled_set(pki: dict[str, Issued]) -> list[CertificateFiles]:
    """The first set after a rollover: the secondary promoted, the old primary retired."""
    return [
        pki["signing-2"].as_("signing", "primary"),
        pki["signing-1"].as_("signing", "retired"),
        pki["decryption-2"].as_("decryption", "primary"),
        pki["decryption-1"].as_("decryption", "retired"),
    ]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store", node_id="node-1")


def identity(certificates: list[CertificateFiles]) -> frozenset[tuple[str, str, str]]:
    return frozenset((c.purpose, c.role, c.thumbprint) for c in certificates)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ``root``, links unfollowed: kind, mode, owner, and content or target."""
    entries: dict[str, tuple[object, ...]] = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(folder, name)
            status = os.lstat(path)
            key = str(path.relative_to(root))
            ownership = (stat.S_IMODE(status.st_mode), status.st_uid, status.st_ino)
            if stat.S_ISLNK(status.st_mode):
                entries[key] = ("link", os.readlink(path))
            elif stat.S_ISDIR(status.st_mode):
                entries[key] = ("folder", *ownership)
            else:
                entries[key] = ("file", *ownership, path.read_bytes())
    return entries


# -- layout, permissions, manifest ------------------------------------------


def test_first_install_lays_out_the_store_for_the_federation_service(store, first_set):
    store.install(first_set, now=NOW)

    root = store.path
    assert os.readlink(root / "current") == ".generations/1"
    assert os.readlink(root / "manifest.json") == "current/manifest.json"
    assert os.readlink(root / "signing") == "current/signing"
    assert os.readlink(root / "decryption") == "current/decryption"
    signing_primary, signing_secondary, decryption_primary = first_set
    for certificate in first_set:
        folder = root / certificate.purpose
        assert (folder / f"{certificate.thumbprint}.pem").read_bytes() == (
            certificate.certificate_pem
        )
        assert (folder / f"{certificate.thumbprint}.key").read_bytes() == (
            certificate.private_key_pem
        )
        assert (folder / f"{certificate.thumbprint}.p12").read_bytes() == certificate.pkcs12
    assert (root / "signing/primary.pem").read_bytes() == signing_primary.certificate_pem
    assert (root / "signing/secondary.key").read_bytes() == signing_secondary.private_key_pem
    assert (root / "decryption/primary.p12").read_bytes() == decryption_primary.pkcs12
    assert not (root / "decryption/secondary.pem").exists()
    assert sorted(os.listdir(root / ".generations")) == ["1"]


def test_every_folder_is_0700_and_every_private_key_file_0600(store, first_set):
    store.install(first_set, now=NOW)

    assert mode(store.path) == 0o700
    folders = [Path(f) for f, _, _ in os.walk(store.path)]
    assert len(folders) >= 5  # store, .generations, 1, signing, decryption
    assert all(mode(folder) == 0o700 for folder in folders)
    key_files = list(store.path.glob(".generations/*/*/*.key"))
    pkcs12_files = list(store.path.glob(".generations/*/*/*.p12"))
    assert len(key_files) == len(pkcs12_files) == 6  # 3 by thumbprint, 2 primary, 1 secondary
    assert all(mode(path) == 0o600 for path in key_files + pkcs12_files)
    assert mode(store.path / "signing/primary.key") == 0o600
    assert mode(store.path / ".lock") == 0o600


def test_private_keys_are_0600_whatever_the_umask(store, first_set):
    previous = os.umask(0)
    try:
        store.install(first_set, now=NOW)
    finally:
        os.umask(previous)

    assert mode(store.path / "signing/primary.key") == 0o600
    assert mode(store.path / "decryption/primary.p12") == 0o600
    assert mode(store.path / ".generations/1/signing") == 0o700


def test_manifest_names_each_certificate_and_its_files_relative_to_the_store(store, first_set):
    returned = store.install(first_set, now=NOW)

    document = json.loads((store.path / "manifest.json").read_text())
    assert document["node"] == "node-1"
    assert document["generation"] == 1
    assert datetime.fromisoformat(document["installed_at"]) == NOW
    assert datetime.fromisoformat(document["installed_at"]).utcoffset() is not None
    listed = {(c["purpose"], c["role"], c["thumbprint"]): c for c in document["certificates"]}
    assert set(listed) == identity(first_set)
    for certificate in first_set:
        entry = listed[(certificate.purpose, certificate.role, certificate.thumbprint)]
        assert datetime.fromisoformat(entry["not_after"]) == certificate.not_after
        files = entry["files"]
        base = f"{certificate.purpose}/{certificate.thumbprint}"
        assert files == {"cert": f"{base}.pem", "key": f"{base}.key", "pkcs12": f"{base}.p12"}
        assert (store.path / files["cert"]).read_bytes() == certificate.certificate_pem
        assert (store.path / files["key"]).read_bytes() == certificate.private_key_pem
        assert (store.path / files["pkcs12"]).read_bytes() == certificate.pkcs12
    assert store.manifest() == returned
    assert returned.identity() == identity(first_set)


def test_manifest_round_trips_through_json(store, first_set):
    manifest = store.install(first_set, now=NOW)

    assert Manifest.from_json(manifest.to_json()) == manifest


def test_role_aliases_are_hard_links_to_the_thumbprint_files(store, first_set, rolled_set):
    store.install(first_set, now=NOW)
    store.install(rolled_set, now=NOW)

    signing = store.path / "signing"
    primary, retired = rolled_set[0], rolled_set[1]
    for suffix in (".pem", ".key", ".p12"):
        alias = signing / f"primary{suffix}"
        target = signing / f"{primary.thumbprint}{suffix}"
        assert alias.read_bytes() == target.read_bytes()
        assert os.stat(alias).st_ino == os.stat(target).st_ino
        assert not alias.is_symlink()
        assert (signing / f"{retired.thumbprint}{suffix}").exists()
    assert not (signing / "secondary.pem").exists()
    assert not (signing / "retired.pem").exists()


def test_repr_of_certificate_files_shows_no_private_key(first_set):
    text = repr(first_set[0])

    assert first_set[0].thumbprint in text
    assert "PRIVATE KEY" not in text
    assert "pkcs12" not in text


# -- switching generations --------------------------------------------------


def test_second_install_switches_everything_at_once_and_increments_generation(
    store, first_set, rolled_set
):
    store.install(first_set, now=NOW)
    later = NOW + timedelta(days=5)

    manifest = store.install(rolled_set, now=later)

    assert manifest.generation == 2
    assert manifest.installed_at == later
    assert os.readlink(store.path / "current") == ".generations/2"
    assert store.manifest() == manifest
    assert manifest.identity() == identity(rolled_set)
    assert (store.path / "signing/primary.pem").read_bytes() == rolled_set[0].certificate_pem
    assert (store.path / "decryption/primary.key").read_bytes() == rolled_set[2].private_key_pem
    assert not (store.path / "signing/secondary.pem").exists()
    assert store.matches(identity(rolled_set))


def test_only_the_current_and_previous_generations_are_kept(store, first_set, rolled_set):
    for certificates in (first_set, rolled_set, first_set, rolled_set):
        store.install(certificates, now=NOW)

    assert sorted(os.listdir(store.path / ".generations")) == ["3", "4"]
    assert store.manifest().generation == 4


def test_a_reader_that_resolved_the_old_paths_can_finish_after_the_switch(
    store, first_set, rolled_set
):
    store.install(first_set, now=NOW)
    old_primary = Path(os.path.realpath(store.path / "signing/primary.pem"))
    old_manifest = Path(os.path.realpath(store.path / "manifest.json"))
    with open(store.path / "signing/primary.key", "rb") as already_open:
        store.install(rolled_set, now=NOW)

        assert already_open.read() == first_set[0].private_key_pem
    assert old_primary.read_bytes() == first_set[0].certificate_pem
    assert json.loads(old_manifest.read_text())["generation"] == 1
    assert (store.path / "signing/primary.pem").read_bytes() == rolled_set[0].certificate_pem


def test_a_concurrent_reader_sees_either_the_old_set_or_the_new_never_a_mix(
    store, first_set, rolled_set
):
    store.install(first_set, now=NOW)
    expected = {1: first_set[0].certificate_pem, 0: rolled_set[0].certificate_pem}
    stop = threading.Event()
    seen: list[tuple[int, bytes, bytes]] = []
    whole_files: list[bool] = []

    def read() -> None:
        while not stop.is_set():
            # A reader that needs two files from one set resolves `current` once.
            generation = Path(os.path.realpath(store.path / "current"))
            try:
                manifest = json.loads((generation / "manifest.json").read_bytes())
                primary = (generation / "signing/primary.pem").read_bytes()
            except FileNotFoundError:
                continue  # two switches happened meanwhile: start over
            # Odd generations hold first_set, even ones rolled_set.
            parity = manifest["generation"] % 2
            seen.append((parity, primary, expected[parity]))
            # A reader using the fixed paths gets one generation's whole file.
            with contextlib.suppress(FileNotFoundError):
                whole = (store.path / "signing/primary.pem").read_bytes() in expected.values()
                whole_files.append(whole)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for round_ in range(20):
            store.install(rolled_set if round_ % 2 == 0 else first_set, now=NOW)
    finally:
        stop.set()
        reader.join()

    assert seen
    assert whole_files
    assert all(primary == wanted for _, primary, wanted in seen)
    assert all(whole_files)


# -- failures that leave the installed set as it was -------------------------

INSTALL_SCRIPT = """
import base64, json, os, resource, signal, sys
from datetime import datetime
from pathlib import Path

from farmkeys.errors import StoreError, UnsafePathError
from farmkeys.store import CertificateFiles, Store

job = json.loads(Path(sys.argv[1]).read_text())
certificates = [
    CertificateFiles(
        purpose=c["purpose"],
        role=c["role"],
        thumbprint=c["thumbprint"],
        not_after=datetime.fromisoformat(c["not_after"]),
        certificate_pem=base64.b64decode(c["certificate_pem"]),
        private_key_pem=base64.b64decode(c["private_key_pem"]),
        pkcs12=base64.b64decode(c["pkcs12"]),
    )
    for c in job["certificates"]
]
store = Store(Path(job["store"]), node_id="node-1")
if job["file_size_limit"] is not None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    limit = job["file_size_limit"]
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
if job["uid"] is not None:
    os.setgroups([])
    os.setgid(job["uid"])
    os.setuid(job["uid"])
try:
    store.install(certificates, now=datetime.fromisoformat(job["now"]))
except StoreError as exc:
    print(exc)
    sys.exit(3)
print("installed")
"""


def install_in_subprocess(
    tmp_path: Path,
    store_path: Path,
    certificates: list[CertificateFiles],
    *,
    file_size_limit: int | None = None,
    uid: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Install from a separate process, with a real file size limit or as another user."""

    def encoded(data: bytes) -> str:
        return base64.b64encode(data).decode()

    job = {
        "store": str(store_path),
        "now": NOW.isoformat(),
        "file_size_limit": file_size_limit,
        "uid": uid,
        "certificates": [
            {
                "purpose": c.purpose,
                "role": c.role,
                "thumbprint": c.thumbprint,
                "not_after": c.not_after.isoformat(),
                "certificate_pem": encoded(c.certificate_pem),
                "private_key_pem": encoded(c.private_key_pem),
                "pkcs12": encoded(c.pkcs12),
            }
            for c in certificates
        ],
    }
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    environment = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-c", INSTALL_SCRIPT, str(job_file)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=False,
    )


def assert_no_key_material(text: str, certificates: list[CertificateFiles]) -> None:
    assert "PRIVATE KEY" not in text
    for certificate in certificates:
        for line in certificate.private_key_pem.decode().splitlines()[1:-1]:
            assert line not in text
        assert base64.b64encode(certificate.pkcs12[:48]).decode() not in text


def test_a_write_failing_midway_leaves_the_previous_set_byte_for_byte(
    tmp_path, store, first_set, rolled_set
):
    store.install(first_set, now=NOW)
    before = snapshot(store.path)
    # Room for a certificate file, not for a private key: the key is cut off partway.
    limit = len(rolled_set[0].certificate_pem) + 16
    assert len(rolled_set[0].private_key_pem) > limit

    result = install_in_subprocess(tmp_path, store.path, rolled_set, file_size_limit=limit)

    assert result.returncode == 3, result.stderr
    message = result.stdout.strip()
    assert message.startswith(f"cannot write the new certificate set into {store.path}: ")
    assert "[Errno 27] File too large" in message
    assert "the installed certificates were left as they were" in message
    assert "\n" not in message
    assert_no_key_material(message + result.stderr, rolled_set)
    assert snapshot(store.path) == before
    assert sorted(os.listdir(store.path / ".generations")) == ["1"]
    assert store.matches(identity(first_set))


def test_a_first_install_failing_midway_leaves_nothing_installed(tmp_path, store, first_set):
    limit = len(first_set[0].certificate_pem) + 16

    result = install_in_subprocess(tmp_path, store.path, first_set, file_size_limit=limit)

    assert result.returncode == 3, result.stderr
    assert "[Errno 27] File too large" in result.stdout
    assert "nothing was installed" in result.stdout
    assert store.manifest() is None
    assert os.listdir(store.path / ".generations") == []
    assert not (store.path / "current").exists()


@pytest.fixture
def reachable_folder() -> Iterator[Path]:
    """A folder outside pytest's root-only tmp tree, so another user can reach a store in it."""
    folder = Path(tempfile.mkdtemp(prefix="farmkeys-store-test-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder)


def test_a_generations_folder_of_another_owner_leaves_the_previous_set_byte_for_byte(
    tmp_path, reachable_folder, first_set, rolled_set
):
    # The test command runs as root (it installs slapd); without root this must fail, not skip.
    assert os.geteuid() == 0, "run the tests as root (make test): this one switches users"
    store = Store(reachable_folder / "store", node_id="node-1")
    store.install(first_set, now=NOW)
    # The service account owns the store and its lock, but may not add a generation.
    os.chown(store.path, NOBODY, NOBODY)
    os.chown(store.path / ".lock", NOBODY, NOBODY)
    (store.path / ".generations").chmod(0o755)
    before = snapshot(store.path)

    result = install_in_subprocess(tmp_path, store.path, rolled_set, uid=NOBODY)

    assert result.returncode == 3, result.stderr
    # A folder the service account does not own is refused before anything is written.
    assert result.stdout.strip() == (
        f"{store.path}/.generations is owned by uid 0, not by this account (uid {NOBODY})"
        " — give the store to the account farmkeys runs as (chown -R), or point node.store"
        " at a folder of its own; nothing was changed"
    )
    assert snapshot(store.path) == before
    assert store.matches(identity(first_set))


def test_leftovers_of_a_crashed_install_are_cleared_by_the_next(store, first_set, rolled_set):
    store.install(first_set, now=NOW)
    staging = store.path / ".generations/.new-crashed"
    (staging / "signing").mkdir(parents=True)
    (staging / "signing/half.key").write_bytes(b"partial")
    (store.path / ".generations/2").mkdir()  # renamed, never switched to
    (store.path / ".generations/2/junk").write_bytes(b"x")
    (store.path / ".current-crashed").symlink_to(".generations/2")

    manifest = store.install(rolled_set, now=NOW)

    assert manifest.generation == 2
    assert sorted(os.listdir(store.path / ".generations")) == ["1", "2"]
    assert not (store.path / ".generations/2/junk").exists()
    assert not os.path.lexists(store.path / ".current-crashed")
    assert store.matches(identity(rolled_set))


# -- the store folder ---------------------------------------------------------


def test_a_missing_store_is_created_with_its_parents_0700(tmp_path, first_set):
    store = Store(tmp_path / "var/lib/farmkeys/store", node_id="node-1")

    store.install(first_set, now=NOW)

    for folder in ("var", "var/lib", "var/lib/farmkeys", "var/lib/farmkeys/store"):
        assert mode(tmp_path / folder) == 0o700
    assert store.matches(identity(first_set))


def test_an_empty_existing_folder_becomes_the_store(tmp_path, first_set):
    (tmp_path / "store").mkdir()

    Store(tmp_path / "store", node_id="node-1").install(first_set, now=NOW)

    assert (tmp_path / "store/signing/primary.pem").exists()


def test_a_0755_store_folder_is_tightened_to_0700(tmp_path, first_set):
    (tmp_path / "store").mkdir()
    (tmp_path / "store").chmod(0o755)

    Store(tmp_path / "store", node_id="node-1").install(first_set, now=NOW)

    assert mode(tmp_path / "store") == 0o700


def test_a_non_empty_folder_without_a_store_layout_is_refused_untouched(tmp_path, first_set):
    folder = tmp_path / "someone-elses"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    before = snapshot(folder)

    with pytest.raises(StoreError, match="holds other files and no farmkeys store") as caught:
        Store(folder, node_id="node-1").install(first_set, now=NOW)

    assert str(folder) in str(caught.value)
    assert snapshot(folder) == before


def test_a_real_folder_where_a_store_link_belongs_is_refused(store, first_set):
    store.install(first_set, now=NOW)
    (store.path / "signing").unlink()
    (store.path / "signing").mkdir()

    with pytest.raises(StoreError, match="is not a link"):
        store.install(first_set, now=NOW)

    assert os.readlink(store.path / "current") == ".generations/1"


def test_install_gives_up_with_store_error_while_another_install_holds_the_lock(
    tmp_path, first_set
):
    store = Store(tmp_path / "store", node_id="node-1", lock_timeout_seconds=0.2)
    store.install(first_set, now=NOW)
    with open(store.path / ".lock", "rb") as other:
        fcntl.flock(other, fcntl.LOCK_EX)

        with pytest.raises(StoreError, match=r"another install .* still held"):
            store.install(first_set, now=NOW)

    assert store.manifest().generation == 1


def test_install_waits_for_another_install_to_release_the_lock(tmp_path, first_set):
    store = Store(tmp_path / "store", node_id="node-1", lock_timeout_seconds=10)
    store.install(first_set, now=NOW)
    other = open(store.path / ".lock", "rb")  # noqa: SIM115 - closed by the timer
    fcntl.flock(other, fcntl.LOCK_EX)
    release = threading.Timer(0.3, other.close)
    release.start()

    manifest = store.install(first_set, now=NOW)

    release.join()
    assert manifest.generation == 2


# -- reading: manifest() and matches() -----------------------------------------


def test_an_empty_store_has_no_manifest_and_matches_nothing(store):
    assert store.manifest() is None
    assert not store.matches(frozenset())
    assert not store.path.exists()  # reading creates nothing


def test_a_corrupt_manifest_is_a_store_error_and_an_install_repairs_it(store, first_set):
    store.install(first_set, now=NOW)
    manifest_file = store.path / ".generations/1/manifest.json"
    manifest_file.write_text('{"node": "node-1", "generation": ')

    with pytest.raises(StoreError, match=r"manifest of the store .* is malformed") as caught:
        store.manifest()

    assert str(store.path) in caught.value.what
    assert "farmkeys sync" in caught.value.todo
    assert not store.matches(identity(first_set))
    assert store.install(first_set, now=NOW).generation == 2
    assert store.matches(identity(first_set))


def test_a_manifest_that_names_another_generation_is_corrupt(store, first_set):
    store.install(first_set, now=NOW)
    manifest_file = store.path / ".generations/1/manifest.json"
    document = json.loads(manifest_file.read_text())
    document["generation"] = 7
    manifest_file.write_text(json.dumps(document))

    with pytest.raises(StoreError, match="says generation 7 in generation 1"):
        store.manifest()


def test_a_current_link_pointing_outside_the_store_is_a_store_error(store, first_set):
    store.install(first_set, now=NOW)
    (store.path / "current").unlink()
    (store.path / "current").symlink_to("/etc")

    with pytest.raises(StoreError, match="not at a generation of the store"):
        store.manifest()


def test_verify_installed_reads_a_file_once_and_sees_one_changed_in_place(
    store, first_set, monkeypatch
):
    """What /healthz runs per request: nothing installed is None, an unreadable store a
    StoreError (inspect() says None for both), and a file is read again only when its
    stat changed, which any write to it does."""
    assert store.verify_installed() is None
    store.install(first_set, now=NOW)
    fresh = Store(store.path, node_id="node-1")  # nothing verified yet
    reads = []
    real = store_module._holds
    monkeypatch.setattr(store_module, "_holds", lambda *a: reads.append(a) or real(*a))
    found = fresh.verify_installed()
    assert found is not None and found.complete and found.matches(identity(first_set))
    assert len(reads) == 9  # three certificates, three files each
    reads.clear()
    assert fresh.verify_installed().complete
    assert reads == []  # every stat unchanged: no file read again

    primary = first_set[0]
    key = store.path / "signing" / f"{primary.thumbprint}.key"
    with key.open("r+b") as file:  # the same name, inode and size; other bytes
        file.write(b"X")
    found = fresh.verify_installed()
    assert not found.complete
    assert ("signing", primary.thumbprint) not in found.intact
    assert len(found.intact) == 2

    (store.path / "current").unlink()
    (store.path / "current").write_text("not a link")
    assert fresh.inspect() is None
    with pytest.raises(StoreError, match="is not a link"):
        fresh.verify_installed()


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda d: d.pop("node"), "exactly the keys"),
        (lambda d: d.update(generation=True), "generation must be a positive integer"),
        (lambda d: d.update(generation=0), "generation must be a positive integer"),
        (lambda d: d.update(installed_at="2025-03-01T12:00:00"), "installed_at has no time zone"),
        (lambda d: d.update(installed_at="yesterday"), "not an ISO 8601 timestamp"),
        (lambda d: d["certificates"][0].update(role="archived"), "role must be one of"),
        (lambda d: d["certificates"][0].update(thumbprint="ab" * 20), "40 upper-case hex"),
        (
            lambda d: d["certificates"][0]["files"].update(key="../../etc/shadow"),
            r"files must name",
        ),
        (
            lambda d: d["certificates"].append(dict(d["certificates"][0])),
            "listed twice",
        ),
        (lambda d: d.update(pkcs12_password="hunter2"), "pkcs12_password must be the marker"),
        (lambda d: d.update(pkcs12_password=7), "pkcs12_password must be the marker"),
    ],
)
def test_a_malformed_manifest_is_refused_with_what_is_wrong(store, first_set, change, complaint):
    document = json.loads(store.install(first_set, now=NOW).to_json())
    change(document)

    with pytest.raises(StoreError, match=complaint):
        Manifest.from_json(json.dumps(document))


def test_a_manifest_that_is_not_json_is_refused():
    with pytest.raises(StoreError, match="malformed"):
        Manifest.from_json("not json")


def test_matches_is_true_for_the_installed_set_only(store, first_set, rolled_set):
    store.install(first_set, now=NOW)

    assert store.matches(identity(first_set))
    assert not store.matches(identity(rolled_set))
    assert not store.matches(identity(first_set[:2]))


@pytest.mark.parametrize(
    "deleted",
    ["signing/{thumbprint}.key", "signing/{thumbprint}.p12", "signing/primary.pem"],
)
def test_matches_is_false_when_a_file_was_deleted(store, first_set, deleted):
    store.install(first_set, now=NOW)

    (store.path / deleted.format(thumbprint=first_set[0].thumbprint)).unlink()

    assert not store.matches(identity(first_set))


def test_matches_is_false_when_a_fixed_link_is_missing(store, first_set):
    store.install(first_set, now=NOW)

    (store.path / "decryption").unlink()

    assert not store.matches(identity(first_set))
    store.install(first_set, now=NOW)
    assert store.matches(identity(first_set))


# -- input validation -----------------------------------------------------------


@pytest.mark.parametrize(
    ("roles", "complaint"),
    [
        (
            [("signing-1", "signing", "primary"), ("signing-2", "signing", "primary")],
            "more than one primary signing",
        ),
        (
            [("signing-1", "signing", "secondary"), ("signing-2", "signing", "secondary")],
            "more than one secondary signing",
        ),
        (
            [("signing-1", "signing", "primary"), ("signing-1", "signing", "retired")],
            "listed twice",
        ),
    ],
)
def test_an_impossible_set_is_refused_before_anything_is_written(store, pki, roles, complaint):
    certificates = [pki[name].as_(purpose, role) for name, purpose, role in roles]

    with pytest.raises(ValueError, match=complaint):
        store.install(certificates, now=NOW)

    assert not store.path.exists()


def test_several_retired_certificates_and_one_per_purpose_are_allowed(store, pki):
    certificates = [
        pki["signing-3"].as_("signing", "primary"),
        pki["signing-2"].as_("signing", "retired"),
        pki["signing-1"].as_("signing", "retired"),
        pki["signing-1"].as_("decryption", "primary"),
    ]

    manifest = store.install(certificates, now=NOW)

    assert manifest.identity() == identity(certificates)


def test_a_naive_now_is_refused(store, first_set):
    with pytest.raises(ValueError, match="now must be a timezone-aware"):
        store.install(first_set, now=datetime(2025, 3, 1))

    assert not store.path.exists()


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"purpose": "encryption"}, "purpose must be one of"),
        ({"role": "archived"}, "role must be one of"),
        ({"thumbprint": "A" * 39}, "40 upper-case hex"),
        ({"not_after": datetime(2026, 1, 1)}, "timezone-aware"),
        ({"private_key_pem": b"-----BEGIN RSA PRIVATE KEY-----\n"}, "not an unencrypted PKCS#8"),
        ({"pkcs12": b""}, "pkcs12 .* must be non-empty bytes"),
        ({"certificate_pem": b"garbage"}, "is not a PEM certificate"),
    ],
)
def test_certificate_files_are_checked_when_made(pki, changes, complaint):
    good = pki["signing-1"].as_("signing", "primary")

    with pytest.raises(ValueError, match=complaint) as caught:
        replace(good, **changes)

    assert "PRIVATE KEY-----\nMI" not in str(caught.value)


def test_a_thumbprint_that_is_not_the_certificates_is_refused(pki):
    good = pki["signing-1"].as_("signing", "primary")

    with pytest.raises(ValueError, match="has thumbprint"):
        replace(good, thumbprint=pki["signing-2"].thumbprint)


def test_the_lowercase_thumbprint_is_refused(pki):
    good = pki["signing-1"].as_("signing", "primary")

    with pytest.raises(ValueError, match="40 upper-case hex"):
        replace(good, thumbprint=good.thumbprint.lower())


# -- the serve tests' watcher (tests/support/serving.py) reads stores as the service would --


def test_the_watcher_records_each_switch_at_the_stores_own_time_even_when_it_looks_late(
    store, first_set, rolled_set
):
    from serving import ManifestWatcher

    store.install(first_set, now=datetime.now(UTC))
    # It looks only once a minute: every record below comes from its first and its last look.
    with ManifestWatcher({"n": store.path}, interval=60.0) as watcher:
        time.sleep(0.3)  # the first look happens at once
        before = time.time()
        store.install(rolled_set, now=datetime.now(UTC))
        after = time.time()
        time.sleep(0.3)
    # Left the `with` just after a switch and long before the next look: still recorded,
    # at the moment the store switched, not when the watcher got round to it.
    assert [found for _, found in watcher.changes["n"]] == [
        identity(first_set),
        identity(rolled_set),
    ]
    switched = watcher.changes["n"][1][0]
    assert before - 0.02 <= switched <= after + 0.02


# -- file digests: a set changed in place is not "in sync" (issue 9, part 3) ----------


@pytest.mark.parametrize(
    "path",
    [
        "signing/primary.key",  # the alias the federation service reads
        "decryption/primary.pem",
    ],
)
def test_a_file_changed_in_place_makes_the_store_not_match(store, first_set, path):
    store.install(first_set, now=NOW)
    assert store.matches(identity(first_set))
    target = (store.path / path).resolve()
    data = target.read_bytes()
    target.write_bytes(data[:-2] + bytes([data[-2] ^ 1]) + data[-1:])  # same size, one bit

    assert not store.matches(identity(first_set))
    assert store.install(first_set, now=NOW).generation == 2
    assert store.matches(identity(first_set))
    assert (store.path / path).read_bytes() == data


def test_an_alias_replaced_by_another_file_makes_the_store_not_match(store, first_set):
    store.install(first_set, now=NOW)
    alias = store.path / "current" / "signing" / "primary.key"
    folder = alias.resolve().parent
    replacement = folder / "planted"
    replacement.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot the farm's\n")
    os.replace(replacement, folder / "primary.key")  # a new inode, the thumbprint file intact

    assert not store.matches(identity(first_set))


def test_the_manifest_records_each_files_sha256(store, first_set):
    store.install(first_set, now=NOW)
    document = json.loads((store.path / "manifest.json").read_text())
    for entry in document["certificates"]:
        for kind, relative in entry["files"].items():
            data = (store.path / relative).read_bytes()
            assert entry["sha256"][kind] == hashlib.sha256(data).hexdigest()


def test_a_manifest_from_before_digests_still_matches(store, first_set):
    store.install(first_set, now=NOW)
    manifest_file = store.path / ".generations/1/manifest.json"
    document = json.loads(manifest_file.read_text())
    for entry in document["certificates"]:
        del entry["sha256"]
    manifest_file.write_text(json.dumps(document))

    assert store.matches(identity(first_set))


@pytest.mark.parametrize(
    "bad",
    [{"cert": "00"}, {"cert": "x" * 64, "key": "0" * 64, "pkcs12": "0" * 64}, ["0" * 64]],
)
def test_a_malformed_digest_makes_the_manifest_corrupt(store, first_set, bad):
    store.install(first_set, now=NOW)
    manifest_file = store.path / ".generations/1/manifest.json"
    document = json.loads(manifest_file.read_text())
    document["certificates"][0]["sha256"] = bad
    manifest_file.write_text(json.dumps(document))

    with pytest.raises(StoreError, match="sha256 must map"):
        store.manifest()


# -- a store that cannot be turned against the node (issue 9, part 3) ---------------------


def every_file(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_store_that_is_a_symbolic_link_is_refused(
    tmp_path: Path, first_set: list[CertificateFiles]
) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    (tmp_path / "store").symlink_to(real)
    with pytest.raises(StoreError, match="is a symbolic link"):
        Store(tmp_path / "store", node_id="node-1").install(first_set, now=NOW)
    assert list(real.iterdir()) == []


def test_a_generations_link_is_refused_and_the_folder_it_names_keeps_its_files(
    tmp_path: Path,
    store: Store,
    first_set: list[CertificateFiles],
    rolled_set: list[CertificateFiles],
) -> None:
    """Today's attack: `.generations` pointed at another folder, whose every entry an
    install would have deleted as an old generation."""
    store.install(first_set, now=NOW)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    (victim / "7").mkdir()
    (victim / "7" / "data").write_text("and me")
    os.rename(store.path / ".generations", tmp_path / "moved-aside")
    (store.path / ".generations").symlink_to(victim)
    with pytest.raises(StoreError, match=r"\.generations in the store is a symbolic link"):
        store.install(rolled_set, now=NOW)
    assert every_file(victim) == {"precious.txt": b"keep me", "7/data": b"and me"}


def test_a_generation_replaced_by_a_link_is_refused(
    tmp_path: Path,
    store: Store,
    first_set: list[CertificateFiles],
    rolled_set: list[CertificateFiles],
) -> None:
    store.install(first_set, now=NOW)
    store.install(rolled_set, now=NOW)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    shutil.rmtree(store.path / ".generations" / "1")
    (store.path / ".generations" / "1").symlink_to(victim)
    before = every_file(store.path / "current")
    with pytest.raises(StoreError, match="not a folder but a link"):
        store.install(first_set, now=NOW)
    assert every_file(victim) == {"precious.txt": b"keep me"}
    assert every_file(store.path / "current") == before


@pytest.mark.parametrize("where", ["", ".generations", ".generations/1/signing"])
def test_a_folder_that_group_or_others_may_write_is_refused(
    store: Store, first_set: list[CertificateFiles], rolled_set: list[CertificateFiles], where: str
) -> None:
    store.install(first_set, now=NOW)
    folder = store.path / where
    folder.chmod(0o777 if where else 0o770)
    before = every_file(store.path)
    with pytest.raises(StoreError, match="may be written by group or others"):
        store.install(rolled_set, now=NOW)
    assert every_file(store.path) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
@pytest.mark.parametrize(
    "where", ["", ".generations", ".generations/1", ".generations/1/decryption"]
)
def test_a_folder_owned_by_another_user_is_refused(
    store: Store, first_set: list[CertificateFiles], rolled_set: list[CertificateFiles], where: str
) -> None:
    store.install(first_set, now=NOW)
    os.chown(store.path / where, 65534, -1)
    before = every_file(store.path)
    with pytest.raises(StoreError, match="is owned by uid 65534, not by this account"):
        store.install(rolled_set, now=NOW)
    assert every_file(store.path) == before


def a_group() -> grp.struct_group:
    """A group of this machine other than this process's own."""
    return next(g for g in grp.getgrall() if g.gr_gid not in (0, os.getegid()))


def test_a_store_group_may_read_the_store_and_never_write_it(
    tmp_path: Path, first_set: list[CertificateFiles]
) -> None:
    group = a_group()
    store = Store(tmp_path / "store", node_id="node-1", group=group.gr_name)
    store.install(first_set, now=NOW)
    generation = (store.path / "current").resolve()
    for folder in [store.path, store.path / ".generations", generation, generation / "signing"]:
        status = folder.lstat()
        assert (stat.S_IMODE(status.st_mode), status.st_gid) == (0o750, group.gr_gid), folder
    for key in generation.glob("*/*.key"):
        status = key.lstat()
        assert (stat.S_IMODE(status.st_mode), status.st_gid) == (0o640, group.gr_gid), key
    for p12 in generation.glob("*/*.p12"):
        assert stat.S_IMODE(p12.lstat().st_mode) == 0o640
    # The group's modes are accepted on the next install; a group-writable one is not.
    store.install(first_set[:1] + first_set[2:], now=NOW)
    (store.path / ".generations").chmod(0o770)
    with pytest.raises(StoreError, match="may be written by group or others"):
        store.install(first_set, now=NOW)


def test_an_unknown_store_group_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="store_group names the group 'no-such-group-x'"):
        Store(tmp_path / "store", node_id="node-1", group="no-such-group-x")


def test_after_an_urgent_rollover_no_file_of_the_replaced_key_stays_anywhere(
    store: Store, pki: dict[str, Issued], first_set: list[CertificateFiles]
) -> None:
    replaced = pki["signing-1"]
    store.install(first_set, now=NOW)
    store.install(first_set, now=NOW)  # two generations hold it now
    after = [
        pki["signing-3"].as_("signing", "primary"),
        pki["decryption-1"].as_("decryption", "primary"),
    ]
    manifest = store.install(after, now=NOW, forget=[replaced.thumbprint])
    assert replaced.thumbprint in manifest.forgotten
    for name, data in every_file(store.path).items():
        assert replaced.thumbprint not in name
        assert replaced.private_key_pem not in data and replaced.pkcs12 not in data
    assert [p.name for p in (store.path / ".generations").iterdir()] == [str(manifest.generation)]
    # Remembered by later installs too.
    again = store.install(after, now=NOW)
    assert replaced.thumbprint in again.forgotten


# -- nothing near the store can be swapped by another account (issue 21) -------------------


def folder_state(path: Path) -> tuple[object, ...]:
    """A folder's own mode, owner and group, and everything in it."""
    status = os.lstat(path)
    return (stat.S_IMODE(status.st_mode), status.st_uid, status.st_gid, snapshot(path))


def test_a_folder_of_other_files_is_refused_and_left_exactly_as_it_was(tmp_path, first_set):
    folder = tmp_path / "data"
    folder.mkdir()
    folder.chmod(0o755)
    (folder / "report.txt").write_text("someone's files")
    before = folder_state(folder)

    with pytest.raises(StoreError, match="farmkeys will not clobber it"):
        Store(folder, node_id="node-1").install(first_set, now=NOW)

    assert folder_state(folder) == before  # still 0755, same owner, nothing added


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_a_refused_folder_of_other_files_keeps_its_group_with_a_store_group(tmp_path, first_set):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "report.txt").write_text("someone's files")
    os.chown(folder, -1, NOBODY)
    before = folder_state(folder)
    group = grp.getgrgid(os.getgid()).gr_name

    with pytest.raises(StoreError, match="farmkeys will not clobber it"):
        Store(folder, node_id="node-1", group=group).install(first_set, now=NOW)

    assert folder_state(folder) == before


@pytest.mark.parametrize(("bits", "fix"), [(0o775, "g-w"), (0o757, "o-w"), (0o777, "go-w")])
def test_a_store_whose_parent_others_may_write_is_refused_before_anything_is_made(
    tmp_path, first_set, bits, fix
):
    parent = tmp_path / "lib"
    parent.mkdir()
    parent.chmod(bits)
    store = Store(parent / "store", node_id="node-1")

    with pytest.raises(UnsafePathError) as caught:
        store.install(first_set, now=NOW)

    assert str(caught.value).endswith(f"(mode {bits:04o}) — chmod {fix} {parent}")
    assert os.listdir(parent) == []  # no store was made
    with pytest.raises(UnsafePathError):
        store.check_location()  # what sync asks first, on every run


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_a_store_whose_parent_another_account_owns_is_refused_and_untouched(tmp_path, first_set):
    parent = tmp_path / "lib"
    parent.mkdir()
    store = Store(parent / "store", node_id="node-1")
    store.install(first_set, now=NOW)
    os.chown(parent, NOBODY, NOBODY)  # nobody can now rename the store away and back
    before = snapshot(parent)

    with pytest.raises(UnsafePathError) as caught:
        store.install(first_set, now=NOW)

    assert str(caught.value).startswith(
        f"{parent}, on the way to the store {store.path}, is owned by nobody (uid {NOBODY})"
    )
    assert snapshot(parent) == before


def test_a_store_reached_through_a_link_into_a_writable_folder_is_refused(tmp_path, first_set):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (tmp_path / "var").symlink_to(shared)
    store = Store(tmp_path / "var/store", node_id="node-1")

    with pytest.raises(UnsafePathError, match=f"chmod go-w {shared}$"):
        store.install(first_set, now=NOW)
    assert os.listdir(shared) == []


def test_a_store_in_a_sticky_folder_is_made_and_its_own(tmp_path, first_set):
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    store = Store(sticky / "farmkeys/store", node_id="node-1")

    store.install(first_set, now=NOW)

    assert mode(sticky / "farmkeys") == 0o700 and store.matches(identity(first_set))


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_a_store_below_a_folder_of_another_account_in_a_sticky_folder_is_refused(
    tmp_path, first_set
):
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "farmkeys").mkdir()
    os.chown(sticky / "farmkeys", NOBODY, NOBODY)  # made first by another account

    with pytest.raises(UnsafePathError, match="is owned by nobody"):
        Store(sticky / "farmkeys/store", node_id="node-1").install(first_set, now=NOW)
    assert os.listdir(sticky / "farmkeys") == []


def test_a_store_installed_before_that_vanished_is_told_apart_from_a_first_install(
    tmp_path, first_set
):
    store = Store(tmp_path / "store", node_id="node-1")
    assert store.vanished(store.inspect(), None) is None  # a first install
    store.install(first_set, now=NOW)
    store.install(first_set, now=NOW)
    assert store.vanished(store.inspect(), 2) is None
    # Its row in the config DB recorded generation 2; the store now holds 1 (put back).
    assert "holds generation 2, older than generation 3" in (
        store.vanished(store.inspect(), 3) or ""
    )
    os.rename(store.path, tmp_path / "away")
    assert store.vanished(store.inspect(), 2) == (
        f"the store {store.path} is missing, but this node installed there before (its row"
        " in the config DB says it installed generation 2 there)"
    )
    store.path.mkdir()
    assert "is empty" in (store.vanished(store.inspect(), 2) or "")
    # Without the row, the store's own generations folder is the witness.
    os.rmdir(store.path)
    os.rename(tmp_path / "away", store.path)
    os.unlink(store.path / "current")
    assert store.vanished(store.inspect(), None) == (
        f"the store {store.path} holds no readable installed set, but this node installed"
        " there before (its folder .generations holds generation 2)"
    )


# -- the protection of the .p12 files (node.pkcs12_password_file) ---------------------


def test_the_manifest_records_the_p12_password_marker_and_round_trips(store, first_set):
    manifest = store.install(first_set, now=NOW, pkcs12_password="64768:1234:5:6")

    assert manifest.pkcs12_protection == "password"
    assert json.loads(manifest.to_json())["pkcs12_password"] == "64768:1234:5:6"
    assert store.manifest() == manifest
    assert Manifest.from_json(manifest.to_json()) == manifest


def test_without_a_p12_password_the_manifest_has_no_such_field(store, first_set):
    manifest = store.install(first_set, now=NOW)

    assert manifest.pkcs12_protection == "none"
    assert "pkcs12_password" not in json.loads(manifest.to_json())


@pytest.mark.parametrize(
    ("before", "after"), [(None, "1:2:3:4"), ("1:2:3:4", None), ("1:2:3:4", "1:2:3:5")]
)
def test_a_p12_is_never_carried_into_a_generation_of_another_protection(
    store, first_set, before, after
):
    store.install(first_set, now=NOW, pkcs12_password=before)
    installed = snapshot(store.path)
    carried = [Carried(c.purpose, c.role, c.thumbprint) for c in first_set]

    with pytest.raises(ValueError, match="another protection"):
        store.install(carried, now=NOW, pkcs12_password=after)
    assert snapshot(store.path) == installed
    assert store.install(carried, now=NOW, pkcs12_password=before).generation == 2


def test_noting_a_new_p12_password_marker_keeps_the_generation(store, first_set):
    store.install(first_set, now=NOW, pkcs12_password="1:2:3:4")
    files = {p: p.read_bytes() for p in (store.path / "signing").iterdir()}

    noted = store.note_pkcs12_password("1:2:3:9")

    assert (noted.generation, noted.pkcs12_password) == (1, "1:2:3:9")
    assert store.manifest() == noted
    assert {p: p.read_bytes() for p in (store.path / "signing").iterdir()} == files


def test_pkcs12_files_reads_each_p12_checked_against_its_digest(store, first_set):
    store.install(first_set, now=NOW)

    found = store.pkcs12_files()

    assert found is not None
    assert found[1] == {c.thumbprint: c.pkcs12 for c in first_set}
