"""The novel-views section of `nvf evaluate`: generated views against ground-truth images (PSNR, SSIM,
LPIPS, CLIP and ArcFace identity, FID), paired by name or by pose."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.core import geometry, image_metrics, io
from stages.core.errors import InputError, ModelError
from stages.evaluate.common import Figures, _bucket, _mean, rig_radius, view_azimuth_deg
from stages.evaluate.depth import _depth_masks, _resize_nearest
from stages.evaluate.sources import PoseSet, _images_by_name, _input_frames, _optional_poses

if TYPE_CHECKING:
    from stages.evaluate import Config, Inputs, ProgressFn

log = logging.getLogger("nvf")


def _read_rgba(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    return io.read_image_alpha(path)


def _resize(image_hw3: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if image_hw3.shape[:2] == (height, width):
        return image_hw3
    return np.asarray(Image.fromarray(image_hw3).resize((width, height), Image.Resampling.BICUBIC))


def _resize_mask(mask_hw: np.ndarray, height: int, width: int) -> np.ndarray:
    return _resize_nearest(mask_hw.astype(np.float64), height, width) > 0.5


def pair_views_by_pose(gen: PoseSet, ref: PoseSet) -> list[tuple[str, str, float]]:
    """(generated name, nearest reference name, cost) per generated view, in any world frame.

    The generated cameras' world may differ from the reference's by a similarity, so: (1) rotation
    anchoring: for each reference camera j, rotate the generated world so that generated view 0
    matches j, and keep the j with the smallest summed nearest-rotation error; (2) with the
    correspondences that gives, a similarity (Umeyama on centres) when 3+ distinct non-collinear
    cameras pair up; (3) nearest reference camera by cost = rotation error (deg) + centre error as
    an angle (deg, centre error / reference rig radius).
    """
    if not len(gen.names) or not len(ref.names):
        raise InputError("pairing by pose needs generated and reference cameras")
    best_cost, best_Rw = math.inf, np.eye(3)
    for j in range(len(ref.names)):
        R_w = ref.R[j].T @ gen.R[0]  # gen.R[0] @ R_w.T == ref.R[j]
        rot = geometry.rotation_angle_deg((gen.R @ R_w.T)[:, None], ref.R[None])  # [N_gen, N_ref]
        cost = float(rot.min(axis=1).sum())
        if cost < best_cost:
            best_cost, best_Rw = cost, R_w
    R_g, T_g = gen.R @ best_Rw.T, gen.T
    match = np.argmin(geometry.rotation_angle_deg(R_g[:, None], ref.R[None]), axis=1)
    C_ref = geometry.camera_centers(ref.R, ref.T)
    radius = max(rig_radius(C_ref), 1e-12)
    if len(set(match.tolist())) >= 3:
        try:
            s, R_w, t_w = geometry.umeyama(geometry.camera_centers(gen.R, gen.T), C_ref[match])
            R_g = gen.R @ R_w.T
            T_g = s * gen.T - R_g @ t_w
        except InputError:
            log.warning("evaluate: generated cameras are collinear; pairing by rotation only")
    C_g = geometry.camera_centers(R_g, T_g)
    out = []
    for i, name in enumerate(gen.names):
        rot = geometry.rotation_angle_deg(R_g[i][None], ref.R)
        ctr = np.degrees(np.linalg.norm(C_ref - C_g[i], axis=1) / radius)
        j = int(np.argmin(rot + ctr))
        out.append((name, ref.names[j], float(rot[j] + ctr[j])))
    return out


def _identity_embedder(cfg: Config, device: str, skipped: list[dict]) -> Any:
    if cfg.identity == "off":
        return None
    try:
        return image_metrics.ClipEmbedder(cfg.clip_preset, cfg.clip_model, device)
    except ModelError as exc:
        if cfg.identity == "on":
            raise
        skipped.append({"metric": "clip_identity", "reason": str(exc)})
        log.warning("evaluate: CLIP identity skipped: %s", exc)
        return None


def _lpips_scorer(cfg: Config, device: str, skipped: list[dict]) -> Any:
    if cfg.lpips == "off":
        return None
    backbone = "alex" if cfg.lpips == "auto" else cfg.lpips
    reason = image_metrics.lpips_unavailable(backbone)
    if reason is None:
        return image_metrics.LpipsScorer(backbone, device)
    if cfg.lpips != "auto":
        raise ModelError(reason)
    skipped.append({"metric": "lpips", "reason": reason})
    log.warning("evaluate: LPIPS skipped: %s", reason)
    return None


def _views_section(inputs: Inputs, cfg: Config, figures: Figures, device: str, skipped: list[dict],
                   progress: ProgressFn | None) -> tuple[dict, list]:  # fmt: skip
    """The views section and its contact sheet: pair, score each pair, then the model-based scores and figures."""
    gen_images = _images_by_name(inputs.views)
    ref_images = _images_by_name(inputs.views_ref)
    if not gen_images:
        raise InputError(f"{inputs.views}: no images to evaluate")
    pairs, ref_poses, inputs_excluded = _view_pairs(inputs, cfg, gen_images, ref_images)
    rows, gen_list, ref_list = _score_pairs(inputs, cfg, pairs, gen_images, ref_images, ref_poses, progress)
    lpips = _lpips_scorer(cfg, device, skipped)
    if lpips is not None:
        for row, value in zip(rows, lpips(gen_list, ref_list), strict=True):
            row["lpips"] = float(value)
    identity: dict[str, Any] = {}
    clip = _clip_scores(cfg, inputs, rows, gen_list, ref_list, identity, device, skipped)
    _arcface(cfg, inputs, rows, gen_list, ref_list, identity, skipped)
    fid_value = _fid(cfg, gen_list, ref_list, device, skipped)
    protocol = _views_protocol(cfg, ref_list, lpips, clip)
    _add_view_figures(figures, rows, identity, fid_value, protocol)
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["azimuth_deg"] is None, rows[i]["azimuth_deg"] or 0.0))
    sheet = [(rows[i]["name"], rows[i]["reference"], gen_list[i], ref_list[i]) for i in order]  # ring order
    section = {"protocol": protocol, "per_view": rows, "identity": identity,
               "inputs_excluded": sorted(inputs_excluded & gen_images.keys())}  # fmt: skip
    return section, sheet


def _view_pairs(inputs: Inputs, cfg: Config, gen_images: dict[str, Path], ref_images: dict[str, Path]
                ) -> tuple[list[tuple[str, str, float]], PoseSet | None, set[str]]:  # fmt: skip
    """((generated, reference, cost) pairs, the reference poses or None, the input frames left out)."""
    gen_poses = _optional_poses(inputs.views / "transforms.json" if inputs.views.is_dir() else None)
    ref_poses = _optional_poses(inputs.views_ref_poses)
    if cfg.pairing == "pose":
        if gen_poses is None or ref_poses is None:
            raise InputError("pairing by pose needs the generated views' transforms.json (in the views folder) and "
                             "--views-ref-poses; or pair by name")  # fmt: skip
        pairs = [(g, r, cost) for g, r, cost in pair_views_by_pose(gen_poses, ref_poses) if g in gen_images]
    else:
        pairs = [(name, name, 0.0) for name in sorted(gen_images) if name in ref_images]
    pairs = [(g, r, c) for g, r, c in pairs if r in ref_images]
    inputs_excluded = _input_frames(inputs.views)  # an nvf sample folder's input photo is no generated view
    pairs = [(g, r, c) for g, r, c in pairs if g not in inputs_excluded]
    if not pairs:
        raise InputError(f"no generated view in {inputs.views} pairs with a ground-truth image in {inputs.views_ref} "
                         f"(pairing by {cfg.pairing})")  # fmt: skip
    return pairs, ref_poses, inputs_excluded


def _score_pairs(inputs: Inputs, cfg: Config, pairs: list[tuple[str, str, float]], gen_images: dict[str, Path],
                 ref_images: dict[str, Path], ref_poses: PoseSet | None, progress: ProgressFn | None
                 ) -> tuple[list[dict], list[np.ndarray], list[np.ndarray]]:  # fmt: skip
    """(rows with PSNR and SSIM, generated images, GT images) of every pair, images as compared."""
    depth_masks = _depth_masks(inputs) if cfg.mask == "depth" else {}
    ref_R = ref_poses.index() if ref_poses is not None else {}
    rows, gen_list, ref_list = [], [], []
    for k, (g, r, cost) in enumerate(pairs):
        gen_f, ref_f = _load_pair(inputs, cfg, gen_images[g], ref_images[r], r, depth_masks)
        azimuth = view_azimuth_deg(r, ref_poses.R[ref_R[r]] if r in ref_R else None)
        rows.append({"name": g, "reference": r, "pair_cost": cost, "azimuth_deg": azimuth,
                     "bucket": _bucket(azimuth, cfg), "psnr": image_metrics.psnr(gen_f, ref_f),
                     "ssim": image_metrics.ssim(gen_f, ref_f)})  # fmt: skip
        gen_list.append(gen_f)
        ref_list.append(ref_f)
        if progress is not None:
            progress(k + 1, len(pairs))
    return rows, gen_list, ref_list


def _load_pair(inputs: Inputs, cfg: Config, gen_path: Path, ref_path: Path, r: str,
               depth_masks: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(generated, GT) as floats in [0, 1] at the compared size, composited on white outside the mask."""
    ref_img, alpha = _read_rgba(ref_path)
    gen_img, _ = _read_rgba(gen_path)
    mask = None
    if cfg.mask == "alpha":
        if alpha is None:
            raise InputError(f"{ref_path}: no alpha channel, so mask=alpha cannot mask it; use mask=none/depth")
        mask = alpha
    elif cfg.mask == "depth":
        if r not in depth_masks:
            raise InputError(f"mask=depth: no reference depth map named {r} in {inputs.depth_ref}")
        mask = depth_masks[r]
    if cfg.resolution:
        h, w = ref_img.shape[:2]
        f = cfg.resolution / max(h, w)
        ref_img = _resize(ref_img, round(h * f), round(w * f))
    gen_img = _resize(gen_img, *ref_img.shape[:2])
    if mask is not None:
        mask = _resize_mask(mask, *ref_img.shape[:2])
        ref_f, gen_f = (
            image_metrics.composite_on_white(ref_img, mask),
            image_metrics.composite_on_white(gen_img, mask),
        )
    else:
        ref_f, gen_f = image_metrics.as_float01(ref_img), image_metrics.as_float01(gen_img)
    return gen_f, ref_f


