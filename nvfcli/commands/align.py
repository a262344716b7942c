"""`nvf align`: per-view scale and shift of the depth maps against the SfM points (paper Eq. 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from nvfcli.console import print_paths, progress_bar
from nvfcli.options import Captures, Json, Opt, Overwrite, Shard, config_options, stage_context
from stages import align as stage


@config_options(stage.Config, {
    "reference_depth": Opt(type=Path, parse=str, hint="Evaluation: align to ground-truth z-depth."),
    "use_masks": Opt(("--masks/--no-masks",)),
}, exclude=("reference",))  # fmt: skip
def align(
    work: Annotated[
        Path,
        typer.Argument(help="Work folder holding <capture>/depth.safetensors (+ poses, sparse).", show_default=False),
    ],  # fmt: skip
    shard: Shard = None,
    captures: Captures = None,
    overwrite: Overwrite = False,
    json_out: Json = False,
    **changes: Any,
) -> None:
    """Fit each view's depth to the reference (SfM points by default) and write WORK/<capture>/aligned.safetensors.

    Examples: `nvf align work`; `nvf align work --robust tukey --no-prefilter` (the pre-0.x fit);
    `nvf align work --reference-depth data/synth/groundtruth` (evaluate against ground truth).
    """
    if "reference_view" in changes and "reference_depth" in changes:
        raise typer.BadParameter("give --reference-view or --reference-depth, not both")
    reference = "view" if "reference_view" in changes else "depth" if "reference_depth" in changes else "sparse"
    cfg = stage.Config(reference=reference, **changes)
    with progress_bar("align") as progress:
        written = stage.run(stage_context(work, shard=shard, captures=captures, overwrite=overwrite, progress=progress),
                            cfg)  # fmt: skip
    print_paths(written, json_out)
