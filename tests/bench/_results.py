"""The benchmarks' common table: each goal's figure, the goal, and their ratio.

Every bench script that measures a goal of docs/operations.md ("Measured") calls
:func:`record` for it; with ``--results FILE`` (what tests/bench/run.py passes) the rows
are appended to FILE as JSON lines, and run.py prints them all as one table at the end.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    goal: str  # what is measured, e.g. "propagation, 10 nodes: commit -> last switch (median)"
    figure: float
    unit: str  # "s", "ms", "x" (a ratio), "connections"
    target: float  # the goal's bound; the figure must be at most this
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.figure / self.target if self.target else float("inf")

    @property
    def met(self) -> bool:
        return self.figure <= self.target


def record(results: str | None, row: Row) -> None:
    """Print ``row`` and append it to ``results`` (a JSON-lines file) when given."""
    print(f"  {row.goal}: {_fmt(row.figure, row.unit)} (goal <= {_fmt(row.target, row.unit)})")
    if results:
        with Path(results).open("a", encoding="utf-8") as out:
            out.write(json.dumps(asdict(row)) + "\n")


def load(results: str) -> list[Row]:
    path = Path(results)
    if not path.exists():
        return []
    return [Row(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _fmt(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "ms":
        return f"{value:.1f} ms"
    return f"{value:g} {unit}"


def machine() -> str:
    """The machine the figures ran on, for the Measured table."""
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} cores ({model}){memory}, {platform.platform(terse=True)}"


def table(rows: list[Row]) -> str:
    width = max((len(r.goal) for r in rows), default=10)
    lines = [
        f"farmkeys benchmarks on {machine()}",
        "",
        f"{'goal':<{width}}  {'figure':>12}  {'goal':>12}  {'ratio':>6}  met",
    ]
    for r in rows:
        lines.append(
            f"{r.goal:<{width}}  {_fmt(r.figure, r.unit):>12}  {_fmt(r.target, r.unit):>12}"
            f"  {r.ratio:>6.2f}  {'yes' if r.met else 'NO'}" + (f"  ({r.note})" if r.note else "")
        )
    return "\n".join(lines)


def compile_farmkeys() -> None:
    """Byte-compile farmkeys as installing its wheel does. An editable install never does,
    and with PYTHONDONTWRITEBYTECODE (set on some machines) every new process would compile
    every module again: tens of milliseconds a cold process would not pay once installed."""
    repo = Path(__file__).resolve().parent.parent.parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(repo / "farmkeys")], check=True)