def _clip_scores(cfg: Config, inputs: Inputs, rows: list[dict], gen: list, ref: list, identity: dict, device: str,
                 skipped: list[dict]) -> Any:  # fmt: skip
    """CLIP to-GT, O2O and I2O into `rows` and `identity`; returns the embedder (None when skipped)."""
    clip = _identity_embedder(cfg, device, skipped)
    if clip is not None:
        emb_gen, emb_ref = clip(gen), clip(ref)
        for row, value in zip(rows, image_metrics.cosine_paired(emb_gen, emb_ref), strict=True):
            row["clip_to_gt"] = float(value)
        identity["clip_o2o"] = image_metrics.mean_pairwise_cosine(emb_gen)
        if inputs.input_image is not None:
            emb_in = clip([io.read_image(inputs.input_image)])[0]
            for row, value in zip(rows, image_metrics.cosine_to(emb_in, emb_gen), strict=True):
                row["clip_i2o"] = float(value)
        else:
            skipped.append({"metric": "clip_i2o", "reason": "no input photo given (--input)"})
    return clip


def _views_protocol(cfg: Config, ref_list: list[np.ndarray], lpips: Any, clip: Any) -> dict[str, Any]:
    resolution = f"{ref_list[0].shape[1]}x{ref_list[0].shape[0]}" if ref_list else None
    return {
        "resolution": resolution if cfg.resolution is None else f"longer side {cfg.resolution} ({resolution})",
        "resize": "bicubic; generated resized to the ground truth's size",
        "mask": cfg.mask, "masked": cfg.mask != "none",
        "pairing": cfg.pairing,
        "ssim": "11x11 Gaussian, sigma 1.5, K1 0.01, K2 0.03, valid region, mean over RGB",
        "psnr": "10 log10(1/MSE), data range 1, all channels",
        "lpips_backbone": lpips.backbone if lpips is not None else None,
        "lpips": "v0.1 linear layers (torchmetrics), inputs in [-1, 1]" if lpips is not None else None,
        "identity_model": clip.name if clip is not None else None,
        "identity": "cosine of L2-normalised image embeddings",
        "alignment": "similarity (Umeyama) on centres for pairing" if cfg.pairing == "pose" else "none (by name)",
    }  # fmt: skip


