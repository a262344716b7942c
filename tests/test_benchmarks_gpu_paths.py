"""The benchmarks' CUDA-only branches, run on the CPU as far as they can be: tiny models and sizes, and
`torch.cuda`'s bookkeeping calls (synchronize, peak memory, memory caps) answered by a stand-in. A
memory cap makes the model raise a real `torch.cuda.OutOfMemoryError` above a set batch, so the
depth benchmark's back-off path runs as it would on a GPU. What this cannot check (kernels, memory
figures, speed) is what `benchmarks/gpu.sh` measures on a lent GPU."""

from __future__ import annotations

import types

import pytest
import torch

from benchmarks import bench_cloud, bench_depth, bench_embed, bench_sample, bench_train
from benchmarks.harness import LogCatcher

CPU = torch.device("cpu")


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's bookkeeping as no-ops on the CPU; `state.cap_items` set by the memory-fraction call."""
    state = types.SimpleNamespace(cap_items=None, fractions=[])
    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    for name in ("max_memory_allocated", "memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: 2**20)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Stand-in H200")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, **k: types.SimpleNamespace(total_memory=2**34))

    def set_fraction(fraction, device=None):
        state.fractions.append(fraction)
        state.cap_items = None if fraction >= 1.0 else 5

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    return state


def test_depth_gpu_branch_backs_off_and_reports_every_figure(fake_cuda, monkeypatch, tmp_path):
    import shutil

    from stages import depth
    from stages.core import models

    tiny = models.resolve_model("depth", "tiny").id  # the tests' DPT: fast on a CPU
    monkeypatch.setattr(bench_depth, "build_dpt_large", lambda folder: shutil.copytree(tiny, folder))
    monkeypatch.setattr(bench_depth, "N_LARGE", 14)
    monkeypatch.setattr(bench_depth, "LARGE_PX", 32)
    predict = depth.DepthPredictor.predict

    def capped_predict(self, images, out_hw):
        if fake_cuda.cap_items is not None and len(images) > fake_cuda.cap_items:
            raise torch.cuda.OutOfMemoryError("stand-in cap")
        return predict(self, images, out_hw)

    monkeypatch.setattr(depth.DepthPredictor, "predict", capped_predict)
    from transformers import pipeline

    vs_pipeline, back_off = bench_depth._dpt_large_on_gpu(tmp_path, CPU, pipeline)
    assert vs_pipeline.candidate_s > 0 and vs_pipeline.baseline_s > 0
    for precision in ("fp32", "bf16", "fp16"):
        assert vs_pipeline.extra[f"{precision}_images_per_s"] > 0 and vs_pipeline.extra[f"{precision}_batch"]
    # 14 images in two folders (13 + 1) under a 5-image cap: halved until a batch fits
    out_of_memory_at = back_off.extra["out_of_memory_at"]
    assert (
        len(out_of_memory_at) >= 2 and min(out_of_memory_at) > 5 and out_of_memory_at[1] <= out_of_memory_at[0] // 2 + 1
    )
    assert back_off.extra["records"] == 2 and back_off.extra["max_rel_diff_vs_uncapped"] < 1e-5
    assert fake_cuda.fractions[-1] == 1.0  # the cap is lifted afterwards


def test_embed_gpu_branch_reports_images_per_second(fake_cuda, monkeypatch, tmp_path):
    monkeypatch.setattr(bench_embed, "N_GPU", 4)
    monkeypatch.setattr(bench_embed, "GPU_PX", 32)
    result = bench_embed._on_gpu(tmp_path, CPU, "ViT-B-32-quickgelu")
    assert result.name == "embed_ViT-B-32-quickgelu_gpu" and result.extra["images"] == 4
    for precision in ("fp32", "fp16", "bf16"):
        assert result.extra[f"{precision}_images_per_s"] > 0 and result.extra[f"{precision}_batch"]


def test_sample_gpu_branch_compares_batched_with_two_pass(fake_cuda, monkeypatch):
    small = bench_sample.build_model
    monkeypatch.setattr(bench_sample, "build_model", lambda full=False, device="cpu": small(False, device))
    monkeypatch.setattr(torch.nn.Module, "half", lambda self: self)  # fp16 kernels are the GPU's; a CPU emulates
    compare = bench_sample.compare
    monkeypatch.setattr(bench_sample, "compare", lambda *a, **k: compare(*a, **{**k, "repeats": 1, "warmup": 0}))
    monkeypatch.setattr(bench_sample, "GPU_VIEWS", 2)
    monkeypatch.setattr(bench_sample, "GPU_STEPS", 2)
    monkeypatch.setattr(bench_sample, "LATENT", 8)
    result = bench_sample._full_size_on_gpu(CPU)
    assert result.extra["views"] == 2 and result.extra["sample_views_batch"]
    assert result.extra["max_abs_diff"] < 1e-3  # fp32 here: summation order only
    assert result.extra["sample_views_per_s"] > 0 and result.extra["denoise_views_per_s"] > 0
    assert result.extra["batched_step_wall_ms"] > 0 and result.extra["two_pass_step_wall_ms"] > 0


def test_train_gpu_branch_measures_utilisation_and_the_largest_batch(fake_cuda, monkeypatch, tmp_path):
    small = bench_train._unet
    monkeypatch.setattr(bench_train, "_unet", lambda full: small(False))
    monkeypatch.setattr(bench_train, "GPU_LATENT", 8)
    monkeypatch.setattr(bench_train, "DATA_BATCHES", 5)
    step = bench_train._Bench.__init__

    def init(self, *args, **kwargs):
        step(self, *args, **kwargs)
        if self.batch_size >= 8:  # the stand-in card holds 4

            def out_of_memory():
                raise torch.cuda.OutOfMemoryError("stand-in")

            self.nvf_step = out_of_memory

    monkeypatch.setattr(bench_train._Bench, "__init__", init)
    bench = bench_train._Bench(tmp_path, CPU, True, "fp32", 2, persons=2)  # bf16 on a CPU is emulated: slow
    result = bench_train._step_vs_bare(bench, repeats=1)
    assert result.extra["batch"] == 2 and result.extra["precision"] == "fp32"
    assert result.extra["fwd_bwd_tflop_per_step"] > 0 and result.extra["mfu"] > 0
    largest = bench_train._largest_batch(tmp_path, CPU, start=2, limit=16, precision="fp32")
    assert largest.extra["batch"] == 4 and largest.extra["out_of_memory_at"] == 8
    assert largest.extra["samples_per_s"] > 0


def test_cloud_without_open3d_times_the_device_against_the_cpu(fake_cuda, monkeypatch):
    monkeypatch.setattr(bench_cloud, "SIZE", 96)
    with LogCatcher():
        (result,) = bench_cloud._without_open3d("cpu")
    assert result.extra["points"] > 2_000 and result.extra["max_point_diff_vs_cpu"] == 0.0
