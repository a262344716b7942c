"""Stage `groundtruth`: a synth dataset's ground-truth poses copied into the work tree.

`nvf run` with ``poses_source = "groundtruth"`` runs this in place of `stages.poses`, for smoke
runs on images too small for SfM: ``WORK/<capture>/poses.safetensors`` from
``DATA/groundtruth/<capture>/poses.safetensors``, tagged ``nvf_stage=groundtruth`` so nothing
mistakes them for estimated poses. A capture is skipped when up to date (input hash = the
ground-truth file's bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages.core import dataset, io, worktree
from stages.core.contract import CaptureJob, Context, Write, for_each_capture, require_data
from stages.core.errors import InputError

STAGE = io.GROUNDTRUTH_STAGE  # the stage tag of the copied records


@dataclass(frozen=True)
class Config:
    """Where the ground truth is."""

    folder: str = "groundtruth"
    """The ground-truth folder, relative to the dataset (as `nvf synth` writes it)."""


PRESETS = {"default": Config()}


def run(ctx: Context, cfg: Config = Config()) -> list[Path]:
    """Copy the ground-truth poses of the selected captures of ``ctx.data`` into ``ctx.work``."""
    data = require_data(ctx, STAGE)
    truth = data / cfg.folder

    def plan(capture: dataset.Capture) -> CaptureJob[Path]:
        source = truth / capture.id / "poses.safetensors"
        if not source.is_file():
            raise InputError(f"{source}: no ground-truth poses; poses_source=groundtruth works on `nvf synth` data "
                             "only, use poses_source=sfm (the default) for real captures")  # fmt: skip
        target = worktree.record_path(ctx.work, capture.id, "poses")
        return CaptureJob(capture, (target,), io.hash_inputs("groundtruth-poses", source), source)

    def copy(job: CaptureJob[Path]) -> Write:
        record = io.load_record(job.state, kind="poses")
        extra = {k: v for k, v in record.extra.items() if not k.endswith("_convention")}
        return lambda: [io.save_record(job.outputs[0], record.tensors, kind="poses", stage=STAGE, capture=job.capture.id,
                               names=record.names, config={"source": str(job.state)}, inputs_hash=job.inputs_hash,
                               extra=extra)]  # fmt: skip

    return for_each_capture(ctx, STAGE, dataset.scan(data).captures, plan, copy)