def _add_view_figures(figures: Figures, rows: list[dict], identity: dict, fid_value: float | None,
                      protocol: dict) -> None:  # fmt: skip
    """Per-metric means by bucket (PSNR +inf views left out, noted), identity O2O and FID."""
    buckets = ["all", "frontal", "back"]
    for metric, better, unit in (("psnr", "higher", "dB"), ("ssim", "higher", ""), ("lpips", "lower", ""),
                                 ("clip_to_gt", "higher", "cos"), ("clip_i2o", "higher", "cos"),
                                 ("arcface_to_gt", "higher", "cos"), ("arcface_i2o", "higher", "cos")):  # fmt: skip
        for bucket in buckets:
            chosen = [row[metric] for row in rows if metric in row and (bucket == "all" or row["bucket"] == bucket)]
            if not chosen:
                continue
            values = np.asarray(chosen, dtype=np.float64)
            n_inf = int(np.isinf(values).sum())
            note = (
                f"{n_inf} identical view(s) with PSNR +inf left out of the mean" if metric == "psnr" and n_inf else ""
            )
            if metric == "psnr" and n_inf == len(values):
                value, note = math.inf, "every view identical: PSNR +inf (written as null)"
            else:
                value = _mean(values)
            figures.add("views", metric, value, protocol=protocol, bucket=bucket, n=len(values), unit=unit,
                        better=better, note=note)  # fmt: skip
    for metric, value in identity.items():
        figures.add("views", metric, value, protocol=protocol, n=len(rows), unit="cos", better="higher")
    if fid_value is not None:
        figures.add("views", "fid", fid_value, protocol=protocol, n=len(rows), better="lower",
                    note="reference = ground-truth views")  # fmt: skip


