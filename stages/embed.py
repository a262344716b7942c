"""Stage `embed`: a CLIP image embedding for every view (paper §IV-6, z_I = CLIP(I)).

Any open_clip model runs over the images of a dataset: the paper's ViT-B/32 with OpenAI's weights
(`ViT-B-32-quickgelu` + `openai`: those weights need QuickGELU, see `stages.core.models`), any other
open_clip name and weight tag (`--model NAME@TAG`), `hf-hub:org/repo`, or a local open_clip folder.
Every image goes through the model's own open_clip preprocessing (resize, centre crop, normalise),
so a row equals `model.encode_image(preprocess(image))` normalised, as open_clip's README computes it.

Speed: images are decoded and preprocessed by worker threads while the model runs on the previous
batch.

What a record depends on: a capture's batches are its own views only, cut by
`batching.capture_batches` from the capture and the config alone (`--batch-size` views, or with the
auto batch size the whole capture up to 32 views on a CPU, 512 on a GPU). So a capture's record is
the same bits in a single run, in any shard and whatever else the run holds, even on CPUs whose
kernels give other last bits for another batch make-up. A different `--batch-size`, or a batch
that free memory or an out-of-memory error splits (a warning says so), gives embeddings equal to
float tolerance, not bit for bit.

Results are cached on disk, keyed by the image bytes + the model (id, weight tag, fingerprint of a
local folder's files) + the precision + the batch the image ran in (the other images' bytes and its
place there), so a rerun or a capture shared by two work trees costs nothing, and a cached row is
always the bits a fresh run would give; rows of a split batch are not cached.

Output per capture: ``WORK/<capture>/embed.safetensors`` (kind ``embed``) with ``embedding``
[N, D] float32, L2-normalised (unit rows; D = 512 for ViT-B/32), rows in the capture's view order
(``names``), and ``norm`` [N] float32, each row's L2 norm before normalising (embedding * norm is
the raw `encode_image` output, which `--conditioning zero123` feeds Zero123's camera projection). Metadata: ``model`` (open_clip name or folder), ``pretrained`` (weight tag or ""),
``model_fingerprint``, ``embed_dim``, ``normalization`` (``l2``), ``data_root`` (absolute path of the
dataset) and ``image_paths`` (JSON, relative to it), which `nvf triplets` uses to find the pixels.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.core import batching, contract, dataset, io, models, view_batches
from stages.core.batching import effective_precision
from stages.core.contract import Context, require_data
from stages.core.errors import InputError
from stages.core.models import model_fingerprint
from stages.core.view_batches import CapturePlan, View

log = logging.getLogger("nvf")

STAGE = "embed"

_CPU_MAX_BATCH = 32  # beyond this a CPU gains nothing from bigger batches, only memory use
_GPU_MAX_BATCH = 512


@dataclass(frozen=True)
class Config:
    """Which CLIP model embeds the images, and how."""

    model_preset: str = "paper"
    """Which models (`stages.core.models.PRESETS`): `paper` (ViT-B/32, OpenAI weights, QuickGELU) or `tiny`
    (random weights, tests). Not the stage preset: `--preset` names one of `PRESETS` below, a whole Config."""
    model: str | None = None
    """Instead of the preset's: open_clip `NAME@TAG` (e.g. ViT-L-14@laion2b_s32b_b82k), `hf-hub:org/repo`,
    or a local open_clip folder (`open_clip_config.json` + weights)."""
    layout: dataset.Layout = "auto"
    """Dataset layout: `auto`, `multipie` or `folder` (as `nvf scan`)."""
    precision: batching.Precision = "fp32"
    """Weights and activations: fp32, fp16 (CUDA only; a CPU falls back to fp32) or bf16."""
    batch_size: int | None = None
    """Images per forward pass, cut per capture; None: the whole capture (up to 32 on a CPU, 512 on a
    GPU), split only where free memory cannot hold it (halved on out-of-memory)."""
    cache: bool = True
    """Reuse and fill the on-disk embedding cache (`<nvf cache>/embed-cache`)."""
    workers: int = 4
    """Image decoding and preprocessing threads running ahead of the model."""


PRESETS: dict[str, Config] = {
    "paper": Config(),
    "tiny": Config(model_preset="tiny"),
    "fast": Config(precision="fp16"),
}


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class ClipEmbedder:
    """A loaded open_clip model: preprocessed image batches in, unit-norm embeddings out.

    `preprocess(PIL image) -> [3, S, S]` is open_clip's own transform for the model;
    `embed(pixels_b3ss) -> [B, D]` float32 on the CPU, each row L2-normalised.
    """

    def __init__(self, ref: models.ModelRef, device: torch.device, precision: batching.Precision = "fp32") -> None:
        self.ref = ref
        self.device = device
        self.model, self.preprocess, self.dim = models.load_clip_model(ref, device, precision)
        self.input_dtype = _input_dtype(self.model.visual)
        size = getattr(self.model.visual, "image_size", 224)
        self.image_hw: tuple[int, int] = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))

    @torch.inference_mode()
    def embed(self, pixels_b3ss: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings [B, D] float32 (CPU) of preprocessed images [B, 3, S, S]."""
        return self.embed_with_norm(pixels_b3ss)[:, :-1]

    @torch.inference_mode()
    def embed_with_norm(self, pixels_b3ss: torch.Tensor) -> torch.Tensor:
        """[unit embedding ‖ its L2 norm before normalising] [B, D + 1] float32 (CPU).

        unit * norm is the raw `encode_image` output (transformers' `image_embeds`), which is what
        Zero123's camera projection was trained on.
        """
        pixels = pixels_b3ss.to(self.device, self.input_dtype, non_blocking=True)
        features = self.model.encode_image(pixels).float()  # [B, D]
        norm = features.norm(dim=-1, keepdim=True)  # [B, 1]
        return torch.cat([features / norm.clamp_min(1e-12), norm], dim=-1).cpu()

    def bytes_per_item(self) -> int:
        """Peak extra memory one more image in a batch costs, in bytes.

        CUDA: measured with two probe passes (batch 1 and 2). CPU: an estimate from the vision
        tower's token count, width and heads (ViT), else 64 image-sized buffers.
        """
        height, width = self.image_hw
        io_bytes = 4 * 3 * height * width * 2
        if self.device.type == "cuda":
            peaks = [self._probe_peak(n) for n in (1, 2)]
            return int(max(peaks[1] - peaks[0], io_bytes) * 1.2)
        elem = torch.finfo(self.input_dtype).bits // 8
        visual = self.model.visual
        try:
            patch_h, patch_w = _pair(visual.patch_size)
            tokens = (height // patch_h) * (width // patch_w) + 1
            widths = int(visual.transformer.width)
            heads = int(visual.transformer.resblocks[0].attn.num_heads)
            activations = 3 * heads * tokens * tokens + 12 * tokens * widths
        except (AttributeError, IndexError, TypeError):  # not an open_clip ViT: be generous
            activations = 64 * 3 * height * width
        return int(1.5 * elem * activations + io_bytes)

    def _probe_peak(self, n: int) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self.embed(torch.zeros((n, 3, *self.image_hw), device=self.device))
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device) - base)


