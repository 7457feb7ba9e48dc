"""`make demo`: the demo farm runs, prints whole documents or summaries of them (never a
cut-off body, never "None"), says at the end that its servers are gone and how to get a
lasting lab; and it installs farmkeys as an operator would, without the test tools."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from farmkeys_lab.demo import WHOLE_DOCUMENT_BYTES, describe_answer

REPO = Path(__file__).resolve().parents[2]
# Generous: the demo takes about 10 s alone, on a loaded 2-core machine much longer.
DEMO_SECONDS = 400.0


def lab_env() -> dict[str, str]:
    """The environment of the Makefile's `LAB` prefix: tools/ on PYTHONPATH, no FARMKEYS_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FARMKEYS_", "DEMO_"))}
    tools = str(REPO / "tools")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tools, env.get("PYTHONPATH")]))
    return env


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_the_demo_prints_whole_documents_or_their_summaries_and_says_its_servers_stopped(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "farmkeys_lab.demo"],
        cwd=tmp_path,
        env=lab_env(),
        capture_output=True,
        text=True,
        timeout=DEMO_SECONDS,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert re.search(r"\bNone\b", out) is None, out
    lines = out.splitlines()
    assert "..." not in lines  # the mark of a cut body

    # The metadata and the JWKS: their real ETag, then a summary of their keys.
    metadata = lines.index(next(line for line in lines if line.startswith("SAML metadata of")))
    assert re.fullmatch(r'HTTP 200, ETag "[0-9a-f]{32}"', lines[metadata - 1])
    assert re.fullmatch(
        r"SAML metadata of https://fs\.contoso\.example/adfs/services/trust: 2 signing keys,"
        r" 1 encryption key, [0-9,]+ bytes, signed",
        lines[metadata],
    )
    keys = [line.split() for line in lines[metadata + 1 : metadata + 4]]
    assert [use for use, _ in keys] == ["signing", "signing", "encryption"]
    assert all(re.fullmatch(r"[0-9A-F]{40}", thumbprint) for _, thumbprint in keys)
    jwks = lines.index(next(line for line in lines if line.startswith("JWKS:")))
    assert re.fullmatch(r'HTTP 200, ETag "[0-9a-f]{32}"', lines[jwks - 1])
    assert re.fullmatch(r"JWKS: 2 keys, [0-9,]+ bytes", lines[jwks])
    assert all(
        re.fullmatch(r"  kid [A-Za-z0-9_-]{27}  RSA RS256  use sig", line)
        for line in lines[jwks + 1 : jwks + 3]
    )
    # /healthz has no ETag: none is printed, and its short body is printed whole.
    health = lines.index("$ curl " + re.search(r"http://\S+/healthz", out)[0])
    assert lines[health + 1] == "HTTP 200"
    assert json.loads(lines[health + 2])["status"] == "ok"

    # The servers are gone, and the demo says so and where a lasting lab is.
    slapd = int(re.search(r"^directory: private slapd at ldap://127\.0\.0\.1:(\d+)", out, re.M)[1])
    postgres = int(re.search(r"^config DB: .* at 127\.0\.0\.1:(\d+)$", out, re.M)[1])
    assert not listening(slapd) and not listening(postgres)
    assert lines[-2].startswith("The demo is over: its slapd and PostgreSQL are stopped, so the")
    assert lines[-1].endswith(": make lab")
    config = (tmp_path / ".demo" / "node-a.toml").read_text()
    assert config.startswith("# farmkeys demo: node node-a. The demo's servers stop when it ends")


def test_a_long_document_of_no_known_kind_is_summarised_never_cut() -> None:
    body = b"x" * (WHOLE_DOCUMENT_BYTES + 1)
    assert describe_answer("/other", 200, '"abc"', body) == [
        'HTTP 200, ETag "abc"',
        f"{len(body):,} bytes, not shown",
    ]


def test_a_short_document_is_printed_whole_and_a_missing_etag_is_not_printed() -> None:
    body = b'{"status": "degraded", "problems": ["the config DB is away"]}\n'
    assert describe_answer("/healthz", 503, None, body) == [
        "HTTP 503",
        '{"status": "degraded", "problems": ["the config DB is away"]}',
    ]


def test_the_metadata_is_summarised_by_its_keys() -> None:
    def key(use: str, name: str) -> str:
        return (
            f'<md:KeyDescriptor use="{use}"><ds:KeyInfo><ds:KeyName>{name}</ds:KeyName>'
            "</ds:KeyInfo></md:KeyDescriptor>"
        )

    body = (
        '<md:EntityDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata"'
        ' xmlns:ds="http://www.w3.org/2000/09/xmldsig#" entityID="https://fs.example/trust">'
        f"<md:IDPSSODescriptor>{key('signing', 'AA')}{key('encryption', 'BB')}"
        "</md:IDPSSODescriptor></md:EntityDescriptor>"
    ).encode()
    path = "/FederationMetadata/2007-06/FederationMetadata.xml"
    assert describe_answer(path, 200, '"e1"', body) == [
        'HTTP 200, ETag "e1"',
        f"SAML metadata of https://fs.example/trust: 1 signing key, 1 encryption key,"
        f" {len(body)} bytes",
        "  signing     AA",
        "  encryption  BB",
    ]


def test_the_signed_metadata_is_summarised_by_its_idpsso_keys_once() -> None:
    key = (
        '<md:KeyDescriptor use="signing"><ds:KeyInfo xmlns:ds="http://www.w3.org/2000/09/xmldsig#">'
        "<ds:KeyName>AA</ds:KeyName></ds:KeyInfo></md:KeyDescriptor>"
    )
    body = (
        '<md:EntityDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata" ID="_1"'
        ' entityID="https://fs.example/trust">'
        '<ds:Signature xmlns:ds="http://www.w3.org/2000/09/xmldsig#"></ds:Signature>'
        f"<md:RoleDescriptor>{key}</md:RoleDescriptor>"
        f"<md:IDPSSODescriptor>{key}</md:IDPSSODescriptor></md:EntityDescriptor>"
    ).encode()
    path = "/FederationMetadata/2007-06/FederationMetadata.xml"
    assert describe_answer(path, 200, None, body) == [
        "HTTP 200",
        f"SAML metadata of https://fs.example/trust: 1 signing key, 0 encryption keys,"
        f" {len(body)} bytes, signed",
        "  signing     AA",
    ]


def test_make_demo_and_make_lab_install_farmkeys_without_the_test_tools(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    planned = subprocess.run(
        ["make", "-n", "-B", "-C", str(REPO), "demo", "lab", f"DEMO_VENV={venv}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert planned.returncode == 0, planned.stderr
    commands = planned.stdout
    assert f"{venv}/bin/python -m pip install --quiet -e .\n" in commands
    assert "[test]" not in commands and "-m pytest" not in commands
    assert f"{venv}/bin/python -m farmkeys_lab.demo" in commands
    assert f"{venv}/bin/python -m farmkeys_lab up --dir lab" in commands
    # The servers they start: slapd and PostgreSQL, not the tests' Samba DC.
    assert "slapd ldap-utils postgresql" in commands
    assert "samba" not in commands
