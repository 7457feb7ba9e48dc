"""Configuration: a TOML file plus FARMKEYS_* overrides, validated before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from farmkeys import config
from farmkeys.errors import ConfigError

MINIMAL = """
[farm]
name = "contoso"
[node]
id = "node-a"
store = "/var/lib/farmkeys/store"
[database]
dsn = "postgresql://farmkeys@db.example/farmkeys"
[directory]
url = "ldap://dc.example:389"
bind_dn = "cn=svc-farm,ou=people,dc=example"
password_file = "/etc/farmkeys/directory-password"
container = "ou=dkm,dc=example"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "farmkeys.toml"
    path.write_text(text)
    return path


def test_minimal_file_loads_with_ad_fs_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, MINIMAL), environ={})
    assert cfg.farm.name == "contoso"
    assert cfg.node.id == "node-a"
    assert cfg.directory.layout == "openldap"
    assert cfg.policy.key == "rsa-2048"
    assert cfg.policy.certificate_duration == 365
    assert cfg.policy.generation_threshold == 20
    assert cfg.policy.promotion_threshold == 5
    assert cfg.policy.critical_threshold == 2
    assert cfg.policy.threshold_unit_seconds == 86400


def test_environment_overrides_every_key_by_section_and_name(tmp_path: Path) -> None:
    env = {
        "FARMKEYS_DATABASE_DSN": "postgresql://other@127.0.0.1/x",
        "FARMKEYS_NODE_ID": "node-b",
        "FARMKEYS_DIRECTORY_PASSWORD_FILE": "/run/secrets/pw",
        "FARMKEYS_DIRECTORY_START_TLS": "true",
        "FARMKEYS_POLICY_THRESHOLD_UNIT_SECONDS": "1",
        "FARMKEYS_RETRY_TOTAL_SECONDS": "2.5",
    }
    cfg = config.load(write(tmp_path, MINIMAL), environ=env)
    assert cfg.database.dsn == "postgresql://other@127.0.0.1/x"
    assert cfg.node.id == "node-b"
    assert cfg.directory.password_file == "/run/secrets/pw"
    assert cfg.directory.start_tls is True
    assert cfg.policy.threshold_unit_seconds == 1
    assert cfg.retry.total_seconds == 2.5


def test_config_path_comes_from_farmkeys_config(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    assert config.load(environ={"FARMKEYS_CONFIG": str(path)}).farm.name == "contoso"


def test_environment_alone_is_a_complete_configuration() -> None:
    env = {
        "FARMKEYS_FARM_NAME": "fabrikam",
        "FARMKEYS_DATABASE_DSN": "postgresql://x@127.0.0.1/y",
        "FARMKEYS_DIRECTORY_URL": "ldap://127.0.0.1:389",
        "FARMKEYS_DIRECTORY_BIND_DN": "cn=svc",
        "FARMKEYS_DIRECTORY_PASSWORD": "pw",
        "FARMKEYS_DIRECTORY_CONTAINER": "ou=dkm",
    }
    assert config.load(environ=env).farm.name == "fabrikam"


def test_node_id_defaults_to_the_host_name(tmp_path: Path) -> None:
    import socket

    text = MINIMAL.replace('id = "node-a"\n', "")
    assert config.load(write(tmp_path, text), environ={}).node.id == socket.gethostname()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL + "\n[bogus]\nx = 1\n", "unknown section [bogus]"),
        (MINIMAL.replace("[node]", "[node]\nstroe = '/x'"), "unknown key 'stroe'"),
        (MINIMAL + "\n[policy]\ncertificate_duration = 'long'\n", "must be an integer"),
        (MINIMAL + "\n[policy]\ncertificate_duration = true\n", "must be an integer"),
        (MINIMAL + "\n[policy]\nkey = 'dsa-1024'\n", "policy.key 'dsa-1024' is not supported"),
        (MINIMAL + "\n[directory]\n", "not valid TOML"),
        ("this is = = not toml", "not valid TOML"),
        (MINIMAL.replace('name = "contoso"', 'name = ""'), "farm.name must be"),
        (MINIMAL.replace('name = "contoso"', f'name = "{"x" * 48}"'), "farm.name must be"),
        (MINIMAL.replace("ldap://dc", "http://dc"), "must start with ldap://"),
        (MINIMAL.replace('"/var/lib/farmkeys/store"', '"relative/store"'), "absolute path"),
        (
            MINIMAL.replace("[node]", "[node]\npkcs12_password_file = 'p12-password'"),
            "node.pkcs12_password_file must be an absolute path",
        ),
        (MINIMAL.replace('password_file = "/etc/farmkeys/directory-password"', ""), "exactly one"),
        (MINIMAL.replace('dsn = "postgresql://farmkeys@db.example/farmkeys"\n', ""), "dsn"),
        (
            MINIMAL + "\n[policy]\ngeneration_threshold = 1\ncritical_threshold = 3\n",
            "critical_threshold <= generation_threshold",
        ),
    ],
)
def test_bad_file_is_one_clear_config_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text), environ={})
    line = caught.value.diagnostics()
    assert message in line
    assert "\n" not in line
    assert " — " in line


