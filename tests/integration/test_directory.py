"""farmkeys.directory against a real slapd (tests/conftest.py's ``slapd``)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import ldap3
import pytest
from conftest import start_slapd

from farmkeys.config import DirectoryConfig, RetryConfig
from farmkeys.directory import (
    MASTER_KEY_LENGTH,
    Directory,
    MasterKeyInfo,
)
from farmkeys.errors import (
    ConfigError,
    DirectoryAuthError,
    DirectoryError,
    FarmConflictError,
    MasterKeyMissingError,
)
from farmkeys_lab.servers import free_port
from farmkeys_lab.slapd import LocalSlapd, acl_lines

MakeDirectory = Callable[..., Directory]


@pytest.fixture
def group(service_directory: Directory) -> Iterator[uuid.UUID]:
    """A fresh DKM group id; its container (if a test made one) is removed afterwards."""
    group = uuid.uuid4()
    yield group
    service_directory.delete_container(group)


@pytest.fixture
def dkm_container(service_directory: Directory, group: uuid.UUID) -> tuple[uuid.UUID, uuid.UUID]:
    """A DKM container made by the service account: (group, first key id)."""
    return group, service_directory.create_container(group, farm_name="test farm")


def admin_connection(slapd: LocalSlapd) -> Any:
    server = ldap3.Server(slapd.url, get_info=ldap3.NONE)
    return ldap3.Connection(
        server, slapd.admin_dn, slapd.admin_password, auto_bind=True, raise_exceptions=True
    )


def retry_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "farmkeys" and r.levelno >= logging.WARNING]


# -- reading and writing keys ------------------------------------------------------


def test_created_key_reads_back_as_32_bytes_from_the_server_once(
    service_directory: Directory, dkm_container: tuple[uuid.UUID, uuid.UUID]
) -> None:
    group, key_id = dkm_container
    assert service_directory.current_key_id(group) == key_id

    key = service_directory.master_key(group, key_id)
    assert isinstance(key, bytes)
    assert len(key) == MASTER_KEY_LENGTH
    assert service_directory.key_reads == 1

    assert service_directory.master_key(group, key_id) == key
    assert service_directory.key_reads == 1


def test_another_node_reads_the_same_key(
    service_directory: Directory,
    make_directory: MakeDirectory,
    dkm_container: tuple[uuid.UUID, uuid.UUID],
) -> None:
    group, key_id = dkm_container
    other_node = make_directory()
    assert other_node.master_key(group, key_id) == service_directory.master_key(group, key_id)
    assert other_node.key_reads == 1


def test_container_has_the_documented_layout(
    slapd: LocalSlapd, service_directory: Directory, dkm_container: tuple[uuid.UUID, uuid.UUID]
) -> None:
    group, key_id = dkm_container
    container = service_directory.container_dn(group)
    assert container == f"cn={group},{slapd.container}"
    conn = admin_connection(slapd)
    conn.search(container, "(objectClass=*)", ldap3.SUBTREE, attributes=["*"])
    entries = {e["dn"].lower(): e["raw_attributes"] for e in conn.response}
    conn.unbind()
    assert set(entries) == {
        container.lower(),
        f"cn={key_id},{container}".lower(),
        f"cn=CryptoPolicy,{container}".lower(),
    }
    top = entries[container.lower()]
    assert top["objectClass"] == [b"applicationProcess"]
    assert top["description"] == [b"farmkeys DKM container for farm test farm"]
    key = entries[f"cn={key_id},{container}".lower()]
    assert b"inetOrgPerson" in key["objectClass"]
    assert key["sn"] == [b"farmkeys master key"]
    assert key["l"] == [str(key_id).encode()]
    assert len(key["jpegPhoto"][0]) == MASTER_KEY_LENGTH
    policy = entries[f"cn=CryptoPolicy,{container}".lower()]
    assert policy["sn"] == [b"CryptoPolicy"]
    assert policy["displayName"] == [str(key_id).encode()]


def test_jpeg_photo_stores_arbitrary_bytes_unchanged(
    slapd: LocalSlapd, make_directory: MakeDirectory, dkm_container: tuple[uuid.UUID, uuid.UUID]
) -> None:
    # Not a JPEG: zero bytes, 0xff, and every other value slapd might choke on.
    group, key_id = dkm_container
    awkward = bytes([0, 255, 10, 13, 0, 0xD8, 0xFF, 0x80]) * 4
    conn = admin_connection(slapd)
    dn = f"cn={key_id},cn={group},{slapd.container}"
    conn.modify(dn, {"jpegPhoto": [(ldap3.MODIFY_REPLACE, [awkward])]})
    conn.unbind()
    assert make_directory().master_key(group, key_id) == awkward


def test_key_of_the_wrong_length_is_reported_as_missing(
    slapd: LocalSlapd, make_directory: MakeDirectory, dkm_container: tuple[uuid.UUID, uuid.UUID]
) -> None:
    group, key_id = dkm_container
    conn = admin_connection(slapd)
    dn = f"cn={key_id},cn={group},{slapd.container}"
    conn.modify(dn, {"jpegPhoto": [(ldap3.MODIFY_REPLACE, [b"\x01" * 31])]})
    conn.unbind()
    with pytest.raises(MasterKeyMissingError, match="31 bytes long"):
        make_directory().master_key(group, key_id)


def test_unknown_key_is_missing_and_the_message_says_what_to_do(
    service_directory: Directory, dkm_container: tuple[uuid.UUID, uuid.UUID], slapd: LocalSlapd
) -> None:
    group, _ = dkm_container
    absent = uuid.uuid4()
    with pytest.raises(MasterKeyMissingError) as caught:
        service_directory.master_key(group, absent)
    message = str(caught.value)
    assert str(absent) in message
    assert str(group) in message
    assert slapd.url in message
    assert slapd.service_dn in message
    assert "restore it with `farmkeys escrow import` or from a directory backup" in message
    assert service_directory.key_reads == 1


def test_list_keys_shows_one_current_key_without_fetching_key_material(
    service_directory: Directory,
    dkm_container: tuple[uuid.UUID, uuid.UUID],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    group, key_id = dkm_container
    requested: list[Any] = []
    real_search = ldap3.Connection.search

    def spying_search(self: Any, *args: Any, **kwargs: Any) -> Any:
        requested.append(kwargs.get("attributes"))
        return real_search(self, *args, **kwargs)

    monkeypatch.setattr(ldap3.Connection, "search", spying_search)

    keys = service_directory.list_keys(group)

    assert [(k.id, k.current) for k in keys] == [(key_id, True)]
    created = keys[0].created_at
    assert created is not None
    assert created.tzinfo is not None
    assert abs(datetime.now(UTC) - created) < timedelta(minutes=5)
    assert requested, "list_keys made no search at all"
    assert all("jpegPhoto" not in (attrs or ["*"]) for attrs in requested)
    assert all(attrs not in (None, ["*"]) for attrs in requested)
    assert service_directory.key_reads == 0


def test_add_key_makes_the_new_key_current(
    service_directory: Directory, dkm_container: tuple[uuid.UUID, uuid.UUID]
) -> None:
    group, first = dkm_container
    spare = service_directory.add_key(group, make_current=False)
    assert service_directory.current_key_id(group) == first

    second = service_directory.add_key(group, make_current=True)

    assert service_directory.current_key_id(group) == second
    keys = {k.id: k for k in service_directory.list_keys(group)}
    assert set(keys) == {first, spare, second}
    assert [k.id for k in keys.values() if k.current] == [second]
    assert service_directory.master_key(group, second) != service_directory.master_key(group, first)


def test_creating_an_existing_container_is_a_conflict(
    service_directory: Directory, dkm_container: tuple[uuid.UUID, uuid.UUID]
) -> None:
    group, key_id = dkm_container
    with pytest.raises(FarmConflictError):
        service_directory.create_container(group, farm_name="test farm")
    # The existing container was not undone.
    assert service_directory.current_key_id(group) == key_id


def test_delete_container_removes_the_keys_and_is_idempotent(
    service_directory: Directory, dkm_container: tuple[uuid.UUID, uuid.UUID]
) -> None:
    group, _ = dkm_container
    service_directory.add_key(group, make_current=True)
    assert service_directory.container_exists(group)

    service_directory.delete_container(group)
    service_directory.delete_container(group)

    assert not service_directory.container_exists(group)


def test_a_create_that_fails_midway_leaves_nothing_behind(
    service_directory: Directory, group: uuid.UUID, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_policy_add(*args: Any, **kwargs: Any) -> None:
        raise DirectoryError("simulated failure", "none")

    real_add = service_directory._add

    def add(dn: str, *args: Any, **kwargs: Any) -> None:
        if dn.lower().startswith("cn=cryptopolicy,"):
            failing_policy_add()
        real_add(dn, *args, **kwargs)

    monkeypatch.setattr(service_directory, "_add", add)
    with pytest.raises(DirectoryError, match="simulated failure"):
        service_directory.create_container(group, farm_name="test farm")
    monkeypatch.undo()
    assert not service_directory.container_exists(group)


def test_missing_parent_container_is_named(
    make_directory: MakeDirectory, slapd: LocalSlapd, group: uuid.UUID
) -> None:
    parent = f"ou=nowhere,{slapd.suffix}"
    directory = make_directory(container=parent)
    with pytest.raises(DirectoryError, match="ou=nowhere") as caught:
        directory.create_container(group, farm_name="test farm")
    assert "directory-setup.md" in str(caught.value)


# -- access control ------------------------------------------------------------------


def test_ordinary_account_cannot_read_the_master_keys(
    other_directory: Directory, dkm_container: tuple[uuid.UUID, uuid.UUID], slapd: LocalSlapd
) -> None:
    group, key_id = dkm_container
    with pytest.raises(MasterKeyMissingError) as caught:
        other_directory.master_key(group, key_id)
    assert slapd.other_dn in str(caught.value)
    assert "check the account's access" in str(caught.value)


def test_ordinary_account_cannot_even_list_the_master_keys(
    other_directory: Directory, dkm_container: tuple[uuid.UUID, uuid.UUID]
) -> None:
    group, _ = dkm_container
    assert not other_directory.container_exists(group)
    with pytest.raises(DirectoryError):
        other_directory.list_keys(group)
    with pytest.raises(DirectoryError):
        other_directory.current_key_id(group)


def test_account_without_rights_cannot_create_a_container_and_leaves_nothing(
    other_directory: Directory,
    service_directory: Directory,
    group: uuid.UUID,
    slapd: LocalSlapd,
) -> None:
    with pytest.raises(DirectoryError) as caught:
        other_directory.create_container(group, farm_name="test farm")
    message = str(caught.value)
    assert f"{slapd.other_dn} may not create entries under {slapd.container}" in message
    assert "docs/directory-setup.md" in message
    assert not service_directory.container_exists(group)


def test_anonymous_cannot_read_the_keys_under_the_documented_acl(
    service_directory: Directory, dkm_container: tuple[uuid.UUID, uuid.UUID]
) -> None:
    group, _ = dkm_container
    assert service_directory.anonymous_can_read(group) is False


def test_anonymous_read_is_detected_on_a_misconfigured_directory(
    make_slapd: Callable[..., LocalSlapd], fast_retry: RetryConfig
) -> None:
    leaky = make_slapd(anonymous_read_dkm=True)
    config = DirectoryConfig(
        url=leaky.url,
        bind_dn=leaky.service_dn,
        container=leaky.container,
        password=leaky.service_password,
    )
    with Directory(config, fast_retry) as directory:
        group = uuid.uuid4()
        directory.create_container(group, farm_name="leaky")
        assert directory.anonymous_can_read(group) is True


def test_slapd_conf_carries_exactly_the_documented_acl(slapd: LocalSlapd) -> None:
    acl = acl_lines(slapd.container, slapd.service_dn)
    assert acl in slapd.conf_path.read_text()
    doc = Path(__file__).parents[2] / "docs" / "directory-setup.md"
    generic = acl_lines("ou=dkm,dc=example,dc=com", "cn=svc-farm,ou=people,dc=example,dc=com")
    assert generic in doc.read_text()


# -- binding, retries, reconnecting -------------------------------------------------


def test_wrong_password_is_an_auth_error_and_is_not_retried(
    make_directory: MakeDirectory, slapd: LocalSlapd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-password"
    directory = make_directory(password=wrong, password_file=None)
    with pytest.raises(DirectoryAuthError) as caught:
        directory.bind()
    message = str(caught.value)
    assert slapd.url in message
    assert slapd.service_dn in message
    assert "invalid credentials" in message
    assert wrong not in message
    assert retry_warnings(caplog) == []
    assert all(wrong not in r.getMessage() for r in caplog.records)


def test_unreachable_directory_is_retried_then_named(
    make_directory: MakeDirectory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="farmkeys")
    url = f"ldap://127.0.0.1:{free_port()}"
    retry = RetryConfig(total_seconds=1.0, initial_backoff_seconds=0.05, max_backoff_seconds=0.2)
    directory = make_directory(url=url, retry=retry)
    with pytest.raises(DirectoryError) as caught:
        directory.current_key_id(uuid.uuid4())
    assert not isinstance(caught.value, DirectoryAuthError)
    assert url in str(caught.value)
    assert "attempts over" in str(caught.value)
    # Several attempts, one line: the outage, not each attempt.
    assert caught.value.what.count("attempt") == 1 and "after 1 attempt " not in str(caught.value)
    (line,) = [r.getMessage() for r in retry_warnings(caplog)]
    assert line.startswith(f"directory {url} is unreachable: ")
    assert line.endswith("; retrying for up to 1 s")


def test_directory_reconnects_after_slapd_restarts(
    slapd: LocalSlapd, service_directory: Directory, dkm_container: tuple[uuid.UUID, uuid.UUID]
) -> None:
    group, key_id = dkm_container
    assert service_directory.current_key_id(group) == key_id  # bound and in use
    port = slapd.port
    slapd.stop()
    slapd.start()
    assert slapd.port == port
    second = service_directory.add_key(group, make_current=True)
    assert service_directory.current_key_id(group) == second


def test_operation_waits_within_the_retry_budget_for_slapd_to_return(
    slapd: LocalSlapd,
    make_directory: MakeDirectory,
    dkm_container: tuple[uuid.UUID, uuid.UUID],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    group, key_id = dkm_container
    retry = RetryConfig(total_seconds=10.0, initial_backoff_seconds=0.1, max_backoff_seconds=0.5)
    directory = make_directory(retry=retry)
    assert directory.current_key_id(group) == key_id
    slapd.stop()
    restart = threading.Timer(0.7, slapd.start)
    restart.start()
    try:
        assert directory.master_key(group, key_id)
    finally:
        restart.join()
        if not slapd.running:
            slapd.start()
    assert len(retry_warnings(caplog)) >= 1


# -- configuration and secrecy -------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"layout": "ad"}, "layout 'ad' needs TLS"),
        ({"layout": "ad", "url": ["ldaps://127.0.0.1", "ldap://127.0.0.1"]}, "needs TLS"),
        ({"url": ["ldap://127.0.0.1:1", "http://x"]}, "not an ldap:// or ldaps:// URL"),
        ({"bind_dn": "svc-farm@farmkeys.lab"}, "not a distinguished name"),
        ({"layout": "novell"}, "not a known layout"),
        ({"url": "http://127.0.0.1:389"}, "not an ldap:// or ldaps:// URL"),
        ({"url": "ldap://"}, "not an ldap:// or ldaps:// URL"),
        ({"start_tls": True}, "ca_file"),
        ({"url": "ldaps://127.0.0.1:636", "start_tls": True, "ca_file": "/x"}, "not both"),
        ({"bind_dn": "svc-farm"}, "not a distinguished name"),
        ({"password": "", "password_file": None}, "empty"),
        ({"password": None, "password_file": None}, "password_file"),
    ],
)
def test_bad_configuration_fails_when_the_directory_is_made(
    directory_config: DirectoryConfig,
    fast_retry: RetryConfig,
    changes: dict[str, Any],
    complaint: str,
) -> None:
    import dataclasses

    with pytest.raises(ConfigError, match=complaint):
        Directory(dataclasses.replace(directory_config, **changes), fast_retry)


def test_making_a_directory_does_no_io(fast_retry: RetryConfig) -> None:
    config = DirectoryConfig(
        url=f"ldap://127.0.0.1:{free_port()}",
        bind_dn="cn=svc-farm,ou=people,dc=farmkeys,dc=test",
        container="ou=dkm,dc=farmkeys,dc=test",
        password_file="/nonexistent/password",
    )
    started = time.monotonic()
    directory = Directory(config, fast_retry)
    assert time.monotonic() - started < 0.5
    directory.close()


def test_keys_and_passwords_never_reach_logs_messages_or_reprs(
    slapd: LocalSlapd,
    service_directory: Directory,
    make_directory: MakeDirectory,
    dkm_container: tuple[uuid.UUID, uuid.UUID],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    group, key_id = dkm_container
    key = service_directory.master_key(group, key_id)
    service_directory.add_key(group, make_current=True)
    infos = service_directory.list_keys(group)
    with pytest.raises(MasterKeyMissingError) as caught:
        make_directory(bind_dn=slapd.other_dn, password=slapd.other_password).master_key(
            group, key_id
        )

    texts = [r.getMessage() for r in caplog.records]
    texts += [repr(service_directory), repr(infos), str(caught.value), repr(slapd)]
    texts.append(repr(service_directory._conn))
    forms = [key.hex(), repr(key), key.decode("latin-1"), slapd.service_password]
    forms += [slapd.other_password, slapd.admin_password]
    for text in texts:
        for form in forms:
            assert form not in text
    assert isinstance(infos[0], MasterKeyInfo)


# --- several servers (domain controllers) ------------------------------------------------


def test_a_dead_server_listed_first_is_passed_over(
    make_directory: MakeDirectory, slapd: LocalSlapd
) -> None:
    dead = f"ldap://127.0.0.1:{free_port()}"
    directory = make_directory(url=[dead, slapd.url])
    assert directory.last_server is None
    group = uuid.uuid4()
    key_id = directory.create_container(group, farm_name="contoso")
    try:
        assert len(directory.master_key(group, key_id)) == 32
        assert directory.last_server == slapd.url
        assert directory.endpoint == slapd.url
    finally:
        directory.delete_container(group)


def test_a_server_that_stops_answering_is_left_for_the_next(
    make_directory: MakeDirectory, slapd: LocalSlapd, tmp_path: Path
) -> None:
    # A second slapd with the same accounts (same passwords file), standing in for a
    # second domain controller: listed first, then stopped under a bound Directory.
    (tmp_path / "first").mkdir()
    (tmp_path / "first" / "passwords.json").write_bytes(
        (slapd.workdir / "passwords.json").read_bytes()
    )
    first = start_slapd(tmp_path / "first")
    try:
        directory = make_directory(url=[first.url, slapd.url])
        group = uuid.uuid4()
        assert not directory.container_exists(group)
        assert directory.last_server == first.url
        first.stop()
        key_id = directory.create_container(group, farm_name="contoso")  # a write, too
        try:
            assert directory.last_server == slapd.url
            assert len(directory.master_key(group, key_id)) == 32
        finally:
            directory.delete_container(group)
    finally:
        first.stop()


def test_all_servers_down_is_one_error_naming_them_all(make_directory: MakeDirectory) -> None:
    dead = [f"ldap://127.0.0.1:{free_port()}", f"ldap://127.0.0.1:{free_port()}"]
    directory = make_directory(url=dead)
    with pytest.raises(DirectoryError, match="cannot reach the directory at") as caught:
        directory.bind()
    assert dead[0] in caught.value.what and dead[1] in caught.value.what


def test_a_rejected_password_is_not_tried_on_the_next_server(
    make_directory: MakeDirectory, slapd: LocalSlapd
) -> None:
    # The second "server" only counts the connections it is offered: a wrong password
    # must not be carried to it (each try could count towards locking the account out).
    import socket

    offered: list[object] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            offered.append(conn)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        second = f"ldap://127.0.0.1:{listener.getsockname()[1]}"
        directory = make_directory(
            url=[slapd.url, second], password="not the password", password_file=None
        )
        with pytest.raises(DirectoryAuthError):
            directory.bind()
        time.sleep(0.3)
        assert offered == []
    finally:
        stop.set()
        thread.join()
        listener.close()


@pytest.mark.parametrize(
    ("changes", "allowed"),
    [
        ({"url": "ldap://dc.example.com"}, False),
        ({"url": ["ldaps://dc1.example.com", "ldap://dc2.example.com"]}, False),
        ({"url": "ldap://dc.example.com", "allow_plaintext": True}, True),
        ({"url": "ldap://dc.example.com", "start_tls": True, "ca_file": "/ca.pem"}, True),
        ({"url": "ldap://127.0.0.1:389"}, True),
        ({"url": "ldap://localhost"}, True),
        ({"url": "ldaps://dc.example.com"}, True),
    ],
)
def test_plaintext_ldap_beyond_loopback_needs_allow_plaintext(
    directory_config: DirectoryConfig,
    fast_retry: RetryConfig,
    changes: dict[str, Any],
    allowed: bool,
) -> None:
    import dataclasses

    config = dataclasses.replace(directory_config, **changes)
    if allowed:
        Directory(config, fast_retry)
    else:
        with pytest.raises(ConfigError, match="reached without TLS"):
            Directory(config, fast_retry)
