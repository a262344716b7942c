"""nvf depth vs transformers' `pipeline("depth-estimation")` image by image, and vs the bare batched forward.

Same 64 images (synthetic heads, 128 px, PNG files), same model: a small-but-realistic DPT built
locally with random weights (ViT width 192, 6 layers, 3 heads, 224 px input, DPT decoder with
fusion width 64: ~5.7 M parameters; no download). Timing does not depend on the weights.

- candidate: `stages.depth.run` end to end (hash + decode in threads + batched preprocess, forward,
  resample + write records), on-disk cache off, so every run computes every map;
- baseline: `pipeline("depth-estimation")` called once per image path (its own decode,
  preprocessing, forward, post-processing to the image size);
- overhead: the same run against the bare batched forward of pre-decoded, pre-processed tensors
  at nvf's batch size (goal: at most 10% slower).

On CUDA two more results run the paper's model size (DPT-Large's architecture, random weights, 384
px input) on 128 distinct images of 512 px: nvf (automatic batch size) in fp32 vs the per-image
pipeline, with nvf's images/s, peak CUDA memory and chosen batch size in fp32, bf16 and fp16; and
the out-of-memory back-off triggered for real under a memory cap, its maps compared with an
uncapped run's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import LogCatcher, Result, Side, compare, synth_image_folders, where_time_goes
from stages.core.contract import Context

N_IMAGES = 64
RESOLUTION = 128
N_LARGE, LARGE_PX = 128, 512  # the CUDA run: images of the paper's size


def build_small_dpt(folder: Path) -> Path:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768,
                       image_size=224, patch_size=16, backbone_out_indices=[1, 3, 4, 5],
                       neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64, head_in_index=-1,
                       readout_type="project", is_hybrid=False)  # fmt: skip
    torch.manual_seed(0)
    DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 224, "width": 224}, keep_aspect_ratio=False, ensure_multiple_of=1,
                      image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)  # fmt: skip
    return folder


def run() -> list[Result]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import pipeline

    from stages import depth
    from stages.core import batching, models

    tmp = Path(tempfile.mkdtemp(prefix="nvf-bench-depth-"))
    try:
        model_dir = build_small_dpt(tmp / "model")
        paths = synth_image_folders(tmp / "data", N_IMAGES, RESOLUTION)
        device = batching.choose_device("auto")
        cfg = depth.Config(model=str(model_dir), layout="folder", cache=False)
        runs = iter(range(10**6))

        def nvf_depth() -> None:
            depth.run(Context(tmp / f"work{next(runs)}", data=tmp / "data", device=str(device)), cfg)

        pipe = pipeline("depth-estimation", model=str(model_dir), device=device)

        def pipeline_per_image() -> None:
            for path in paths:
                pipe(str(path))

        ref = models.ModelRef("depth", str(model_dir))
        predictor = depth.DepthPredictor(ref, device)
        from stages.core import io

        images = torch.from_numpy(np.stack([io.read_image(p) for p in paths])).permute(0, 3, 1, 2)
        pixels = predictor.processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        per_item = predictor.bytes_per_item((RESOLUTION,) * 2, (RESOLUTION,) * 2)
        batch = batching.resolve_batch_size(None, device, per_item,
                                            max_batch=32 if device.type == "cpu" else 256)  # fmt: skip

        def bare_forward() -> None:
            with torch.inference_mode():
                for start in range(0, len(pixels), batch):
                    predictor.model(pixel_values=pixels[start : start + batch]).predicted_depth.cpu()

        extra = {"device": str(device), "images": N_IMAGES, "batch": batch, "model": "local DPT ViT-192x6, 224 px"}
        baseline = Side("pipeline per image", pipeline_per_image)
        vs_pipeline = compare("depth_vs_pipeline", Side("nvf depth", nvf_depth), baseline,
                              repeats=3, goal="ratio <= 0.333 (>= 3x faster)", extra=extra)  # fmt: skip
        vs_bare = compare("depth_overhead", Side("nvf depth", nvf_depth), Side("bare batched forward", bare_forward),
                          repeats=3, goal="ratio <= 1.10", extra={**extra, "nvf_profile": where_time_goes(nvf_depth)})  # fmt: skip
        results = [vs_pipeline, vs_bare]
        if device.type == "cuda":
            results += _dpt_large_on_gpu(tmp, device, pipeline)
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_dpt_large(folder: Path) -> Path:
    """Intel/dpt-large's architecture (ViT-L/16 at 384 px, 24 layers, ~343 M parameters), random weights."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       image_size=384, patch_size=16, backbone_out_indices=[5, 11, 17, 23],
                       neck_hidden_sizes=[256, 512, 1024, 1024], fusion_hidden_size=256, is_hybrid=False)  # fmt: skip
    torch.manual_seed(0)
    DPTForDepthEstimation(config).save_pretrained(folder)
    # Intel/dpt-large's preprocessor_config.json: a plain 384x384 resize (its ViT takes square inputs only)
    DPTImageProcessor(size={"height": 384, "width": 384}, keep_aspect_ratio=False, ensure_multiple_of=1,
                      image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)  # fmt: skip
    return folder


