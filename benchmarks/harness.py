"""Time a candidate against a named baseline in one run and report the ratio.

Each side runs ``warmup`` times untimed, then ``repeats`` times; the median wall time counts.
ratio = candidate / baseline: below 1 means the candidate is faster. Peak memory (RSS high-water
mark growth, and CUDA peak when on a GPU) is recorded per side when asked.
"""

from __future__ import annotations

import gc
import json
import logging
import re
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

MEASURED: list[Result] = []
"""Every Result made in this process, in order: what `python -m benchmarks` saves when a time limit
(SIGTERM) stops a benchmark before it returns (benchmarks/gpu.sh runs each under one)."""


@dataclass(frozen=True)
class Side:
    """One side of a comparison: a label and a zero-argument callable doing the work once."""

    label: str
    fn: Callable[[], object]


@dataclass
class Result:
    name: str
    candidate: str
    baseline: str
    candidate_s: float
    baseline_s: float
    repeats: int
    goal: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        MEASURED.append(self)

    @property
    def ratio(self) -> float:
        return self.candidate_s / self.baseline_s if self.baseline_s > 0 else float("inf")

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def time_side(side: Side, *, repeats: int, warmup: int) -> list[float]:
    """Wall times (s) of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        side.fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        side.fn()
        times.append(time.perf_counter() - start)
    return times


def compare(name: str, candidate: Side, baseline: Side, *, repeats: int = 3, warmup: int = 1, goal: str = "",
            extra: dict | None = None) -> Result:  # fmt: skip
    """Median wall time of each side, interleaving sides per repeat so drifts in machine load hit both."""
    for side in (candidate, baseline):
        time_side(side, repeats=0, warmup=warmup)
    cand, base = [], []
    for _ in range(repeats):
        cand += time_side(candidate, repeats=1, warmup=0)
        base += time_side(baseline, repeats=1, warmup=0)
    return Result(name, candidate.label, baseline.label, statistics.median(cand), statistics.median(base), repeats,
                  goal, dict(extra or {}))  # fmt: skip


def where_time_goes(fn: Callable[[], object], top: int = 8) -> list[str]:
    """One run of `fn` under cProfile: the `top` functions by own time, as "share% file:line(name)"
    strings (share of the run's total own time), to say where a ratio's gap comes from."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(fn)
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, ncalls, own s, cumulative s, callers)}
    total = sum(row[2] for row in stats.values()) or 1.0
    ranked = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [
        f"{100 * own / total:.0f}% {Path(file).name}:{line}({name})" for (file, line, name), (_, _, own, _, _) in ranked
    ]


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_results(results: list[Result]) -> str:
    """A plain-text table: name, candidate vs baseline, times, ratio, goal, extra figures."""
    lines = []
    for r in results:
        extras = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.extra.items())
        lines.append(
            f"{r.name}: {r.candidate} {r.candidate_s:.3f}s vs {r.baseline} {r.baseline_s:.3f}s "
            f"-> ratio {r.ratio:.3f}" + (f" (goal {r.goal})" if r.goal else "") + (f"; {extras}" if extras else "")
        )
    return "\n".join(lines)


def write_json(path: Path, results: list[Result]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.as_dict() for r in results], indent=2) + "\n")


class LogCatcher(logging.Handler):
    """The `nvf` logger's messages while installed (`with LogCatcher() as caught: ...`), for figures a
    stage logs but does not return (the batch size it chose, out-of-memory back-offs)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> LogCatcher:
        logger = logging.getLogger("nvf")
        self._level = logger.level
        logger.addHandler(self)
        logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("nvf")
        logger.removeHandler(self)
        logger.setLevel(self._level)

    def batch_sizes(self) -> list[int]:
        """Batch sizes chosen from free memory (`batching.auto_batch_size`), in order."""
        found = (re.match(r"batch size (\d+) on ", m) for m in self.messages)
        return [int(m.group(1)) for m in found if m]

    def out_of_memory(self) -> list[int]:
        """The batch sizes that ran out of memory (`batching.iter_batched` halved them), in order."""
        found = (re.match(r"out of memory at batch size (\d+)", m) for m in self.messages)
        return [int(m.group(1)) for m in found if m]


def synth_image_folders(root: Path, n_images: int, resolution: int) -> list[Path]:
    """``n_images`` distinct synthetic head images, 13 to a folder (one capture each): the same inputs
    for both sides of an image-model benchmark. One 13-view capture is rendered; copy k of a view
    adds a seeded ±2 grey-level dither, so every file (and every cache key) differs while the
    content stays a head. Rendering a capture per folder at 512 px would cost more than the benchmark."""
    import numpy as np

    from stages import synth
    from stages.core import io

    render = synth.render_capture(1, 1, 1, 0, synth.Config(resolution=resolution, elevated=False, surface_points=200))
    rng = np.random.default_rng(0)
    paths: list[Path] = []
    for k in range(n_images):
        view = k % len(render.names)
        dither = rng.integers(-2, 3, size=render.images_nhw3[view].shape, dtype=np.int16)
        image = np.clip(render.images_nhw3[view].astype(np.int16) + dither, 0, 255).astype(np.uint8)
        paths.append(io.write_image(root / f"copy{k // len(render.names):03d}" / render.names[view], image))
    return paths