def _arcface(cfg: Config, inputs: Inputs, rows: list[dict], gen: list, ref: list, identity: dict,
             skipped: list[dict]) -> None:  # fmt: skip
    if cfg.arcface == "off":
        return
    reason = image_metrics.arcface_unavailable()
    if reason is not None:
        if cfg.arcface == "on":
            raise ModelError(reason)
        skipped.append({"metric": "arcface", "reason": reason})
        return
    arc = image_metrics.ArcFaceEmbedder()
    emb_gen, emb_ref = arc(gen), arc(ref)
    found = ~np.isnan(emb_gen[:, 0])
    both = found & ~np.isnan(emb_ref[:, 0])
    for row, value, ok in zip(rows, image_metrics.cosine_paired(emb_gen, emb_ref), both, strict=True):
        row["arcface_to_gt"] = float(value) if ok else math.nan
    identity["arcface_o2o"] = image_metrics.mean_pairwise_cosine(emb_gen[found])
    identity["arcface_faces_found"] = int(found.sum())
    if inputs.input_image is not None:
        emb_in = arc([io.read_image(inputs.input_image)])[0]
        if not np.isnan(emb_in[0]):
            for row, value, ok in zip(rows, image_metrics.cosine_to(emb_in, emb_gen), found, strict=True):
                row["arcface_i2o"] = float(value) if ok else math.nan


def _fid(cfg: Config, gen: list, ref: list, device: str, skipped: list[dict]) -> float | None:
    reason = image_metrics.fid_unavailable(len(gen), cfg.fid_min_images)
    if reason is not None:
        skipped.append({"metric": "fid", "reason": reason})
        return None
    return image_metrics.fid(ref, gen, device)
