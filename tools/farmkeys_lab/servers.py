"""What the lab servers share: a free loopback port, a readiness probe, their logs, stopping."""

from __future__ import annotations

import logging
import socket
import subprocess
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
