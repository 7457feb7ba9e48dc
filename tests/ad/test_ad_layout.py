"""The `ad` layout on a real Active Directory domain controller (Samba's AD DC, on loopback).

Each test runs a fresh copy of the session's provisioned domain
(farmkeys_lab.samba): init, three nodes syncing, certificate and master-key
rollovers, the farm container's protected security descriptor against an
ordinary domain user, TLS, several domain controllers, and an AD FS-made DKM
container read by `farmkeys import adfs`.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import ldap3
import pytest
from adfs_encoder import encode
from farmtools import TestFarm, audit_events, db_query, expect_ok, one_error_line
from ldap3.protocol.microsoft import security_descriptor_control

from farmkeys.config import DirectoryConfig, RetryConfig, load
from farmkeys.directory import Directory, ad
from farmkeys.directory import security_descriptor as sd
from farmkeys.errors import DirectoryError, MasterKeyMissingError
from farmkeys.formats import certificates
from farmkeys_lab.samba import LocalSambaDC, write_ca_certificate
from farmkeys_lab.servers import free_port
from farmkeys_lab.slapd import LocalSlapd

RETRY = RetryConfig(total_seconds=2.0, initial_backoff_seconds=0.05, max_backoff_seconds=0.5)


def ad_settings(dc: LocalSambaDC, root: Path, **changes: Any) -> dict[str, Any]:
    """The [directory] section of a farm on the lab DC, as the service account."""
    settings: dict[str, Any] = {
        "layout": "ad",
        "url": dc.url,
        "bind_dn": dc.service_dn,
        "password_file": str(dc.write_password_file(root / "ad.password")),
        "password": None,
        "container": dc.adfs_parent,
        "ca_file": str(dc.ca_file),
        "timeout_seconds": 5,
    }
    settings.update(changes)
    return settings


@pytest.fixture
def ad_farm(tmp_path: Path, slapd: LocalSlapd, pg_dsn: str, samba_dc: LocalSambaDC) -> TestFarm:
    return TestFarm(
        root=tmp_path,
        slapd=slapd,
        dsn=pg_dsn,
        overrides={"directory": ad_settings(samba_dc, tmp_path)},
    )


@pytest.fixture
def ad_initialised(ad_farm: TestFarm) -> TestFarm:
    result = ad_farm.run("init")
    expect_ok(result)
    assert result.err == ""  # no warning: an anonymous bind reads nothing on AD
    return ad_farm


def dkm_group(farm: TestFarm) -> uuid.UUID:
    return uuid.UUID(str(db_query(farm.dsn, "SELECT dkm_group FROM farm")[0]["dkm_group"]))


def entries(conn: ldap3.Connection) -> list[dict[str, Any]]:
    return [r for r in conn.response or [] if r.get("type") == "searchResEntry"]


def first(entry: dict[str, Any], attribute: str) -> str:
    """The first value of a text attribute of a search result entry."""
    values = entry["raw_attributes"].get(attribute) or [b""]
    return bytes(values[0]).decode()


def search(
    conn: ldap3.Connection, base: str, query: str, scope: str, attrs: list[str]
) -> list[dict[str, Any]]:
    try:
        conn.search(base, query, search_scope=scope, attributes=attrs)
    except ldap3.core.exceptions.LDAPNoSuchObjectResult:
        return []
    return entries(conn)


# --- init: the AD FS shape, protected ----------------------------------------------------


def test_init_makes_the_adfs_container_with_contacts_and_a_protected_descriptor(
    ad_initialised: TestFarm, samba_dc: LocalSambaDC
) -> None:
    group = dkm_group(ad_initialised)
    container = f"CN={group},{samba_dc.adfs_parent}"
    admin = samba_dc.admin_connection()
    try:
        found = search(
            admin,
            container,
            "(objectClass=contact)",
            ldap3.LEVEL,
            ["cn", "l", "thumbnailPhoto", "displayName"],
        )
        keys = [e for e in found if first(e, "cn") != "CryptoPolicy"]
        policy = [e for e in found if first(e, "cn") == "CryptoPolicy"]
        assert len(keys) == 1 and len(policy) == 1
        key_id = first(keys[0], "l")
        assert uuid.UUID(key_id) and len(keys[0]["raw_attributes"]["thumbnailPhoto"][0]) == 32
        assert first(policy[0], "displayName") == key_id
        admin.search(
            container,
            "(objectClass=*)",
            ldap3.BASE,
            attributes=["nTSecurityDescriptor"],
            controls=security_descriptor_control(sdflags=0x04),
        )
        raw = entries(admin)[0]["raw_attributes"]["nTSecurityDescriptor"][0]
    finally:
        admin.unbind()
    descriptor = sd.decode_descriptor(raw)
    assert descriptor.protected
    assert ad.descriptor_problem(raw, samba_dc.service_sid) is None
    assert sd.readers(descriptor) == {
        f"{samba_dc.domain_sid}-512",
        "S-1-5-18",
        samba_dc.service_sid,
    }
    # Each key and CryptoPolicy carries the same protected descriptor of its own: a
    # contact's schema default (Authenticated Users may read) never applies to them.
    for dn in ad_initialised_key_dns(samba_dc, container):
        entry_raw = read_descriptor(samba_dc, dn)
        assert sd.decode_descriptor(entry_raw).protected, dn
        assert ad.descriptor_problem(entry_raw, samba_dc.service_sid) is None, dn


def test_an_ordinary_domain_user_can_read_neither_the_keys_nor_their_thumbnailphoto(
    ad_initialised: TestFarm, samba_dc: LocalSambaDC
) -> None:
    group = dkm_group(ad_initialised)
    container = f"CN={group},{samba_dc.adfs_parent}"
    # What Golden SAML starts from: by default a domain user reads a contact's
    # thumbnailPhoto. Shown on a contact outside the farm's container, so this test
    # would fail if the lab's domain were locked down some other way.
    admin = samba_dc.admin_connection()
    exposed = f"CN=exposed-{uuid.uuid4().hex[:8]},{samba_dc.adfs_parent}"
    admin.add(exposed, ["contact"], {"thumbnailPhoto": b"\x01" * 32, "l": "x"})
    admin.unbind()
    alice = samba_dc.connect(samba_dc.other_dn, samba_dc.other_password)
    try:
        seen = search(alice, exposed, "(objectClass=*)", ldap3.BASE, ["thumbnailPhoto"])
        assert seen and seen[0]["raw_attributes"].get("thumbnailPhoto")
        # The farm's container: its name shows in its parent's listing (AD lists children
        # to whoever may list the parent), but nothing of it can be read, and nothing
        # inside it is even listed: by subtree, by base, or from the domain's root.
        found = search(alice, container, "(objectClass=*)", ldap3.SUBTREE, ["*"])
        assert [(e["dn"].lower(), e["raw_attributes"]) for e in found] in (
            [],
            [(container.lower(), {})],
        )
        for key in ad_initialised_key_dns(samba_dc, container):
            assert search(alice, key, "(objectClass=*)", ldap3.BASE, ["thumbnailPhoto"]) == []
        everywhere = search(
            alice, samba_dc.base_dn, "(thumbnailPhoto=*)", ldap3.SUBTREE, ["thumbnailPhoto"]
        )
        assert {e["dn"].lower() for e in everywhere} <= {exposed.lower()}
    finally:
        alice.unbind()
    # And through farmkeys: alice's Directory finds no key.
    config = DirectoryConfig(
        url=samba_dc.url,
        bind_dn=samba_dc.other_dn,
        password=samba_dc.other_password,
        container=samba_dc.adfs_parent,
        layout="ad",
        ca_file=str(samba_dc.ca_file),
    )
    key_ids = [
        uuid.UUID(k["id"]) for k in ad_initialised.run("status", "--json").json["master_keys"]
    ]
    with Directory(config, RETRY) as directory:
        for key_id in key_ids:
            with pytest.raises(MasterKeyMissingError):
                directory.master_key(group, key_id)
            found = [dn.lower() for dn, _ in directory.find_keys(key_id)]
            assert found == [exposed.lower()]  # the planted one, never the farm's
        with pytest.raises(DirectoryError):
            directory.list_keys(group)


def read_descriptor(dc: LocalSambaDC, dn: str) -> bytes:
    """The DACL part of ``dn``'s nTSecurityDescriptor, read as the domain admin."""
    admin = dc.admin_connection()
    try:
        admin.search(
            dn,
            "(objectClass=*)",
            ldap3.BASE,
            attributes=["nTSecurityDescriptor"],
            controls=security_descriptor_control(sdflags=0x04),
        )
        return bytes(entries(admin)[0]["raw_attributes"]["nTSecurityDescriptor"][0])
    finally:
        admin.unbind()


