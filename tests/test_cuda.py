"""The CUDA paths against the CPU, on tiny models. They run where torch sees a GPU (a lent one runs them
through `benchmarks/gpu.sh`) and are skipped elsewhere: the CPU halves of each path are tested in the
stage tests."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from stages import cloud, depth, embed, sample, synth
from stages.core import batching, dataset, io, models
from stages.core.contract import Context
from stages.train import checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def exact_fp32() -> None:
    """fp32 on the GPU without TF32 (cuDNN convolutions default to it; `nvf train` turns it on for
    matmuls too), so CUDA and the CPU differ by summation order only."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _restore_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    exact_fp32()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda-data")
    synth.run(root, synth.Config(subjects=2, resolution=64, elevated=False, surface_points=100))
    return root


def _maps(work, kind: str, key: str) -> dict[str, np.ndarray]:
    return {p.parent.name: io.load_record(p, kind=kind)[key] for p in sorted(work.glob(f"*/{kind}.safetensors"))}


def test_depth_on_cuda_matches_the_cpu_in_every_precision(data, tmp_path):
    on_cpu = _maps(depth.run(Context(tmp_path / "cpu", data=data, device="cpu"), depth.Config(model_preset="tiny", cache=False))[0].parents[1],
                   "depth", "depth")  # fmt: skip
    # the tiny random model predicts ~1e-8: below fp16's smallest subnormal (6e-8), so fp16 may give 0
    for precision, tolerance, floor in (("fp32", 1e-4, 0.0), ("bf16", 6e-2, 0.0), ("fp16", 1e-2, 1.2e-7)):
        cfg = depth.Config(model_preset="tiny", cache=False, precision=precision)
        work = tmp_path / precision
        depth.run(Context(work, data=data, device="cuda"), cfg)
        on_gpu = _maps(work, "depth", "depth")
        assert on_gpu.keys() == on_cpu.keys() and len(on_gpu) == 2
        for capture, reference in on_cpu.items():
            scale = np.abs(reference).max()
            assert np.abs(on_gpu[capture] - reference).max() <= tolerance * scale + floor, (precision, capture)


def test_embed_on_cuda_matches_the_cpu(data, tmp_path):
    cfg = embed.Config(model_preset="tiny", cache=False)
    embed.run(Context(tmp_path / "cpu", data=data, device="cpu"), cfg)
    embed.run(Context(tmp_path / "cuda", data=data, device="cuda"), cfg)
    on_cpu, on_gpu = _maps(tmp_path / "cpu", "embed", "embedding"), _maps(tmp_path / "cuda", "embed", "embedding")
    assert on_gpu.keys() == on_cpu.keys() and len(on_gpu) == 2
    for capture, reference in on_cpu.items():
        cosine = (on_gpu[capture] * reference).sum(axis=1)  # unit rows
        assert cosine.min() > 1 - 1e-6, capture


def test_fusion_on_cuda_gives_the_cpu_points(data):
    capture = dataset.scan(data).captures[0].id
    gt = synth.groundtruth_dir(data, capture)
    poses = io.load_record(gt / "poses.safetensors", kind="poses")
    depth_nhw = io.load_record(gt / "depth.safetensors", kind="depth")["depth"]
    views = cloud.Views(poses.names, depth_nhw, poses["K"], poses["R"], poses["T"], None)
    on_cpu, on_gpu = cloud.fuse_views(views), cloud.fuse_views(views, device=torch.device("cuda"))
    assert len(on_cpu) == len(on_gpu) > 1000
    np.testing.assert_array_equal(on_gpu.view_n, on_cpu.view_n)
    assert np.abs(on_gpu.points_n3 - on_cpu.points_n3).max() < 1e-12


def test_out_of_memory_halves_the_batch_for_real_and_keeps_every_result():
    """A real `torch.cuda.OutOfMemoryError` from the caching allocator under a memory cap."""
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    gib = 2**30
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated(device) + 5 * gib) / total))
    tried: list[int] = []

    def fn(batch):
        tried.append(len(batch))
        buffer = torch.ones(len(batch) * gib, dtype=torch.uint8, device=device)  # 1 GiB an item
        return [int(buffer[-1].item()) + item for item in batch]

    try:
        results = batching.run_batched(fn, list(range(12)), batch_size=12)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert results == [1 + item for item in range(12)]
    assert tried[:3] == [12, 6, 3] and max(tried[2:]) <= 3  # 12 and 6 GiB do not fit under 5 GiB


def test_train_then_sample_on_cuda(tmp_path):
    from stages import train
    from tests.train.fixtures import build_triplets, tiny_config

    index = build_triplets(tmp_path, subjects=2, train_split=0.5)
    photo = next((tmp_path / "data").rglob("*_051_*.png"))
    runs = {}
    for precision in ("bf16", "fp16", "fp32"):
        run = tmp_path / f"run-{precision}"
        train.train(index, run, tiny_config(max_steps=2, checkpoint_every=2, precision=precision), device="cuda")
        runs[precision] = run
        assert checkpoint.load_checkpoint(run, "cpu").step == 2
    cfg = sample.Config(steps=2, azimuths=(-30.0, 0.0, 30.0), clip_model=models.resolve_model("clip", "tiny").id,
                        precision="fp32")  # fmt: skip
    exact_fp32()  # train turned TF32 on
    views = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"views-{device}"
        sample.sample(runs["fp32"], photo, out, cfg, device=device)
        views[device] = np.stack([io.read_image(p) for p in sorted((out / "views").glob("*.png"))]).astype(int)
    assert views["cuda"].shape == views["cpu"].shape and len(views["cuda"]) == 3
    difference = np.abs(views["cuda"] - views["cpu"])
    assert difference.mean() < 0.1 and difference.max() <= 3  # summation order only: a grey level here and there
    fp16 = tmp_path / "views-fp16"
    sample.sample(runs["fp32"], photo, fp16, dataclasses.replace(cfg, precision="fp16"), device="cuda")
    assert len(list((fp16 / "views").glob("*.png"))) == 3
