"""`make fuzz`: run each parser target coverage-guided with atheris (libFuzzer), seeded
with valid inputs, and print how many inputs each tried and what it found.

    python tests/fuzz/run.py [--seconds N] [TARGET ...]

Each target runs in a child process of its own (libFuzzer stops at the first crash);
an input that raises anything but farmkeys' Error is a crash, saved under
.fuzz/crashes/<target>/ and reported. Exits 1 when any target crashed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent
# tests/: the fuzz package; tests/support: the tests' AD FS encoder; the repository: farmkeys.
SEARCH_PATH = [str(TESTS), str(TESTS / "support"), str(REPO)]
CRASHES = REPO / ".fuzz" / "crashes"


def child(name: str, seconds: int, corpus: Path, crashes: Path) -> None:
    """Inside the child: fuzz one target with atheris until ``seconds`` have passed."""
    import atheris

    sys.path[:0] = SEARCH_PATH
    with atheris.instrument_imports():  # coverage feedback from farmkeys' parsers
        for module in (
            "config",
            "formats.adfs_pfx",
            "formats.blob",
            "formats.escrow_file",
            "formats.farm_state",
            "store",
        ):
            importlib.import_module(f"farmkeys.{module}")
    from farmkeys.errors import Error
    from fuzz.targets import TARGETS

    target = TARGETS[name]
    for n, seed in enumerate(target.seeds()):
        (corpus / f"seed-{n}").write_bytes(seed)

    def one(data: bytes) -> None:
        with contextlib.suppress(Error):
            target.run(data)

    atheris.Setup(
        [
            sys.argv[0],
            str(corpus),
            f"-max_total_time={seconds}",
            "-timeout=5",
            "-rss_limit_mb=2048",
            f"-artifact_prefix={crashes}/",
            "-print_final_stats=1",
        ],
        one,
    )
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("targets", nargs="*")
    args = parser.parse_args()
    if args.child:
        crashes = CRASHES / args.child
        child(args.child, args.seconds, Path(args.corpus), crashes)
        return 0

    sys.path[:0] = SEARCH_PATH
    from fuzz.targets import TARGETS

    names = args.targets or sorted(TARGETS)
    crashed = []
    print(f"{'target':<10} {'inputs':>10} {'exec/s':>8} {'edges':>7}  result")
    for name in names:
        (CRASHES / name).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"farmkeys-fuzz-{name}-") as corpus:
            started = time.monotonic()
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    name,
                    "--corpus",
                    corpus,
                    "--seconds",
                    str(args.seconds),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            took = time.monotonic() - started
        log = proc.stderr
        runs = _stat(log, "stat::number_of_executed_units")
        edges = _last(log, r"cov: (\d+)")
        rate = f"{runs / took:.0f}" if runs else "?"
        found = sorted(p.name for p in (CRASHES / name).iterdir())
        if proc.returncode != 0 or found:
            crashed.append(name)
            tail = "\n".join(log.splitlines()[-15:])
            result = f"CRASH (exit {proc.returncode}); inputs in {CRASHES / name}\n{tail}"
        else:
            result = "no crash"
        print(f"{name:<10} {runs:>10} {rate:>8} {edges:>7}  {result}", flush=True)
    total = "every target" if not crashed else f"crashes in {', '.join(crashed)}"
    print(f"fuzzed {len(names)} targets for {args.seconds} s each: {total}")
    return 1 if crashed else 0


def _stat(log: str, name: str) -> int:
    found = re.findall(rf"{re.escape(name)}:\s*(\d+)", log)
    return int(found[-1]) if found else 0


def _last(log: str, pattern: str) -> str:
    found = re.findall(pattern, log)
    return found[-1] if found else "?"


if __name__ == "__main__":
    sys.exit(main())
