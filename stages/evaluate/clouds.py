"""The clouds section of `nvf evaluate`: Chamfer and F-score against a reference surface, Table V quoted."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from stages.core import io
from stages.evaluate.common import Figures, _mean
from stages.evaluate.sources import _paired, _tree

if TYPE_CHECKING:
    from stages.evaluate import Config, Inputs
    from stages.evaluate.poses import PoseResult


def _cloud_section(inputs: Inputs, cfg: Config, figures: Figures, poses: dict[str, PoseResult]) -> dict:
    from stages.core import metrics

    est_tree = _tree(inputs.cloud, ("cloud.ply",), "clouds")
    ref_tree = _tree(inputs.cloud_ref, ("surface.ply",), "reference surfaces")
    captures = {}
    alignments = set()
    for cid, est_path, ref_path in _paired(est_tree, ref_tree, "clouds"):
        points = io.read_ply(est_path).points
        ref_points = io.read_ply(ref_path).points
        if cid in poses:
            pr = poses[cid]
            points = pr.scale * points @ pr.R_world.T + pr.t_world
            alignment = "pose similarity (Umeyama on camera centres)"
        else:
            alignment = "none (same frame assumed)"
        alignments.add(alignment)
        threshold = cfg.fscore_threshold_rel * metrics.bbox_diagonal(ref_points)
        chamfer = metrics.chamfer_distance(points, ref_points)
        fs = metrics.fscore(points, ref_points, threshold)
        diagnostics_path = est_path.parent / "cloud_metrics.json"
        diagnostics = io.read_json(diagnostics_path) if diagnostics_path.is_file() else None
        captures[cid] = {
            "inputs": [str(est_path), str(ref_path)],
            "alignment": alignment,
            "n_points": len(points),
            "n_reference": len(ref_points),
            "chamfer": dataclasses.asdict(chamfer),
            "fscore": dataclasses.asdict(fs),
            "table_v": diagnostics,
            "table_v_note": None if diagnostics else f"no {diagnostics_path.name} beside the cloud: run `nvf cloud`",
        }
    protocol = {"alignment": sorted(alignments), "chamfer": "symmetric, not squared: mean_p min_q |p-q| + mean_q "
                "min_p |q-p|, reference units", "fscore_threshold": f"{cfg.fscore_threshold_rel} x reference bbox "
                "diagonal", "table_v": "cloud stage diagnostics quoted as written (self-consistency, not "
                "accuracy)"}  # fmt: skip
    n = len(captures)
    for key, sub, better in (("chamfer", "chamfer", "lower"), ("chamfer", "accuracy", "lower"),
                             ("chamfer", "completeness", "lower"), ("fscore", "fscore", "higher"),
                             ("fscore", "precision", "higher"), ("fscore", "recall", "higher")):  # fmt: skip
        name = sub if key == "fscore" or sub == "chamfer" else f"chamfer_{sub}"
        figures.add("clouds", name, _mean(c[key][sub] for c in captures.values()), protocol=protocol, n=n,
                    unit="ref units" if key == "chamfer" else "", better=better)  # fmt: skip
    for key in TABLE_V_KEYS:
        values = [_dig(c["table_v"], key) for c in captures.values()]
        values = [v for v in values if isinstance(v, (int, float))]
        if values:
            figures.add("clouds", f"table_v.{key}", _mean(values), protocol=protocol, n=len(values),
                        note="cloud-stage diagnostic in the cloud's own units; NN spacing is not Chamfer")  # fmt: skip
    return {"protocol": protocol, "captures": captures}


TABLE_V_KEYS = (
    "removed_percent",
    "mean_nn_distance",
    "density_uniformity_coefficient",
    "local_density_variation",
    "points_per_valid_pixel",
    "coverage_percent",
    "confirmed_percent",
    "view_consistency",
)
"""Table V figures (from the cloud stage's cloud_metrics.json) carried into the summary table."""


def _dig(doc: Any, key: str) -> Any:
    """The first value stored under `key` anywhere in a nested dict (cloud_metrics.json layouts vary)."""
    if isinstance(doc, dict):
        if key in doc:
            return doc[key]
        for value in doc.values():
            found = _dig(value, key)
            if found is not None:
                return found
    return None