def ad_initialised_key_dns(dc: LocalSambaDC, container: str) -> list[str]:
    admin = dc.admin_connection()
    try:
        return [
            e["dn"] for e in search(admin, container, "(objectClass=contact)", ldap3.LEVEL, ["cn"])
        ]
    finally:
        admin.unbind()


def test_init_where_the_service_account_may_not_protect_the_container_fails_and_leaves_nothing(
    ad_farm: TestFarm, samba_dc: LocalSambaDC, tmp_path: Path
) -> None:
    undelegated = {
        "directory": ad_settings(samba_dc, tmp_path, container=samba_dc.undelegated_parent)
    }
    result = ad_farm.run("init", **undelegated)
    assert result.code != 0
    line = one_error_line(result)
    assert "samba-tool dsacl set" in line and samba_dc.undelegated_parent in line
    assert "docs/directory-setup.md" in line
    admin = samba_dc.admin_connection()
    try:
        left = search(admin, samba_dc.undelegated_parent, "(objectClass=*)", ldap3.LEVEL, ["cn"])
    finally:
        admin.unbind()
    assert left == []
    assert db_query(ad_farm.dsn, "SELECT 1 FROM farm") == []


# --- a farm on AD: sync, rollovers -------------------------------------------------------


def test_three_nodes_sync_and_follow_certificate_and_master_key_rollovers(
    ad_initialised: TestFarm, samba_dc: LocalSambaDC
) -> None:
    nodes = ("node-a", "node-b", "node-c")
    for node in nodes:
        expect_ok(ad_initialised.run("sync", node=node))

    def installed(node: str) -> str:
        return (ad_initialised.store(node) / "manifest.json").read_text()

    before = {node: installed(node) for node in nodes}
    assert len(set(before.values())) <= 3  # each names its own node, same certificates
    result = ad_initialised.run("rollover", "--purpose", "signing")
    expect_ok(result)
    result = ad_initialised.run("rollover", "--master-key")
    expect_ok(result)
    group = dkm_group(ad_initialised)
    admin = samba_dc.admin_connection()
    try:
        keys = search(
            admin,
            f"CN={group},{samba_dc.adfs_parent}",
            "(&(objectClass=contact)(l=*))",
            ldap3.LEVEL,
            ["l"],
        )
    finally:
        admin.unbind()
    assert len(keys) == 2  # the new key, and the replaced one kept for `retain`
    for node in nodes:
        expect_ok(ad_initialised.run("sync", node=node))
    doc = ad_initialised.run("status", "--json").json
    signing = [c for c in doc["certificates"] if c["purpose"] == "signing"]
    assert {c["role"] for c in signing} >= {"primary", "secondary"}
    current = [k for k in doc["master_keys"] if k["current"]]
    assert len(current) == 1 and current[0]["in_directory"]
    assert all(n["in_sync"] for n in doc["nodes"])
    assert {n["directory_server"] for n in doc["nodes"]} == {samba_dc.url}
    actions = {e["action"] for e in audit_events(ad_initialised)}
    assert {"generate", "master_key_add", "master_key_roll"} <= actions
    # An urgent master-key roll deletes the replaced key's contact from AD at once.
    replaced = next(k["id"] for k in doc["master_keys"] if k["current"])
    expect_ok(ad_initialised.run("rollover", "--master-key", "--urgent", "--yes"))
    for node in nodes:
        expect_ok(ad_initialised.run("sync", node=node))
    admin = samba_dc.admin_connection()
    try:
        left = search(
            admin,
            f"CN={group},{samba_dc.adfs_parent}",
            f"(&(objectClass=contact)(l={replaced}))",
            ldap3.LEVEL,
            ["l"],
        )
    finally:
        admin.unbind()
    assert left == []


