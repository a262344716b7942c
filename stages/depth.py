"""Stage `depth`: batched monocular depth for every view of every capture (paper §IV-5, Eq. 3-4).

Any transformers depth model (`AutoModelForDepthEstimation` + its image processor) runs over the
images of a dataset in batches of equal-size images; images are decoded by worker threads while the
model runs on the previous batch; preprocessing (the model's own processor on a uint8 batch tensor),
the forward pass and the resampling of the prediction to the image size (or to `max_res`) are
batched on the device.

What a record depends on: a capture's batches are its own views only, cut by
`batching.capture_batches` from the capture and the config alone (`--batch-size` views, or with
the auto batch size the whole capture up to 32 views on a CPU, 256 on a GPU). So a capture's record
is the same bits in a single run, in any shard, and whatever else the run holds, even on CPUs whose
kernels give other last bits for another batch make-up. A different `--batch-size`, or a batch that
free memory or an out-of-memory error splits (a warning says so), gives maps equal to float
tolerance, not bit for bit.

Results are cached on disk, keyed by the image bytes + the model + the settings + the batch the
map was computed in (the other images' bytes and its place there), so a rerun or a capture shared
by two work trees costs nothing and a cached map is always the bits a fresh run would give; maps of
a split batch are not cached. An in-memory LRU serves repeated access within a run.

Output per capture: ``WORK/<capture>/depth.safetensors`` (kind ``depth``) with
``depth`` [N, H, W] (float32 or float16) and ``image_hw`` [N, 2] (each view's image size, so a map
stored at `max_res` maps back to pixels: u_map = u_image * W / image_w). Metadata ``depth_kind``
says what the values are: ``disparity`` (relative inverse depth: DPT, Depth Anything V2 relative;
larger = nearer, unknown scale and shift) or ``depth`` (metric z-depth). ``nvf align`` turns either
into z-depth in the poses' units.

Models: the paper's `Intel/dpt-large` (Apache-2.0); `depth-anything/Depth-Anything-V2-Small-hf`
(`--model depth-anything-v2-small`, Apache-2.0) is faster; its Base and Large checkpoints are
CC-BY-NC-4.0 (non-commercial use only). A local folder with a saved model works the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from stages.core import batching, contract, dataset, io, models, view_batches
from stages.core.batching import effective_precision
from stages.core.contract import Context, require_data
from stages.core.errors import InputError
from stages.core.models import model_fingerprint
from stages.core.view_batches import CapturePlan, ImagePredictor, View

log = logging.getLogger("nvf")

STAGE = "depth"
Interpolation = Literal["bilinear", "bicubic"]
DepthKind = Literal["auto", "disparity", "depth"]
StoreDtype = Literal["float32", "float16"]

_RELATIVE_MODEL_TYPES = {"dpt"}  # relative inverse depth; depth_anything depends on its config
_CPU_MAX_BATCH = 32  # beyond this a CPU gains nothing from bigger batches, only memory use
_GPU_MAX_BATCH = 256


@dataclass(frozen=True)
class Config:
    """How depth maps are predicted and stored."""

    model_preset: str = "paper"
    """Which models (`stages.core.models.PRESETS`): `paper` (Intel/dpt-large) or `tiny` (random weights, tests).
    Not the stage preset: `--preset` names one of `PRESETS` below, a whole Config."""
    model: str | None = None
    """A hub id, local folder or alternative name (`depth-anything-v2-small`) instead of the preset's."""
    layout: dataset.Layout = "auto"
    """Dataset layout: `auto`, `multipie` or `folder` (as `nvf scan`)."""
    precision: batching.Precision = "fp32"
    """Weights and activations: fp32, fp16 (CUDA only; CPU falls back to fp32) or bf16."""
    batch_size: int | None = None
    """Images per forward pass, cut per capture; None: the whole capture (up to 32 on a CPU, 256 on a
    GPU), split only where free memory cannot hold it (halved on out-of-memory)."""
    max_res: int | None = None
    """Store maps with their longer side at most this many pixels; None keeps the image size."""
    interpolation: Interpolation = "bicubic"
    """How the prediction is resampled to the stored size."""
    store_dtype: StoreDtype = "float32"
    """Stored value type: float32, or float16 for half the disk space."""
    depth_kind: DepthKind = "auto"
    """What the model predicts: `auto` (from its config), `disparity` or `depth`."""
    cache: bool = True
    """Reuse and fill the on-disk depth cache (`<nvf cache>/depth-cache`)."""
    workers: int = 4
    """Image-decoding threads running ahead of the model."""


