"""The benchmark harness measures what it says: a ratio below 1 for a faster candidate."""

from __future__ import annotations

import time

from benchmarks.harness import Side, compare, format_results


def test_compare_reports_the_faster_side_and_the_ratio():
    result = compare("sleep", Side("short", lambda: time.sleep(0.01)), Side("long", lambda: time.sleep(0.05)),
                     repeats=3, warmup=0, goal="<= 0.5x")  # fmt: skip
    assert 0.01 <= result.candidate_s < result.baseline_s
    assert 0.1 < result.ratio < 0.6
    text = format_results([result])
    assert text.startswith("sleep: short") and "ratio" in text and "(goal <= 0.5x)" in text
