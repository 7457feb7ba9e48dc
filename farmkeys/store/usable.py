"""Whether a node can serve with its installed set: what `/healthz` and `sync` both ask.

Pure: the installed set (:meth:`farmkeys.store.Store.verify_installed`) and the time are
passed in. Only the store is consulted, never the config DB (attacker-writable): a
forged row must not make a node stop serving an intact set.
"""

from __future__ import annotations

from datetime import datetime

from farmkeys.errors import Error
from farmkeys.store.reader import Installed


def installed_problems(
    installed: Installed | None, store_error: Error | None, *, now: datetime
) -> list[str]:
    """Why the node cannot serve its installed set; empty when it can.

    It cannot when the store cannot be read (``store_error``), nothing is installed
    (``installed`` None), an installed file no longer holds what the manifest records
    (removed, changed, a role or fixed link gone), or the signing primary has expired.
    """
    if store_error is not None:
        return [f"the store cannot be read: {store_error.what}"]
    if installed is None:
        return ["nothing is installed; run `farmkeys sync`"]
    problems: list[str] = []
    for entry in installed.manifest.certificates:
        if (entry.purpose, entry.thumbprint) not in installed.intact:
            problems.append(
                f"the installed {entry.purpose} {entry.role} {entry.thumbprint} no longer"
                " matches the store's manifest (a file removed or changed)"
            )
        if (entry.purpose, entry.role) == ("signing", "primary") and now >= entry.not_after:
            problems.append(f"the installed signing primary {entry.thumbprint} has expired")
    if not problems and not installed.complete:
        problems.append("the store's role or fixed links are not the installed set's")
    return problems