def test_escrow_brings_back_a_deleted_container_protected_as_before(
    ad_initialised: TestFarm, samba_dc: LocalSambaDC, tmp_path: Path
) -> None:
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("a long enough escrow passphrase\n")
    passphrase.chmod(0o600)
    out = tmp_path / "escrow.age"
    result = ad_initialised.run(
        "escrow", "export", "--out", str(out), "--passphrase-file", str(passphrase)
    )
    expect_ok(result)
    group = dkm_group(ad_initialised)
    container = f"CN={group},{samba_dc.adfs_parent}"
    admin = samba_dc.admin_connection()
    try:
        for entry in search(admin, container, "(objectClass=contact)", ldap3.LEVEL, ["cn"]):
            admin.delete(entry["dn"])
        admin.delete(container)
    finally:
        admin.unbind()
    assert ad_initialised.run("sync", node="node-b").code != 0  # nothing to open them with
    result = ad_initialised.run("escrow", "import", str(out), "--passphrase-file", str(passphrase))
    expect_ok(result)
    expect_ok(ad_initialised.run("sync", node="node-b"))
    cfg = load(ad_initialised.config())
    with Directory(cfg.directory, cfg.retry) as directory:
        assert directory.container_protection_problem(group) is None


def test_a_node_keeps_syncing_when_the_first_listed_dc_is_down(
    ad_initialised: TestFarm, samba_dc: LocalSambaDC, tmp_path: Path
) -> None:
    dead = f"ldaps://127.0.0.1:{free_port()}"
    two = {"directory": ad_settings(samba_dc, tmp_path, url=[dead, samba_dc.url])}
    result = ad_initialised.run("sync", node="node-b", **two)
    expect_ok(result)
    doc = ad_initialised.run("status", "--json").json
    nodes = {n["id"]: n for n in doc["nodes"]}
    assert nodes["node-b"]["directory_server"] == samba_dc.url
    # The DC stops: a node whose store is in sync still starts; when it comes back, a
    # rollover reaches the node through it.
    samba_dc.stop()
    expect_ok(ad_initialised.run("sync", node="node-b", **two))
    samba_dc.start()
    expect_ok(ad_initialised.run("rollover", "--purpose", "decryption"))
    expect_ok(ad_initialised.run("sync", node="node-b", **two))


