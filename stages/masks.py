"""Stage `masks`: batched head masks (head, hair, background) for every view of every capture.

Any transformers semantic segmentation model (`AutoModelForSemanticSegmentation` + its image
processor) runs over a dataset's images in batches of equal-size images, as `stages.depth` does:
images decoded by worker threads ahead of the model, the model's own processor on a uint8 batch
tensor, the logits resampled bilinearly to the image size *before* the argmax over labels, each
label mapped to a class by name (`stages.core.masks.label_classes`: face parts and ears -> head,
hair and hat -> hair, neck, clothes and the rest -> background).

The batching, cache, shard and resume contract is depth's: a capture's batches are its own views
only (`batching.capture_batches`: `--batch-size` views, or with the auto batch size the whole
capture up to 32 views on a CPU, 256 on a GPU), so its record is the same bits in any run or
shard; a batch that memory splits (auto batch size, out-of-memory halving) gives maps equal up to
float ties and is not cached. Maps are cached on disk (``<nvf cache>/masks-cache``) keyed by the
image bytes, the model, the label mapping and the batch the map was computed in. A capture whose
record carries the same input hash (image bytes + settings) is skipped unless `overwrite`.

Output per capture: ``WORK/<capture>/masks.safetensors`` (kind ``masks``, format in
`stages.core.masks`): ``classes`` [V, H, W] uint8 (0 background, 1 head, 2 hair) at image
resolution and ``image_hw`` [V, 2]. `nvf align`, `nvf cloud`, `nvf reconstruct` and `nvf evaluate`
use the head mask (head ∪ hair) when the record is there.

Models: `paper` preset `jonathandinu/face-parsing` (SegFormer-B5 trained on CelebAMask-HQ, 19
labels); `tiny` a random 2-stage SegFormer with the same label set (tests only). A local folder or
another hub id works through `--model` when its labels name face parts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.core import batching, contract, dataset, io, models, view_batches
from stages.core import masks as headmasks
from stages.core.batching import effective_precision
from stages.core.contract import Context, require_data
from stages.core.models import model_fingerprint
from stages.core.view_batches import CapturePlan, ImagePredictor, View

log = logging.getLogger("nvf")

STAGE = "masks"
_CPU_MAX_BATCH = 32
_GPU_MAX_BATCH = 256
_MEMORY_CACHE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Config:
    """How head masks are predicted."""

    model_preset: str = "paper"
    """Which models (`stages.core.models.PRESETS`): `paper` (jonathandinu/face-parsing) or `tiny`
    (random weights, tests). Not the stage preset: `--preset` names one of `PRESETS` below."""
    model: str | None = None
    """A hub id or local folder of a face-parsing segmentation model instead of the preset's."""
    layout: dataset.Layout = "auto"
    """Dataset layout: `auto`, `multipie` or `folder` (as `nvf scan`)."""
    precision: batching.Precision = "fp32"
    """Weights and activations: fp32, fp16 (CUDA only; CPU falls back to fp32) or bf16."""
    batch_size: int | None = None
    """Images per forward pass, cut per capture; None: the whole capture (up to 32 on a CPU, 256 on a
    GPU), split only where free memory cannot hold it (halved on out-of-memory)."""
    cache: bool = True
    """Reuse and fill the on-disk masks cache (`<nvf cache>/masks-cache`)."""
    workers: int = 4
    """Image-decoding threads running ahead of the model."""


