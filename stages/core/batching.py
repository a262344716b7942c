"""Device choice, batch sizing to free memory, and out-of-memory back-off.

Convention: memory figures are bytes. A batch size is a number of items handed to one call of the
model function. `run_batched` follows accelerate's `find_executable_batch_size`: on
`torch.cuda.OutOfMemoryError` (caught by type, nothing else) it frees the CUDA cache, halves the
batch size and retries the same slice; later slices keep the reduced size.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import itertools
import logging
import os
import re
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from stages.core.errors import InputError, StageFailure

if TYPE_CHECKING:  # torch is imported where it is used: the CLI and light stages import this module
    import torch

log = logging.getLogger("nvf")

T = TypeVar("T")
R = TypeVar("R")

ProgressFn = Callable[[int, int], None]
"""Progress callback used across stages: `progress(n_done, n_total)`, counts of items."""

_CUDA_SPEC = re.compile(r"^cuda(?::(\d+))?$")
_MEMINFO = Path("/proc/meminfo")


def one_blas_thread() -> contextlib.AbstractContextManager:
    """Limit BLAS to one thread (threadpoolctl) for code that runs its own threads, or whose products
    are small: BLAS threads on top of those only contend for the cores (synth's skinny renders were
    ~1.5x slower with 2 of them; matching several image pairs at once, ~1.4x).

    The count is process-wide and each holder restores what it found, so holders in threads that
    overlap must sit inside one held by the thread that starts them (as `poses.run` does)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it, BLAS keeps its default
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def choose_device(spec: str = "auto") -> torch.device:
    """Turn a `--device` value into a `torch.device`.

    `auto` picks the current CUDA device when one is visible, else the CPU; `cpu`; `cuda` (the
    current CUDA device); `cuda:N`. Anything else, or CUDA asked for where none is visible, or an
    index past the last GPU, raises `InputError` saying what to pass instead.
    """
    import torch

    text = spec.strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    match = _CUDA_SPEC.match(text)
    if match is None:
        raise InputError(f"unknown device {spec!r}: use --device auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise InputError(
            f"--device {spec} asked for a GPU but torch sees none (no CUDA device or driver): "
            "use --device cpu (or --device auto)"
        )
    n_gpus = torch.cuda.device_count()
    index = torch.cuda.current_device() if match.group(1) is None else int(match.group(1))
    if index >= n_gpus:
        raise InputError(
            f"--device {spec}: found {n_gpus} GPU(s), so the valid choices are "
            f"cuda:0..cuda:{n_gpus - 1}; pick one of those or use --device cpu"
        )
    return torch.device("cuda", index)


def free_memory_bytes(device: torch.device | str) -> int:
    """Bytes a new batch can use on `device`.

    CUDA: free device memory (`torch.cuda.mem_get_info`) plus what PyTorch's caching allocator holds
    reserved but unallocated (it reuses that before asking the driver). CPU: `MemAvailable` from
    /proc/meminfo, or available physical pages from `os.sysconf` where that file is missing.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    return _cpu_available_bytes()


def _cpu_available_bytes(meminfo: Path = _MEMINFO) -> int:
    """`MemAvailable` of /proc/meminfo in bytes; `os.sysconf` available pages where unreadable."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))


