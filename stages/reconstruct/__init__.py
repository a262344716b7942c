"""Stage `reconstruct`: hand a posed view set to nerfstudio and bring back geometry and scores.

Input is one of
    - a capture folder of the work tree, ``WORK/<capture>/`` with ``poses.safetensors`` (images from
      ``data``, the dataset folder `nvf poses` read, else from the capture's exported
      ``transforms.json``); ``aligned.safetensors`` gives depth maps to ``depth-nerfacto`` and
      ``cloud.ply`` initial points to ``splatfacto`` when present;
    - a folder holding ``transforms.json`` and its images (what `nvf sample` writes, nerfstudio's
      convention, the input photo as frame 0).

Writes into ``out``:
    - ``dataset/``: a nerfstudio dataset (``images/`` hard-linked or copied, ``transforms.json`` with
      ``applied_transform`` = identity because the poses are written in nvf's world frame as they are,
      explicit ``train_filenames``/``val_filenames``/``test_filenames``, optional ``depths/`` 16-bit
      PNGs and ``points.ply``; with ``use_masks`` and ``WORK/<capture>/masks.safetensors`` present,
      ``masks/<stem>.png`` per frame (nerfstudio's convention: one channel, the image's size,
      255 = head ∪ hair, train on it; 0 = ignore) named by each frame's ``mask_path``);
    - ``<method>/``: nerfstudio's run folder (``config.yml``, ``nerfstudio_models/step-*.ckpt``,
      ``dataparser_transforms.json``, tensorboard events); ``nerfstudio.log`` holds its console output;
    - ``points.ply``: the reconstruction as coloured points in the input's own world frame;
      ``mesh.ply`` on request (Poisson on those points, Open3D);
    - ``recon_metrics.json`` (written last: it marks the run as complete and carries the input hash).

Convention:
    - Held-out views: rows ``i`` with ``i % eval_every == eval_every // 2`` in the input's row order
      (capture order: the ring by azimuth; sample order: frame 0 first), so held-out views lie between
      training views (interpolation). 13 ring views with ``eval_every=6`` hold out rows 3 and 9.
    - nerfstudio's dataparser maps the world to its own frame: x_ns = s (D x_world) with D the 3x4
      ``transform`` and s the ``scale`` of ``dataparser_transforms.json`` (applied_transform being
      identity, D is that file's transform). Exports are mapped back with x_world = D^-1 (x_ns / s).
    - Points: every training view is rendered at full resolution; a pixel whose accumulated opacity
      exceeds ``export_opacity`` (0.5, as nerfstudio's exporter) gives the point origin + t direction
      (t = nerfacto's ``expected_depth``, the weight-normalised ray distance, meaningful at any
      opacity; nerfstudio's exporter uses the median ``depth``), kept when inside the dataparser's
      [-1, 1]^3 box (nerfstudio's exporter default), then Open3D's statistical outlier removal.
      (nerfstudio's ``generate_point_cloud`` samples random training rays but loops until it has
      ``num_points`` opaque points: forever on an under-trained model.) Splatfacto exports the
      Gaussian centres whose opacity exceeds ``export_opacity``.
    - Metrics: nerfstudio's own ``Model.get_image_metrics_and_images`` per held-out view, on full
      renders: PSNR (torchmetrics, data range 1), SSIM and LPIPS (AlexNet, torchmetrics, inputs in
      0..1), ground truth blended with the model's background as nerfstudio does.

Offline: nothing is fetched at run time. nerfstudio builds LPIPS (torchvision AlexNet) with every
model; its weights must already be in the torch hub cache (`alexnet_weights_path`), else a
ModelError says how to provide them. depth-nerfacto without depth maps would fetch ZoeDepth from
torch hub: nvf requires ``aligned.safetensors`` instead. Training runs in-process with the viewer
off (``vis=tensorboard``) and nerfstudio's in-process VanillaDataManager (the ParallelDataManager
nerfacto defaults to spawns worker processes, a poor fit on CPU and inside other programs).

Modules: `inputs` (view sets, split, the nerfstudio dataset), `training` (offline checks, trainer
config, in-process training), `export` (points, mesh, held-out metrics); this module holds Config,
PRESETS and `run`, and re-exports the public names of the former single module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stages.core import batching, io, worktree
from stages.core.contract import Context
from stages.core.errors import InputError, StageFailure
from stages.reconstruct.export import (
    clean_points,
    evaluate_views,
    poisson_mesh,
    read_dataparser_transform,
    render_points,
    to_world,
)
from stages.reconstruct.inputs import (
    DEPTH_PNG_MAX,
    MIN_TRAIN_VIEWS,
    ViewSet,
    _capture_views,
    load_views,
    split_views,
    write_dataset,
)
from stages.reconstruct.training import (
    ALEXNET_FILE,
    ALEXNET_URL,
    BOUNDED_SETTINGS,
    COMPACT_SETTINGS,
    alexnet_weights_path,
    apply_overrides,
    build_trainer_config,
    check_offline_assets,
    parse_overrides,
    train,
    without_lpips,
)

__all__ = [
    "PATHS", "reconstruct", "ALEXNET_FILE", "ALEXNET_URL", "BOUNDED_SETTINGS", "COMPACT_SETTINGS", "DEPTH_PNG_MAX", "METHODS", "METRICS_FILE",
    "MIN_TRAIN_VIEWS", "PRESETS", "STAGE", "Config", "Method", "ViewSet", "_capture_views", "alexnet_weights_path",
    "apply_overrides", "build_trainer_config", "check_offline_assets", "clean_points", "evaluate_views",
    "finite_or_none", "inputs_hash", "load_views", "parse_overrides", "poisson_mesh", "read_dataparser_transform",
    "render_points", "run", "split_views", "to_world", "train", "validate", "without_lpips", "write_dataset",
]  # fmt: skip

log = logging.getLogger("nvf")

STAGE = "reconstruct"
Method = Literal["nerfacto", "depth-nerfacto", "splatfacto"]
METHODS: tuple[str, ...] = typing.get_args(Method)
METRICS_FILE = "recon_metrics.json"


@dataclass(frozen=True)
class Config:
    """How a view set is reconstructed. nerfstudio's own defaults apply unless a field says otherwise."""

    method: Method = "nerfacto"
    """nerfstudio method: nerfacto, depth-nerfacto (needs aligned depth) or splatfacto (needs CUDA)."""
    iterations: int = 30000
    """Training iterations (nerfstudio's default; a few thousand already give a usable model)."""
    rays_per_batch: int | None = None
    """Rays per training batch (None: the method's default, 4096 for nerfacto); fewer is faster."""
    eval_every: int = 6
    """Hold out every k-th view (rows i with i % k == k // 2) for the metrics; k >= 2."""
    center: Literal["focus", "poses", "none"] = "focus"
    """Dataparser centring: `focus` (where the cameras look: the head of a ring), `poses` (mean camera
    centre, nerfstudio's default, off-centre for a half ring), `none`."""
    bounded: bool = False
    """Treat the scene as an object inside the dataparser's [-1, 1]^3 box (no scene contraction, far
    plane 3): right for plain backgrounds (synthetic captures, generated views), converges sooner.
    False keeps nerfstudio's unbounded scene, which also models a real background."""
    compact: bool = False
    """A smaller nerfacto for CPU: hash tables of 2^15 entries, finest resolution 512, 64+32 proposal
    and 32 NeRF samples per ray (nerfstudio: 2^19, 2048, 256+96, 48); enough for images <= 256 px."""
    export_opacity: float = 0.5
    """A rendered pixel gives a point when its accumulated opacity exceeds this (nerfstudio's exporter: 0.5);
    lower keeps more of an under-trained model's points."""
    export_points: int = 200_000
    """Most points in points.ply (a seeded subset when more pixels are opaque)."""
    export_scale: float = 1.0
    """Render the training views at this fraction of their resolution to export points (0.25: 16x fewer
    rays, for CPU runs; the held-out metrics always render at full resolution)."""
    mesh: bool = False
    """Also write mesh.ply: Poisson surface (Open3D) of the exported points with estimated normals."""
    use_masks: bool = True
    """A work capture with masks.safetensors (`nvf masks`): give nerfstudio each view's head mask
    (``mask_path``), so rays off the head (background, neck, clothes) are not trained on."""
    init_points: bool = True
    """splatfacto: start from WORK/<capture>/cloud.ply when present (else nerfstudio's random init)."""
    ns: tuple[tuple[str, str], ...] = ()
    """nerfstudio config overrides as (dotted path from TrainerConfig, value), applied last, e.g.
    ("pipeline.model.num_nerf_samples_per_ray", "32")."""
    seed: int = 42
    """Seed of nerfstudio's training (machine.seed) and of the point subset."""
    lpips: bool = True
    """Score held-out views with LPIPS as well (AlexNet weights from the torch hub cache, never
    downloaded). False: PSNR and SSIM only, LPIPS recorded as not computed (machines without the weights)."""


