"""The stage: render every capture of a `Config` and write it in the Multi-PIE layout, with ground truth."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from stages.core import dataset, io
from stages.core.errors import InputError
from stages.synth.config import SELECTION_FIELDS, Config, validate
from stages.synth.render import render_capture, surface_cloud
from stages.synth.rig import camera_ids

log = logging.getLogger("nvf")

STAGE = "synth"


def captures(cfg: Config) -> list[tuple[int, int, int, int]]:
    """(subject, session, recording, shot) of every capture the config asks for, in order."""
    out = []
    for subject in range(1, cfg.subjects + 1):
        for session in cfg.sessions:
            n_rec = len(dataset.SESSION_EXPRESSIONS[f"{session:02d}"]) if cfg.recordings == "all" else 1
            for recording in range(1, n_rec + 1):
                out.extend((subject, session, recording, shot) for shot in range(cfg.shots))
    return out


def groundtruth_dir(out: Path, capture: str) -> Path:
    """Folder of a capture's ground truth: ``OUT/groundtruth/<capture id>``."""
    return Path(out) / "groundtruth" / capture


def _render_config(cfg: Config) -> dict:
    """The fields that decide how captures look (what the input hash covers)."""
    return {k: v for k, v in asdict(cfg).items() if k not in SELECTION_FIELDS}


def run(
    out: Path, cfg: Config, *, overwrite: bool = False, progress: Callable[[int, int], None] | None = None
) -> list[Path]:
    """Render every capture of `cfg` under `out` in the Multi-PIE layout, with ground truth.

    Writes ``out/sessionNN/multiview/...png``, per capture ``out/groundtruth/<id>/`` holding
    ``poses.safetensors``, ``depth.safetensors`` and ``surface.ply``, and ``out/synth.json``.
    A capture whose files exist with the same render config is skipped unless `overwrite` (or
    ``cfg.overwrite``). Returns the paths written.
    """
    validate(cfg)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file: synth writes a dataset folder; pass a new or empty folder")
    overwrite = overwrite or cfg.overwrite
    todo = captures(cfg)
    written: list[Path] = []
    render_cfg = _render_config(cfg)
    for done, (subject, session, recording, shot) in enumerate(todo):
        cid = dataset.capture_id(subject, session, recording, shot)
        inputs_hash = io.hash_inputs(render_cfg, cid)
        if not overwrite and _complete(out, cfg, cid, (subject, session, recording, shot), inputs_hash):
            log.debug("synth: %s exists, skipped", cid)
        else:
            written.extend(_write_capture(out, cfg, (subject, session, recording, shot), inputs_hash))
            log.info("synth: wrote %s", cid)
        if progress is not None:
            progress(done + 1, len(todo))
    summary = {
        "stage": STAGE,
        "config": cfg,
        "conventions": {
            "poses": io.POSE_CONVENTION,
            "depth": io.DEPTH_CONVENTION,
            "world": "up is -y; the face looks toward -z; head ~2 units tall, centred at the origin",
        },
        "cameras": camera_ids(cfg),
        "captures": [dataset.capture_id(*key) for key in todo],
    }
    written.append(io.write_json(out / "synth.json", summary))
    return written


def _image_paths(out: Path, cfg: Config, key: tuple[int, int, int, int]) -> list[Path]:
    subject, session, recording, shot = key
    return [out / dataset.multipie_relpath(subject, session, recording, cam, shot) for cam in camera_ids(cfg)]


def _complete(out: Path, cfg: Config, cid: str, key: tuple[int, int, int, int], inputs_hash: str) -> bool:
    """Whether a capture is fully written with this render config (poses are written last)."""
    gt = groundtruth_dir(out, cid)
    poses = gt / "poses.safetensors"
    if not poses.is_file() or not (gt / "depth.safetensors").is_file() or not (gt / "surface.ply").is_file():
        return False
    try:
        if io.read_record_metadata(poses).get("inputs") != inputs_hash:
            return False
    except Exception:  # safetensors raises its own error type for a corrupt file: render again
        return False
    return all(path.is_file() for path in _image_paths(out, cfg, key))


def _write_capture(out: Path, cfg: Config, key: tuple[int, int, int, int], inputs_hash: str) -> list[Path]:
    """Render and write one capture: images, depth, surface, then poses (the completion mark)."""
    subject, session, recording, shot = key
    render = render_capture(subject, session, recording, shot, cfg)
    gt = groundtruth_dir(out, render.capture)
    paths = [
        io.write_image(path, image) for path, image in zip(_image_paths(out, cfg, key), render.images_nhw3, strict=True)
    ]
    meta = {"stage": STAGE, "capture": render.capture, "names": render.names, "config": cfg, "inputs_hash": inputs_hash}
    paths.append(
        io.save_record(
            gt / "depth.safetensors",
            {"depth": render.depth_nhw},
            kind="depth",
            extra={"depth_kind": "depth", "source": "synth-groundtruth"},
            **meta,
        )
    )
    points, colours, normals = surface_cloud(subject, render.expression, cfg)
    paths.append(io.write_ply(gt / "surface.ply", points, colours, normals))
    n = len(render.names)
    size = cfg.resolution
    tensors = {
        "R": render.R,
        "T": render.T,
        "K": render.K,
        "width": np.full(n, size, dtype=np.int32),
        "height": np.full(n, size, dtype=np.int32),
    }
    paths.append(
        io.save_record(
            gt / "poses.safetensors",
            tensors,
            kind="poses",
            extra={
                "camera_ids": json.dumps(render.camera_ids),
                "source": "synth-groundtruth",
                "expression": render.expression,
                "light": json.dumps(render.light),
            },
            **meta,
        )
    )
    return paths
