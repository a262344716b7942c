"""Stage `evaluate`: one metric suite for poses, depth, clouds and novel views, and a report to look at.

Each section runs when its inputs are given (`Inputs`); sources are files or work trees, paired
by capture id (folder names) and by image name:

- **poses** (a poses record, a nerfstudio ``transforms.json`` or a COLMAP model, each vs a
  reference of any of those kinds): a similarity (Umeyama on camera centres) fitted on the views
  whose source tag is in `Config.fit_sources` (all paired views when fewer than 3), then per view
  the geodesic rotation error (degrees) and the camera-centre error (reference units, and relative
  to the reference rig's radius = mean distance of its centres from their centroid). Registered
  fraction = views with a fitted source tag / reference views. Figures are split by source tag.
- **depth** (a depth or aligned record vs a z-depth reference): per view, after
  `Config.depth_alignment` (none | scale | scale_shift least squares | median scaling; disparity
  records are aligned in disparity space to 1/z and inverted), over pixels valid in both (> 0,
  finite): AbsRel = mean |d - d*| / d*, RMSE = sqrt(mean (d - d*)^2) in reference units,
  δ_k = share of pixels with max(d / d*, d* / d) < 1.25^k, k = 1, 2, 3. The estimate is resized
  to the reference's size by nearest neighbour.
- **clouds** (a PLY or a work tree of ``<capture>/cloud.ply`` vs a reference surface PLY): the
  cloud stage's own Table V diagnostics (its ``cloud_metrics.json``, quoted as written), then
  Chamfer (symmetric, not squared) and F-score from `stages.core.metrics`, after mapping the cloud
  with the pose similarity when a poses section covered the capture (else no alignment).
  Mean nearest-neighbour *spacing* is a Table V diagnostic, never called Chamfer here.
- **views** (generated images vs ground-truth images): paired by name, or by pose (nearest
  reference camera after a similarity alignment, cost = rotation error in degrees + centre error
  as an angle, degrees of the reference radius). The input photo of an `nvf sample` folder
  (views/000.png, ``generated: false`` in its sample.json) is not scored: the section lists it under
  ``inputs_excluded``. PSNR, SSIM, LPIPS (`stages.core.image_metrics`),
  CLIP identity (I2O: input photo -> view, O2O: between views, to-GT: view -> its ground truth),
  ArcFace when available, FID when enough images; buckets all / frontal (|azimuth| <= 90°) / back.

- **closed_loop** and **identity** (generated views alone, `--views` without `--views-ref`; also
  beside the views section): `stages.evaluate.generated` (SfM re-posing of the views against their
  transforms.json; dlib face identity, default backbone, with CLIP and ArcFace beside it).

Averaging: per view -> per capture -> over captures (each capture weighs the same).
Output: ``OUT/metrics.json``, ``OUT/report.md`` and ``OUT/figures/*.png``, written into a temp
folder and swapped in. In ``metrics.json`` every figure carries its protocol (resolution, mask,
backbone, alignment...). JSON has no infinity: a non-finite number is written ``null``; for PSNR
that means +inf (identical images), noted in ``conventions``. `run` with `compare` adds a side by
side table against another report folder.

Modules: `sources` (reading and pairing inputs), `poses`, `depth`, `clouds`, `views` (vs ground
truth), `generated` (closed loop, identity), `recon`, `plots`, `report` (markdown, compare);
`common` holds the shared helpers. This module holds Inputs, Config, PRESETS and `run`, and
re-exports the public names of the former single module (its satellite modules under their old
names `evaluate_views`, `evaluate_plots`, `evaluate_recon`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stages.core import io
from stages.core.contract import Context
from stages.core.errors import InputError
from stages.evaluate import generated as evaluate_views  # the former satellite modules, by their old names
from stages.evaluate import plots as evaluate_plots
from stages.evaluate import recon as evaluate_recon
from stages.evaluate.clouds import TABLE_V_KEYS, _cloud_section
from stages.evaluate.common import Figures, _finite_json, rig_radius, view_azimuth_deg
from stages.evaluate.depth import _depth_section, align_depth, depth_errors
from stages.evaluate.generated import _generated_views_sections
from stages.evaluate.plots import plot_contact_sheet, plot_depth_maps, plot_pose_top_view
from stages.evaluate.poses import PoseResult, _poses_section, evaluate_poses
from stages.evaluate.report import compare_rows, compare_section, render_report
from stages.evaluate.sources import POSE_SOURCES, PoseSet, _tree, read_pose_set
from stages.evaluate.views import _views_section, pair_views_by_pose

__all__ = [
    "PATHS", "CONVENTIONS", "evaluate", "POSE_SOURCES", "PRESETS", "STAGE", "TABLE_V_KEYS", "Config", "DepthAlignment", "DepthMask",
    "Figures", "Inputs", "LpipsChoice", "MaskMode", "Pairing", "PoseResult", "PoseSet", "ProgressFn", "Switch",
    "align_depth", "compare_rows", "compare_section", "depth_errors", "evaluate_plots", "evaluate_poses",
    "evaluate_recon", "evaluate_views", "pair_views_by_pose", "plot_contact_sheet", "plot_depth_maps",
    "plot_pose_top_view", "read_pose_set", "render_report", "rig_radius", "run", "view_azimuth_deg",
]  # fmt: skip

log = logging.getLogger("nvf")

STAGE = "evaluate"
DepthAlignment = Literal["none", "scale", "scale_shift", "median"]
Pairing = Literal["name", "pose"]
MaskMode = Literal["none", "alpha", "depth"]
DepthMask = Literal["auto", "none", "masks"]
LpipsChoice = Literal["auto", "alex", "vgg", "squeeze", "off"]
Switch = Literal["auto", "on", "off"]
ProgressFn = Callable[[int, int], None]

CONVENTIONS = {
    "null": "JSON has no infinity or NaN: null is a non-finite value; a null PSNR is +inf (identical images, MSE 0)",
    "averaging": "per view -> per capture -> mean over captures (each capture weighs the same)",
    "images": "RGB in [0, 1], data range 1",
    "poses": io.POSE_CONVENTION,
    "azimuth": "Multi-PIE camera table when the name is a Multi-PIE name, else from the reference camera's viewing "
    "direction in the nvf rig frame (frontal looks along +z, positive azimuth toward +x); frontal = |az| <= 90°",
}


@dataclass(frozen=True)
class Inputs:
    """What to evaluate; a section runs when both of its sides are given."""

    poses: Path | None = None
    """Estimated poses: poses record, transforms.json, COLMAP model folder, or a tree of <capture>/poses.safetensors."""
    poses_ref: Path | None = None
    """Reference poses, same kinds (e.g. synth's groundtruth folder)."""
    depth: Path | None = None
    """Estimated depth: depth/aligned record or work tree (<capture>/aligned.safetensors, else depth.safetensors)."""
    depth_ref: Path | None = None
    """Reference z-depth: depth record or tree of <capture>/depth.safetensors."""
    cloud: Path | None = None
    """Point cloud PLY or work tree of <capture>/cloud.ply (with cloud_metrics.json beside it)."""
    cloud_ref: Path | None = None
    """Reference surface PLY or tree of <capture>/surface.ply."""
    views: Path | None = None
    """Folder of generated views (PNG/JPG), optionally with their transforms.json."""
    views_ref: Path | None = None
    """Folder searched (recursively) for the ground-truth images, by file name."""
    views_ref_poses: Path | None = None
    """Poses of the ground-truth views (for pairing by pose and azimuth buckets of non-Multi-PIE names)."""
    input_image: Path | None = None
    """The photo the views were generated from (identity I2O)."""
    reconstruction: Path | None = None
    """`nvf reconstruct` output (recon_metrics.json) or a tree of <capture>/recon_metrics.json: held-out PSNR/SSIM/LPIPS."""
    compare: Path | None = None
    """Another report folder to put side by side with this one."""


@dataclass(frozen=True)
class Config:
    """How the evaluation is done; every choice is recorded next to the figures it affects."""

    fit_sources: tuple[str, ...] = ("sfm", "rig")
    """Pose source tags the similarity is fitted on (sfm, rig, interp); other views are only scored."""
    depth_alignment: DepthAlignment = "median"
    """Per-view depth alignment before scoring: none, scale, scale_shift (least squares) or median."""
    fscore_threshold_rel: float = 0.01
    """F-score threshold as a fraction of the reference cloud's bounding-box diagonal."""
    resolution: int | None = 512
    """Longer side the ground-truth views are resized to (generated views follow); None keeps their size."""
    depth_mask: DepthMask = "auto"
    """Depth scores inside the head mask (head ∪ hair) of the masks.safetensors beside each estimate
    (`nvf masks`): `auto` where that record exists, `masks` requires it, `none` scores every pixel."""
    mask: MaskMode = "none"
    """Composite both views on white outside a mask: none, the GT image's alpha, or GT depth > 0 (depth_ref)."""
    pairing: Pairing = "name"
    """Pair generated and GT views by file name, or by pose (nearest reference camera after alignment)."""
    lpips: LpipsChoice = "auto"
    """LPIPS backbone; auto = alex, skipped with a reason when its weights are not cached; off skips it."""
    identity: Switch = "auto"
    """CLIP identity similarity: auto skips (with the reason) when the model cannot load; on requires it."""
    clip_preset: str = "paper"
    """Model preset for CLIP (paper = ViT-B/32 OpenAI, tiny = random test model)."""
    clip_model: str | None = None
    """CLIP override: NAME@TAG, hf-hub:org/repo or a local open_clip folder."""
    arcface: Switch = "auto"
    """ArcFace identity (insightface buffalo_l): auto when installed with weights, on requires it."""
    closed_loop: Switch = "auto"
    """Re-pose generated views by SfM against their transforms.json (`stages.closed_loop`): auto when present."""
    face_identity: Switch = "auto"
    """dlib face identity of generated views (extra nvf[face]): auto skips with the reason when missing."""
    fid_min_images: int = 100
    """FID only with at least this many image pairs (and the Inception weights cached)."""
    frontal_max_azimuth: float = 90.0
    """Views with |azimuth| up to this many degrees are 'frontal', the rest 'back'."""
    sheet_views: int = 12
    """Most views in the contact sheet and depth figure."""
    label: str = ""
    """A line under the report's title saying what the run is (e.g. a smoke run on random-weight models)."""
    overwrite: bool = False
    """Evaluate again even when OUT/metrics.json was made from the same inputs and config."""


PRESETS: dict[str, Config] = {
    "default": Config(),
    "tiny": Config(clip_preset="tiny", resolution=None, sheet_views=6),
}


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def _inputs_fingerprint(inputs: Inputs, cfg: Config) -> str:
    """Hash of the config and of every input file's name, size and mtime (cheap for image folders)."""
    listing = []
    for f in dataclasses.fields(inputs):
        path = getattr(inputs, f.name)
        if path is None or not Path(path).exists():
            continue
        files = [Path(path)] if Path(path).is_file() else sorted(p for p in Path(path).rglob("*") if p.is_file())
        listing.append([f.name, [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]])
    return io.hash_inputs(dataclasses.asdict(cfg) | {"overwrite": False}, listing)


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    from stages.core.batching import choose_device

    return str(choose_device("auto"))


PATHS = {"out": "report", **{f.name: None for f in dataclasses.fields(Inputs)}}
"""Named paths `Context.paths` may set: the report folder ``out`` (default ``WORK/report``) and every
`Inputs` field (poses, poses_ref, depth, ...). With none of those given and a ``DATA/groundtruth``
folder (synth data), poses and depth of the work tree are scored against it."""


def run(ctx: Context, cfg: Config = Config()) -> list[Path]:
    """The stage contract: `evaluate` the inputs named in ``ctx.paths`` (or the work tree against
    ``DATA/groundtruth``) into the report folder."""
    given = {name: path for name in PATHS if name != "out" and (path := ctx.given(name)) is not None}
    truth = Path(ctx.data) / "groundtruth" if ctx.data is not None else None
    if not given:
        if truth is None or not truth.is_dir():
            raise InputError("evaluate: say what to score: name the inputs (poses/poses_ref, depth/depth_ref, ...; in "
                             "nvf run an inputs table in [stages.evaluate] of --config); defaults exist only for "
                             "synth data with groundtruth/")  # fmt: skip
        given = {"poses": ctx.work, "poses_ref": truth, "depth": ctx.work, "depth_ref": truth}
    return evaluate(
        Inputs(**given),
        ctx.path("out", PATHS["out"]),
        cfg,
        device=ctx.device,
        overwrite=ctx.overwrite,
        progress=ctx.progress,
    )


def evaluate(inputs: Inputs, out: Path, cfg: Config = Config(), *, device: str = "auto", overwrite: bool = False,
             progress: ProgressFn | None = None) -> list[Path]:  # fmt: skip
    """Evaluate every section whose inputs are given; write OUT/metrics.json, OUT/report.md, OUT/figures/.

    Returns the paths written (report.md first). An up-to-date OUT (same inputs hash) is kept
    unless `overwrite` or `cfg.overwrite`; then nothing is written and [] is returned.
    """
    out = Path(out)
    _check_inputs(inputs)
    found_reconstructions = _tree(inputs.reconstruction, (evaluate_recon.METRICS_FILE,), "reconstructions")
    fingerprint = _inputs_fingerprint(inputs, cfg)
    if not (overwrite or cfg.overwrite) and _up_to_date(out / "metrics.json", fingerprint):
        log.info("evaluate: %s is up to date, skipped (pass --overwrite to redo)", out)
        return []
    io.check_replaceable(out, "--out folder")  # before the work: a report replaces only a report
    device = _resolve_device(device)
    figures, skipped = Figures(), []
    doc: dict[str, Any] = {"nvf_stage": STAGE, "nvf_version": _version(), "inputs_hash": fingerprint,
                           "inputs": {k: str(v) if v else None for k, v in dataclasses.asdict(inputs).items()},
                           "config": dataclasses.asdict(cfg), "conventions": CONVENTIONS}  # fmt: skip
    plots = _run_sections(inputs, cfg, figures, device, skipped, progress, doc)
    if found_reconstructions:
        doc["reconstruction"] = evaluate_recon.reconstruction_section(found_reconstructions, figures)
    doc["figures"] = figures.rows
    doc["skipped"] = skipped
    if inputs.compare is not None:
        doc["compare"] = compare_section(Path(inputs.compare), _finite_json(figures.rows))
    written = _write_report(out, doc, figures, plots)
    log.info("evaluate: wrote %s", out / "report.md")
    return written


def _check_inputs(inputs: Inputs) -> None:
    """Reject a half-given pair (estimate without reference, or the reverse) and an empty request."""
    sections = {"poses": (inputs.poses, inputs.poses_ref), "depth": (inputs.depth, inputs.depth_ref),
                "clouds": (inputs.cloud, inputs.cloud_ref), "views": (inputs.views, inputs.views_ref)}  # fmt: skip
    if inputs.views is not None and not Path(inputs.views).is_dir():
        raise InputError(f"--views {inputs.views}: not a folder; pass the folder nvf sample wrote")
    for name, (est, ref) in sections.items():
        if name == "views" and est is not None:
            continue  # generated views alone: closed loop and identity, no ground truth needed
        if (est is None) != (ref is None):
            raise InputError(f"{name}: give both the estimate and its reference (got only the "
                             f"{'estimate' if ref is None else 'reference'})")  # fmt: skip
    if not any(est is not None for est, _ in sections.values()) and inputs.reconstruction is None:
        raise InputError(
            "nothing to evaluate: give at least one pair (poses, depth, clouds or views) and its reference, "
            "generated views, or a reconstruction"
        )


def _up_to_date(metrics_path: Path, fingerprint: str) -> bool:
    """Whether `metrics_path` is a report made from the same inputs and config."""
    if not metrics_path.is_file():
        return False
    try:
        return json.loads(metrics_path.read_text()).get("inputs_hash") == fingerprint
    except (OSError, ValueError, AttributeError):  # not a report of nvf's: check_replaceable decides
        return False


def _run_sections(inputs: Inputs, cfg: Config, figures: Figures, device: str, skipped: list[dict],
                  progress: ProgressFn | None, doc: dict[str, Any]) -> dict[str, Callable[[Path], Path]]:  # fmt: skip
    """Poses, depth, clouds, views and generated-view sections into `doc`; returns their plots by section."""
    plots: dict[str, Callable[[Path], Path]] = {}
    pose_results: dict[str, PoseResult] = {}
    if inputs.poses is not None:
        doc["poses"], pose_results = _poses_section(inputs, cfg, figures)
        plots["poses"] = lambda p: plot_pose_top_view(pose_results, p)
    if inputs.depth is not None:
        doc["depth"], maps = _depth_section(inputs, cfg, figures)
        plots["depth"] = lambda p: plot_depth_maps(maps, p, cfg.sheet_views)
    if inputs.cloud is not None:
        doc["clouds"] = _cloud_section(inputs, cfg, figures, pose_results)
        renders = evaluate_plots.cloud_renders(_tree(inputs.cloud, ("cloud.ply",), "clouds"))
        if renders:
            plots["clouds"] = lambda p: evaluate_plots.plot_cloud_renders(renders, p)
    if inputs.views is not None and inputs.views_ref is not None:
        doc["views"], sheet = _views_section(inputs, cfg, figures, device, skipped, progress)
        plots["views"] = lambda p: plot_contact_sheet(sheet, p, cfg.sheet_views)
    if inputs.views is not None:
        _generated_views_sections(inputs, cfg, figures, device, skipped, doc)
        generated_sheet = evaluate_plots.generated_sheet(inputs.views, doc.get("closed_loop"), doc.get("identity"))
        section = "identity" if "identity" in doc else "closed_loop" if "closed_loop" in doc else None
        if generated_sheet and section is not None:
            plots[section] = lambda p: evaluate_plots.plot_generated_sheet(generated_sheet, p)
    return plots


PLOT_NAMES = {
    "poses": "poses_top.png",
    "depth": "depth.png",
    "views": "contact_sheet.png",
    "clouds": "cloud_renders.png",
    "identity": "generated_views.png",
    "closed_loop": "generated_views.png",
}
"""File name under OUT/figures/ of each section's plot."""


def _write_report(out: Path, doc: dict[str, Any], figures: Figures,
                  plots: dict[str, Callable[[Path], Path]]) -> list[Path]:  # fmt: skip
    """OUT/figures/*.png, OUT/metrics.json and OUT/report.md, swapped in at once; the paths written."""
    with io.atomic_dir(out) as tmp:
        (tmp / "figures").mkdir()
        for section, plot in plots.items():
            plot(tmp / "figures" / PLOT_NAMES[section])
        figure_files = {s: f"figures/{PLOT_NAMES[s]}" for s in plots}
        safe = _finite_json(doc)
        (tmp / "metrics.json").write_text(json.dumps(safe, indent=2) + "\n")
        (tmp / "report.md").write_text(render_report({**safe, "figures": figures.rows}, figure_files))
    return [out / "report.md", out / "metrics.json"] + [out / f for f in figure_files.values()]


def _version() -> str:
    from stages import __version__

    return __version__