PRESETS: dict[str, Config] = {
    "paper": Config(),
    "tiny": Config(model_preset="tiny"),
    "fast": Config(model="depth-anything-v2-small", precision="fp16", store_dtype="float16"),
}

_OUTPUT_FIELDS = ("max_res", "interpolation", "store_dtype")  # config fields that change the maps


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


def infer_depth_kind(config: Any) -> io.DepthKind:
    """`disparity` for relative models (DPT, Depth Anything relative), `depth` for metric ones."""
    model_type = getattr(config, "model_type", "")
    if model_type in _RELATIVE_MODEL_TYPES:
        return "disparity"
    if model_type == "depth_anything":
        return "depth" if getattr(config, "depth_estimation_type", "relative") == "metric" else "disparity"
    return "depth"  # ZoeDepth, Depth Pro, GLPN, ... predict metric depth


class DepthPredictor(ImagePredictor):
    """A loaded depth model: uint8 image batches in, depth maps at a requested size out.

    `predict(images_b3hw, out_hw)`: images [B, 3, H, W] uint8 (any device) -> [B, h, w] float32 on
    the model's device, resampled to `out_hw` with `interpolation`.
    """

    def __init__(
        self,
        ref: models.ModelRef,
        device: torch.device,
        precision: batching.Precision = "fp32",
        depth_kind: DepthKind = "auto",
        interpolation: Interpolation = "bicubic",
    ) -> None:
        self.ref = ref
        self.device = device
        self.dtype = batching.torch_dtype(precision)
        self.model, self.processor = models.load_depth_model(ref, device, self.dtype)
        self.depth_kind = infer_depth_kind(self.model.config) if depth_kind == "auto" else depth_kind
        self.interpolation = interpolation
        # DPT-family processors (DPT, Depth Anything) resize predictions plainly: do it batched
        self._plain_post = type(self.processor).__name__.startswith("DPTImageProcessor")

    @torch.inference_mode()
    def predict(self, images_b3hw: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        """Depth [B, h, w] float32 for uint8 images [B, 3, H, W], resampled to `out_hw` = (h, w)."""
        images_b3hw = images_b3hw.to(self.device, non_blocking=True)
        pixels = self.processor(images=images_b3hw, return_tensors="pt")["pixel_values"]  # [B, 3, h', w']
        outputs = self.model(pixel_values=pixels.to(self.device, self.dtype))
        if not self._plain_post:  # e.g. ZoeDepth removes its padding: the processor knows how
            sizes = [tuple(images_b3hw.shape[-2:])] * len(images_b3hw)
            maps = self.processor.post_process_depth_estimation(outputs, sizes)
            predicted = torch.stack([m["predicted_depth"] for m in maps])
        else:
            predicted = outputs.predicted_depth  # [B, h', w']
        predicted = predicted.float().unsqueeze(1)  # [B, 1, h', w']
        if tuple(predicted.shape[-2:]) != tuple(out_hw):
            predicted = torch.nn.functional.interpolate(
                predicted, size=out_hw, mode=self.interpolation, align_corners=False
            )
        return predicted[:, 0]

    def bytes_per_item(self, image_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
        """Peak extra memory one more image in a batch costs, in bytes.

        CUDA: measured with two probe passes (batch 1 and 2) at this input size. CPU: an estimate
        from the model input size and, for ViT-based models, attention and decoder sizes.
        """
        in_h, in_w = self.input_hw(image_hw)
        io_bytes = 4 * (3 * image_hw[0] * image_hw[1] + in_h * in_w * 3 + 2 * out_hw[0] * out_hw[1])
        if self.device.type == "cuda":
            return self.measured_bytes_per_item(image_hw, out_hw, io_bytes)
        return int(_estimate_activation_bytes(self.model.config, in_h, in_w, self.dtype) + io_bytes)


def int32_batch_limit(config: Any, input_hw: tuple[int, int]) -> int:
    """Largest batch whose widest decoder map [B, C, h, w] (C = the neck width `fusion_hidden_size`,
    at the model input's h, w) holds under 2**31 elements. CUDA kernels that index with int32 refuse
    more whatever the free memory (`upsample_bilinear2d_nhwc` did, for DPT-Large at batch 128)."""
    channels = int(getattr(config, "fusion_hidden_size", 256) or 256)
    return max(1, (2**31 - 1) // (channels * input_hw[0] * input_hw[1]))


_LOADED: dict[tuple, DepthPredictor] = {}


def loaded_predictor(
    ref: models.ModelRef, fingerprint: str, device: torch.device, precision: batching.Precision, cfg: Config
) -> DepthPredictor:
    """A `DepthPredictor`, kept loaded for the next run in this process (one model at a time), so
    chained runs (examples, notebooks, benchmarks) pay the load once."""
    key = (ref.id, fingerprint, str(device), precision, cfg.depth_kind, cfg.interpolation)
    if key not in _LOADED:
        _LOADED.clear()  # free the previous model before loading another
        _LOADED[key] = DepthPredictor(ref, device, precision, cfg.depth_kind, cfg.interpolation)
    return _LOADED[key]


def _estimate_activation_bytes(config: Any, in_h: int, in_w: int, dtype: torch.dtype) -> float:
    """Rough peak activation bytes of one image through a ViT + DPT-style decoder (x1.5 margin)."""
    elem = torch.finfo(dtype).bits // 8
    backbone = getattr(config, "backbone_config", None) or config
    patch = int(getattr(backbone, "patch_size", 16) or 16)
    hidden = int(getattr(backbone, "hidden_size", 768) or 768)
    heads = int(getattr(backbone, "num_attention_heads", 12) or 12)
    fusion = int(getattr(config, "fusion_hidden_size", 256) or 256)
    tokens = (in_h // patch) * (in_w // patch) + 1
    attention = 3 * heads * tokens * tokens  # scores, softmax, context
    token_buffers = 12 * tokens * hidden  # qkv, 4x MLP, residuals
    decoder = 6 * fusion * (in_h // 2) * (in_w // 2) + 3 * (fusion // 2) * in_h * in_w
    return 1.5 * elem * (attention + token_buffers + decoder)


_MEMORY_CACHE_BYTES = 512 * 2**20  # in-memory LRU of depth maps for repeated access within a run


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def stored_hw(image_hw: tuple[int, int], max_res: int | None) -> tuple[int, int]:
    """(h, w) a map is stored at: the image size, shrunk so its longer side is at most `max_res`."""
    h, w = image_hw
    if max_res is None or max(h, w) <= max_res:
        return h, w
    scale = max_res / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


PATHS = {"cache_dir": "<nvf cache>/depth-cache"}
"""Named paths `Context.paths` may set: ``cache_dir``, the on-disk depth cache folder."""


def run(ctx: Context, cfg: Config = Config()) -> list[Path]:
    """Predict depth for every view of the selected captures of ``ctx.data``; write them into ``ctx.work``.

    Writes ``WORK/<capture>/depth.safetensors`` per capture and returns those paths (captures whose
    record is up to date are skipped unless ``ctx.overwrite``). ``ctx.paths["cache_dir"]`` defaults to
    ``<nvf cache>/depth-cache``; `cfg.cache = False` neither reads nor writes it.
    """
    if cfg.max_res is not None and cfg.max_res < 1:
        raise InputError(f"--max-res must be a positive number of pixels, got {cfg.max_res}")
    torch_device = batching.choose_device(ctx.device)
    precision = effective_precision(cfg.precision, torch_device)
    ref = models.resolve_model("depth", cfg.model_preset, cfg.model)
    selected = contract.selected(ctx, STAGE, dataset.scan(require_data(ctx, STAGE), cfg.layout).captures)
    if not selected:
        return []
    cache = view_batches.array_cache(ctx, STAGE, cfg.cache, _MEMORY_CACHE_BYTES)
    settings = {
        "stage": STAGE,
        "model": ref.id,
        "model_fingerprint": model_fingerprint(ref),
        "precision": precision,
        "depth_kind": cfg.depth_kind,
        **{name: getattr(cfg, name) for name in _OUTPUT_FIELDS},
    }
    max_batch = _CPU_MAX_BATCH if torch_device.type == "cpu" else _GPU_MAX_BATCH
    how = view_batches.Batching(cfg.batch_size, max_batch, cfg.workers, stored_hw=lambda hw: stored_hw(hw, cfg.max_res))
    plans = view_batches.plan(ctx, STAGE, "depth", selected, settings, how, cache)
    meta = {"model": ref.id, "precision": precision}

    def load() -> Callable[[list[list[View]]], view_batches.Computed]:
        predictor = loaded_predictor(ref, settings["model_fingerprint"], torch_device, precision, cfg)
        meta["depth_kind"] = predictor.depth_kind
        return lambda batches: _predict_all(predictor, batches, cfg, torch_device)

    def write(plan: CapturePlan, maps: list[np.ndarray]) -> Path:
        if "depth_kind" not in meta:  # nothing ran: what the model predicts, from its config alone
            meta["depth_kind"] = _config_depth_kind(ref, cfg)
        return _write_record(plan, maps, settings, cfg, meta)

    return view_batches.drive(STAGE, plans, cache, load, write, ctx.progress)


def _config_depth_kind(ref: models.ModelRef, cfg: Config) -> str:
    """What the model predicts, read from its config alone (no weights) when nothing needs running."""
    if cfg.depth_kind != "auto":
        return cfg.depth_kind
    from transformers import AutoConfig

    folder = Path(ref.id).expanduser()
    source = str(folder) if folder.is_dir() else ref.id
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=models.hub_offline())
    except (OSError, ValueError) as err:
        raise models._load_failed(ref, err) from err
    return infer_depth_kind(config)


def _predict_all(
    predictor: DepthPredictor, batches: list[list[View]], cfg: Config, device: torch.device
) -> view_batches.Computed:
    """Yield (view, depth [h, w] numpy in the stored dtype, whole) for every view of the planned
    batches, each batch run whole unless memory forbids (`batching.run_planned_batches`; `whole`
    is False for the views of a split batch).

    Decoding runs ahead in threads. With the auto batch size, free memory caps a batch (the fit is
    estimated once per image size); an out-of-memory halving carries over to later batches.
    """
    store_dtype = torch.float16 if cfg.store_dtype == "float16" else torch.float32
    max_batch = _CPU_MAX_BATCH if device.type == "cpu" else _GPU_MAX_BATCH

    def fit(view: View) -> int:  # what int32 indexing and (auto batch size) free memory hold
        cap = min(max_batch, int32_batch_limit(predictor.model.config, predictor.input_hw(view.image_hw)))
        if cfg.batch_size is None:
            per_item = predictor.bytes_per_item(view.image_hw, view.out_hw)
            cap = batching.auto_batch_size(device, per_item, max_batch=cap)
        return cap

    def forward(images: list[np.ndarray], out_hw: tuple[int, int]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # [B, 3, H, W] uint8
        if device.type == "cuda":
            batch = batch.pin_memory()
        depth = predictor.predict(batch, out_hw)  # [B, h, w] float32 on the device
        return depth.to(store_dtype).cpu()

    return view_batches.run_views(batches, io.read_image, forward, cfg.workers, fit)


def _write_record(
    plan: CapturePlan, maps: list[np.ndarray], settings: dict[str, Any], cfg: Config, meta: dict[str, str]
) -> Path:
    depth_nhw = np.stack(maps)  # [N, h, w]
    image_hw = np.asarray([v.image_hw for v in plan.views], dtype=np.int32)  # [N, 2]
    path = io.save_record(
        plan.out_path,
        {"depth": depth_nhw, "image_hw": image_hw},
        kind="depth",
        stage=STAGE,
        capture=plan.capture.id,
        names=plan.capture.names,
        config={**settings, **{k: v for k, v in asdict(cfg).items() if k not in ("cache", "workers")}},
        inputs_hash=plan.inputs_hash,
        extra={**meta, "subject": plan.capture.subject, "source": "prediction"},
    )
    log.info("depth: wrote %s", path)
    return path
