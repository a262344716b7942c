"""The benchmark harness measures what it says: a ratio below 1 for a faster candidate."""

from __future__ import annotations

import time

from benchmarks import harness
from benchmarks.harness import Side, compare, format_results


def test_compare_reports_the_faster_side_and_the_ratio():
    result = compare("sleep", Side("short", lambda: time.sleep(0.01)), Side("long", lambda: time.sleep(0.05)),
                     repeats=3, warmup=0, goal="<= 0.5x")  # fmt: skip
    assert 0.01 <= result.candidate_s < result.baseline_s
    assert 0.1 < result.ratio < 0.6
    text = format_results([result])
    assert text.startswith("sleep: short") and "ratio" in text and "(goal <= 0.5x)" in text


def test_a_time_limit_keeps_the_results_measured_so_far(tmp_path):
    """`timeout` stops a benchmark with SIGTERM: `python -m benchmarks --json` still writes what it
    measured before, marked partial, and exits 124 (benchmarks/gpu.sh lost a whole GPU benchmark
    to its time limit before this)."""
    import json
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    marker, out = tmp_path / "measured", tmp_path / "bench.json"
    script = f"""
import sys, time, types
from pathlib import Path
import benchmarks.__main__ as entry
from benchmarks.harness import Result
fake = types.ModuleType("fake_bench")
def run():
    Result("first", "a", "b", 1.0, 2.0, 1)
    Path({str(marker)!r}).touch()
    time.sleep(60)
fake.run = run
sys.modules["fake_bench"] = fake
entry.available = lambda: {{"fake": "fake_bench"}}
sys.argv = ["benchmarks", "fake", "--json", {str(out)!r}]
entry.main()
"""
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen([sys.executable, "-c", script], cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 124
    (saved,) = json.loads(out.read_text())
    assert saved["name"] == "first" and saved["ratio"] == 0.5 and "stopped" in saved["extra"]["partial"]


def test_where_time_goes_names_the_function_that_took_the_time():
    def slow() -> None:
        time.sleep(0.05)

    def busy() -> int:
        return sum(range(20_000))

    top = harness.where_time_goes(lambda: (slow(), busy()), top=3)
    assert len(top) == 3 and "sleep" in top[0] and top[0].endswith("(<built-in method time.sleep>)")
    assert int(top[0].split("%")[0]) >= 80
