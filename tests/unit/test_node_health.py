"""What `/healthz` answers (farmkeys.serve.node_health): it follows what the node can serve
from its store, never what the config DB claims. The endpoint on real serving processes is
in tests/system/test_serve_http.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from farmkeys.errors import DirectoryError, Error, FarmStateError, StoreError
from farmkeys.serve import node_health
from farmkeys.store import Installed, Manifest, ManifestEntry

NOW = datetime(2030, 6, 1, tzinfo=UTC)


def installed_set(
    *, expires: datetime = NOW + timedelta(days=30), damaged: bool = False, links: bool = True
) -> Installed:
    entries = tuple(
        ManifestEntry(
            purpose=purpose,
            role="primary",
            thumbprint=thumbprint,
            not_after=expires,
            files={"cert": f"{purpose}/{thumbprint}.pem"},
        )
        for purpose, thumbprint in (("signing", "A" * 40), ("decryption", "B" * 40))
    )
    manifest = Manifest(node="node-a", generation=7, installed_at=NOW, certificates=entries)
    intact = {(e.purpose, e.thumbprint) for e in entries}
    if damaged:
        intact.discard(("signing", "A" * 40))
    return Installed(manifest=manifest, intact=frozenset(intact), complete=links and not damaged)


def test_node_health_follows_what_the_node_can_serve_not_the_config_db() -> None:
    refused = FarmStateError(
        "the config DB's farm state (version 3) fails authentication", "repair"
    )
    cases: list[tuple[Installed | None, Error | None, Error | None, int, str, list[str]]] = [
        (installed_set(), None, None, 200, "ok", []),
        (
            installed_set(),
            refused,
            None,
            200,
            "degraded",
            [f"the last sync refused the farm's set: {refused.what}; serving generation 7"],
        ),
        (
            installed_set(),
            DirectoryError("the directory is away", "wait"),
            None,
            200,
            "degraded",
            ["the last sync failed: the directory is away"],
        ),
        (
            None,
            refused,
            None,
            503,
            "failing",
            [
                "nothing is installed; run `farmkeys sync`",
                f"the last sync refused the farm's set: {refused.what}",
            ],
        ),
        (
            installed_set(expires=NOW),
            None,
            None,
            503,
            "failing",
            [f"the installed signing primary {'A' * 40} has expired"],
        ),
        (
            installed_set(damaged=True),
            None,
            None,
            503,
            "failing",
            [
                f"the installed signing primary {'A' * 40} no longer matches the store's"
                " manifest (a file removed or changed)"
            ],
        ),
        (
            installed_set(links=False),
            None,
            None,
            503,
            "failing",
            ["the store's role or fixed links are not the installed set's"],
        ),
        (
            None,
            None,
            StoreError("cannot read the manifest", "sync"),
            503,
            "failing",
            ["the store cannot be read: cannot read the manifest"],
        ),
    ]
    for installed, sync_error, store_error, code, status, problems in cases:
        ok, body = node_health(
            installed, sync_error, listening=True, now=NOW, store_error=store_error
        )
        assert (200 if ok else 503, body["status"]) == (code, status), body
        assert body["problems"] == problems
    ok, body = node_health(installed_set(), None, listening=False, now=NOW)
    assert ok and body["status"] == "degraded"
    assert body["problems"] == ["not connected to the config DB"]
