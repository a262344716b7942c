"""The depth section of `nvf evaluate`: per-view alignment, AbsRel, RMSE and δ thresholds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.core import io
from stages.core import masks as headmasks
from stages.core.errors import InputError
from stages.evaluate.common import Figures, _mean
from stages.evaluate.sources import _paired, _tree

if TYPE_CHECKING:
    from stages.evaluate import Config, DepthAlignment, Inputs


def align_depth(est_hw: np.ndarray, ref_hw: np.ndarray, mode: DepthAlignment, kind: str = "depth") -> np.ndarray:
    """`est_hw` mapped onto the reference's z-depth by `mode`, fitted over pixels valid in both.

    kind="disparity": fitted in disparity space against 1/z, then inverted (non-positive -> 0).
    Pixels invalid in the estimate stay 0.
    """
    est = np.asarray(est_hw, dtype=np.float64)
    ref = np.asarray(ref_hw, dtype=np.float64)
    valid = np.isfinite(est) & np.isfinite(ref) & (ref > 0) & (est > 0 if kind == "depth" else np.isfinite(est))
    if kind == "disparity":
        valid &= est != 0
    target = np.where(ref > 0, 1.0 / np.where(ref > 0, ref, 1.0), 0.0) if kind == "disparity" else ref
    x, y = est[valid], target[valid]
    scale, shift = 1.0, 0.0
    if len(x) >= 2 and mode != "none":
        if mode == "scale":
            scale = float(x @ y / max(x @ x, 1e-300))
        elif mode == "median":
            scale = float(np.median(y) / np.median(x)) if np.median(x) != 0 else 1.0
        elif mode == "scale_shift":
            A = np.stack([x, np.ones_like(x)], axis=1)
            (scale, shift), *_ = np.linalg.lstsq(A, y, rcond=None)
        else:
            raise InputError(f"unknown depth alignment {mode!r}: none, scale, scale_shift or median")
    fitted = scale * est + shift
    ok = np.isfinite(est) & (est != 0) & (fitted > 0)
    if kind == "disparity":
        return np.where(ok, 1.0 / np.where(ok, fitted, 1.0), 0.0)
    return np.where(ok & (est > 0), fitted, 0.0)


def depth_errors(est_hw: np.ndarray, ref_hw: np.ndarray) -> dict[str, float]:
    """AbsRel, RMSE, δ<1.25^k over pixels valid (> 0, finite) in both; n = pixel count."""
    est, ref = np.asarray(est_hw, np.float64), np.asarray(ref_hw, np.float64)
    valid = np.isfinite(est) & np.isfinite(ref) & (est > 0) & (ref > 0)
    if not valid.any():
        return {
            "abs_rel": math.nan,
            "rmse": math.nan,
            "delta1": math.nan,
            "delta2": math.nan,
            "delta3": math.nan,
            "n": 0,
        }
    e, r = est[valid], ref[valid]
    ratio = np.maximum(e / r, r / e)
    return {
        "abs_rel": float(np.mean(np.abs(e - r) / r)),
        "rmse": float(np.sqrt(np.mean((e - r) ** 2))),
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25**2)),
        "delta3": float(np.mean(ratio < 1.25**3)),
        "n": int(valid.sum()),
    }


def _resize_nearest(map_hw: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize by pixel centres: row j of the output samples row floor((j+0.5) h / H)."""
    h, w = map_hw.shape
    if (h, w) == (height, width):
        return map_hw
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(int), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(int), w - 1)
    return map_hw[rows[:, None], cols[None, :]]


def _load_depth(path: Path) -> tuple[io.Record, str]:
    meta = io.read_record_metadata(path)
    kind = meta.get("nvf_kind", "")
    if kind not in ("depth", "aligned"):
        raise InputError(f"{path}: holds a '{kind}' record; evaluate depth needs a depth or aligned record: "
                         "pass one (nvf depth and nvf align write them)")  # fmt: skip
    record = io.load_record(path, kind=kind)
    return record, io.depth_kind(record)


