"""The StrictModes walk (farmkeys.file_trust): every file farmkeys acts on, and every folder
above it and above the store, must be root's or this account's, and writable by no one
else (issue 21). Each test gives one of them away, or opens it to group or others, the
way a local attacker would find it, and expects one line naming the path and the fix."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_config import MINIMAL

from farmkeys import config, escrow
from farmkeys.config import DirectoryConfig, HooksConfig, RetryConfig
from farmkeys.errors import ConfigError, EscrowError, UnsafePathError
from farmkeys.file_trust import check_file, check_folders_above
from farmkeys.serve.hook import OnChangeHook

NOBODY = 65534
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving a file to another account needs root"
)


@pytest.fixture
def etc(tmp_path: Path) -> Iterator[Path]:
    """A folder like /etc/farmkeys: this account's, 0755."""
    folder = tmp_path / "etc-farmkeys"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    yield folder
    folder.chmod(0o755)  # so pytest can clean up whatever a test did to it


def config_file(folder: Path, text: str = MINIMAL, mode: int = 0o644) -> Path:
    path = folder / "farmkeys.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def refusal(exc: pytest.ExceptionInfo[BaseException]) -> str:
    assert isinstance(exc.value, UnsafePathError), exc.value
    assert isinstance(exc.value, ConfigError)  # the one hierarchy: a configuration error
    return str(exc.value)


# -- the walk accepts what a normal machine has -------------------------------------------


def test_a_root_owned_0755_chain_and_the_sticky_tmp_are_accepted(etc: Path) -> None:
    # pytest's tmp_path is under /tmp (1777, sticky) then /tmp/pytest-of-root (root, 0700).
    path = config_file(etc)
    assert check_file(path, what="config file") == path.resolve()
    assert config.load(path, environ={}).farm.name == "contoso"


# -- the config file ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "who", "fix"),
    [(0o664, "group", "g-w"), (0o646, "others", "o-w"), (0o666, "group and others", "go-w")],
)
def test_a_config_file_others_may_write_is_refused_though_it_holds_no_password(
    etc: Path, mode: int, who: str, fix: str
) -> None:
    path = config_file(etc, mode=mode)
    with pytest.raises(ConfigError) as caught:
        config.load(path, environ={})
    assert refusal(caught) == (
        f"config file {path} is writable by {who} (mode {mode:04o}) — chmod {fix} {path}"
    )


def test_a_config_file_in_a_group_writable_folder_is_refused(etc: Path) -> None:
    path = config_file(etc)
    etc.chmod(0o775)
    with pytest.raises(ConfigError) as caught:
        config.load(path, environ={})
    assert refusal(caught) == (
        f"{etc}, on the way to config file {path}, is writable by group (mode 0775)"
        f" — chmod g-w {etc}"
    )


@needs_root
def test_a_config_file_of_another_owner_is_refused(etc: Path) -> None:
    path = config_file(etc)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ConfigError) as caught:
        config.load(path, environ={})
    text = refusal(caught)
    assert text.startswith(f"config file {path} is owned by nobody (uid {NOBODY}), not by root")
    assert text.endswith(f"— chown root {path}, or move config file to a folder of root's")


@needs_root
def test_a_config_file_in_a_folder_of_another_owner_is_refused(etc: Path) -> None:
    path = config_file(etc)
    os.chown(etc, NOBODY, NOBODY)
    with pytest.raises(ConfigError) as caught:
        config.load(path, environ={})
    assert refusal(caught).startswith(
        f"{etc}, on the way to config file {path}, is owned by nobody (uid {NOBODY})"
    )


def test_a_config_file_of_this_account_in_a_sticky_folder_is_accepted(tmp_path: Path) -> None:
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    path = config_file(sticky)
    assert config.load(path, environ={}).farm.name == "contoso"


@needs_root
def test_a_config_file_of_another_account_in_a_sticky_folder_is_refused(tmp_path: Path) -> None:
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    path = config_file(sticky)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ConfigError) as caught:
        config.load(path, environ={})
    assert f"config file {path} is owned by nobody" in refusal(caught)


def test_a_folder_others_may_write_without_the_sticky_bit_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    path = config_file(shared)
    with pytest.raises(ConfigError) as caught:
        config.load(path, environ={})
    assert refusal(caught).endswith(
        f"is writable by group and others (mode 0777) — chmod go-w {shared}"
    )


# -- symbolic links: the chain as given and the chain resolved are both checked ---------


def test_a_link_to_a_file_in_a_writable_folder_is_refused(etc: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    real = config_file(shared)
    shared.chmod(0o775)
    link = etc / "farmkeys.toml"
    link.symlink_to(real)
    with pytest.raises(ConfigError) as caught:
        config.load(link, environ={})
    assert refusal(caught) == (
        f"{shared}, on the way to config file {real}, is writable by group (mode 0775)"
        f" — chmod g-w {shared}"
    )


def test_a_link_in_a_writable_folder_is_refused_though_its_target_is_safe(
    etc: Path, tmp_path: Path
) -> None:
    real = config_file(etc)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "farmkeys.toml").symlink_to(real)
    shared.chmod(0o775)  # whoever is in the group can point the link elsewhere
    with pytest.raises(ConfigError) as caught:
        config.load(shared / "farmkeys.toml", environ={})
    assert refusal(caught).endswith(f"is writable by group (mode 0775) — chmod g-w {shared}")