PRESETS: dict[str, Config] = {
    "default": Config(),
    "quick": Config(iterations=3000),
    "cpu": Config(iterations=2000, rays_per_batch=1024, compact=True),
    "object": Config(bounded=True),
    "test": Config(
        iterations=30, rays_per_batch=256, bounded=True, compact=True, export_opacity=0.0, export_points=20_000
    ),  # 30 CPU iterations leave nerfacto nearly transparent (opacity ~0.01)
}


# ----------------------------------------------------------------------------------------------
# Stage entry point
# ----------------------------------------------------------------------------------------------


def validate(cfg: Config) -> None:
    """Reject bad settings before any work (method, counts, --ns keys)."""
    if cfg.method not in METHODS:
        raise InputError(f"unknown method '{cfg.method}'; choose one of: {', '.join(METHODS)}")
    if cfg.iterations < 1:
        raise InputError(f"--iterations must be >= 1, got {cfg.iterations}")
    if cfg.eval_every < 2:
        raise InputError(f"--eval-every must be >= 2 (hold out every k-th view), got {cfg.eval_every}")
    if cfg.rays_per_batch is not None and cfg.rays_per_batch < 1:
        raise InputError(f"--rays-per-batch must be >= 1, got {cfg.rays_per_batch}")
    if not 0.0 <= cfg.export_opacity < 1.0:
        raise InputError(f"export opacity must be in [0, 1), got {cfg.export_opacity}")
    if cfg.export_points < 1:
        raise InputError(f"export_points must be >= 1, got {cfg.export_points}")
    if not 0.0 < cfg.export_scale <= 1.0:
        raise InputError(f"export_scale must be in (0, 1], got {cfg.export_scale}")
    build_trainer_config(cfg, Path("."), Path("."), "cpu")  # unknown --ns keys fail here