def _input_dtype(visual: torch.nn.Module) -> torch.dtype:
    """The dtype images must have: that of the tower's first convolution or linear layer. open_clip's
    fp16/bf16 casts those layers and keeps embeddings and norms in fp32, so the first parameter
    (class_embedding) would say fp32 and the patch convolution would refuse the batch."""
    for module in visual.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            return module.weight.dtype
    return next(p.dtype for p in visual.parameters() if p.is_floating_point())


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


_LOADED: dict[tuple, ClipEmbedder] = {}


def loaded_embedder(
    ref: models.ModelRef, fingerprint: str, device: torch.device, precision: batching.Precision
) -> ClipEmbedder:
    """A `ClipEmbedder`, kept loaded for the next run in this process (one model at a time), so
    chained runs (examples, notebooks, benchmarks) pay the load once."""
    key = (ref.id, ref.pretrained, fingerprint, str(device), precision)
    if key not in _LOADED:
        _LOADED.clear()  # free the previous model before loading another
        _LOADED[key] = ClipEmbedder(ref, device, precision)
    return _LOADED[key]


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


PATHS = {"cache_dir": "<nvf cache>/embed-cache"}
"""Named paths `Context.paths` may set: ``cache_dir``, the on-disk embedding cache folder."""


def run(ctx: Context, cfg: Config = Config()) -> list[Path]:
    """Embed every view of the selected captures of ``ctx.data``; write ``WORK/<capture>/embed.safetensors``.

    Returns the paths written (captures whose record is up to date are skipped unless ``ctx.overwrite``).
    ``ctx.paths["cache_dir"]`` defaults to ``<nvf cache>/embed-cache``; `cfg.cache = False` neither reads nor writes it.
    """
    if cfg.workers < 1:
        raise InputError(f"--workers must be at least 1, got {cfg.workers}")
    torch_device = batching.choose_device(ctx.device)
    precision = effective_precision(cfg.precision, torch_device)
    ref = models.resolve_model("clip", cfg.model_preset, cfg.model)
    data = require_data(ctx, STAGE)
    selected = contract.selected(ctx, STAGE, dataset.scan(data, cfg.layout).captures)
    if not selected:
        return []
    settings = {
        "stage": STAGE,
        "model": ref.id,
        "pretrained": ref.pretrained or "",
        "model_fingerprint": model_fingerprint(ref),
        "precision": precision,
        "rows": "unit embedding + norm",  # what the cache holds per image: [D + 1]
    }
    cache = view_batches.array_cache(ctx, STAGE, cfg.cache)
    max_batch = _CPU_MAX_BATCH if torch_device.type == "cpu" else _GPU_MAX_BATCH
    how = view_batches.Batching(cfg.batch_size, max_batch, cfg.workers, sized=False)
    plans = view_batches.plan(ctx, STAGE, "embed", selected, settings, how, cache)

    def load() -> Callable[[list[list[View]]], view_batches.Computed]:
        embedder = loaded_embedder(ref, settings["model_fingerprint"], torch_device, precision)
        return lambda batches: _embed_all(embedder, batches, cfg, torch_device)

    def write(plan: CapturePlan, rows: list[np.ndarray]) -> Path:
        rows_nd1 = np.stack(rows).astype(np.float32)  # [N, D + 1]: unit rows ‖ norms
        return _write_record(plan, rows_nd1, settings, cfg, data)

    return view_batches.drive(STAGE, plans, cache, load, write, ctx.progress)


