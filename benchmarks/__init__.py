"""Benchmarks: each stage against a named baseline, timed in the same run, reported as a ratio.

Run `python -m benchmarks [NAME ...] [--json FILE]` (or `make bench`). Ratios, not absolute times,
are what the goals are stated in: both sides run on the same machine, inputs and moment.
"""