def _depth_section(inputs: Inputs, cfg: Config, figures: Figures) -> tuple[dict, dict[str, dict]]:
    est_tree = _tree(inputs.depth, ("aligned.safetensors", "depth.safetensors"), "depth")
    ref_tree = _tree(inputs.depth_ref, ("depth.safetensors",), "reference depth")
    captures, maps = {}, {}
    protocol: dict[str, Any] = {"alignment": cfg.depth_alignment, "alignment_scope": "per view",
                                "valid": "pixels > 0 and finite in both",
                                "resolution": "reference's (estimate resized, nearest)",
                                "units": "reference units (RMSE)"}  # fmt: skip
    masked = set()
    for cid, est_path, ref_path in _paired(est_tree, ref_tree, "depth"):
        est, kind = _load_depth(est_path)
        ref, _ = _load_depth(ref_path)
        ref_index = {n: i for i, n in enumerate(ref.names)}
        head = _depth_head_masks(est_path, est, cfg)
        masked.add(head is not None)
        per_view, shown = [], []
        for i, name in enumerate(est.names):
            if name not in ref_index:
                continue
            ref_hw = ref["depth"][ref_index[name]].astype(np.float64)
            if head is not None:  # outside the head mask the reference counts as invalid
                ref_hw = np.where(headmasks.resample_nearest(head[i : i + 1], ref_hw.shape)[0], ref_hw, 0.0)
            est_hw = _resize_nearest(est["depth"][i].astype(np.float64), *ref_hw.shape)
            aligned = align_depth(est_hw, ref_hw, cfg.depth_alignment, kind)
            per_view.append({"name": name, **depth_errors(aligned, ref_hw)})
            shown.append((name, ref_hw, aligned))
        if not per_view:
            raise InputError(f"{cid}: no depth map of {est_path} pairs by name with {ref_path}")
        summary = {k: _mean(v[k] for v in per_view) for k in ("abs_rel", "rmse", "delta1", "delta2", "delta3")}
        captures[cid] = {"kind": kind, "record": est.kind, "inputs": [str(est_path), str(ref_path)],
                         "mask": str(est_path.parent / "masks.safetensors") if head is not None else "none",
                         "summary": summary, "per_view": per_view}  # fmt: skip
        maps[cid] = shown
    kinds = sorted({c["kind"] for c in captures.values()})
    protocol["mask"] = {frozenset([True]): "head mask (head ∪ hair) of <capture>/masks.safetensors beside the estimate",
                        frozenset([False]): "none"}.get(frozenset(masked), "per capture (see its 'mask')")  # fmt: skip
    protocol["estimate_kind"] = kinds if len(kinds) > 1 else kinds[0]
    n = sum(len(c["per_view"]) for c in captures.values())
    for key, better, unit in (("abs_rel", "lower", ""), ("rmse", "lower", "ref units"), ("delta1", "higher", ""),
                              ("delta2", "higher", ""), ("delta3", "higher", "")):  # fmt: skip
        figures.add("depth", key, _mean(c["summary"][key] for c in captures.values()), protocol=protocol, n=n,
                    unit=unit, better=better)  # fmt: skip
    return {"protocol": protocol, "captures": captures}, maps


def _depth_head_masks(est_path: Path, est: io.Record, cfg: Config) -> np.ndarray | None:
    """[V, H, W] bool head masks of the estimate's views from the masks record beside it, or None
    (`depth_mask` none, or auto without a record)."""
    path = est_path.parent / "masks.safetensors"
    if cfg.depth_mask not in ("auto", "none", "masks"):
        raise InputError(f"unknown depth_mask {cfg.depth_mask!r}: use auto, masks or none")
    if cfg.depth_mask == "none" or (cfg.depth_mask == "auto" and not path.is_file()):
        return None
    if not path.is_file():
        raise InputError(f"{path}: not found, and depth_mask=masks needs it; run `nvf masks DATA --out WORK` first")
    return headmasks.view_head_masks(headmasks.load_masks(path), est.names)


def _depth_masks(inputs: Inputs) -> dict[str, np.ndarray]:
    masks = {}
    for _, path in _tree(inputs.depth_ref, ("depth.safetensors",), "reference depth (for mask=depth)").items():
        record, _ = _load_depth(path)
        masks.update({name: record["depth"][i] > 0 for i, name in enumerate(record.names)})
    return masks
