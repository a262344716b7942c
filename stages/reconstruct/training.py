"""nerfstudio for `nvf reconstruct`: the offline LPIPS weights, the trainer config (nvf's settings and
``--ns`` overrides) and in-process training."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.core.errors import InputError, ModelError, StageFailure

if TYPE_CHECKING:
    from stages.reconstruct import Config

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"


# ----------------------------------------------------------------------------------------------
# Offline checks
# ----------------------------------------------------------------------------------------------


def alexnet_weights_path() -> Path:
    """Where torchvision looks for AlexNet's weights: ``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def check_offline_assets() -> Path:
    """Raise ModelError unless the AlexNet weights LPIPS needs are cached (nvf never downloads them)."""
    path = alexnet_weights_path()
    if not path.is_file():
        raise ModelError(
            f"nerfstudio's LPIPS metric needs torchvision's AlexNet weights at {path} and nvf does not download "
            f"at run time: run `nvf fetch-models` where the network is reachable (or download {ALEXNET_URL} into "
            f"{path.parent}), or set TORCH_HOME to a torch cache that has hub/checkpoints/{ALEXNET_FILE}"
        )
    return path


# ----------------------------------------------------------------------------------------------
# nerfstudio configuration
# ----------------------------------------------------------------------------------------------


def build_trainer_config(cfg: Config, dataset_dir: Path, out: Path, device: str, depth_unit: float | None = None):
    """nerfstudio's TrainerConfig for ``cfg.method`` with nvf's settings, then ``cfg.ns`` overrides."""
    from nerfstudio.configs.method_configs import method_configs
    from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig

    config = copy.deepcopy(method_configs[cfg.method])
    config.output_dir = Path(out)
    config.experiment_name = ""
    config.timestamp = ""  # run folder: out/<method>
    config.method_name = cfg.method
    config.vis = "tensorboard"  # headless; the viewer would block after training
    config.viewer.quit_on_train_completion = True
    config.max_num_iterations = cfg.iterations
    config.steps_per_save = cfg.iterations
    config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = 0
    config.logging.profiler = "none"
    config.machine.seed = cfg.seed
    config.machine.device_type = device
    if device == "cpu":
        config.mixed_precision = False
    manager = config.pipeline.datamanager
    if type(manager).__name__ == "ParallelDataManagerConfig":  # in-process loading (see module doc)
        shared = {f.name: getattr(manager, f.name) for f in dataclasses.fields(VanillaDataManagerConfig)
                  if f.name != "_target"}  # fmt: skip
        manager = config.pipeline.datamanager = VanillaDataManagerConfig(**shared)
    manager.data = Path(dataset_dir)
    manager.dataparser.data = Path(dataset_dir)
    manager.dataparser.center_method = cfg.center
    if depth_unit is not None:
        manager.dataparser.depth_unit_scale_factor = depth_unit
    if cfg.rays_per_batch is not None and hasattr(manager, "train_num_rays_per_batch"):
        manager.train_num_rays_per_batch = cfg.rays_per_batch
        manager.eval_num_rays_per_batch = cfg.rays_per_batch
    if device == "cpu" and hasattr(config.pipeline.model, "eval_num_rays_per_chunk"):
        config.pipeline.model.eval_num_rays_per_chunk = 4096  # bounds RAM of full-image renders
    apply_overrides(config, _method_settings(cfg))
    apply_overrides(config, cfg.ns)
    return config


BOUNDED_SETTINGS = (("pipeline.model.disable_scene_contraction", "true"), ("pipeline.model.far_plane", "3.0"))
COMPACT_SETTINGS = (("pipeline.model.log2_hashmap_size", "15"), ("pipeline.model.max_res", "512"),
                    ("pipeline.model.num_proposal_samples_per_ray", "[64, 32]"),
                    ("pipeline.model.num_nerf_samples_per_ray", "32"))  # fmt: skip


def _method_settings(cfg: Config) -> tuple[tuple[str, str], ...]:
    """The nerfstudio settings `bounded` and `compact` stand for (NeRF methods only)."""
    if cfg.method == "splatfacto":
        return ()
    return (BOUNDED_SETTINGS if cfg.bounded else ()) + (COMPACT_SETTINGS if cfg.compact else ())


