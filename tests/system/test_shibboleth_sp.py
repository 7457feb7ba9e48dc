"""A real SAML relying party loads the farm's signed metadata: Debian's Shibboleth SP
utilities (shibboleth-sp-utils; `make setup` installs them) run ``mdquery`` with a
``MetadataProvider type="XML"`` that fetches the metadata URL of a serving node, a
``Signature`` metadata filter on the farm's signing certificate and a ``RequireValidUntil``
filter. It loads and trusts the document, and refuses it when one byte is changed, when
another certificate is pinned, and when its validity is longer than the filter allows.

What these tools need and do, as found here (Shibboleth SP 3.4.1):

- mdquery loads the SP configuration in-process (``SHIBSP_CONFIG``) and fetches the URL
  with the SP's own HTTP client: neither shibd nor a web server runs.
- It exits 0 whether or not it found the entity: the test reads what it prints (the
  entity's XML on stdout; the log, ``SHIBSP_LOGGING``, goes to a file).
- ``validate="true"`` (the SP's schema validation) refuses the document: its parser has no
  grammar for the WS-Federation namespace of the ``fed:SecurityTokenServiceType`` role, as
  with AD FS's own metadata. A relying party loading AD FS-shaped metadata sets
  ``validate="false"``; the signature and validity filters still apply (the last test).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from farmtools import TestFarm, expect_ok, wait_until
from federation import one_byte_changed
from serving import ServeNodes
from test_serve_http import PUBLISH, QUICK, START, free_port, get

from farmkeys import publish

ENTITY = PUBLISH["entity_id"]
FOURTEEN_DAYS = 14 * 24 * 3600  # RequireValidUntil's maxValidityInterval, in seconds
LOGGER = """\
log4j.rootCategory=INFO, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.fileName={log}
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=%p %c: %m%n
"""
CONFIG = """\
<SPConfig xmlns="urn:mace:shibboleth:3.0:native:sp:config" clockSkew="180">
  <ApplicationDefaults entityID="https://sp.example.org/shibboleth">
    <Sessions lifetime="28800" timeout="3600" handlerSSL="true" cookieProps="https"
              redirectLimit="exact"/>
    <MetadataProvider type="XML" validate="{validate}" {source}>
      <MetadataFilter type="RequireValidUntil" maxValidityInterval="{max_validity}"/>
      <MetadataFilter type="Signature" certificate="{certificate}" verifyBackup="false"/>
    </MetadataProvider>
  </ApplicationDefaults>
  <SecurityPolicyProvider type="XML" validate="true" path="/etc/shibboleth/security-policy.xml"/>
  <ProtocolProvider type="XML" validate="true" reloadChanges="false"
                    path="/etc/shibboleth/protocols.xml"/>
