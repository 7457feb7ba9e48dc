"""Who runs this command: the account, the host and the operator's ``--reason``, as a
signed request names them (:mod:`farmkeys.formats.request`) and as the audit events of
commands that change the farm themselves (`init`, `escrow`, `nodes remove`) record them.
"""

from __future__ import annotations

import os
import pwd
import socket

from farmkeys.errors import RequestRefusedError
from farmkeys.formats import request as request_format

__all__ = ["account", "requester"]


def account() -> str:
    """The account this command runs as, as a request names it.

    The effective user's name (``"uid 1234"`` when it has none in the password
    database). Run through sudo for another user, with ``SUDO_USER`` naming someone
    else: ``"alice via sudo as root"``. ``SUDO_USER`` is what sudo set in the
    environment; whoever runs the command could set it too (docs/security.md).
    """
    uid = os.geteuid()
    try:
        me = pwd.getpwuid(uid).pw_name
    except KeyError:
        me = f"uid {uid}"
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user and sudo_user != me:
        return f"{sudo_user} via sudo as {me}"
    return me


def requester(reason: str | None) -> request_format.Requester:
    """Who asks: this command's :func:`account`, this host's name (``gethostname()``,
    which asks no DNS server), and ``reason``; refused when one cannot be signed."""
    who = request_format.Requester(account=account(), host=socket.gethostname(), reason=reason)
    why = who.problem()
    if why is not None:
        raise RequestRefusedError(
            f"the request cannot say who asks: {why}",
            f"a --reason is one line of at most {request_format.MAX_REASON} printable characters,"
            " and SUDO_USER and the host name must be printable too; nothing was asked",
        )
    return who
