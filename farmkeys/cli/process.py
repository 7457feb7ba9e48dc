"""What every `farmkeys` command does to its own process before anything else: no core dumps.

Commands hold master keys and private keys in memory (`escrow export`, `import adfs`,
`repair-state`, a `rollover` that leads, `serve`, `sync`). A core file would write
them to disk outside the store, readable by whoever reads the crash folder, and
a process another process of the same account can attach to (ptrace) can read them
live. So at start the command sets ``RLIMIT_CORE`` to 0 (no core file, whatever the
service manager or the shell allows) and marks itself not dumpable
(``prctl(PR_SET_DUMPABLE, 0)``): no core through ``core_pattern`` pipes either, no
ptrace by the same account, and its ``/proc/<pid>`` files become root's.
"""

from __future__ import annotations

import ctypes
import logging
import resource

log = logging.getLogger(__name__)

_PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def forbid_core_dumps() -> None:
    """No core file and no ptrace of this process, for the rest of its life."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        # Linux only; RLIMIT_CORE alone still stops a core file.
        log.debug("prctl(PR_SET_DUMPABLE) failed: errno %d", ctypes.get_errno())
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