def _dpt_large_on_gpu(tmp: Path, device: torch.device, pipeline) -> list[Result]:
    """The paper's depth model on the GPU (see the module docstring): per precision, nvf's images/s,
    peak memory and the batch size it chose; nvf fp32 vs the per-image pipeline; and the
    out-of-memory back-off triggered for real under a memory cap, checked against the uncapped maps."""
    from stages import depth

    model_dir = build_dpt_large(tmp / "dpt-large")
    paths = synth_image_folders(tmp / "data-large", N_LARGE, LARGE_PX)
    runs = iter(range(10**6))

    def nvf_depth(precision: str, work: Path | None = None) -> Path:
        work = work or tmp / f"large{next(runs)}"
        cfg = depth.Config(model=str(model_dir), layout="folder", cache=False, precision=precision)
        depth.run(Context(work, data=tmp / "data-large", device=str(device)), cfg)
        torch.cuda.synchronize()
        return work

    per_precision: dict[str, dict] = {}
    for precision in ("fp32", "bf16", "fp16"):
        nvf_depth(precision)  # warm-up: load, cuDNN autotuning, allocator
        torch.cuda.reset_peak_memory_stats()
        with LogCatcher() as caught:
            start = time.perf_counter()
            nvf_depth(precision)
            seconds = time.perf_counter() - start
        per_precision[precision] = {"images_per_s": N_LARGE / seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                                    "batch": caught.batch_sizes()}  # fmt: skip
    pipe = pipeline("depth-estimation", model=str(model_dir), device=device)

    def pipeline_per_image() -> None:
        for path in paths:
            pipe(str(path))
        torch.cuda.synchronize()

    extra = {"device": torch.cuda.get_device_name(device), "images": N_LARGE, "image_px": LARGE_PX,
             "model": "DPT-Large architecture (random weights), 384 px"}  # fmt: skip
    for precision, figures in per_precision.items():
        extra.update({f"{precision}_{k}": v for k, v in figures.items()})
    vs_pipeline = compare("depth_dpt_large_gpu", Side("nvf depth fp32", lambda: nvf_depth("fp32")),
                          Side("pipeline per image fp32", pipeline_per_image), repeats=2,
                          goal="ratio <= 0.333 (>= 3x faster)", extra=extra)  # fmt: skip
    return [vs_pipeline, _out_of_memory_back_off(tmp, device, nvf_depth)]


def _out_of_memory_back_off(tmp: Path, device: torch.device, nvf_depth) -> Result:
    """Cap this process's CUDA memory (`torch.cuda.set_per_process_memory_fraction`) to the loaded
    model plus ~24 images' activations: the free-memory batch size (which the cap does not lower)
    runs out of memory for real and `iter_batched` halves it until it fits. The maps must equal an
    uncapped run's: bit for bit where the kernels allow, else the largest difference is reported."""
    from stages import depth
    from stages.core import io

    reference = nvf_depth("fp32")
    predictor = next(iter(depth._LOADED.values()))
    per_item = predictor.bytes_per_item((LARGE_PX, LARGE_PX), (LARGE_PX, LARGE_PX))
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    cap = torch.cuda.memory_allocated(device) + 24 * per_item
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    try:
        with LogCatcher() as caught:
            start = time.perf_counter()
            capped = nvf_depth("fp32")
            seconds = time.perf_counter() - start
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    differences = []
    for record in sorted(reference.glob("*/depth.safetensors")):
        a = io.load_record(record, kind="depth")["depth"]
        b = io.load_record(capped / record.relative_to(reference), kind="depth")["depth"]
        differences.append(float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(a).max(), 1e-12)))
    extra = {"cap_gib": cap / 2**30, "per_item_mib": per_item / 2**20, "chosen_batch": caught.batch_sizes(),
             "out_of_memory_at": caught.out_of_memory(), "records": len(differences),
             "max_rel_diff_vs_uncapped": max(differences) if differences else float("nan"),
             "bitwise_equal": all(d == 0.0 for d in differences)}  # fmt: skip
    return Result("depth_oom_back_off_gpu", "nvf depth fp32 under a memory cap", "(no baseline: figures only)",
                  seconds, seconds, 1, goal="back-off triggers and the maps match", extra=extra)  # fmt: skip