def _embed_all(
    embedder: ClipEmbedder, batches: list[list[View]], cfg: Config, device: torch.device
) -> view_batches.Computed:
    """Yield (view, [unit vector ‖ norm] [D + 1] float32, whole) for every view of the planned batches."""
    from PIL import Image

    max_batch = _CPU_MAX_BATCH if device.type == "cpu" else _GPU_MAX_BATCH

    def fit(_view: View) -> int:  # auto batch size: what free memory holds
        return batching.auto_batch_size(device, embedder.bytes_per_item(), max_batch=max_batch)

    def load(path: Path) -> torch.Tensor:  # [3, S, S] float32: open_clip's transform of the decoded image
        return embedder.preprocess(Image.fromarray(io.read_image(path)))

    def forward(items: list[torch.Tensor], _out_hw: tuple[int, int]) -> torch.Tensor:
        pixels = torch.stack(items)  # [B, 3, S, S] float32
        if device.type == "cuda":
            pixels = pixels.pin_memory()
        return embedder.embed_with_norm(pixels)  # [B, D + 1]

    return view_batches.run_views(batches, load, forward, cfg.workers, fit if cfg.batch_size is None else None)


def _write_record(plan: CapturePlan, rows_nd1: np.ndarray, settings: dict[str, Any], cfg: Config,
                  data: Path) -> Path:  # fmt: skip
    capture = plan.capture
    embedding_nd, norm_n = rows_nd1[:, :-1], rows_nd1[:, -1]
    path = io.save_record(
        plan.out_path,
        {"embedding": np.ascontiguousarray(embedding_nd), "norm": np.ascontiguousarray(norm_n)},
        kind="embed",
        stage=STAGE,
        capture=capture.id,
        names=capture.names,
        config={**settings, **{k: v for k, v in asdict(cfg).items() if k not in ("cache", "workers")}},
        inputs_hash=plan.inputs_hash,
        extra={
            "model": settings["model"],
            "pretrained": settings["pretrained"],
            "model_fingerprint": settings["model_fingerprint"],
            "embed_dim": str(embedding_nd.shape[1]),
            "normalization": "l2",
            "subject": capture.subject,
            "camera_ids": json.dumps(capture.cameras),
            "data_root": os.path.abspath(data),
            "image_paths": json.dumps([image.path for image in capture.images]),
        },
    )
    log.info("embed: wrote %s", path)
    return path
