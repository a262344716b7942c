"""Writing the triplet index: the record from every capture's rows, then its CSV views (pairs and
images) beside it.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from stages.core import io
from stages.triplets.codes import view_order
from stages.triplets.config import (
    KIND,
    OPTIONAL_SCHEMA,
    POSE_NORMALIZATION,
    SCHEMA,
    SPLITS,
    STAGE,
    Config,
    PairSpec,
    record_schema,
)
from stages.triplets.load import TripletSet, load_triplets
from stages.triplets.rows import _CaptureRows
from stages.triplets.splits import assign_splits, check_splits


def _rel(path: Path | str, base: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def _write(out: Path, rows: list[_CaptureRows], cfg: Config, spec: PairSpec, data_root: Path, layout: str,
           inputs_hash: str, embed_meta: dict[str, str]) -> list[Path]:  # fmt: skip
    base = out.parent
    base.mkdir(parents=True, exist_ok=True)
    subjects = sorted({r.capture.subject for r in rows})
    split_of = assign_splits(subjects, cfg.train_split, cfg.val_split, cfg.test_split, cfg.seed)
    subject_ids = {s: i for i, s in enumerate(subjects)}
    per_image: dict[str, list[np.ndarray]] = {key: [] for key in SCHEMA if key not in ("pose_scale",)}
    image_paths, cameras, captures_meta = [], [], []
    pair_codes_list, zero123_list = [], []
    offset = 0
    for c, r in enumerate(rows):
        n = len(r.views)
        images = [r.capture.images[i] for i in r.views]
        image_paths += [image.path for image in images]
        cameras += [image.camera for image in images]
        per_image["capture_index"].append(np.full(n, c, np.int32))
        per_image["subject_index"].append(np.full(n, subject_ids[r.capture.subject], np.int32))
        per_image["split"].append(np.full(n, SPLITS[split_of[r.capture.subject]], np.int8))
        per_image["embed_row"].append(r.embed_rows.astype(np.int32))
        per_image["pose_row"].append(r.pose_rows.astype(np.int32))
        per_image["depth_row"].append(r.depth_rows.astype(np.int32))
        per_image["pose_source"].append(r.pose_source.astype(np.int8))
        per_image["azimuth_deg"].append(r.azimuth.astype(np.float32))
        per_image["elevation_deg"].append(r.elevation.astype(np.float32))
        per_image["order"].append(view_order(r.azimuth, r.elevation))
        per_image["pair_source"].append((r.sources + offset).astype(np.int32))
        per_image["pair_target"].append((r.targets + offset).astype(np.int32))
        pair_codes_list.append(r.codes.astype(np.float32))
        if r.zero123 is not None:
            zero123_list.append(r.zero123.astype(np.float32))
        captures_meta.append({
            "id": r.capture.id, "subject": r.capture.subject, "session": r.capture.session,
            "recording": r.capture.recording, "shot": r.capture.shot, "expression": r.capture.expression,
            **{kind: _rel(r.records[kind], base) if kind in r.records else "" for kind in ("poses", "embed", "depth")},
        })  # fmt: skip
        offset += n
    tensors: dict[str, np.ndarray] = {
        key: np.concatenate(parts) for key, parts in per_image.items() if key not in ("pose_code",)
    }
    tensors["pose_code"] = np.concatenate(pair_codes_list).reshape(-1, io.POSE_CODES["pose_code"])
    tensors["pose_scale"] = np.asarray([r.scale for r in rows], dtype=np.float64)
    if cfg.pose_code != "paper":
        tensors["zero123_code"] = np.concatenate(zero123_list).reshape(-1, io.POSE_CODES["zero123_code"])
    check_splits(tensors["subject_index"], tensors["split"], subjects, out)
    splits_meta = {name: sorted(s for s in subjects if split_of[s] == name) for name in SPLITS}
    embed_dim = int(embed_meta["embed_dim"]) if embed_meta["embed_dim"].isdigit() else 0
    extra = {
        "captures": json.dumps(captures_meta),
        "subjects": json.dumps(subjects),
        "splits": json.dumps(splits_meta),
        "camera_ids": json.dumps(cameras),
        "data_root": _rel(data_root, base),
        "layout": layout,
        "pairs": str(spec),
        "conditioning": cfg.pose_code,
        "pose_code_dim": str(io.POSE_CODE_DIMS[cfg.pose_code]),
        "z_cond_dim": str(io.z_cond_dim(embed_dim, cfg.pose_code)),
        "pose_normalization": POSE_NORMALIZATION,
        "pose_sources": json.dumps(io.POSE_SOURCES),
        "splits_codes": json.dumps(SPLITS),
        "azimuth_source": "multipie-camera-table" if layout == "multipie" else "poses",
        "optional_tensors": json.dumps(sorted(k for k in OPTIONAL_SCHEMA if k in tensors)),
        **embed_meta,
    }
    io.save_record(out, tensors, kind=KIND, stage=STAGE, capture="*", names=image_paths, config=cfg,
                   inputs_hash=inputs_hash, extra=extra, schema=record_schema(tensors))  # fmt: skip
    written = [out]
    if cfg.csv:
        triplets = load_triplets(out)
        written += write_csv(triplets, out.with_suffix(".csv"), out.with_suffix(".images.csv"))
    return written


def write_csv(triplets: TripletSet, pairs_path: Path, images_path: Path) -> list[Path]:
    """Write the pair view (one row per pair) and the image view (one row per D_I) as CSV.

    Image and record paths are relative to the CSV's folder (the triplet file's folder).
    """
    rec = triplets.record
    base = pairs_path.parent
    split_names = {v: k for k, v in SPLITS.items()}
    cameras = json.loads(rec.extra.get("camera_ids", "[]")) or [""] * triplets.n_images
    image_rel = [_rel(triplets.image_path(i), base) for i in range(triplets.n_images)]
    capture_index = rec["capture_index"]

    def rel_record(c: int, kind: Any) -> str:
        found = triplets.record_path(c, kind)
        return _rel(found, base) if found is not None else ""

    with io.atomic_path(images_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "image", "capture", "subject", "split", "camera", "azimuth_deg", "elevation_deg",
                         "order", "pose_source", "embed_record", "embed_row", "pose_record", "pose_row",
                         "depth_record", "depth_row"])  # fmt: skip
        for i in range(triplets.n_images):
            c = int(capture_index[i])
            writer.writerow([
                i, image_rel[i], triplets.captures[c]["id"], triplets.subjects[int(rec["subject_index"][i])],
                split_names[int(rec["split"][i])], cameras[i], f"{rec['azimuth_deg'][i]:.6g}",
                f"{rec['elevation_deg'][i]:.6g}", int(rec["order"][i]), int(rec["pose_source"][i]),
                rel_record(c, "embed"), int(rec["embed_row"][i]), rel_record(c, "poses"), int(rec["pose_row"][i]),
                rel_record(c, "depth"), int(rec["depth_row"][i]),
            ])  # fmt: skip
    has_z123 = "zero123_code" in rec.tensors
    with io.atomic_path(pairs_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["pair", "split", "subject", "capture", "source_row", "target_row", "source_image", "target_image",
                  "source_camera", "target_camera", "source_azimuth_deg", "target_azimuth_deg"]  # fmt: skip
        header += [f"pose_{k}" for k in range(12)] + ([f"zero123_{k}" for k in range(4)] if has_z123 else [])
        writer.writerow(header)
        for p, (s, t) in enumerate(zip(rec["pair_source"], rec["pair_target"], strict=True)):
            s, t = int(s), int(t)
            row = [p, split_names[int(rec["split"][s])], triplets.subjects[int(rec["subject_index"][s])],
                   triplets.captures[int(capture_index[s])]["id"], s, t, image_rel[s], image_rel[t], cameras[s],
                   cameras[t], f"{rec['azimuth_deg'][s]:.6g}", f"{rec['azimuth_deg'][t]:.6g}"]  # fmt: skip
            row += [f"{v:.9g}" for v in rec["pose_code"][p]]
            if has_z123:
                row += [f"{v:.9g}" for v in rec["zero123_code"][p]]
            writer.writerow(row)
    return [pairs_path, images_path]
