"""The exit codes of the `farmkeys` command."""

EXIT_OK = 0
EXIT_ERROR = 1
# sysexits' EX_TEMPFAIL: `sync` could not reach a server but kept an installed set it can serve
EXIT_UNREACHABLE = 75
EXIT_USAGE = 64  # sysexits' EX_USAGE: apart from status's 0-3
STATUS_EXIT = {"ok": 0, "warning": 1, "critical": 2}
STATUS_UNKNOWN = 3
CHECK_EXIT = {"ok": 0, "warning": 1, "failed": 2}
