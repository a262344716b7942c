"""`nvf align`: per-view scale and shift of the depth maps against the SfM points (paper Eq. 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from nvfcli.console import print_paths, progress_bar
from nvfcli.options import Captures, Json, Overwrite, Shard
from stages import align as stage
from stages.core import worktree


def align(
    work: Annotated[
        Path,
        typer.Argument(help="Work folder holding <capture>/depth.safetensors (+ poses, sparse).", show_default=False),
    ],  # fmt: skip
    reference_view: Annotated[
        Optional[str], typer.Option(help="Align every view to this view's depth (image name).")
    ] = None,
    reference_depth: Annotated[
        Optional[Path],
        typer.Option(
            help="Align to given z-depth: a depth record or a folder of <capture>/depth.safetensors (evaluation)."
        ),
    ] = None,
    robust: Annotated[stage.Robust, typer.Option(help="lmeds, tukey, huber, ransac or none.")] = "lmeds",
    prefilter: Annotated[
        bool,
        typer.Option(
            "--prefilter/--no-prefilter", help="Skip depth edges and salt; read SfM points off the median map."
        ),
    ] = True,
    ransac_threshold: Annotated[float, typer.Option(help="RANSAC inlier threshold, relative.")] = 0.03,
    seed: Annotated[int, typer.Option(help="Seed of subsampling and RANSAC.")] = 0,
    masks: Annotated[
        bool, typer.Option("--masks/--no-masks", help="Sample inside the head mask of masks.safetensors when present.")
    ] = True,
    shard: Shard = None,
    captures: Captures = None,
    overwrite: Overwrite = False,
    json_out: Json = False,
) -> None:
    """Fit each view's depth to the reference (SfM points by default) and write WORK/<capture>/aligned.safetensors.

    Examples: `nvf align work`; `nvf align work --robust tukey --no-prefilter` (the pre-0.x fit);
    `nvf align work --reference-depth data/synth/groundtruth` (evaluate against ground truth).
    """
    if reference_view and reference_depth:
        raise typer.BadParameter("give --reference-view or --reference-depth, not both")
    reference = "view" if reference_view else "depth" if reference_depth else "sparse"
    cfg = stage.Config(reference=reference, reference_view=reference_view,
                       reference_depth=str(reference_depth) if reference_depth else None, robust=robust,
                       ransac_threshold=ransac_threshold, seed=seed, prefilter=prefilter, use_masks=masks)  # fmt: skip
    ids = worktree.read_capture_ids(captures) if captures else None
    with progress_bar("align") as progress:
        written = stage.run(work, cfg, shard=worktree.Shard.parse(shard), capture_ids=ids, overwrite=overwrite,
                            progress=progress)  # fmt: skip
    print_paths(written, json_out)
