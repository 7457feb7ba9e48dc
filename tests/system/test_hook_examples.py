"""The example hooks of deploy/hooks/, run by a real `farmkeys serve` as `hooks.on_change`.

`restart-on-primary-change` (docs/integrations.md, SATOSA) restarts a service that loads
its keys only at start, and only when a primary changed. Here the "restart" is a small
program that records what a restarted pysaml2 service would load from the store at that
moment: the thumbprints of signing/primary.pem and decryption/primary.pem, and whether
signing/primary.key is that certificate's key. A day lasts a second:

    t0        init: one primary per purpose, valid t0 .. t0+30: the first restart
    t0+10     a secondary per purpose (generation_threshold 20): no restart
    t0+18     each is promoted (promotion_threshold 8): a restart on the new primaries
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from farmtools import REPO, TestFarm, expect_ok, wait_until
from serving import ServeNodes, live_identity, manifest_identity

HOOK = REPO / "deploy" / "hooks" / "restart-on-primary-change"
POLICY: dict[str, Any] = {
    "threshold_unit_seconds": 1,
    "certificate_duration": 30,
    "generation_threshold": 20,
    "promotion_threshold": 8,
    "critical_threshold": 2,
    "rollover_interval_seconds": 1.0,
}
START = 30.0  # a process starts and syncs on a loaded machine
ENTITY_ID = "https://fs.contoso.example/adfs/services/trust"
SSO_URL = "https://fs.contoso.example/adfs/ls/"

# What the restarted service would load, appended as one JSON line to argv[1].
RECORDER = """\
import hashlib, json, os, sys
from pathlib import Path
from cryptography import x509
from cryptography.hazmat.primitives import serialization

store = Path(os.environ["FARMKEYS_STORE"])

def thumbprint(path):
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()

def public(key):
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

cert = x509.load_pem_x509_certificate((store / "signing" / "primary.pem").read_bytes())
key = serialization.load_pem_private_key((store / "signing" / "primary.key").read_bytes(), None)
line = {
    "changed": os.environ.get("FARMKEYS_CHANGED", "").split(),
    "signing": thumbprint(store / "signing" / "primary.pem"),
    "decryption": thumbprint(store / "decryption" / "primary.pem"),
    "key_matches": public(key.public_key()) == public(cert.public_key()),
}
with open(sys.argv[1], "a") as out:
    out.write(json.dumps(line) + "\\n")
"""


@pytest.fixture
def nodes(farm: TestFarm) -> Iterator[ServeNodes]:
    farm.overrides["policy"] = dict(POLICY)
    farm.overrides["lease"] = {"ttl_seconds": 3.0, "renew_seconds": 0.5}
    with ServeNodes(farm, farm.root / "logs") as started:
        yield started


def _install_hook(folder: Path) -> Path:
    """The hook as an operator installs it: a copy, 0755, in a folder only we can write."""
    folder.mkdir(mode=0o755)
    installed = folder / HOOK.name
    shutil.copyfile(HOOK, installed)
    installed.chmod(0o755)
    return installed


def _primary(farm: TestFarm, purpose: str) -> str:
    found = [t for p, r, t in live_identity(farm.dsn) if p == purpose and r == "primary"]
    assert len(found) == 1, found
    return found[0]


def _metadata_thumbprints(farm: TestFarm) -> set[str]:
    result = farm.run("metadata", "--entity-id", ENTITY_ID, "--sso-url", SSO_URL)
    expect_ok(result)
    found = re.findall(r"<(?:ds:)?X509Certificate>([^<]+)</", result.out)
    assert found, result.out
    return {hashlib.sha1(base64.b64decode(b)).hexdigest().upper() for b in found}


def test_restart_on_primary_change_restarts_only_for_a_new_primary_and_after_the_switch(
    farm: TestFarm, nodes: ServeNodes, tmp_path: Path
) -> None:
    hook = _install_hook(tmp_path / "hooks")
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    restarts = tmp_path / "restarts.jsonl"
    on_change = f"{hook} {sys.executable} {recorder} {restarts}"

    def lines() -> list[dict[str, Any]]:
        text = restarts.read_text() if restarts.exists() else ""
        return [json.loads(line) for line in text.splitlines()]

    expect_ok(farm.run("init"))
    first = {"signing": _primary(farm, "signing"), "decryption": _primary(farm, "decryption")}
    nodes.start("node-a", hooks={"on_change": on_change})

    # The first install brings both primaries: one restart, on them.
    wait_until(lines, START, "the hook restarted for the first primaries", detail=nodes.logs)
    assert lines()[0]["signing"] == first["signing"], lines()
    assert lines()[0]["decryption"] == first["decryption"], lines()
    assert set(lines()[0]["changed"]) == set(first.values()), lines()

    # The secondaries are installed: the hook runs and restarts nothing.
    def secondaries() -> set[str] | None:
        installed = manifest_identity(farm.store("node-a")) or frozenset()
        found = {t for _, r, t in installed if r == "secondary"}
        return found if len(found) == 2 else None

    new = wait_until(secondaries, 30.0, "both secondaries installed", detail=nodes.logs)
    time.sleep(3.0)  # the hook runs right after the install; promotion is 8 s away
    assert len(lines()) == 1, lines()

    # Both are promoted: the last restart loads the new primaries, key matching certificate.
    wait_until(
        lambda: {lines()[-1]["signing"], lines()[-1]["decryption"]} == new,
        30.0,
        "the hook restarted on the promoted primaries",
        detail=nodes.logs,
    )
    nodes.stop("node-a")
    for line in lines():
        # Every restart had a reason: a thumbprint that had just become a primary.
        assert set(line["changed"]) & {line["signing"], line["decryption"]}, lines()
        assert line["key_matches"], lines()
    assert lines()[-1]["signing"] == _primary(farm, "signing")
    assert lines()[-1]["decryption"] == _primary(farm, "decryption")
    # What the restarted service signs with is what the node publishes to relying parties.
    assert lines()[-1]["signing"] in _metadata_thumbprints(farm)


def test_restart_on_primary_change_refuses_to_run_without_a_command(tmp_path: Path) -> None:
    hook = _install_hook(tmp_path / "hooks")
    done = subprocess.run(
        [str(hook)], env={"FARMKEYS_STORE": str(tmp_path)}, capture_output=True, text=True
    )
    assert done.returncode == 2, done
    assert "usage: restart-on-primary-change COMMAND" in done.stderr