# --- TLS and binds -----------------------------------------------------------------------


def ad_config(dc: LocalSambaDC, **changes: Any) -> DirectoryConfig:
    values: dict[str, Any] = {
        "url": dc.url,
        "bind_dn": dc.service_dn,
        "password": dc.service_password,
        "container": dc.adfs_parent,
        "layout": "ad",
        "ca_file": str(dc.ca_file),
        "timeout_seconds": 5,
    }
    values.update(changes)
    return DirectoryConfig(**values)


def test_bind_by_upn_and_over_starttls(samba_dc: LocalSambaDC) -> None:
    for config in (
        ad_config(samba_dc, bind_dn=samba_dc.service_upn),
        ad_config(samba_dc, url=samba_dc.ldap_url, start_tls=True),
    ):
        with Directory(config, RETRY) as directory:
            assert directory.service_sid() == samba_dc.service_sid
            assert not directory.container_exists(uuid.uuid4())


def test_a_dc_certificate_from_another_ca_is_refused(
    samba_dc: LocalSambaDC, tmp_path: Path
) -> None:
    other_ca = write_ca_certificate(tmp_path / "other-ca.pem")
    directory = Directory(ad_config(samba_dc, ca_file=str(other_ca)), RETRY)
    with directory, pytest.raises(DirectoryError, match=r"(?i)certificate verify failed"):
        directory.bind()


