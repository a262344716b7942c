"""Builders for train tests: a synthetic triplet index (no CLIP run) and a tiny Zero123-shaped base."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from stages import synth, train, triplets
from stages.core import dataset, io, models, worktree
from stages.core.contract import Context

EMBED_DIM = 512


def fake_embed(work: Path, data: Path, capture: dataset.Capture, seed: int, dim: int = EMBED_DIM,
               norms: bool = True) -> None:  # fmt: skip
    """An embed record with random unit rows and norms, as `nvf embed` writes it (without running
    CLIP); `norms=False` writes an older record with unit rows only."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(len(capture.images), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    tensors = {"embedding": vectors}
    if norms:
        tensors["norm"] = rng.uniform(5.0, 15.0, size=len(capture.images)).astype(np.float32)
    io.save_record(
        worktree.record_path(work, capture.id, "embed"),
        tensors,
        kind="embed",
        stage="embed",
        capture=capture.id,
        names=capture.names,
        extra={"model": "fake", "pretrained": "", "embed_dim": str(dim), "data_root": str(data.resolve())},
    )


def build_triplets(
    root: Path,
    *,
    subjects: int = 3,
    resolution: int = 32,
    pairs: str = "adjacent",
    pose_code: str = "paper",
    train_split: float = 0.67,
    embed_dim: int = EMBED_DIM,
) -> Path:
    """synth (13-camera ring) -> ground-truth poses + fake embeddings -> triplets; returns the index path.

    With 3 subjects and train_split 0.67: 2 persons train, 1 val; `adjacent` gives 24 pairs a capture.
    """
    data, work = root / "data", root / "work"
    synth.run(data, synth.Config(subjects=subjects, resolution=resolution, elevated=False, surface_points=100))
    for i, capture in enumerate(dataset.scan(data).captures):
        (work / capture.id).mkdir(parents=True)
        shutil.copy(synth.groundtruth_dir(data, capture.id) / "poses.safetensors", work / capture.id)
        fake_embed(work, data, capture, seed=i, dim=embed_dim)
    cfg = triplets.Config(pairs=pairs, pose_code=pose_code, train_split=train_split, csv=False)  # type: ignore[arg-type]
    return triplets.run(Context(work, paths={"out": work / "triplets.safetensors"}), cfg)[0]


def tiny_config(**changes) -> train.Config:
    """The tiny preset with quiet extras (no previews), overridable."""
    base = dataclasses.replace(train.PRESETS["tiny"], preview_images=0, validate_every=0)
    return dataclasses.replace(base, **changes)


def tiny_zero123_base(folder: Path, clip_dim: int = EMBED_DIM) -> Path:
    """The tiny diffusion base plus a cc_projection/ Linear(clip_dim + 4 -> 32) with random weights (kxhit layout)."""
    from safetensors.torch import save_file

    shutil.copytree(models.resolve_model("diffusion", "tiny").id, folder)
    torch.manual_seed(1)
    linear = torch.nn.Linear(clip_dim + 4, 32)
    (folder / "cc_projection").mkdir()
    save_file(
        {"projection.weight": linear.weight.detach().contiguous(), "projection.bias": linear.bias.detach()},
        str(folder / "cc_projection" / "diffusion_pytorch_model.safetensors"),
    )
    (folder / "cc_projection" / "config.json").write_text(json.dumps({"in_channel": clip_dim + 4, "out_channel": 32}))
    return folder