</SPConfig>
"""


@pytest.fixture(scope="module", autouse=True)
def _mdquery_installed() -> None:
    if shutil.which("mdquery") is None:
        pytest.fail("mdquery is not installed: run `make setup` (shibboleth-sp-utils)")


@pytest.fixture
def serving(farm: TestFarm, request: pytest.FixtureRequest) -> Iterator[tuple[TestFarm, str]]:
    """node-a serving the farm over HTTP (its keys: the parameter, else RSA); its metadata
    URL."""
    farm.overrides.update(json.loads(json.dumps(QUICK)))
    farm.overrides["policy"]["key"] = getattr(request, "param", "rsa-2048")
    expect_ok(farm.run("init"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with ServeNodes(farm) as nodes:
        nodes.start("node-a", publish={**PUBLISH, "listen": f"127.0.0.1:{port}"})
        wait_until(
            lambda: get(url + publish.METADATA_PATH)[0] == 200,
            START,
            "node-a publishes its metadata",
            interval=0.1,
            detail=nodes.logs,
        )
        yield farm, url + publish.METADATA_PATH


def mdquery(
    folder: Path,
    source: str,
    certificate: Path,
    *,
    max_validity: int = FOURTEEN_DAYS,
    validate: bool = False,
) -> tuple[str, str]:
    """What ``mdquery -e ENTITY`` prints of the IdP (its XML, or nothing) and its log, with
    the metadata from ``source`` (``url="..."`` or ``path="..."``) through the filters."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "shibboleth.log"
    log.unlink(missing_ok=True)
    (folder / "console.logger").write_text(LOGGER.format(log=log))
    (folder / "shibboleth2.xml").write_text(
        CONFIG.format(
            validate="true" if validate else "false",
            source=source,
            max_validity=max_validity,
            certificate=certificate,
        )
    )
    result = subprocess.run(
        ["mdquery", "-e", ENTITY, "-a", "default"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={
            "PATH": "/usr/bin:/bin",
            "SHIBSP_CONFIG": str(folder / "shibboleth2.xml"),
            "SHIBSP_LOGGING": str(folder / "console.logger"),
        },
    )
    assert result.returncode == 0, result.stderr  # also when it found nothing
    return result.stdout, log.read_text(errors="replace") if log.exists() else ""


def loaded(out: str) -> bool:
    return f'entityID="{ENTITY}"' in out and "<md:IDPSSODescriptor" in out


@pytest.mark.parametrize("serving", ["rsa-2048", "ec-p256"], indirect=True)
def test_shibboleth_loads_and_trusts_the_signed_metadata_from_the_nodes_url(
    serving: tuple[TestFarm, str], tmp_path: Path
) -> None:
    farm, url = serving
    certificate = farm.store() / "signing" / "primary.pem"
    backup = tmp_path / "backup.xml"
    out, log = mdquery(tmp_path / "sp", f'url="{url}" backingFilePath="{backup}"', certificate)
    assert loaded(out), log
    ec = farm.overrides["policy"]["key"] == "ec-p256"
    assert ("xmldsig-more#ecdsa-sha256" in out) == ec
    assert "applying metadata filter (Signature)" in log
    assert "applying metadata filter (RequireValidUntil)" in log
    assert "failed signature check" not in log
    manifest = json.loads((farm.store() / "manifest.json").read_text())
    (primary,) = [
        c["thumbprint"]
        for c in manifest["certificates"]
        if (c["purpose"], c["role"]) == ("signing", "primary")
    ]
    assert f"<ds:KeyName>{primary}</ds:KeyName>" in out
    # The SP kept what it trusted, byte for byte what the node serves.
    with urllib.request.urlopen(url, timeout=60) as response:
        assert backup.read_bytes() == response.read()


def test_shibboleth_refuses_the_metadata_when_one_byte_is_changed(
    serving: tuple[TestFarm, str], tmp_path: Path
) -> None:
    farm, url = serving
    with urllib.request.urlopen(url, timeout=60) as response:
        body = response.read()
    certificate = farm.store() / "signing" / "primary.pem"
    good, changed = tmp_path / "good.xml", tmp_path / "changed.xml"
    good.write_bytes(body)
    changed.write_bytes(one_byte_changed(body, b"adfs/ls/", b"adfs/lt/"))
    out, log = mdquery(tmp_path / "good", f'path="{good}"', certificate)
    assert loaded(out), log
    out, log = mdquery(tmp_path / "changed", f'path="{changed}"', certificate)
    assert not loaded(out)
    assert "failed signature check" in log, log


def test_shibboleth_refuses_the_metadata_with_another_certificate_pinned(
    serving: tuple[TestFarm, str], tmp_path: Path
) -> None:
    farm, url = serving
    other = farm.store() / "decryption" / "primary.pem"
    out, log = mdquery(tmp_path / "sp", f'url="{url}"', other)
    assert not loaded(out)
    assert "failed signature check" in log, log


def test_require_valid_until_refuses_a_longer_validity_than_it_allows(
    serving: tuple[TestFarm, str], tmp_path: Path
) -> None:
    """validUntil is at most seven days ahead: a filter allowing six days refuses it."""
    farm, url = serving
    certificate = farm.store() / "signing" / "primary.pem"
    out, log = mdquery(tmp_path / "sp", f'url="{url}"', certificate, max_validity=6 * 24 * 3600)
    assert not loaded(out)
    # Stopped at the first filter: the signature filter never ran.
    assert "applying metadata filter (RequireValidUntil)" in log, log
    assert "applying metadata filter (Signature)" not in log, log


def test_schema_validation_by_the_sp_refuses_the_ws_federation_role(
    serving: tuple[TestFarm, str], tmp_path: Path
) -> None:
    """What a relying party must know: the SP's validator has no WS-Federation grammar."""
    farm, url = serving
    certificate = farm.store() / "signing" / "primary.pem"
    out, log = mdquery(tmp_path / "sp", f'url="{url}"', certificate, validate=True)
    assert not loaded(out)
    assert (
        "grammar not found for namespace 'http://docs.oasis-open.org/wsfed/federation/200706'"
        in log
    )
