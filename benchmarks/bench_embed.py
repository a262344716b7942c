"""nvf embed vs open_clip called image by image (its README recipe), same images, same model.

Model: open_clip's ViT-B-32-quickgelu vision tower (the paper's: 224 px, patch 32, width 768,
12 layers, 88 M parameters) with random weights built locally and saved as an open_clip folder
(no download; timing does not depend on the weights). The text tower is cut to one narrow layer to
keep the folder small: embedding images never runs it.

- candidate: `stages.embed.run` end to end (hash images, decode + open_clip preprocess in worker
  threads ahead of the model, batched forward at the auto batch size, write the records), with the
  on-disk cache off so every run computes every embedding;
- baseline: for each image path `model.encode_image(preprocess(Image.open(path)).unsqueeze(0))`,
  normalised, under `torch.no_grad()` — the same loaded model object.

On CUDA one more result per architecture (ViT-B/32 and ViT-L/14, random weights) on 128 distinct
images of 256 px (13 to a capture): nvf fp32 vs open_clip per image, with nvf's images/s, peak memory
and batch sizes in fp32, fp16 and bf16. A batch is one capture's views (13) whatever the free memory,
so a record never depends on what shares its batch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import LogCatcher, Result, Side, compare, synth_image_folders
from stages.core.contract import Context

N_IMAGES = 64
RESOLUTION = 128
GPU_ARCHITECTURES = ("ViT-B-32-quickgelu", "ViT-L-14")  # the paper's, and the larger CLIP many users pick
N_GPU, GPU_PX = 128, 256


def build_vit_b32_folder(folder: Path, architecture: str = "ViT-B-32-quickgelu") -> Path:
    """`architecture`'s vision config (random weights, seed 0) + a 1-layer text tower, as an open_clip folder."""
    import open_clip
    from safetensors.torch import save_file

    from stages.core import models

    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = open_clip.get_model_config(architecture)
    model_cfg["text_cfg"] = {"context_length": 77, "vocab_size": 49408, "width": 8, "heads": 1, "layers": 1}
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    preprocess = {"mean": list(models._OPENAI_MEAN), "std": list(models._OPENAI_STD), "interpolation": "bicubic",
                  "resize_mode": "shortest"}  # fmt: skip
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}))
    return folder


def run() -> list[Result]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from stages import embed
    from stages.core import batching, models

    tmp = Path(tempfile.mkdtemp(prefix="nvf-bench-embed-"))
    try:
        model_dir = build_vit_b32_folder(tmp / "model")
        paths = synth_image_folders(tmp / "data", N_IMAGES, RESOLUTION)
        device = batching.choose_device("auto")
        cfg = embed.Config(model=str(model_dir), layout="folder", cache=False)
        runs = iter(range(10**6))

        def nvf_embed() -> None:
            embed.run(Context(tmp / f"work{next(runs)}", data=tmp / "data", device=str(device)), cfg)

        nvf_embed()  # loads the model once (kept loaded for later runs in this process)
        ref = models.ModelRef("clip", str(model_dir))
        embedder = embed.loaded_embedder(ref, embed.model_fingerprint(ref), device, "fp32")
        open_clip_per_image = _open_clip_per_image(embedder, paths, device)

        batch = batching.resolve_batch_size(None, device, embedder.bytes_per_item(),
                                            max_batch=32 if device.type == "cpu" else 512)  # fmt: skip
        extra = {"device": str(device), "images": N_IMAGES, "batch": batch, "threads": torch.get_num_threads(),
                 "model": "ViT-B-32-quickgelu vision tower, random weights, 224 px"}  # fmt: skip
        result = compare("embed_vs_open_clip_per_image", Side("nvf embed", nvf_embed),
                         Side("open_clip per image", open_clip_per_image), repeats=3,
                         goal="ratio <= 0.333 (>= 3x faster)", extra=extra)  # fmt: skip
        results = [result]
        if device.type == "cuda":
            results += [_on_gpu(tmp, device, architecture) for architecture in GPU_ARCHITECTURES]
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _on_gpu(tmp: Path, device: torch.device, architecture: str) -> Result:
    """nvf embed vs open_clip per image for `architecture` on the GPU, with images/s per precision."""

    from stages import embed
    from stages.core import models

    model_dir = build_vit_b32_folder(tmp / architecture, architecture)
    data = tmp / f"data-{architecture}"
    paths = synth_image_folders(data, N_GPU, GPU_PX)
    runs = iter(range(10**6))

    def nvf_embed(precision: str = "fp32", batch_size: int | None = None) -> None:
        cfg = embed.Config(
            model=str(model_dir), layout="folder", cache=False, precision=precision, batch_size=batch_size
        )
        embed.run(Context(tmp / f"work-{architecture}-{next(runs)}", data=data, device=str(device)), cfg)
        torch.cuda.synchronize()

    figures: dict[str, float | list[int]] = {}
    for label in ("fp32", "fp16", "bf16"):
        nvf_embed(label)  # warm-up: load, autotuning
        torch.cuda.reset_peak_memory_stats()
        with LogCatcher() as caught:
            start = time.perf_counter()
            nvf_embed(label)
            seconds = time.perf_counter() - start
        figures[f"{label}_images_per_s"] = N_GPU / seconds
        figures[f"{label}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        figures[f"{label}_batch"] = caught.batch_sizes()
    ref = models.ModelRef("clip", str(model_dir))
    embedder = embed.loaded_embedder(ref, embed.model_fingerprint(ref), device, "fp32")  # what nvf_embed() uses
    open_clip_per_image = _open_clip_per_image(embedder, paths, device)

    extra = {"device": torch.cuda.get_device_name(device), "images": N_GPU, "image_px": GPU_PX,
             "model": f"{architecture} vision tower, random weights", **figures}  # fmt: skip
    return compare(f"embed_{architecture}_gpu", Side("nvf embed fp32", nvf_embed),
                   Side("open_clip per image fp32", open_clip_per_image), repeats=2,
                   goal="ratio <= 0.333 (>= 3x faster)", extra=extra)  # fmt: skip


def _open_clip_per_image(embedder, paths: list[Path], device: torch.device):
    """The baseline: open_clip's README recipe image by image, on nvf's loaded model object."""
    from PIL import Image

    model, preprocess = embedder.model, embedder.preprocess

    def open_clip_per_image() -> None:
        with torch.no_grad():
            for path in paths:
                features = model.encode_image(preprocess(Image.open(path)).unsqueeze(0).to(device))
                (features / features.norm(dim=-1, keepdim=True)).cpu()

    return open_clip_per_image
