"""What the lab servers share: a free loopback port, a readiness probe, their logs, starting
and stopping."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def log_tail(path: Path, offset: int, *, empty: str = "(no output)") -> str:
    """What a server wrote to its log ``path`` since ``offset``: the last 4,000 characters."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace").strip()
    except OSError:
        return empty
    return text[-4000:] or empty


def stop_child(
    process: subprocess.Popen[bytes] | None, *, sig: int, timeout: float, name: str
) -> None:
    """Send ``sig`` to a server we started and wait; SIGKILL it if it outlasts ``timeout``."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s %d did not stop on signal %d; killing it", name, process.pid, sig)
        process.kill()
        process.wait(timeout=timeout)


# How often wait_until_serving looks again.
_POLL_SECONDS = 0.05


def wait_until_serving(
    process: subprocess.Popen[bytes],
    *,
    name: str,
    port: int,
    ready: str,
    timeout: float,
    log_path: Path,
    log_offset: int,
    error: Callable[[str], Exception],
    on_failure: Callable[[], None],
    check: Callable[[], None] | None = None,
    starting: tuple[type[Exception], ...] = (),
) -> None:
    """Return once the server ``process`` we just started serves; else stop it and raise.

    Serving means: something accepts TCP connections on 127.0.0.1:``port`` and, when
    given, ``check()`` returns (a login, a bind) instead of raising one of ``starting``,
    the errors of a server still starting up. If ``process`` exits first, or ``timeout``
    seconds pass, ``on_failure()`` is called (it stops what is left and forgets the
    process) and ``error(message)`` is raised; the message says what happened, ``ready``
    (what serving means, e.g. "accepting logins on port 5432"), the last complaint of
    ``check`` and the tail of ``log_path`` since ``log_offset``.
    """
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            code = process.returncode
            on_failure()
            raise error(
                f"{name} exited with status {code} before {ready}; its output:\n"
                f"{log_tail(log_path, log_offset)}"
            )
        if accepts(port):
            if check is None:
                return
            try:
                check()
                return
            except starting as exc:
                last = " ".join(str(exc).split()) or type(exc).__name__
        time.sleep(_POLL_SECONDS)
    on_failure()
    raise error(
        f"{name} was not {ready} within {timeout:.0f} s ({last or 'no answer'}); its output:\n"
        f"{log_tail(log_path, log_offset)}"
    )