@needs_root
def test_a_link_of_another_account_in_a_sticky_folder_is_refused(etc: Path, tmp_path: Path) -> None:
    real = config_file(etc)
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    link = sticky / "farmkeys.toml"
    link.symlink_to(real)
    os.chown(link, NOBODY, NOBODY, follow_symlinks=False)
    with pytest.raises(ConfigError) as caught:
        config.load(link, environ={})
    assert refusal(caught).startswith(f"config file {link}, a symbolic link, is owned by nobody")


def test_a_link_in_a_safe_folder_to_a_safe_file_is_accepted(etc: Path, tmp_path: Path) -> None:
    real = config_file(etc)
    other = tmp_path / "other"
    other.mkdir(mode=0o755)
    (other / "farmkeys.toml").symlink_to(real)
    assert config.load(other / "farmkeys.toml", environ={}).farm.name == "contoso"


# -- directory.password_file, and the DSN's passfile --------------------------------------


def password_config(etc: Path, secret: Path) -> config.Config:
    text = MINIMAL.replace("/etc/farmkeys/directory-password", str(secret))
    return config.load(config_file(etc, text), environ={})


def test_a_password_file_in_a_group_writable_folder_is_refused(etc: Path, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    secret = secrets / "pw"
    secret.write_text("s3cret-pass\n")
    secret.chmod(0o600)
    cfg = password_config(etc, secret)
    assert cfg.directory.read_password() == "s3cret-pass"
    secrets.chmod(0o770)
    with pytest.raises(ConfigError) as caught:
        cfg.directory.read_password()
    text = refusal(caught)
    assert text == (
        f"{secrets}, on the way to directory.password_file {secret}, is writable by group"
        f" (mode 0770) — chmod g-w {secrets}"
    )
    assert "s3cret-pass" not in text


@needs_root
def test_a_password_file_of_another_owner_is_refused(etc: Path, tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret-pass\n")
    secret.chmod(0o600)
    os.chown(secret, NOBODY, NOBODY)
    with pytest.raises(ConfigError) as caught:
        password_config(etc, secret).directory.read_password()
    assert f"directory.password_file {secret} is owned by nobody" in refusal(caught)


def test_a_passfile_the_dsn_names_is_checked_too(etc: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    passfile = shared / "pgpass"
    passfile.write_text("*:*:*:*:pw\n")
    passfile.chmod(0o600)
    text = MINIMAL.replace(
        'dsn = "postgresql://farmkeys@db.example/farmkeys"',
        f'dsn = "host=db.example user=farmkeys passfile={passfile}"',
    )
    assert config.load(config_file(etc, text), environ={}).farm.name == "contoso"
    shared.chmod(0o777)
    with pytest.raises(ConfigError) as caught:
        config.load(config_file(etc, text), environ={})
    assert refusal(caught).endswith(f"(mode 0777) — chmod go-w {shared}")
    shared.chmod(0o755)
    passfile.chmod(0o644)
    with pytest.raises(ConfigError, match="may be read or written by group or others"):
        config.load(config_file(etc, text), environ={})


# -- directory.ca_file --------------------------------------------------------------------


def test_a_ca_file_others_may_write_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    from farmkeys.directory import Directory

    secret = tmp_path / "pw"
    secret.write_text("s3cret-pass\n")
    secret.chmod(0o600)
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    ca.chmod(0o664)
    directory = DirectoryConfig(
        url="ldaps://127.0.0.1:9",  # nothing listens: the refusal comes first
        bind_dn="cn=svc",
        container="ou=dkm",
        password_file=str(secret),
        ca_file=str(ca),
        timeout_seconds=1,
    )
    retry = RetryConfig(total_seconds=0, initial_backoff_seconds=0.01, max_backoff_seconds=0.01)
    with pytest.raises(ConfigError) as caught, Directory(directory, retry) as client:
        client.bind()
    assert refusal(caught) == (
        f"directory.ca_file {ca} is writable by group (mode 0664) — chmod g-w {ca}"
    )


# -- escrow passphrase files --------------------------------------------------------------


def test_a_passphrase_file_in_a_writable_folder_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    passphrase = shared / "passphrase"
    passphrase.write_text("correct horse battery staple\n")
    passphrase.chmod(0o600)
    assert escrow.read_passphrase(str(passphrase), confirm=False, minimum=0)
    shared.chmod(0o757)
    with pytest.raises(ConfigError) as caught:
        escrow.read_passphrase(str(passphrase), confirm=False, minimum=0)
    assert refusal(caught) == (
        f"{shared}, on the way to passphrase file {passphrase}, is writable by others"
        f" (mode 0757) — chmod o-w {shared}"
    )
    # The file's own mode is still judged as before, by the escrow's own error.
    shared.chmod(0o755)
    passphrase.chmod(0o640)
    with pytest.raises(EscrowError, match="may be read or written by group or others"):
        escrow.read_passphrase(str(passphrase), confirm=False, minimum=0)


@needs_root
def test_a_passphrase_file_of_another_owner_is_refused(tmp_path: Path) -> None:
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("correct horse battery staple\n")
    passphrase.chmod(0o600)
    os.chown(passphrase, NOBODY, NOBODY)
    with pytest.raises(ConfigError) as caught:
        escrow.read_passphrase(str(passphrase), confirm=False, minimum=0)
    assert f"passphrase file {passphrase} is owned by nobody" in refusal(caught)


# -- the hook program ---------------------------------------------------------------------


def hook_script(folder: Path, marker: Path) -> Path:
    script = folder / "reload.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    script.chmod(0o755)
    return script


def run_hook(command: str) -> str | None:
    """What the hook's runner says of ``command`` (None: it ran and exited 0). The runner
    records its outcome in the config DB; that part is tested in tests/system."""
    hook = OnChangeHook(HooksConfig(on_change=command), None, store=Path("/"), node_id="n")  # type: ignore[arg-type]
    return hook._execute(command, {"PATH": os.environ.get("PATH", os.defpath)})


def test_a_hook_program_others_may_write_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    script = hook_script(tmp_path, marker)
    assert run_hook(str(script)) is None and marker.exists()
    marker.unlink()
    script.chmod(0o775)
    error = run_hook(str(script))
    assert error == (
        f"on_change hook refused: hooks.on_change program {script} is writable by group"
        f" (mode 0775) — chmod g-w {script}"
    )
    assert not marker.exists()


def test_a_hook_program_in_a_writable_folder_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    shared = tmp_path / "bin"
    shared.mkdir()
    script = hook_script(shared, marker)
    shared.chmod(0o777)
    error = run_hook(f"{script} --reload")
    assert error is not None and error.startswith("on_change hook refused: ")
    assert error.endswith(f"— chmod go-w {shared}") and not marker.exists()


@needs_root
def test_a_hook_program_of_another_owner_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    script = hook_script(tmp_path, marker)
    os.chown(script, NOBODY, NOBODY)
    error = run_hook(str(script))
    assert error is not None and f"program {script} is owned by nobody" in error
    assert not marker.exists()


def test_a_hook_program_found_on_path_is_checked_where_it_is_found(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    shared = tmp_path / "bin"
    shared.mkdir()
    hook_script(shared, marker)
    path = f"{shared}{os.pathsep}{os.environ.get('PATH', os.defpath)}"
    hook = OnChangeHook(HooksConfig(on_change="reload.sh"), None, store=Path("/"), node_id="n")  # type: ignore[arg-type]
    assert hook._execute("reload.sh", {"PATH": path}) is None and marker.exists()
    marker.unlink()
    shared.chmod(0o775)
    error = hook._execute("reload.sh", {"PATH": path})
    assert error is not None and error.endswith(f"— chmod g-w {shared}")
    assert not marker.exists()


# -- the folders above the store ----------------------------------------------------------


def test_the_folders_above_a_store_that_does_not_exist_yet_are_checked(tmp_path: Path) -> None:
    shared = tmp_path / "srv"
    shared.mkdir()
    check_folders_above(shared / "a/b/store", what="the store")
    shared.chmod(0o777)
    with pytest.raises(UnsafePathError) as caught:
        check_folders_above(shared / "a/b/store", what="the store")
    assert refusal(caught) == (
        f"{shared}, on the way to the store {shared}/a/b/store, is writable by group and"
        f" others (mode 0777) — chmod go-w {shared}"
    )
    # In a sticky folder, a store this account makes is its own: accepted.
    shared.chmod(0o1777)
    check_folders_above(shared / "a/b/store", what="the store")


@needs_root
def test_an_entry_of_another_account_in_a_sticky_folder_is_refused(tmp_path: Path) -> None:
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "store").mkdir()
    os.chown(sticky / "store", NOBODY, NOBODY)  # nobody may rename it away and back
    with pytest.raises(UnsafePathError) as caught:
        check_folders_above(sticky / "store", what="the store")
    assert refusal(caught) == (
        f"the store {sticky}/store is in the sticky folder {sticky} (mode 1777) but owned by"
        f" nobody (uid {NOBODY}), who can therefore replace it — chown root {sticky}/store,"
        f" or move the store out of {sticky}"
    )


def test_a_non_regular_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafePathError, match="is not a regular file"):
        check_file(tmp_path, what="config file")
    assert stat.S_ISDIR(os.stat(tmp_path).st_mode)
