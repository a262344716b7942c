"""Checkpoints of a run, and loading a trained model back (what `nvf sample` uses).

A run folder RUN holds, written once at the start:

- ``model.json``: conditioning kind, resolution, CLIP model of the embeddings (id, weight tag, D),
  pose code layout, projection spec, base model, VAE fingerprint, latent scaling factor;
- ``vae/`` (the frozen VAE, diffusers `save_pretrained`) and ``scheduler/`` (the base's scheduler
  config): a run is self-contained, sampling never needs the base model again;
- ``config.json`` (the train Config) and ``logs/`` (TensorBoard events);

and every `checkpoint_every` steps (atomically: a temp folder renamed into place)
``checkpoints/step-00000100/`` with

- ``unet/`` (`save_pretrained`, safetensors), ``projection.safetensors`` (spec in the metadata),
  ``ema.safetensors`` when EMA is on (shadow of UNet + projection);
- ``trainer_state.safetensors``: optimizer moments as tensors, and in the metadata (JSON) the
  optimizer's param groups, the lr scheduler, the GradScaler, the sampler state, the step and the
  RNG states (python, numpy, torch CPU; CUDA states as tensors).

`--resume latest` picks the highest step under RUN/checkpoints.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.core import io
from stages.core.errors import InputError, RecordError
from stages.train.model import ConditioningProjection

log = logging.getLogger("nvf")

CHECKPOINTS = "checkpoints"
MODEL_JSON = "model.json"
STEP_PREFIX = "step-"


def checkpoint_dir(run: Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"{STEP_PREFIX}{step:08d}"


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    folder = Path(run) / CHECKPOINTS
    found = [p for p in folder.glob(f"{STEP_PREFIX}*") if p.is_dir() and (p / "trainer_state.safetensors").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def find_checkpoint(where: str | Path, run: Path | None = None) -> Path:
    """`latest` (of `run`), a run folder (its latest) or a checkpoint folder -> the checkpoint folder."""
    if str(where) == "latest":
        if run is None:
            raise InputError("--resume latest needs the run folder")
        where = run
    path = Path(where)
    if (path / "trainer_state.safetensors").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise InputError(
            f"{path}: no checkpoint found (expected {CHECKPOINTS}/{STEP_PREFIX}N/ with trainer_state."
            "safetensors); train first, or pass a checkpoint folder"
        )
    return found[-1]


def run_of(checkpoint: Path) -> Path:
    """The run folder of a checkpoint folder."""
    return Path(checkpoint).parent.parent


# --- saving -------------------------------------------------------------------------------------


def save_projection(path: Path, projection: ConditioningProjection) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in projection.state_dict().items()}
    save_file(state, str(path), metadata={"spec": json.dumps(projection.spec)})


def load_projection(path: Path) -> ConditioningProjection:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as handle:
        spec = json.loads(handle.metadata()["spec"])
    projection = ConditioningProjection(
        spec["kind"], spec["in_features"], spec["width"], spec["clip_dim"], spec["pose_dim"]
    )
    projection.load_state_dict(load_file(str(path)))
    return projection


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON) capturing the python, numpy, torch and CUDA generators."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy_keys": torch.from_numpy(np.asarray(keys, np.int64))}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    meta = {"python": random.getstate(), "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    run: Path,
    step: int,
    *,
    unet: Any,
    projection: ConditioningProjection,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    sampler_state: dict[str, int],
    scaler: torch.amp.GradScaler | None,
    ema: Any | None,
    keep: int = 0,
) -> Path:
    """Write checkpoints/step-N/ atomically; keep only the newest `keep` (0: all). Returns the folder."""
    from safetensors.torch import save_file

    final = checkpoint_dir(run, step)
    with io.atomic_dir(final) as tmp:  # a re-save swaps the folders: the old one stays until the new is whole
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        save_projection(tmp / "projection.safetensors", projection)
        if ema is not None:
            save_file({k: v.cpu().contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
        state = optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, Any] = {}
        for index, slots in state["state"].items():
            for key, value in slots.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{index}.{key}"] = value
        rng_tensors, rng_meta = rng_state()
        tensors.update(rng_tensors)
        meta = {
            "step": str(step),
            "param_groups": json.dumps(state["param_groups"]),
            "optimizer_scalars": json.dumps(scalars),
            "lr_scheduler": json.dumps(lr_scheduler.state_dict()),
            "scaler": json.dumps(scaler.state_dict() if scaler is not None else {}),
            "sampler": json.dumps(sampler_state),
            "rng": json.dumps(rng_meta),
        }
        save_file(tensors, str(tmp / "trainer_state.safetensors"), metadata=meta)
    if keep > 0:
        for old in list_checkpoints(run)[:-keep]:
            io.remove_owned_dir(old)
    return final


# --- resuming -----------------------------------------------------------------------------------


def load_training_state(
    checkpoint: Path,
    *,
    unet: nn.Module,
    projection: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    ema: Any | None,
    restore_rng: bool = True,
) -> tuple[int, dict[str, int]]:
    """Load weights, optimizer, lr scheduler, scaler, EMA and RNG states in place; returns (step, sampler state)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = checkpoint / "unet" / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise RecordError(f"{checkpoint}: unet weights missing; the checkpoint is incomplete, resume from another")
    unet.load_state_dict(load_file(str(weights)))
    projection.load_state_dict(load_file(str(checkpoint / "projection.safetensors")))
    path = checkpoint / "trainer_state.safetensors"
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(path))
    groups = json.loads(meta["param_groups"])
    scalars = json.loads(meta["optimizer_scalars"])
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in scalars.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    lr_scheduler.load_state_dict(json.loads(meta["lr_scheduler"]))
    scaler_state = json.loads(meta["scaler"])
    if scaler is not None and scaler_state:
        scaler.load_state_dict(scaler_state)
    if ema is not None:
        ema_path = checkpoint / "ema.safetensors"
        if not ema_path.is_file():
            raise InputError(f"{checkpoint} has no EMA weights: resume without --ema, or start a new run")
        ema.load_state_dict(load_file(str(ema_path)))
    if restore_rng:
        set_rng_state(tensors, json.loads(meta["rng"]))
    return int(meta["step"]), json.loads(meta["sampler"])


