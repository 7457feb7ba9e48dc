"""systemd's notify protocol (farmkeys.serve.sdnotify): path and abstract sockets, the watchdog's
interval, and failures that never raise. `farmkeys serve` under a real notify socket is in
tests/system/test_serve_http.py."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def test_notifier_speaks_to_path_and_abstract_sockets(tmp_path: Path) -> None:
    from farmkeys.serve.sdnotify import Notifier

    abstract = f"@farmkeys-test-{os.getpid()}"
    for where, bind_to in (
        (str(tmp_path / "n"), str(tmp_path / "n")),
        (abstract, "\0" + abstract[1:]),
    ):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(bind_to)
            notifier = Notifier.from_environment({"NOTIFY_SOCKET": where})
            notifier.ready("line one\nline two")
            assert sock.recv(4096) == b"READY=1\nSTATUS=line one line two"
            notifier.watchdog()  # off without WATCHDOG_USEC: nothing sent
            notifier.stopping()
            assert sock.recv(4096) == b"STOPPING=1"


def test_notifier_watchdog_rules_and_failures() -> None:
    from farmkeys.serve.sdnotify import Notifier

    assert Notifier.from_environment({}).notify("READY=1") is False
    on = {"NOTIFY_SOCKET": "/nonexistent/socket", "WATCHDOG_USEC": "3000000"}
    assert Notifier.from_environment(on).watchdog_interval_seconds == 1.5
    mine = Notifier.from_environment({**on, "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_interval_seconds == 1.5
    for other in (
        {"WATCHDOG_PID": str(os.getpid() + 1)},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "0"},
    ):
        assert Notifier.from_environment({**on, **other}).watchdog_interval_seconds is None
    # Nobody listening: False and a warning, never an exception.
    assert Notifier.from_environment(on).notify("READY=1") is False
