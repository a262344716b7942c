from __future__ import annotations

import logging

import pytest
import torch

from stages.core import batching
from stages.core.batching import (
    auto_batch_size,
    choose_device,
    iter_batched,
    resolve_batch_size,
    run_batched,
)
from stages.core.errors import InputError, StageFailure


class _OomAbove:
    """A batch function that runs out of memory on batches longer than `limit`; records sizes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sizes: list[int] = []

    def __call__(self, batch):
        self.sizes.append(len(batch))
        if len(batch) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return [x * x for x in batch]


# --- run_batched -------------------------------------------------------------------------------


def test_oom_halves_16_8_4_2_and_keeps_order():
    items = list(range(37))
    fn = _OomAbove(limit=3)
    done: list[tuple[int, int]] = []
    out = run_batched(fn, items, batch_size=16, progress=lambda d, t: done.append((d, t)))

    assert out == run_batched(lambda b: [x * x for x in b], items, batch_size=37)
    assert out == [x * x for x in items]
    assert fn.sizes[:4] == [16, 8, 4, 2]  # halved on each OOM, the same slice retried
    assert set(fn.sizes[4:]) == {2, 1}  # later slices keep the reduced size; 37 is odd
    assert done[0] == (0, 37) and done[-1] == (37, 37)
    assert [d for d, _ in done] == sorted(d for d, _ in done)


def test_logs_settled_batch_size(caplog):
    with caplog.at_level(logging.INFO, logger="nvf"):
        run_batched(_OomAbove(limit=5), list(range(10)), batch_size=16)
    # 16 -> OOM on the 10-item slice -> 5, which fits
    assert "batch size settled at 5 (asked for 16)" in caplog.text


def test_short_last_slice_halves_its_own_length():
    fn = _OomAbove(limit=2)
    out = run_batched(fn, list(range(5)), batch_size=8)
    assert out == [0, 1, 4, 9, 16]
    assert fn.sizes == [5, 2, 2, 1]


def test_oom_at_min_batch_size_is_stage_failure():
    def always_oom(batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(StageFailure, match="--precision fp16") as info:
        run_batched(always_oom, [1, 2, 3, 4], batch_size=4)
    assert "batch size 1" in str(info.value)
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)

    with pytest.raises(StageFailure, match="batch size 2"):
        run_batched(always_oom, [1, 2, 3, 4], batch_size=4, min_batch_size=2)


def test_other_exceptions_propagate_unchanged():
    calls: list[int] = []
    error = RuntimeError("CUDA error: device-side assert triggered")

    def broken(batch):
        calls.append(len(batch))
        raise error

    with pytest.raises(RuntimeError) as info:
        run_batched(broken, list(range(8)), batch_size=8)
    assert info.value is error
    assert calls == [8]  # no retry at a smaller size


def test_tensor_results_contribute_rows():
    items = torch.arange(10.0)
    out = run_batched(lambda b: b[:, None] * 2, items, batch_size=3)
    assert torch.equal(torch.stack(out), items[:, None] * 2)


def test_iter_batched_yields_batches_with_results():
    pairs = list(iter_batched(lambda b: [x + 1 for x in b], [1, 2, 3, 4, 5], batch_size=2))
    assert pairs == [([1, 2], [2, 3]), ([3, 4], [4, 5]), ([5], [6])]


def test_wrong_result_count_is_an_error():
    with pytest.raises(ValueError, match="2 results for 3 items"):
        run_batched(lambda b: b[:2], [1, 2, 3], batch_size=3)


def test_empty_items():
    done: list[tuple[int, int]] = []
    assert run_batched(lambda b: b, [], batch_size=4, progress=lambda d, t: done.append((d, t))) == []
    assert done == [(0, 0)]


# --- batch sizing ------------------------------------------------------------------------------


@pytest.fixture
def free_gib(monkeypatch):
    def set_free(gib: float) -> None:
        monkeypatch.setattr(batching, "free_memory_bytes", lambda device: int(gib * 2**30))

    return set_free


def test_auto_batch_size_arithmetic(free_gib):
    free_gib(10)
    # 10 GiB * 0.8 = 8 GiB; minus 2 GiB fixed = 6 GiB; / 100 MiB = 61.44 -> 61
    assert auto_batch_size("cpu", 100 * 2**20, fixed_bytes=2 * 2**30) == 61
    assert auto_batch_size("cpu", 100 * 2**20, fixed_bytes=2 * 2**30, headroom=0.5) == 30
    assert auto_batch_size("cpu", 2**20) == 256  # capped by max_batch
    assert auto_batch_size("cpu", 2**20, max_batch=10_000) == 8192
    assert auto_batch_size("cpu", 2**20 * 10, max_batch=1000) == 819  # 8192 MiB / 10 MiB


def test_auto_batch_size_is_at_least_one(free_gib):
    free_gib(1)
    assert auto_batch_size("cpu", 2**30) == 1  # one item is bigger than the budget
    assert auto_batch_size("cpu", 2**20, fixed_bytes=2**31) == 1  # fixed cost eats everything


def test_auto_batch_size_rejects_nonsense():
    with pytest.raises(ValueError):
        auto_batch_size("cpu", 0)
    with pytest.raises(ValueError):
        auto_batch_size("cpu", 1, headroom=1.5)


def test_resolve_batch_size(free_gib):
    free_gib(1)
    assert resolve_batch_size(7, "cpu") == 7
    assert resolve_batch_size(None, "cpu", 2**20 * 8) == 102  # 819.2 MiB / 8 MiB
    assert resolve_batch_size(None, "cpu", 2**20 * 8, max_batch=16) == 16
    with pytest.raises(InputError, match="--batch-size"):
        resolve_batch_size(0, "cpu")
    with pytest.raises(ValueError, match="bytes_per_item"):
        resolve_batch_size(None, "cpu")


def test_cpu_free_memory_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    2048 kB\n")
    assert batching._cpu_available_bytes(meminfo) == 2048 * 1024
    missing = batching._cpu_available_bytes(tmp_path / "absent")
    assert missing > 0  # falls back to os.sysconf
    assert batching.free_memory_bytes("cpu") > 0


# --- device choice -----------------------------------------------------------------------------


def _fake_cuda(monkeypatch, n_gpus: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n_gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpus)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_choose_device_without_gpu(monkeypatch):
    _fake_cuda(monkeypatch, 0)
    assert choose_device() == torch.device("cpu")
    assert choose_device("auto") == torch.device("cpu")
    assert choose_device(" CPU ") == torch.device("cpu")
    with pytest.raises(InputError, match="use --device cpu"):
        choose_device("cuda")
    with pytest.raises(InputError, match="use --device cpu"):
        choose_device("cuda:0")


def test_choose_device_with_two_gpus(monkeypatch):
    _fake_cuda(monkeypatch, 2)
    assert choose_device("auto") == torch.device("cuda", 0)
    assert choose_device("cuda") == torch.device("cuda", 0)
    assert choose_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(InputError, match="found 2 GPU"):
        choose_device("cuda:2")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "mps0", ""])
def test_choose_device_rejects_unknown(spec):
    with pytest.raises(InputError, match="unknown device"):
        choose_device(spec)


# -- threads -----------------------------------------------------------------------------------------


def test_ordered_thread_map_keeps_order_and_runs_ahead_boundedly():
    import threading
    import time

    started, lock = [], threading.Lock()

    def slow_square(x: int) -> int:
        with lock:
            started.append(x)
        time.sleep(0.02 if x % 3 == 0 else 0.001)  # later items finish first
        return x * x

    results = batching.ordered_thread_map(slow_square, range(20), workers=2)
    assert next(results) == 0
    assert len(started) <= 5  # 4 ahead (2 x workers) plus one refill, not all 20
    assert list(results) == [x * x for x in range(1, 20)]
    assert list(batching.ordered_thread_map(slow_square, [3, 1], workers=1)) == [9, 1]


def test_ordered_thread_map_raises_at_the_failing_item_and_starts_nothing_more():
    seen = []

    def fail_on_two(x: int) -> int:
        seen.append(x)
        if x == 2:
            raise ValueError("item 2")
        return x

    aborted = []
    results = batching.ordered_thread_map(fail_on_two, range(100), workers=2, on_abort=lambda: aborted.append(1))
    assert [next(results), next(results)] == [0, 1]
    with pytest.raises(ValueError, match="item 2"):
        next(results)
    assert len(seen) < 10 and aborted == [1]  # told before the running items were waited for


def test_ordered_thread_map_calls_on_abort_only_when_stopped_early():
    aborted = []
    assert list(batching.ordered_thread_map(abs, [-1, -2, -3], workers=2, on_abort=lambda: aborted.append(1))) == [
        1,
        2,
        3,
    ]
    assert aborted == []
    results = batching.ordered_thread_map(abs, range(-10, 0), workers=2, on_abort=lambda: aborted.append(1))
    assert next(results) == 10
    results.close()  # the consumer stops (an error of its own, Ctrl-C)
    assert aborted == [1]


def test_capture_batches_depend_on_the_capture_and_the_config_only():
    assert batching.capture_batches(7, 3, max_batch=32) == [range(0, 3), range(3, 6), range(6, 7)]
    assert batching.capture_batches(7, None, max_batch=32) == [range(0, 7)]  # auto: the whole capture
    assert batching.capture_batches(40, None, max_batch=32) == [range(0, 32), range(32, 40)]
    with pytest.raises(InputError, match="--batch-size must be at least 1"):
        batching.capture_batches(4, 0, max_batch=32)


def test_planned_batches_run_whole_unless_memory_splits_them(caplog):
    import torch

    calls: list[list[int]] = []

    def fn(items):
        calls.append(list(items))
        if len(items) > 2 and items[0] >= 5:  # the second batch does not fit: out of memory
            raise torch.cuda.OutOfMemoryError("simulated")
        return [10 * i for i in items]

    with caplog.at_level(logging.WARNING, logger="nvf"):
        out = list(batching.run_planned_batches(fn, [range(0, 5), range(5, 10), range(10, 12)]))
    assert [(list(items), whole) for items, _, whole in out] == [
        ([0, 1, 2, 3, 4], True), ([5, 6], False), ([7, 8], False), ([9], False), ([10, 11], True)]  # fmt: skip
    assert [list(r) for _, r, _ in out][1] == [50, 60]
    assert calls[1:3] == [[5, 6, 7, 8, 9], [5, 6]]  # 5 ran out of memory, halved to 2; later batches start at 2
    assert "out of memory at batch size 5; retrying at 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nvf"):  # free memory for 3: the batch of 5 is split, with a warning
        split = list(batching.run_planned_batches(lambda items: list(items), [range(0, 5)], limit=lambda batch: 3))
    assert [(list(items), whole) for items, _, whole in split] == [([0, 1, 2], False), ([3, 4], False)]
    assert "a batch of 5 items runs in slices of 3" in caplog.text