def parse_overrides(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``["a.b=1", ...]`` -> ``(("a.b", "1"), ...)``; InputError for an item without '='."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"bad --ns '{item}': use KEY=VALUE with a dotted nerfstudio config path, e.g. "
                             "pipeline.model.num_nerf_samples_per_ray=32")  # fmt: skip
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def apply_overrides(config: Any, pairs: Sequence[tuple[str, str]]) -> None:
    """Set dotted paths on a nerfstudio config (dataclass attributes and dict keys).

    The value is parsed after the current one's type (bool, int, float, str, Path, tuple; YAML
    when the current value is None). Unknown keys and unparsable values are InputErrors.
    """
    import difflib

    for key, text in pairs:
        parent: Any = config
        parts = key.split(".")
        for depth, part in enumerate(parts):
            fields = _child_names(parent)
            if part not in fields:
                where = ".".join(parts[:depth]) or "the trainer config"
                close = difflib.get_close_matches(part, fields, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; it has: {', '.join(sorted(fields))}"
                raise InputError(f"unknown --ns key '{key}': {where} has no '{part}'{hint}")
            if depth == len(parts) - 1:
                current = parent[part] if isinstance(parent, dict) else getattr(parent, part)
                value = _parse_value(key, current, text)
                if isinstance(parent, dict):
                    parent[part] = value
                else:
                    setattr(parent, part, value)
            else:
                parent = parent[part] if isinstance(parent, dict) else getattr(parent, part)


def _child_names(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [str(k) for k in obj]
    if dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj) if not f.name.startswith("_")]
    return []


def _parse_value(key: str, current: Any, text: str) -> Any:
    import yaml

    try:
        if isinstance(current, bool):
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes", "on")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, Path):
            return Path(text)
        if isinstance(current, str):
            return text
        if isinstance(current, (tuple, list)):
            parsed = yaml.safe_load(text if text.startswith("[") else f"[{text}]")
            return type(current)(parsed)
        if dataclasses.is_dataclass(current) or isinstance(current, dict):
            raise ValueError("a group of options")
        return yaml.safe_load(text)
    except (ValueError, TypeError, yaml.YAMLError) as exc:
        raise InputError(f"bad --ns value for '{key}': '{text}' ({exc}); the current value is {current!r}") from None


# ----------------------------------------------------------------------------------------------
# Training (in-process)
# ----------------------------------------------------------------------------------------------


def train(config: Any, log_path: Path, progress: Callable[[int, int], None] | None = None):
    """Run nerfstudio's Trainer in this process; returns (trainer, seconds per iteration).

    nerfstudio's console output goes to ``log_path`` (stdout stays for results). Training errors
    become StageFailure; the run folder must hold config.yml, a checkpoint and the dataparser
    transform afterwards (nerfstudio can finish "successfully" without them).
    """
    import random

    import torch
    from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation
    from nerfstudio.utils import writer

    stamps: list[float] = []
    total = config.max_num_iterations

    def on_step(step: int) -> None:
        stamps.append(time.perf_counter())
        if progress is not None:
            progress(step + 1, total)

    random.seed(config.machine.seed)
    np.random.seed(config.machine.seed)
    torch.manual_seed(config.machine.seed)
    writer.EVENT_WRITERS.clear()
    writer.EVENT_STORAGE.clear()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log_file, contextlib.redirect_stdout(log_file):
        try:
            config.save_config()
            trainer = config.setup(local_rank=0, world_size=1)
            trainer.setup()
            trainer.callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], on_step,
                                                      update_every_num_iters=1))  # fmt: skip
            trainer.train()
        except torch.cuda.OutOfMemoryError:
            raise StageFailure("nerfstudio ran out of GPU memory; lower --rays-per-batch (or use "
                               "--ns pipeline.model.eval_num_rays_per_chunk=4096)") from None  # fmt: skip
        except (KeyboardInterrupt, SystemExit) as exc:
            if isinstance(exc, SystemExit) and exc.code in (0, None):
                raise StageFailure(f"nerfstudio exited before training finished; see {log_path}") from None
            raise
        except Exception as exc:
            raise StageFailure(f"nerfstudio training failed: {type(exc).__name__}: {exc} (log: {log_path})") from exc
        finally:
            _close_writers(writer)
    base = config.get_base_dir()
    missing = [p for p in (base / "config.yml", base / "dataparser_transforms.json") if not p.is_file()]
    if not missing and not list((base / "nerfstudio_models").glob("step-*.ckpt")):
        missing.append(base / "nerfstudio_models" / "step-*.ckpt")
    if missing:
        raise StageFailure(f"nerfstudio finished without writing {missing[0]}; see {log_path}")
    per_iteration = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return trainer, per_iteration


def _close_writers(writer: Any) -> None:
    for event_writer in writer.EVENT_WRITERS:
        tb = getattr(event_writer, "tb_writer", None)
        if tb is not None:
            tb.close()
    writer.EVENT_WRITERS.clear()
    writer.EVENT_STORAGE.clear()


@contextlib.contextmanager
def without_lpips() -> Iterator[None]:
    """Models built inside get a stand-in for torchmetrics' LPIPS, so that building them loads no
    AlexNet weights; its score is NaN, and `evaluate_views(..., lpips=False)` drops it."""
    import torch
    from torchmetrics.image import lpip

    class NotComputed(torch.nn.Module):
        def forward(self, *_: Any, **__: Any) -> torch.Tensor:
            return torch.tensor(float("nan"))

    real = lpip.LearnedPerceptualImagePatchSimilarity
    lpip.LearnedPerceptualImagePatchSimilarity = lambda *_, **__: NotComputed()
    try:
        yield
    finally:
        lpip.LearnedPerceptualImagePatchSimilarity = real
