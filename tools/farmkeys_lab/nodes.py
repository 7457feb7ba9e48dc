"""The node config files the demo and the lab write for their private slapd and PostgreSQL.

Each file holds no secret: the directory password is in a password file beside it (0600)
and the config DB's in the cluster's passfile, which the DSN names. The files are 0600
all the same, and the store folders' parent 0700, so every check farmkeys makes of
its files and folders passes.
"""

from __future__ import annotations

import os
from pathlib import Path

from farmkeys_lab.slapd import LocalSlapd

FARM = "contoso"
PASSWORD_FILE = "directory.password"  # noqa: S105 - the name of the file


def store_of(root: Path, node: str) -> Path:
    """Where ``node``'s store lives under ``root``."""
    return root / "stores" / node


def write_node_config(
    root: Path,
    *,
    node: str,
    slapd: LocalSlapd,
    dsn: str,
    heading: str,
    publish: str = "",
) -> Path:
    """Write ``<root>/<node>.toml`` (mode 0600) for ``node`` of the farm on ``slapd`` and
    ``dsn``; ``heading`` is its first comment, ``publish`` an optional [publish] section.

    The directory password goes to ``<root>/directory.password`` (0600), the stores under
    ``<root>/stores/`` (0700), which farmkeys makes on the first sync.
    """
    password_file = slapd.write_password_file(root / PASSWORD_FILE)
    store_of(root, node).parent.mkdir(mode=0o700, exist_ok=True)
    path = root / f"{node}.toml"
    text = f"""# {heading}
[farm]
name = "{FARM}"
[node]
id = "{node}"
store = "{store_of(root, node)}"
[database]
dsn = "{dsn}"
[directory]
url = "{slapd.url}"
bind_dn = "{slapd.service_dn}"
password_file = "{password_file}"
container = "{slapd.container}"
layout = "openldap"
[policy]
key = "rsa-2048"
certificate_duration = 365
{publish}"""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def publish_section(port: int) -> str:
    """A [publish] section: metadata, JWKS, /healthz and /metrics on 127.0.0.1:``port``."""
    return (
        f'[publish]\nlisten = "127.0.0.1:{port}"\n'
        'entity_id = "https://fs.contoso.example/adfs/services/trust"\n'
        'sso_url = "https://fs.contoso.example/adfs/ls/"\nrelying_parties = ["rp1"]\n'
    )
