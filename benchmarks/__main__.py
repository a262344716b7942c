"""`python -m benchmarks [NAME ...] [--json FILE]`: run the named benchmarks (default: all)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from pathlib import Path

import benchmarks
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
    results = []
    for name in args.names or list(modules):
        found = importlib.import_module(modules[name]).run()
        print(format_results(found), flush=True)
        results += found
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