# --- importing from an AD FS farm's own DKM container ------------------------------------


def test_import_reads_the_dkm_key_from_a_container_that_adfs_made(
    ad_initialised: TestFarm, samba_dc: LocalSambaDC, tmp_path: Path
) -> None:
    # AD FS's own container: CN=<group>, a contact whose name is not the key id, l = the
    # key id, thumbnailPhoto = the key; made by the domain admin as AD FS would.
    adfs_group, key_id, key = uuid.uuid4(), uuid.uuid4(), bytes(range(50, 82))
    admin = samba_dc.admin_connection()
    container = f"CN={adfs_group},{samba_dc.adfs_parent}"
    admin.add(container, ["container"])
    admin.add(
        f"CN={uuid.uuid4()},{container}",
        ["contact"],
        {"l": str(key_id), "thumbnailPhoto": key},
    )
    admin.add(f"CN=CryptoPolicy,{container}", ["contact"], {"displayName": str(key_id)})
    admin.unbind()
    start = datetime.now(UTC).replace(microsecond=0)
    made = certificates.generate(
        farm_name="adfs.contoso.example",
        purpose="signing",
        key_type="rsa-2048",
        not_before=start,
        not_after=start + timedelta(days=300),
    )
    pkcs12 = certificates.to_pkcs12(made.certificate, made.key, friendly_name="")
    pfx = tmp_path / "signing.pfx"
    pfx.write_bytes(base64.b64encode(encode(pkcs12, dkm_key=key, key_id=key_id)))
    result = ad_initialised.run(
        "import", "adfs", "--encrypted-pfx", str(pfx), "--purpose", "signing", "--wait", "30"
    )
    expect_ok(result)
    thumb = certificates.thumbprint(made.certificate)
    assert db_query(
        ad_initialised.dsn, "SELECT role FROM certificate WHERE thumbprint = %s", (thumb,)
    )
    expect_ok(ad_initialised.run("sync"))
    assert (ad_initialised.store() / f"signing/{thumb}.pem").exists()


@pytest.mark.parametrize("target", ["container", "key"])
def test_status_is_critical_when_someone_opens_the_container_to_others(
    ad_initialised: TestFarm, samba_dc: LocalSambaDC, target: str
) -> None:
    assert ad_initialised.run("status").code in (0, 1)  # no node serves: a warning at most
    group = dkm_group(ad_initialised)
    container = f"CN={group},{samba_dc.adfs_parent}"
    dn = container
    if target == "key":
        dn = next(d for d in ad_initialised_key_dns(samba_dc, container) if "CryptoPolicy" not in d)
    # A domain admin adds "Authenticated Users may read" to the container or to a key.
    opened = sd.encode_dacl_descriptor(
        (*ad.container_aces(samba_dc.service_sid), sd.allow("S-1-5-11", sd.READ_RIGHTS)),
        protected=True,
    )
    admin = samba_dc.admin_connection()
    try:
        admin.modify(
            dn,
            {"nTSecurityDescriptor": [(ldap3.MODIFY_REPLACE, [opened])]},
            controls=security_descriptor_control(sdflags=0x04),
        )
    finally:
        admin.unbind()
    result = ad_initialised.run("status")
    assert result.code == 2, result.out
    assert "is not protected" in result.out and "S-1-5-11" in result.out
