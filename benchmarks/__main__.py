"""`python -m benchmarks [NAME ...] [--json FILE]`: run the named benchmarks (default: all)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import signal
import sys
from pathlib import Path

import benchmarks
from benchmarks import harness
from benchmarks.harness import format_results, write_json


def available() -> dict[str, str]:
    """Benchmark name -> module, for every benchmarks/bench_<name>.py."""
    return {m.name.removeprefix("bench_"): f"benchmarks.{m.name}" for m in pkgutil.iter_modules(benchmarks.__path__)
            if m.name.startswith("bench_")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {', '.join(available())}")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    modules = available()
    unknown = [n for n in args.names if n not in modules]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(modules)}")
    signal.signal(signal.SIGTERM, _stopped)  # `timeout` stops a run with SIGTERM: keep what was measured
    results, first = [], 0
    try:
        for name in args.names or list(modules):
            first = len(harness.MEASURED)  # this benchmark's results start here
            found = importlib.import_module(modules[name]).run()
            print(format_results(found), flush=True)
            results += found
    except _Stopped:
        partial = harness.MEASURED[first:]  # (with any helper comparisons it made along the way)
        for result in partial:
            result.extra["partial"] = "the benchmark was stopped (time limit) after this result"
        print(format_results(partial), flush=True)
        results += partial
        if args.json:
            write_json(args.json, results)
        sys.exit(124)
    if args.json:
        write_json(args.json, results)


class _Stopped(BaseException):
    """SIGTERM arrived: unwind (running `finally` clean-ups) and save the results so far."""


def _stopped(signum: int, frame: object) -> None:
    raise _Stopped


if __name__ == "__main__":
    main()
