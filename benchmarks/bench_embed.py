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
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from benchmarks.harness import Result, Side, compare, synth_image_folders

N_IMAGES = 64
RESOLUTION = 128


def build_vit_b32_folder(folder: Path) -> Path:
    """ViT-B-32-quickgelu's vision config (random weights, seed 0) + a 1-layer text tower, as an open_clip folder."""
    import open_clip
    from safetensors.torch import save_file

    from stages.core import models

    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = open_clip.get_model_config("ViT-B-32-quickgelu")
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
    from PIL import Image

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
            embed.run(tmp / "data", tmp / f"work{next(runs)}", cfg, device=str(device))

        nvf_embed()  # loads the model once (kept loaded for later runs in this process)
        ref = models.ModelRef("clip", str(model_dir))
        embedder = embed.loaded_embedder(ref, embed.model_fingerprint(ref), device, "fp32")
        model, preprocess = embedder.model, embedder.preprocess

        def open_clip_per_image() -> None:
            with torch.no_grad():
                for path in paths:
                    features = model.encode_image(preprocess(Image.open(path)).unsqueeze(0).to(device))
                    (features / features.norm(dim=-1, keepdim=True)).cpu()

        batch = batching.resolve_batch_size(None, device, embedder.bytes_per_item(),
                                            max_batch=32 if device.type == "cpu" else 512)  # fmt: skip
        extra = {"device": str(device), "images": N_IMAGES, "batch": batch, "threads": torch.get_num_threads(),
                 "model": "ViT-B-32-quickgelu vision tower, random weights, 224 px"}  # fmt: skip
        result = compare("embed_vs_open_clip_per_image", Side("nvf embed", nvf_embed),
                         Side("open_clip per image", open_clip_per_image), repeats=3,
                         goal="ratio <= 0.333 (>= 3x faster)", extra=extra)  # fmt: skip
        return [result]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
