"""Caches and read-ahead shared by the model stages (depth, embed, train).

- `ArrayCache`: arrays by key in an in-memory LRU (bounded in bytes) in front of an optional disk
  folder ``folder/<key[:2]>/<key>.npy``. Keys are content hashes (image bytes + model + settings),
  so reruns, repeated images and other work trees sharing the folder cost nothing. Disk writes are
  atomic (temp file + rename): concurrent runs (SLURM shards) never read a half-written entry, and
  an unreadable entry is a miss that gets recomputed and rewritten.
- `Prefetcher`: runs a loader (decode, preprocess) over items in worker threads, ahead of the
  consumer, so decoding overlaps the model's forward pass.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from stages.core import io

log = logging.getLogger("nvf")

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")


class ArrayCache:
    """Arrays by key: a memory LRU of at most ``memory_bytes`` and/or ``max_items`` (0: that bound
    is off; both 0: no memory tier) over an optional disk folder."""

    def __init__(self, folder: str | Path | None, memory_bytes: int = 0, max_items: int = 0) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.memory_bytes = memory_bytes
        self.max_items = max_items
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self.hits = {"memory": 0, "disk": 0}

    def _file(self, key: str) -> Path:
        if self.folder is None:
            raise ValueError("this cache has no disk folder")
        return self.folder / key[:2] / f"{key}.npy"

    def __len__(self) -> int:
        """How many entries the memory tier holds."""
        with self._lock:
            return len(self._memory)

    def contains(self, key: str) -> bool:
        """Whether ``key`` is cached (in memory or on disk), without loading it."""
        with self._lock:
            if key in self._memory:
                return True
        return self.folder is not None and self._file(key).is_file()

    def get(self, key: str) -> np.ndarray | None:
        """The cached array for ``key`` or None; a disk hit is promoted into memory."""
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                self.hits["memory"] += 1
                return self._memory[key]
        if self.folder is None or not self._file(key).is_file():
            return None
        try:
            array = np.load(self._file(key), allow_pickle=False)
        except (OSError, ValueError):
            log.debug("cache %s: unreadable entry %s ignored", self.folder, key)
            return None
        self.hits["disk"] += 1
        self._remember(key, array)
        return array

    def put(self, key: str, array: np.ndarray, *, to_disk: bool = True) -> None:
        """Cache ``array`` in memory and, when a folder is set and ``to_disk``, on disk."""
        self._remember(key, array)
        if to_disk:
            self.write_disk(key, array)

    def write_disk(self, key: str, array: np.ndarray) -> None:
        """Store ``array`` on disk only (no-op without a folder); safe to call from a worker thread."""
        if self.folder is None:
            return
        with io.atomic_path(self._file(key)) as tmp, open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)

    def _remember(self, key: str, array: np.ndarray) -> None:
        if self.memory_bytes <= 0 and self.max_items <= 0:
            return
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return
            self._memory[key] = array
            self._used += array.nbytes
            while len(self._memory) > 1 and (
                0 < self.memory_bytes < self._used or 0 < self.max_items < len(self._memory)
            ):
                _, evicted = self._memory.popitem(last=False)
                self._used -= evicted.nbytes


class Prefetcher(Generic[Item, Loaded]):
    """``load(item)`` for positions of ``items`` in worker threads, running ahead of the consumer.

    `get(positions, lookahead)` returns the loaded values of those positions (loading them now if
    not yet queued, e.g. after an out-of-memory retry) and queues the next ``lookahead`` positions;
    the returned positions are released. Use as a context manager, or call `close`.
    """

    def __init__(self, items: Sequence[Item], load: Callable[[Item], Loaded], workers: int = 4) -> None:
        self.items = list(items)
        self.load = load
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="nvf-prefetch")
        self._futures: dict[int, Future[Loaded]] = {}
        self._submitted = 0

    def prefetch(self, stop: int) -> None:
        """Start loading every position before ``stop``."""
        while self._submitted < min(stop, len(self.items)):
            if self._submitted not in self._futures:  # `get` may have asked for it already
                self._futures[self._submitted] = self._pool.submit(self.load, self.items[self._submitted])
            self._submitted += 1

    def get(self, positions: Sequence[int], lookahead: int = 0) -> list[Loaded]:
        for index in positions:
            if index not in self._futures:
                self._futures[index] = self._pool.submit(self.load, self.items[index])
        self.prefetch(max(positions, default=-1) + 1 + lookahead)
        loaded = [self._futures[index].result() for index in positions]
        for index in positions:
            self._futures.pop(index, None)
        return loaded

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Prefetcher[Item, Loaded]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CaptureAssembler:
    """Hands each capture its per-view arrays as soon as all of them are known, in row order.

    A plan is any object with ``keys`` (the cache key of each row, in row order) and ``missing``
    (the keys still to be computed). Computed arrays arrive through `add`; a key not computed in
    this run is read with ``stored(key)`` (a cache). A computed array is held only until every
    capture that needs it is finished, so memory stays bounded by the captures in flight.
    ``finish(plan, arrays)`` writes the capture; ``progress(done_rows, total_rows)`` follows.
    """

    def __init__(
        self,
        plans: Sequence[Any],
        finish: Callable[[Any, list[np.ndarray]], None],
        stored: Callable[[str], np.ndarray | None],
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.plans, self.finish, self.stored, self.progress = list(plans), finish, stored, progress
        self._fresh: dict[str, np.ndarray] = {}
        self._waiting: dict[str, list[Any]] = {}
        self._refs: dict[str, int] = {}
        for plan in self.plans:
            for key in plan.missing:
                self._waiting.setdefault(key, []).append(plan)
                self._refs[key] = self._refs.get(key, 0) + 1
        self._total = sum(len(plan.keys) for plan in self.plans)
        self._done = 0
        if progress is not None:
            progress(0, self._total)

    def flush_ready(self) -> None:
        """Finish the captures that need nothing computed."""
        for plan in self.plans:
            if not plan.missing:
                self._finish(plan)

    def add(self, key: str, array: np.ndarray) -> None:
        """A computed array; finishes every capture it completes. A key no capture waits for any
        more (computed before in this run, or not missing) is ignored: the first value stays."""
        if key in self._fresh or key not in self._refs:
            return
        self._fresh[key] = array
        for plan in self._waiting.pop(key, []):
            plan.missing.discard(key)
            if not plan.missing:
                self._finish(plan)

    def _finish(self, plan: Any) -> None:
        arrays = [self._fresh[key] if key in self._fresh else self.stored(key) for key in plan.keys]
        self.finish(plan, arrays)
        for key in set(plan.keys) & self._refs.keys():
            self._refs[key] -= 1
            if self._refs[key] == 0:
                del self._refs[key]
                self._fresh.pop(key, None)
        self._done += len(plan.keys)
        if self.progress is not None:
            self.progress(self._done, self._total)