def test_ad_layout_needs_tls(tmp_path: Path) -> None:
    text = MINIMAL.replace("[directory]", '[directory]\nlayout = "ad"')
    with pytest.raises(ConfigError, match="layout 'ad' needs TLS"):
        config.load(write(tmp_path, text), environ={})
    text = text.replace('url = "ldap://dc.example:389"', 'url = "ldaps://dc.example"')
    assert config.load(write(tmp_path, text), environ={}).directory.layout == "ad"


def test_directory_url_takes_a_list_of_servers(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'url = "ldap://dc.example:389"', 'url = ["ldaps://dc1.example", "ldaps://dc2.example"]'
    )
    loaded = config.load(write(tmp_path, text), environ={})
    assert loaded.directory.urls == ("ldaps://dc1.example", "ldaps://dc2.example")
    assert config.load(write(tmp_path, MINIMAL), environ={}).directory.urls == (
        "ldap://dc.example:389",
    )
    env = {"FARMKEYS_DIRECTORY_URL": "ldaps://a.example, ldaps://b.example"}
    assert config.load(write(tmp_path, MINIMAL), environ=env).directory.urls == (
        "ldaps://a.example",
        "ldaps://b.example",
    )


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("[]", "non-empty list of strings"),
        ("[1, 2]", "non-empty list of strings"),
        ('["ldaps://a", "https://b"]', "must start with ldap:// or ldaps://"),
        ('["ldaps://a", "ldaps://a"]', "lists the same server twice"),
    ],
)
def test_bad_directory_url_lists_are_refused(tmp_path: Path, value: str, complaint: str) -> None:
    text = MINIMAL.replace('url = "ldap://dc.example:389"', f"url = {value}")
    with pytest.raises(ConfigError, match=complaint):
        config.load(write(tmp_path, text), environ={})


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*nope\.toml does not exist"):
        config.load(tmp_path / "nope.toml", environ={})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FARMKEYS_NODE_STROE": "/x"}, "FARMKEYS_NODE_STROE has an unknown key 'stroe'"),
        ({"FARMKEYS_NOSUCH_KEY": "1"}, "FARMKEYS_NOSUCH_KEY names no configuration section"),
        ({"FARMKEYS_POLICY_CERTIFICATE_DURATION": "a year"}, "must be an integer"),
        ({"FARMKEYS_DIRECTORY_START_TLS": "maybe"}, "must be true or false"),
    ],
)
def test_bad_environment_override_is_a_config_error(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(write(tmp_path, MINIMAL), environ=env)


def test_hook_variables_are_not_configuration(tmp_path: Path) -> None:
    env = {"FARMKEYS_STORE": "/x", "FARMKEYS_CHANGED": "AB"}
    assert config.load(write(tmp_path, MINIMAL), environ=env).farm.name == "contoso"


def test_password_file_is_read_and_never_shown_in_repr(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret-pass\n")
    text = MINIMAL.replace("/etc/farmkeys/directory-password", str(secret))
    cfg = config.load(write(tmp_path, text), environ={})
    secret.chmod(0o600)
    assert cfg.directory.read_password() == "s3cret-pass"
    holding = write(tmp_path, text.replace(f'password_file = "{secret}"', 'password = "inline-pw"'))
    holding.chmod(0o600)
    inline = config.load(holding, environ={})
    assert "inline-pw" not in repr(inline)


def test_unreadable_password_file_is_a_config_error(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, MINIMAL.replace("/etc/farmkeys", str(tmp_path))), environ={})
    with pytest.raises(ConfigError, match=r"cannot read directory\.password_file"):
        cfg.directory.read_password()


# --- secrets on disk and in reprs (issue 9, part 4) --------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_a_password_file_others_may_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret-pass\n")
    secret.chmod(mode)
    text = MINIMAL.replace("/etc/farmkeys/directory-password", str(secret))
    cfg = config.load(write(tmp_path, text), environ={})
    with pytest.raises(ConfigError, match="may be read or written by group or others") as caught:
        cfg.directory.read_password()
    assert "s3cret-pass" not in str(caught.value) and "chmod 600" in str(caught.value)


@pytest.mark.parametrize(
    ("change", "holds"),
    [
        (
            ('password_file = "/etc/farmkeys/directory-password"', 'password = "inline-pw"'),
            "directory.password",
        ),
        (
            (
                'dsn = "postgresql://farmkeys@db.example/farmkeys"',
                'dsn = "postgresql://farmkeys:pw@db.example/farmkeys"',
            ),
            "a password in database.dsn",
        ),
        (
            (
                'dsn = "postgresql://farmkeys@db.example/farmkeys"',
                'dsn = "host=db.example user=f password=pw"',
            ),
            "a password in database.dsn",
        ),
    ],
)
def test_a_config_file_holding_a_password_must_be_private(
    tmp_path: Path, change: tuple[str, str], holds: str
) -> None:
    path = write(tmp_path, MINIMAL.replace(*change))
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=f"holds {holds} but may be read") as caught:
        config.load(path, environ={})
    assert "pw" not in str(caught.value).replace("password", "")
    path.chmod(0o600)
    assert config.load(path, environ={}).farm.name == "contoso"
    # Without a secret in it, a config file may be readable by others.
    assert config.load(write(tmp_path, MINIMAL), environ={}).farm.name == "contoso"