PRESETS: dict[str, Config] = {
    "paper": Config(),
    "tiny": Config(model_preset="tiny"),
    "fast": Config(precision="fp16"),
}


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class MaskPredictor(ImagePredictor):
    """A loaded segmentation model: uint8 image batches in, class maps (`headmasks.CLASSES`) out.

    `predict(images_b3hw, out_hw)`: images [B, 3, H, W] uint8 -> [B, h, w] uint8 on the model's device.
    """

    def __init__(self, ref: models.ModelRef, device: torch.device, precision: batching.Precision = "fp32") -> None:
        self.ref, self.device = ref, device
        self.dtype = batching.torch_dtype(precision)
        self.model, self.processor = models.load_segmentation_model(ref, device, self.dtype)
        self.table_l = headmasks.label_classes(self.model.config.id2label)
        self._table = torch.from_numpy(self.table_l).to(device)

    @torch.inference_mode()
    def predict(self, images_b3hw: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        """Class maps [B, h, w] uint8 for uint8 images [B, 3, H, W], at `out_hw` = (h, w)."""
        pixels = self.processor(images=images_b3hw, return_tensors="pt")["pixel_values"]  # [B, 3, h', w']
        logits = self.model(pixel_values=pixels.to(self.device, self.dtype)).logits  # [B, L, h'/4, w'/4]
        return headmasks.classes_from_logits(logits, self._table, out_hw)

    def bytes_per_item(self, image_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
        """Peak extra memory one more image in a batch costs, in bytes: measured with two probe
        passes on CUDA, estimated from the encoder's feature maps on a CPU."""
        in_h, in_w = self.input_hw(image_hw)
        io_bytes = 4 * (3 * image_hw[0] * image_hw[1] + 3 * in_h * in_w) + out_hw[0] * out_hw[1]
        if self.device.type == "cuda":
            return self.measured_bytes_per_item(image_hw, out_hw, io_bytes)
        config = self.model.config
        elem = torch.finfo(self.dtype).bits // 8
        features, stride = 0, 1
        for hidden, step, ratio, heads in zip(config.hidden_sizes, config.strides, config.sr_ratios,
                                              config.num_attention_heads, strict=False):  # fmt: skip
            stride *= step
            tokens = (in_h // stride) * (in_w // stride)
            features += 12 * tokens * hidden + 2 * heads * tokens * max(1, tokens // (ratio * ratio))
        decoder = 6 * config.decoder_hidden_size * (in_h // 4) * (in_w // 4)
        return int(1.5 * elem * (features + decoder) + io_bytes)


_LOADED: dict[tuple, MaskPredictor] = {}


def loaded_predictor(ref: models.ModelRef, fingerprint: str, device: torch.device, precision: str) -> MaskPredictor:
    """A `MaskPredictor`, kept loaded for the next run in this process (one model at a time)."""
    key = (ref.id, fingerprint, str(device), precision)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = MaskPredictor(ref, device, precision)  # type: ignore[arg-type]
    return _LOADED[key]


def model_labels(ref: models.ModelRef) -> dict[int, str]:
    """The model's ``id2label``, read from its config alone (no weights)."""
    from transformers import AutoConfig

    folder = Path(ref.id).expanduser()
    source = str(folder) if folder.is_dir() else ref.id
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=models.hub_offline())
    except (OSError, ValueError) as err:
        raise models._load_failed(ref, err) from err
    return {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


PATHS = {"cache_dir": "<nvf cache>/masks-cache"}
"""Named paths `Context.paths` may set: ``cache_dir``, the on-disk masks cache folder."""


def run(ctx: Context, cfg: Config = Config()) -> list[Path]:
    """Predict head masks for every view of the selected captures of ``ctx.data``; write them into ``ctx.work``.

    Writes ``WORK/<capture>/masks.safetensors`` per capture and returns those paths (captures whose
    record is up to date are skipped unless ``ctx.overwrite``).
    """
    torch_device = batching.choose_device(ctx.device)
    precision = effective_precision(cfg.precision, torch_device)
    selected = contract.selected(ctx, STAGE, dataset.scan(require_data(ctx, STAGE), cfg.layout).captures)
    if not selected:
        return []
    ref = models.resolve_model("masks", cfg.model_preset, cfg.model)
    labels = model_labels(ref)
    table_l = headmasks.label_classes(labels)  # a model without face labels fails here, before any work
    settings = {
        "stage": STAGE,
        "model": ref.id,
        "model_fingerprint": model_fingerprint(ref),
        "precision": precision,
        "label_classes": table_l.tolist(),
    }
    meta = {
        "model": ref.id,
        "model_fingerprint": settings["model_fingerprint"],
        "precision": precision,
        "classes": json.dumps(headmasks.CLASSES),
        "label_classes": headmasks.label_map_json(labels, table_l),
    }
    cache = view_batches.array_cache(ctx, STAGE, cfg.cache, _MEMORY_CACHE_BYTES)
    max_batch = _CPU_MAX_BATCH if torch_device.type == "cpu" else _GPU_MAX_BATCH
    how = view_batches.Batching(cfg.batch_size, max_batch, cfg.workers)
    plans = view_batches.plan(ctx, STAGE, headmasks.KIND, selected, settings, how, cache)

    def load() -> Callable[[list[list[View]]], view_batches.Computed]:
        predictor = loaded_predictor(ref, settings["model_fingerprint"], torch_device, precision)
        return lambda batches: _predict_all(predictor, batches, cfg, torch_device, max_batch)

    def write(plan: CapturePlan, maps: list[np.ndarray]) -> Path:
        return _write_record(plan, maps, settings, cfg, meta)

    return view_batches.drive(STAGE, plans, cache, load, write, ctx.progress)


def _predict_all(
    predictor: MaskPredictor, batches: list[list[View]], cfg: Config, device: torch.device, max_batch: int
) -> view_batches.Computed:
    """Yield (view, classes [h, w] uint8, whole) for every view of the planned batches."""

    def fit(view: View) -> int:  # the auto batch size: what free memory holds
        if cfg.batch_size is not None:
            return max_batch
        per_item = predictor.bytes_per_item(view.image_hw, view.out_hw)
        return batching.auto_batch_size(device, per_item, max_batch=max_batch)

    def forward(images: list[np.ndarray], out_hw: tuple[int, int]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # [B, 3, H, W] uint8
        return predictor.predict(batch, out_hw).cpu()  # [B, h, w] uint8

    return view_batches.run_views(batches, io.read_image, forward, cfg.workers, fit)


def _write_record(
    plan: CapturePlan, maps: list[np.ndarray], settings: dict[str, Any], cfg: Config, meta: dict[str, str]
) -> Path:
    classes_vhw = np.stack(maps).astype(np.uint8)  # [V, H, W]
    image_hw = np.asarray([v.image_hw for v in plan.views], dtype=np.int32)  # [V, 2]
    config = {**settings, "model_preset": cfg.model_preset, "batch_size": cfg.batch_size, "layout": cfg.layout}
    path = io.save_record(
        plan.out_path,
        {"classes": classes_vhw, "image_hw": image_hw},
        kind=headmasks.KIND,
        stage=STAGE,
        capture=plan.capture.id,
        names=plan.capture.names,
        config=config,
        inputs_hash=plan.inputs_hash,
        extra={**meta, "subject": plan.capture.subject, "source": "prediction"},
    )
    head = float(headmasks.head_mask(classes_vhw).mean())
    log.info("masks: wrote %s (head mask covers %.1f%% of the pixels)", path, 100 * head)
    return path
