"""`make bench`: every benchmark, one after the other, then one table of the goals.

Each script under tests/bench/ that measures a goal appends its rows (figure, goal, ratio)
to a results file; the table at the end lists them all, with the machine they ran on. The
figures go into docs/operations.md ("Measured"). Nothing here passes or fails a build:
timings are never asserted in `make test`.

    .venv/bin/python tests/bench/run.py            # everything (about 10 minutes)
    .venv/bin/python tests/bench/run.py --quick    # fewer rounds, a herd of 100
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _results import load, table  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    quick = args.quick
    with tempfile.TemporaryDirectory(prefix="farmkeys-bench-") as folder:
        results = str(Path(folder) / "results.jsonl")
        goals = [
            ["bench_sync.py", "--rounds", "5" if quick else "20"],
            ["bench_cold.py", "--runs", "5" if quick else "21"],
            ["bench_propagation.py", "--nodes", "3", "10", "50"]
            + (["--rollovers", "3", "--failovers", "1"] if quick else []),
            ["bench_herd.py", "--herd", "100" if quick else "500"],
            ["bench_connections.py", "--nodes", "10" if quick else "20"],
            ["bench_crowd.py"] + (["--rounds", "2", "--seconds", "5"] if quick else []),
        ]
        others = [["bench_master_key.py"], ["bench_directory.py"], ["bench_publish.py"]]
        failed = []
        for argv in goals + others:
            extra = ["--results", results] if argv in goals else []
            print(f"\n=== {' '.join(argv)}", flush=True)
            done = subprocess.run([sys.executable, str(HERE / argv[0]), *argv[1:], *extra])
            if done.returncode != 0:
                failed.append(argv[0])
        print()
        print(table(load(results)))
    if failed:
        print(f"\nbenchmarks that did not finish: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