def test_no_config_object_shows_a_secret_in_its_repr(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'password_file = "/etc/farmkeys/directory-password"', 'password = "inline-pw-1"'
    ).replace(
        'dsn = "postgresql://farmkeys@db.example/farmkeys"',
        'dsn = "postgresql://farmkeys:dsn-pw-2@db.example/farmkeys"',
    )
    path = write(tmp_path, text)
    path.chmod(0o600)
    cfg = config.load(path, environ={})
    shown = repr(cfg) + repr(cfg.database) + repr(cfg.directory) + str(cfg)
    assert "inline-pw-1" not in shown and "dsn-pw-2" not in shown


def test_publish_settings_from_the_file_and_the_environment(tmp_path: Path) -> None:
    text = MINIMAL + (
        '\n[publish]\nlisten = "127.0.0.1:9464"\nrelying_parties = "rp1"\n'
        'entity_id = "https://fs.example/adfs/services/trust"\n'
    )
    cfg = config.load(write(tmp_path, text), environ={})
    assert cfg.publish.address == ("127.0.0.1", 9464)
    assert [p.name for p in cfg.publish.parties] == ["rp1"]  # one string is a list of one
    env = {"FARMKEYS_PUBLISH_RELYING_PARTIES": "rp1=https://rp1.example/md, rp2"}
    cfg = config.load(write(tmp_path, text), environ=env)
    assert cfg.publish.parties == (
        config.RelyingParty("rp1", "https://rp1.example/md"),
        config.RelyingParty("rp2", None),
    )
    assert config.load(write(tmp_path, MINIMAL), environ={}).publish.address is None
    env = {"FARMKEYS_POLICY_REQUIRE_FETCH": "true"}
    assert config.load(write(tmp_path, MINIMAL), environ=env).policy.require_fetch is True
    assert config.load(write(tmp_path, MINIMAL), environ={}).policy.require_fetch is False


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        (MINIMAL.replace("[directory]", "[directroy]"), "did you mean [directory]?"),
        (MINIMAL.replace("bind_dn =", "bnid_dn ="), "did you mean 'bind_dn'?"),
        (MINIMAL + "\n[retry]\ntotal_second = 3\n", "did you mean 'total_seconds'?"),
    ],
)
def test_a_mistyped_section_or_key_gets_a_did_you_mean(
    tmp_path: Path, text: str, hint: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text))
    assert hint in caught.value.what