def _device_type(device: str, method: str) -> str:
    chosen = batching.choose_device(device)
    if method == "splatfacto" and chosen.type != "cuda":
        raise InputError("splatfacto needs a CUDA GPU (gsplat rasterises with CUDA kernels only) and none is in use: "
                         "run on a GPU machine, or use --method nerfacto (or depth-nerfacto) on CPU")  # fmt: skip
    if chosen.type == "cuda" and (chosen.index or 0) != 0:
        raise InputError(f"nerfstudio trains on cuda:0 of the visible GPUs; to use {chosen}, set "
                         f"CUDA_VISIBLE_DEVICES={chosen.index} and pass --device cuda")  # fmt: skip
    return chosen.type


def inputs_hash(views: ViewSet, cfg: Config) -> str:
    """Hash of the image bytes, the poses (and depth, cloud) and the config."""
    cams = views.cameras
    arrays = [np.asarray(a, dtype=np.float64).round(9).tolist() for a in (cams.R, cams.T, cams.K, cams.width,
                                                                         cams.height)]  # fmt: skip
    extra: list[Any] = [io.hash_inputs(views.depth_nhw.tobytes())] if views.depth_nhw is not None else []
    if views.cloud_path is not None and cfg.method == "splatfacto" and cfg.init_points:
        extra.append(views.cloud_path)
    if views.masks_path is not None:
        extra.append(views.masks_path)
    return io.hash_inputs(dataclasses.asdict(cfg), cams.names, arrays, *views.image_paths, *extra)