# --- the trained model --------------------------------------------------------------------------


@dataclass
class TrainedModel:
    """A trained view-conditioned model, ready for sampling (eval mode, on `device`).

    - `unet`: [B, 8, h, w] = [x_t ‖ source latent (VAE mode, unscaled)] + t + context -> ε [B, 4, h, w];
    - `vae`: frozen; pixels [-1, 1] from `stages.train.data.preprocess_image` (centre crop, resize to
      `resolution`); latents of the diffusion are `mean * scaling_factor`;
    - `projection`: z_cond [B, D] -> context [B, 1, C]; z_cond = [CLIP(source) ‖ pose] with CLIP of
      `clip_model` (`clip_dim` numbers; unit rows for `paper`, raw `encode_image` output for
      `zero123`: model.json's ``normalization``), pose = 12-D [R_rel | T_rel] code (`conditioning`
      paper) or [4-number Zero123 T ‖ 12-D code] (zero123);
    - unconditional branch for CFG (Eq. 9): CLIP part of z_cond zeroed and source latent zeroed,
      pose kept (`null_z_cond`), as trained;
    - `scheduler_config`: the base's (DDIM-compatible) noise schedule; build a sampler with
      `DDIMScheduler.from_config(scheduler_config)`.
    """

    unet: Any
    vae: Any
    projection: ConditioningProjection
    scheduler_config: dict[str, Any]
    conditioning: str
    resolution: int
    clip_model: dict[str, Any]
    clip_dim: int
    pose_dim: int
    scaling_factor: float
    step: int
    checkpoint: Path

    def null_z_cond(self, z_cond_bd: torch.Tensor) -> torch.Tensor:
        """z_cond with its CLIP part zeroed (the CFG-dropped condition)."""
        return io.without_clip(z_cond_bd, self.clip_dim)


def load_checkpoint(
    run_or_checkpoint: str | Path,
    device: torch.device | str = "cpu",
    *,
    use_ema: bool = False,
    dtype: torch.dtype = torch.float32,
) -> TrainedModel:
    """Load a run's latest checkpoint (or a given checkpoint folder) for sampling.

    `use_ema` takes the EMA weights (RecordError if the run kept none). Everything comes from the
    run folder: no base model or hub access is needed.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file

    checkpoint = find_checkpoint(run_or_checkpoint)
    run = run_of(checkpoint)
    if not (run / MODEL_JSON).is_file():
        raise RecordError(f"{run}: {MODEL_JSON} missing; not an nvf train run folder")
    info = io.read_json(run / MODEL_JSON)
    if not isinstance(info, dict):
        raise RecordError(f"{run / MODEL_JSON}: not an nvf model description (a JSON object); retrain or restore it")
    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet", torch_dtype=dtype)
    projection = load_projection(checkpoint / "projection.safetensors")
    if use_ema:
        ema_path = checkpoint / "ema.safetensors"
        if not ema_path.is_file():
            raise RecordError(f"{checkpoint}: no EMA weights (the run was trained without --ema)")
        shadow = load_file(str(ema_path))
        unet.load_state_dict({k[len("unet.") :]: v for k, v in shadow.items() if k.startswith("unet.")})
        projection.load_state_dict(
            {k[len("projection.") :]: v for k, v in shadow.items() if k.startswith("projection.")}
        )
    vae = AutoencoderKL.from_pretrained(run / "vae", torch_dtype=dtype)
    step = int(checkpoint.name[len(STEP_PREFIX) :]) if checkpoint.name.startswith(STEP_PREFIX) else -1
    return TrainedModel(
        unet=unet.to(device).eval(),
        vae=vae.to(device).eval(),
        projection=projection.to(device, dtype).eval(),
        scheduler_config=info["scheduler_config"],
        conditioning=info["conditioning"],
        resolution=info["resolution"],
        clip_model=info["clip_model"],
        clip_dim=info["clip_dim"],
        pose_dim=info["pose_dim"],
        scaling_factor=info["scaling_factor"],
        step=step,
        checkpoint=checkpoint,
    )