def test_a_name_like_no_other_gets_no_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, MINIMAL + "\n[xyzzy]\n"))
    assert "did you mean" not in caught.value.what


def test_the_http_limits_have_defaults_that_hold_a_crowd_and_can_be_set(tmp_path: Path) -> None:
    defaults = config.load(write(tmp_path, MINIMAL), environ={}).publish
    assert (defaults.threads, defaults.max_queued) == (8, 256)
    assert (defaults.connection_limit, defaults.backlog) == (512, 1024)
    assert defaults.request_timeout_seconds == 10.0
    text = MINIMAL + (
        "\n[publish]\nthreads = 2\nmax_queued = 0\nconnection_limit = 64\nbacklog = 128\n"
        "request_timeout_seconds = 2.5\n"
    )
    cfg = config.load(write(tmp_path, text), environ={"FARMKEYS_PUBLISH_THREADS": "3"})
    assert (cfg.publish.threads, cfg.publish.max_queued) == (3, 0)
    assert (cfg.publish.connection_limit, cfg.publish.backlog) == (64, 128)
    assert cfg.publish.request_timeout_seconds == 2.5


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("threads = 0", r"publish.threads must be from 1 to 256, not 0"),
        ("max_queued = -1", r"publish.max_queued must be from 0 to 100000, not -1"),
        ("connection_limit = 0", r"publish.connection_limit must be from 1 to 100000, not 0"),
        ("backlog = 5", r"publish.backlog must be from 128 to 65535, not 5"),
        ("request_timeout_seconds = 0", r"publish.request_timeout_seconds must be more than 0"),
        ('threads = "many"', r"must be an integer"),
    ],
)
def test_bad_http_limits_are_one_clear_error(tmp_path: Path, line: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        config.load(write(tmp_path, MINIMAL + f"\n[publish]\n{line}\n"), environ={})


def test_the_metadata_is_signed_by_default_and_its_passive_url_can_be_set(tmp_path: Path) -> None:
    defaults = config.load(write(tmp_path, MINIMAL), environ={}).publish
    assert (defaults.sign_metadata, defaults.passive_url) == (True, None)
    text = MINIMAL + '\n[publish]\nsign_metadata = false\npassive_url = "https://fs.example/ls/"\n'
    cfg = config.load(write(tmp_path, text), environ={})
    assert (cfg.publish.sign_metadata, cfg.publish.passive_url) == (False, "https://fs.example/ls/")
    env = {"FARMKEYS_PUBLISH_SIGN_METADATA": "true"}
    assert config.load(write(tmp_path, text), environ=env).publish.sign_metadata is True


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ('passive_url = "ftp://fs.example/ls/"', r"publish.passive_url must be an http\(s\) URL"),
        ('passive_url = "https://fs.example/a b"', r"publish.passive_url must be an absolute URI"),
        ('sso_url = "https://fs.example/\\u001b[8m"', r"publish.sso_url must be an absolute URI"),
        ('sign_metadata = "yes"', r"must be true or false"),
    ],
)
def test_bad_metadata_settings_are_one_clear_error(
    tmp_path: Path, line: str, complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint):
        config.load(write(tmp_path, MINIMAL + f"\n[publish]\n{line}\n"), environ={})
