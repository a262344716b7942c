"""The batched model stages (depth, masks, embed): one model over every view, in per-capture batches.

`plan` hashes every image of the selected captures (threads; `core.digests` remembers unchanged
files), keeps the captures whose record is not up to date (`contract.pending`), cuts each into its
batches and keys every view by its batch. `drive` loads the model only when some view is missing
from the cache, runs the missing batches (the stage's ``compute``), caches what it computed, and
writes each capture's record (the stage's ``write``, in a writer thread) as soon as all its views
are known (`CaptureAssembler`).

What a record depends on: a capture's batches are its own views only, grouped by image size and
cut by `batching.capture_batches` from the capture and the config alone, and a view's cache key
names its whole batch (the other images' bytes and sizes, and its place there). So a record is the
same bits in any run or shard whatever else the run holds, and a cached array is always the bits
a fresh run would give. Arrays of a batch that memory split (``whole`` False) reach only this
run's record, never the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core import batching, dataset, io, worktree
from stages.core.cache import ArrayCache, CaptureAssembler, Prefetcher
from stages.core.contract import CaptureJob, Context, pending, require_data
from stages.core.digests import image_digests

log = logging.getLogger("nvf")

UNSIZED = (0, 0)  # image_hw / out_hw of a view whose model input size does not depend on the image size


@dataclass(frozen=True)
class View:
    """One image to process: its file, its size and the size its array is stored at, its cache key."""

    path: Path
    image_hw: tuple[int, int]
    out_hw: tuple[int, int]
    key: str


@dataclass
class CapturePlan:
    """A pending capture: its views in row order, its batches (row indices), where it goes."""

    capture: dataset.Capture
    views: list[View]
    batches: list[list[int]]
    inputs_hash: str
    out_path: Path
    missing: set[str]
    """Keys the cache lacks (`CaptureAssembler` removes them as they are computed)."""

    @property
    def keys(self) -> list[str]:
        return [view.key for view in self.views]


@dataclass(frozen=True)
class Batching:
    """How a stage cuts and keys its views."""

    batch_size: int | None
    """Views per batch; None: the whole capture up to ``max_batch``."""
    max_batch: int
    workers: int
    """Threads hashing and sizing images."""
    sized: bool = True
    """Group views by image size and store each at ``stored_hw(first image's size)`` (depth, masks);
    False: every view alike (embed: the model's preprocessing sets the input size)."""
    stored_hw: Callable[[tuple[int, int]], tuple[int, int]] = lambda hw: hw


def array_cache(ctx: Context, stage: str, enabled: bool, memory_bytes: int = 0) -> ArrayCache:
    """The stage's array cache: on disk in ``ctx.paths["cache_dir"]``, else ``<nvf cache>/<stage>-cache``
    (none when not ``enabled``), with an in-memory LRU of ``memory_bytes``."""
    from stages.core.models import cache_dir

    folder = (ctx.given("cache_dir") or cache_dir() / f"{stage}-cache") if enabled else None
    return ArrayCache(folder, memory_bytes)


def plan(
    ctx: Context, stage: str, record: str, captures: Sequence[dataset.Capture], settings: dict[str, Any],
    how: Batching, cache: ArrayCache,
) -> list[CapturePlan]:  # fmt: skip
    """The pending captures of ``captures`` (already selected), each cut into batches of keyed views.

    A record's input hash is ``settings`` + the capture's image names and bytes; ``record`` is its
    kind in the work tree (`worktree.RECORD_FILES`).
    """
    data, workers = require_data(ctx, stage), min(8, max(1, how.workers))
    per_capture = image_digests(data, ctx.work, captures, workers=workers)
    jobs = [CaptureJob(capture, (worktree.record_path(ctx.work, capture.id, record),),
                       io.hash_inputs(settings, list(zip(capture.names, digests, strict=False))), digests)
            for capture, digests in zip(captures, per_capture, strict=True)]  # fmt: skip
    plans = []
    with ThreadPoolExecutor(workers, thread_name_prefix="nvf-size") as pool:
        for job in pending(ctx, stage, jobs):
            paths = [data / image.path for image in job.capture.images]
            sizes = list(pool.map(io.image_hw, paths)) if how.sized else [UNSIZED] * len(paths)  # headers only
            plans.append(_cut(stage, job, paths, sizes, settings, how, cache))
    return plans


def _cut(stage: str, job: CaptureJob[list[str]], paths: list[Path], sizes: list[tuple[int, int]],
         settings: dict[str, Any], how: Batching, cache: ArrayCache) -> CapturePlan:  # fmt: skip
    """One pending capture cut into its batches, each view keyed by its batch."""
    digests = job.state
    stored = how.stored_hw(sizes[0]) if how.sized else UNSIZED
    if len(set(sizes)) > 1:
        log.warning("%s: capture %s mixes image sizes %s; its arrays are all stored at %dx%d (image_hw keeps each size)",
                    stage, job.capture.id, sorted(set(sizes)), stored[1], stored[0])  # fmt: skip
    batches = _capture_batches(sizes, how.batch_size, how.max_batch)
    keys = [""] * len(paths)
    for batch in batches:  # a view's key names its whole batch: the same key, the same bits
        if how.sized:
            context, where = [(digests[row], sizes[row]) for row in batch], (stored,)
        else:
            context, where = [digests[row] for row in batch], ()
        for position, row in enumerate(batch):
            keys[row] = io.hash_inputs(settings, context, *where, position)
    views = [View(path, hw, stored, key) for path, hw, key in zip(paths, sizes, keys, strict=True)]
    missing = {view.key for view in views if not cache.contains(view.key)}
    return CapturePlan(job.capture, views, batches, job.inputs_hash, job.outputs[0], missing)


def _capture_batches(sizes: list[tuple[int, int]], batch_size: int | None, max_batch: int) -> list[list[int]]:
    """A capture's batches as row indices: its views grouped by image size (first-seen order), each
    group cut by `batching.capture_batches`. Depends on the capture and the config alone."""
    groups: dict[tuple[int, int], list[int]] = {}
    for row, hw in enumerate(sizes):
        groups.setdefault(hw, []).append(row)
    return [
        [rows[i] for i in piece]
        for rows in groups.values()
        for piece in batching.capture_batches(len(rows), batch_size, max_batch)
    ]


class ImagePredictor:
    """What the image-to-map predictors (depth, masks) share. A subclass sets ``processor`` (a
    transformers image processor) and ``device``, and defines ``predict(images_b3hw, out_hw)``."""

    processor: Any
    device: Any  # torch.device

    def input_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the model input the processor makes from an image of `image_hw`."""
        import torch

        known: dict[tuple[int, int], tuple[int, int]] = self.__dict__.setdefault("_input_hw", {})
        if image_hw not in known:
            probe = torch.zeros((1, 3, *image_hw), dtype=torch.uint8)
            shape = self.processor(images=probe, return_tensors="pt")["pixel_values"].shape
            known[image_hw] = (int(shape[-2]), int(shape[-1]))
        return known[image_hw]

    def measured_bytes_per_item(self, image_hw: tuple[int, int], out_hw: tuple[int, int], floor: int) -> int:
        """CUDA: the peak memory one more image in a batch costs, from probe passes of batch 1 and 2
        (at least ``floor``), with a 20 % margin."""
        import torch

        peaks = []
        for n in (1, 2):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            self.predict(torch.zeros((n, 3, *image_hw), dtype=torch.uint8), out_hw)  # type: ignore[attr-defined]
            torch.cuda.synchronize(self.device)
            peaks.append(int(torch.cuda.max_memory_allocated(self.device) - base))
        return int(max(peaks[1] - peaks[0], floor) * 1.2)


Computed = Iterator[tuple[View, np.ndarray, bool]]
"""(view, its array, whole): whole is False for the views of a batch that memory split."""


def drive(
    stage: str,
    plans: list[CapturePlan],
    cache: ArrayCache,
    load: Callable[[], Callable[[list[list[View]]], Computed]],
    write: Callable[[CapturePlan, list[np.ndarray]], Path],
    progress: batching.ProgressFn | None = None,
) -> list[Path]:
    """Compute what the cache lacks and write every planned capture; returns the records written.

    ``load()`` loads the model (called only when some batch must run) and returns ``compute``,
    which yields every view of the batches it is given. ``write(plan, arrays)`` writes one
    capture's record (arrays in row order) and returns its path; it runs in a writer thread, as do
    the disk-cache writes, so the model never waits on the disk.
    """
    if not plans:
        return []
    pool = ThreadPoolExecutor(1, thread_name_prefix="nvf-write")
    written: list[Future[Path]] = []

    def finish(plan: CapturePlan, arrays: list[np.ndarray | None]) -> None:
        if any(array is None for array in arrays):  # evicted with no disk cache: cannot happen by design
            raise RuntimeError(f"{stage}: an array of capture {plan.capture.id} was lost before writing")
        written.append(pool.submit(write, plan, arrays))  # type: ignore[arg-type]

    assembler = CaptureAssembler(plans, finish, cache.get, progress)
    todo = batching.unique_batches(plans)
    try:
        compute = load() if todo else None
        assembler.flush_ready()
        if compute is not None:
            for view, array, whole in compute(todo):
                if whole:
                    cache.put(view.key, array, to_disk=False)
                    pool.submit(cache.write_disk, view.key, array)
                assembler.add(view.key, array)
        paths = [future.result() for future in written]
    finally:
        pool.shutdown(wait=True)
    log.info("%s: wrote %d capture(s); %d image(s) computed; cache hits %d memory, %d disk", stage, len(paths),
             sum(map(len, todo)), cache.hits["memory"], cache.hits["disk"])  # fmt: skip
    return paths


def run_views(
    batches: list[list[View]],
    load: Callable[[Path], Any],
    forward: Callable[[list[Any], tuple[int, int]], Any],
    workers: int,
    fit: Callable[[View], int] | None = None,
) -> Computed:
    """Yield (view, its array, whole) for every view of the planned ``batches``.

    ``load(path)`` decodes a view's file in one of ``workers`` threads running ahead of the model;
    ``forward(items, out_hw)`` runs one batch (the loaded items, the size its outputs are stored at)
    and returns a CPU tensor [B, ...]. Each planned batch runs whole unless ``fit(view)`` (what
    memory or int32 indexing holds for views of that size; asked once per size) or an out-of-memory
    error splits it (`batching.run_planned_batches`); ``whole`` is False for the views of a split batch.
    """
    views = [view for batch in batches for view in batch]
    prefetcher = Prefetcher([view.path for view in views], load, workers)
    fits: dict[tuple[tuple[int, int], tuple[int, int]], int] = {}

    def limit(positions: Sequence[int]) -> int:
        view = views[positions[0]]
        size = (view.image_hw, view.out_hw)
        if size not in fits:
            fits[size] = fit(view)  # type: ignore[misc]
        return fits[size]

    def run_batch(positions: Sequence[int]) -> Any:
        return forward(prefetcher.get(positions, lookahead=len(positions)), views[positions[0]].out_hw)

    try:
        prefetcher.prefetch(2 * max((len(batch) for batch in batches), default=1))
        planned = planned_ranges(batches)
        for positions, arrays, whole in batching.run_planned_batches(run_batch, planned,
                                                                     limit=limit if fit is not None else None):  # fmt: skip
            for position, array in zip(positions, arrays.numpy(), strict=True):
                yield views[position], array, whole
    finally:
        prefetcher.close()


def planned_ranges(batches: Sequence[Sequence[Any]]) -> list[range]:
    """Consecutive position ranges of ``batches`` flattened in order (for `batching.run_planned_batches`)."""
    ranges: list[range] = []
    for batch in batches:
        start = ranges[-1].stop if ranges else 0
        ranges.append(range(start, start + len(batch)))
    return ranges