PATHS = {"out": "reconstruct"}
"""Named paths `Context.paths` may set: ``out``, the folder of the per-capture reconstructions
(default ``WORK/reconstruct``; capture C goes to ``OUT/C``)."""


def run(ctx: Context, cfg: Config = Config()) -> list[Path]:
    """The stage contract: `reconstruct` every selected capture of ``ctx.work`` that has poses."""
    out = ctx.path("out", PATHS["out"])
    written: list[Path] = []
    for capture in ctx.select(worktree.captures_with(ctx.work, "poses", f"run nvf poses DATA --out {ctx.work} first")):
        written += reconstruct(worktree.capture_dir(ctx.work, capture.id), out / capture.id, cfg, data=ctx.data,
                               overwrite=ctx.overwrite, device=ctx.device)  # fmt: skip
    return written


def reconstruct(
    source: Path,
    out: Path,
    cfg: Config = Config(),
    *,
    data: Path | None = None,
    overwrite: bool = False,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Reconstruct the views of ``source`` (WORK/<capture> or a transforms.json folder) into ``out``.

    Returns the paths written: points.ply (+ mesh.ply), the run's config.yml and checkpoint, and
    recon_metrics.json; [] when ``out`` is up to date (same input hash) and not ``overwrite``.
    ``progress(done, total)`` reports training iterations.
    """
    validate(cfg)
    device_type = _device_type(device, cfg.method)
    # the input first: its errors are the user's
    views = load_views(Path(source), data=data, method=cfg.method, use_masks=cfg.use_masks)
    split_views(len(views.cameras.names), cfg.eval_every)  # too few views: fail before writing
    if cfg.lpips:
        check_offline_assets()
    out = Path(out)
    digest = inputs_hash(views, cfg)
    metrics_path = out / METRICS_FILE
    if not overwrite and _up_to_date(out, metrics_path, digest, cfg):
        log.info("reconstruct: %s up to date, skipped", out)
        return []
    if metrics_path.exists():
        metrics_path.unlink()  # the completion mark goes first, so a failed rerun never looks complete
    run_dir = out / cfg.method
    io.remove_owned_dir(run_dir)  # nerfstudio's previous run, in the folder nvf made for it; nothing else
    io.claim_dir(run_dir)
    split = write_dataset(out / "dataset", views, cfg)
    config = build_trainer_config(cfg, out / "dataset", out, device_type, split["depth_unit"])
    log.info("reconstruct: %s: %s for %d iterations on %s (%d train, %d held-out views)", views.name, cfg.method,
             cfg.iterations, device_type, len(split["train"]), len(split["eval"]))  # fmt: skip
    started = time.perf_counter()
    with contextlib.nullcontext() if cfg.lpips else without_lpips():
        trainer, per_iteration = train(config, out / "nerfstudio.log", progress)
    train_seconds = time.perf_counter() - started
    base = config.get_base_dir()
    D, scale, points, colors, per_view = _export_and_score(trainer.pipeline, base, out, cfg)
    written = [io.write_ply(out / "points.ply", points, colors)]
    if cfg.mesh:
        written.append(poisson_mesh(out / "mesh.ply", points, colors))
    checkpoint = sorted((base / "nerfstudio_models").glob("step-*.ckpt"))[-1]
    written += [base / "config.yml", checkpoint]
    report = _metrics_report(views, cfg, device_type, split, per_view, per_iteration, train_seconds, len(points),
                             (D, scale), base, checkpoint, digest)  # fmt: skip
    written.append(io.write_json(metrics_path, report))
    return written


def _export_and_score(pipeline: Any, base: Path, out: Path, cfg: Config
                      ) -> tuple[np.ndarray, float, np.ndarray, np.ndarray, dict[str, dict[str, float]]]:  # fmt: skip
    """(D, s, points in the input's world frame, their colours, held-out metrics per view) of a trained model."""
    pipeline.eval()
    D, scale = read_dataparser_transform(base / "dataparser_transforms.json")
    with open(out / "nerfstudio.log", "a", encoding="utf-8") as log_file, contextlib.redirect_stdout(log_file):
        points_ns, colors = render_points(pipeline, cfg.export_points, cfg.seed, cfg.export_opacity, cfg.export_scale)
        per_view = evaluate_views(pipeline, lpips=cfg.lpips)
    points, colors = clean_points(to_world(points_ns, D, scale), colors)
    if len(points) == 0:
        raise StageFailure(f"the trained model has no opaque points to export (after {cfg.iterations} iterations); "
                           "train longer (--iterations) or lower --export-opacity")  # fmt: skip
    return D, scale, points, colors, per_view


def _metrics_report(views: ViewSet, cfg: Config, device_type: str, split: dict[str, Any],
                    per_view: dict[str, dict[str, float]], per_iteration: float, train_seconds: float, n_points: int,
                    dataparser: tuple[np.ndarray, float], base: Path, checkpoint: Path,
                    digest: str) -> dict[str, Any]:  # fmt: skip
    """The content of recon_metrics.json."""
    D, scale = dataparser
    metrics = {k: float(np.mean([v[k] for v in per_view.values()])) for k in next(iter(per_view.values()))}
    return {
        "stage": STAGE,
        "input": views.source,
        "name": views.name,
        "method": cfg.method,
        "iterations": cfg.iterations,
        "device": device_type,
        "seconds_per_iteration": finite_or_none(per_iteration),
        "train_seconds": train_seconds,
        "views": {"train": split["train"], "eval": split["eval"]},
        "eval_split": f"rows i with i % {cfg.eval_every} == {cfg.eval_every // 2} held out (input row order)",
        "metrics": metrics,
        "per_view": per_view,
        "metrics_source": "nerfstudio Model.get_image_metrics_and_images on full renders of the held-out views "
        + (
            "(PSNR data range 1, SSIM, LPIPS AlexNet from the torch hub cache)"
            if cfg.lpips
            else "(PSNR data range 1, SSIM; LPIPS not computed: lpips = false)"
        ),  # fmt: skip
        "lpips_weights": {"path": str(alexnet_weights_path()), "sha256": io.hash_file(alexnet_weights_path())}
        if cfg.lpips
        else None,
        "masks": str(views.masks_path) if views.masks_path is not None else "none",
        "export": {
            "points": int(n_points),
            "frame": "the input's world frame (dataparser transform undone)",
            "mesh": bool(cfg.mesh),
        },
        "dataparser": {"transform": D[:3].tolist(), "scale": scale},
        "run_dir": str(base),
        "checkpoint": str(checkpoint),
        "config": cfg,
        "inputs": digest,
    }


def _up_to_date(out: Path, metrics_path: Path, digest: str, cfg: Config) -> bool:
    if (
        not metrics_path.is_file()
        or not (out / "points.ply").is_file()
        or (cfg.mesh and not (out / "mesh.ply").is_file())
    ):
        return False
    try:
        return json.loads(metrics_path.read_text()).get("inputs") == digest
    except (OSError, ValueError, AttributeError):
        return False


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: None for a non-finite figure."""
    return value if math.isfinite(value) else None