def auto_batch_size(
    device: torch.device | str,
    bytes_per_item: int,
    *,
    fixed_bytes: int = 0,
    headroom: float = 0.8,
    max_batch: int = 256,
) -> int:
    """Largest batch that fits `headroom` of the free memory on `device`, in [1, max_batch].

    batch = floor((free * headroom - fixed_bytes) / bytes_per_item), where `fixed_bytes` is what the
    call needs whatever the batch (weights not yet loaded, workspace) and `bytes_per_item` the peak
    extra memory one more item costs. Deterministic for a given free memory; logged.
    """
    import torch

    if bytes_per_item <= 0:
        raise ValueError(f"bytes_per_item must be positive, got {bytes_per_item}")
    if not 0.0 < headroom <= 1.0:
        raise ValueError(f"headroom must be in (0, 1], got {headroom}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    free = free_memory_bytes(device)
    budget = free * headroom - fixed_bytes
    batch = int(budget // bytes_per_item) if budget > 0 else 0
    batch = max(1, min(max_batch, batch))
    log.info(
        "batch size %d on %s (%.2f GiB free x %.2f headroom, %.1f MiB fixed, %.2f MiB per item)",
        batch,
        torch.device(device),
        free / 2**30,
        headroom,
        fixed_bytes / 2**20,
        bytes_per_item / 2**20,
    )
    return batch


def resolve_batch_size(
    requested: int | None,
    device: torch.device | str,
    bytes_per_item: int | None = None,
    **auto_kwargs: Any,
) -> int:
    """`--batch-size` as given (must be >= 1), or `auto_batch_size` when it is None (auto).

    `auto_kwargs` go to `auto_batch_size` (fixed_bytes, headroom, max_batch).
    """
    if requested is not None:
        if requested < 1:
            raise InputError(
                f"--batch-size must be at least 1, got {requested}: pass a positive "
                "number, or leave it out to size batches to free memory"
            )
        return int(requested)
    if bytes_per_item is None:
        raise ValueError("automatic batch size needs bytes_per_item")
    return auto_batch_size(device, bytes_per_item, **auto_kwargs)


def capture_batches(n: int, requested: int | None, max_batch: int) -> list[range]:
    """How one capture's ``n`` items are cut into batches, from the capture and the config alone.

    Consecutive slices of ``requested`` items (`--batch-size`), or, when it is None (auto), of
    ``max_batch`` (so a capture of at most ``max_batch`` views is one batch). Neither free memory
    nor the other captures of the run play a part: a capture gets the same batches in a single run,
    in any shard and on any machine of one device type. That is what makes its records the same
    bits there, even where a kernel's last bits depend on the batch (GEMM blocking follows the
    number of rows, and a row's place in it). Memory limits are met later by splitting a batch
    (`run_planned_batches`), which then gives results equal to float tolerance only.
    """
    if requested is not None and requested < 1:
        raise InputError(
            f"--batch-size must be at least 1, got {requested}: pass a positive "
            "number, or leave it out to size batches per capture"
        )
    size = int(requested) if requested is not None else max_batch
    return [range(start, min(n, start + size)) for start in range(0, n, size)]


def unique_batches(plans: Iterable[Any]) -> list[list[Any]]:
    """The planned batches that hold an item the cache lacks, each once (a batch's keys name it).

    `plans` are per-capture plans with ``batches`` (lists of rows), ``views`` (items with a ``key``)
    and ``missing`` (the keys the cache lacks), as depth and masks plan them."""
    found: dict[tuple[str, ...], list[Any]] = {}
    for plan in plans:
        for rows in plan.batches:
            views = [plan.views[row] for row in rows]
            if any(view.key in plan.missing for view in views):
                found.setdefault(tuple(view.key for view in views), views)
    return list(found.values())


def _release_cuda_memory() -> None:
    """Drop garbage and hand PyTorch's cached CUDA blocks back after an OOM."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def ordered_thread_map(fn: Callable[[T], R], items: Iterable[T], workers: int,
                       on_abort: Callable[[], None] | None = None) -> Iterator[R]:  # fmt: skip
    """``map(fn, items)`` on ``workers`` threads: results in input order, at most ``2 x workers``
    items started ahead of the one consumed (bounded memory on long inputs). For work that releases
    the GIL (pycolmap, numpy). An exception reaches the consumer at its item. When an item fails or
    the consumer stops early (an error, Ctrl-C), items not yet started are dropped and ``on_abort``
    runs before the items still running are waited for (to make them stop sooner, e.g. by
    cancelling their token). ``workers <= 1`` runs on the calling thread."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pending: collections.deque = collections.deque()
    source = iter(items)
    finished = False
    with ThreadPoolExecutor(workers, "nvf-map") as pool:
        try:
            pending.extend(pool.submit(fn, item) for item in itertools.islice(source, 2 * workers))
            while pending:
                result = pending.popleft().result()
                pending.extend(pool.submit(fn, item) for item in itertools.islice(source, 1))
                yield result
            finished = True
        finally:
            if not finished:
                for future in pending:
                    future.cancel()
                if on_abort is not None:
                    on_abort()


def iter_batched(
    fn: Callable[[Sequence[T]], Sequence[R]],
    items: Sequence[T],
    *,
    batch_size: int,
    min_batch_size: int = 1,
    progress: ProgressFn | None = None,
    logger: logging.Logger | None = None,
) -> Iterator[tuple[Sequence[T], Sequence[R]]]:
    """Yield `(batch, fn(batch))` over consecutive slices of `items`, halving the size on OOM.

    `fn` must return one result per item (a list, or a tensor/array whose first axis is the batch).
    On `torch.cuda.OutOfMemoryError` the CUDA cache is emptied and the failed slice is retried at
    half its length (not below `min_batch_size`); later slices keep the reduced size. An OOM at
    `min_batch_size` raises `StageFailure`. Any other exception propagates unchanged.
    `progress(n_done, n_total)` is called once with 0 and after every finished slice.
    """
    import torch

    logger = logger or log
    if batch_size < 1 or min_batch_size < 1:
        raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size}, min_batch_size={min_batch_size}")
    n_total = len(items)
    size = max(batch_size, min_batch_size)
    start = 0
    if progress is not None:
        progress(0, n_total)
    while start < n_total:
        batch = items[start : start + size]
        out_of_memory = False
        try:
            results = fn(batch)
        except torch.cuda.OutOfMemoryError as err:
            if len(batch) <= min_batch_size:
                raise StageFailure(
                    f"out of memory even at batch size {len(batch)}: lower --max-res, use "
                    "--precision fp16, or run on --device cpu"
                ) from err
            out_of_memory = True
        if out_of_memory:  # outside the except block, so the traceback's tensors can be freed
            new_size = max(min_batch_size, len(batch) // 2)
            logger.warning("out of memory at batch size %d; retrying at %d", len(batch), new_size)
            del batch
            _release_cuda_memory()
            size = new_size
            continue
        if len(results) != len(batch):
            raise ValueError(f"batch function returned {len(results)} results for {len(batch)} items")
        start += len(batch)
        if progress is not None:
            progress(start, n_total)
        yield batch, results
    if size < batch_size:
        logger.info("batch size settled at %d (asked for %d) after running out of memory", size, batch_size)
    else:
        logger.debug("batch size %d", size)


def run_planned_batches(
    fn: Callable[[Sequence[T]], Sequence[R]],
    batches: Iterable[Sequence[T]],
    *,
    limit: Callable[[Sequence[T]], int] | None = None,
    logger: logging.Logger | None = None,
) -> Iterator[tuple[Sequence[T], Sequence[R], bool]]:
    """Run ``fn`` on each planned batch (`capture_batches`) whole; yield ``(items, results, whole)``.

    A batch runs as one call unless memory forbids: ``limit(batch)`` (the auto batch size's fit
    to free memory; None: no limit) or an out-of-memory error (halved and retried as in
    `iter_batched`; later batches start at the size that fitted) splits it into slices. ``whole``
    says whether the results came from the batch as planned: only those are the bits the same
    capture gives in any other run; a split batch's rows agree with them to float tolerance (the
    stages do not cache them). A split is logged as a warning.
    """
    import torch

    logger = logger or log
    ceiling: list[int] = []  # the batch size an out-of-memory settled on, if any
    warned: set[tuple[int, int]] = set()

    def guarded(items: Sequence[T]) -> Sequence[R]:
        try:
            return fn(items)
        except torch.cuda.OutOfMemoryError:
            ceiling.append(max(1, len(items) // 2))
            raise

    for batch in batches:
        size = len(batch)
        if limit is not None:
            size = min(size, max(1, limit(batch)))
        if ceiling:
            size = min(size, ceiling[-1])
        if size < len(batch) and (len(batch), size) not in warned:  # once per kind of split, not per capture
            warned.add((len(batch), size))
            logger.warning("a batch of %d items runs in slices of %d to fit memory: its results agree with the "
                           "whole batch's to float tolerance, not bit for bit", len(batch), size)  # fmt: skip
        for items, results in iter_batched(guarded, batch, batch_size=size, logger=logger):
            yield items, results, len(items) == len(batch)


def run_batched(
    fn: Callable[[Sequence[T]], Sequence[R]],
    items: Sequence[T],
    *,
    batch_size: int,
    min_batch_size: int = 1,
    progress: ProgressFn | None = None,
    logger: logging.Logger | None = None,
) -> list[R]:
    """`fn` over `items` in batches (see `iter_batched`); one result per item, in input order.

    A tensor returned by `fn` contributes its rows, so `torch.stack(run_batched(...))` rebuilds it.
    """
    outputs: list[R] = []
    for _batch, results in iter_batched(
        fn,
        items,
        batch_size=batch_size,
        min_batch_size=min_batch_size,
        progress=progress,
        logger=logger,
    ):
        outputs.extend(results)
    return outputs


Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a `Precision` (fp32, fp16, bf16)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def effective_precision(precision: str, device: torch.device) -> str:
    """`precision`, except fp16 on a CPU, which falls back to fp32 with a warning."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}: use fp32, fp16 or bf16")
    if precision == "fp16" and device.type != "cuda":
        log.warning("--precision fp16 needs a CUDA device; running in fp32 on %s (use bf16 for a CPU)", device)
        return "fp32"
    return precision
