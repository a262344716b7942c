"""ArrayCache (memory LRU over an atomic disk folder) and the Prefetcher."""

from __future__ import annotations

import threading

import numpy as np

from stages.core.cache import ArrayCache, Prefetcher


def test_memory_lru_is_bounded():
    cache = ArrayCache(None, memory_bytes=3 * 400)
    for i in range(5):
        cache.put(f"k{i}", np.zeros((10, 10), np.float32))  # 400 bytes each
    assert cache.get("k0") is None and cache.get("k4") is not None and cache.get("k2") is not None
    assert cache.hits["memory"] == 2


def test_memory_lru_bounded_by_items_and_bytes_together():
    cache = ArrayCache(None, max_items=2)
    for key in "abc":
        cache.put(key, np.zeros(10))
    assert len(cache) == 2 and cache.get("a") is None and cache.get("c") is not None
    both = ArrayCache(None, memory_bytes=1000, max_items=5)
    for key in "abcd":
        both.put(key, np.zeros(50))  # 400 bytes each: the byte bound bites first
    assert len(both) == 2 and both.get("d") is not None and both.get("b") is None
    assert len(ArrayCache(None)) == 0


def test_disk_round_trip_and_corrupt_entry_is_a_miss(tmp_path):
    cache = ArrayCache(tmp_path)
    value = np.arange(12, dtype=np.float16).reshape(3, 4)
    cache.put("abcdef", value)
    assert sorted(p.name for p in (tmp_path / "ab").iterdir()) == ["abcdef.npy"]
    fresh = ArrayCache(tmp_path)
    assert fresh.contains("abcdef")
    loaded = fresh.get("abcdef")
    assert loaded.dtype == np.float16 and np.array_equal(loaded, value) and fresh.hits["disk"] == 1
    (tmp_path / "ab" / "abcdef.npy").write_bytes(b"broken")
    assert ArrayCache(tmp_path).get("abcdef") is None


def test_prefetcher_returns_in_order_and_reloads_released_positions():
    calls: list[int] = []
    lock = threading.Lock()

    def load(item: int) -> int:
        with lock:
            calls.append(item)
        return item * 10

    with Prefetcher(list(range(6)), load, workers=2) as prefetcher:
        assert prefetcher.get([0, 1], lookahead=2) == [0, 10]
        assert prefetcher.get([2, 3]) == [20, 30]
        assert prefetcher.get([0]) == [0]  # released after the first get: loaded again (an OOM retry)
    assert sorted(calls) == [0, 0, 1, 2, 3]


def test_capture_assembler_finishes_each_capture_once_in_row_order_and_frees_memory():
    from types import SimpleNamespace

    from stages.core.cache import CaptureAssembler

    plans = [
        SimpleNamespace(name="a", keys=["k1", "k2", "k1"], missing={"k1", "k2"}),  # a repeated image
        SimpleNamespace(name="b", keys=["k2", "k3"], missing={"k2"}),  # k3 comes from the cache
        SimpleNamespace(name="c", keys=["k3"], missing=set()),
    ]
    finished, ticks = [], []
    assembler = CaptureAssembler(plans, lambda plan, rows: finished.append((plan.name, [int(r[0]) for r in rows])),
                                 stored={"k3": np.array([3])}.__getitem__, progress=lambda d, t: ticks.append((d, t)))  # fmt: skip
    assembler.flush_ready()
    assert finished == [("c", [3])]
    assembler.add("k2", np.array([2]))
    assert finished[-1] == ("b", [2, 3])
    assembler.add("k1", np.array([1]))
    assert finished[-1] == ("a", [1, 2, 1])
    assert ticks == [(0, 6), (1, 6), (3, 6), (6, 6)]
    assert assembler._fresh == {}  # every computed array released once its captures are written
