"""`nvf triplets`: the training index — D_I per image, pairs with relative-pose codes, splits by person."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from nvfcli.console import print_paths, progress_bar
from nvfcli.options import Json, Layout, Overwrite, Seed
from stages import triplets as stage
from stages.core import dataset

IdList = Optional[list[str]]


def triplets(
    work: Annotated[
        Path, typer.Argument(help="Work folder holding <capture>/poses + embed records.", show_default=False)
    ],
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Index file [default: WORK/triplets.safetensors].")
    ] = None,
    data: Annotated[Optional[Path], typer.Option(help="Dataset folder [default: the one nvf embed read].")] = None,
    layout: Layout = "auto",
    pairs: Annotated[str, typer.Option(help="all, adjacent, nearest:K or random:K (within a capture).")] = "all",
    exclude_interp: Annotated[
        bool, typer.Option("--exclude-interp", help="Leave out views with interpolated poses.")
    ] = False,
    pose_code: Annotated[
        stage.PoseCode, typer.Option(help="Conditioning: paper (12-D), zero123 (4-D) or both.")
    ] = "paper",
    train_split: Annotated[float, typer.Option(help="Fraction of persons for training.")] = 0.9,
    val_split: Annotated[Optional[float], typer.Option(help="Fraction for validation [default: the rest].")] = None,
    test_split: Annotated[float, typer.Option(help="Fraction of persons for testing.")] = 0.0,
    seed: Seed = 0,
    protocol: Annotated[
        Optional[str], typer.Option(help="Multi-PIE protocol E, P, M or U (restricts sources).")
    ] = None,
    subject: Annotated[IdList, typer.Option(help="Subjects to keep, e.g. 1-10,12 (repeatable).")] = None,
    session: Annotated[IdList, typer.Option(help="Sessions to keep, e.g. 1,3.")] = None,
    camera: Annotated[IdList, typer.Option(help="Cameras to keep, e.g. 051,050.")] = None,
    expression: Annotated[IdList, typer.Option(help="Expressions to keep: neutral, smile, ...")] = None,
    illumination: Annotated[IdList, typer.Option(help="Shots to keep: 0 = no flash, 1-18 flashes.")] = None,
    depth: Annotated[stage.DepthChoice, typer.Option(help="Depth in D_I: auto, aligned, depth or none.")] = "auto",
    min_depth_quality: Annotated[
        str, typer.Option(help="Aligned depth of views below this align quality is left out: failed, weak, good.")
    ] = "weak",
    skip_missing: Annotated[bool, typer.Option("--skip-missing", help="Skip captures without records.")] = False,
    csv: Annotated[bool, typer.Option("--csv/--no-csv", help="Also write the CSV views.")] = True,
    overwrite: Overwrite = False,
    json_out: Json = False,
) -> None:
    """Build WORK/triplets.safetensors (+ .csv, .images.csv) from the poses and embed records of WORK.

    Examples: `nvf triplets work`; `nvf triplets work --pairs nearest:2 --train-split 0.8 --val-split 0.1 --seed 1`;
    `nvf triplets work --protocol P --exclude-interp --pose-code both`.
    """
    cfg = stage.Config(
        layout=layout, pairs=pairs, exclude_interp=exclude_interp, pose_code=pose_code, train_split=train_split,
        val_split=val_split, test_split=test_split, seed=seed, protocol=protocol.upper() if protocol else None,
        subjects=dataset.parse_ids(subject or [], 3, "subject"),
        sessions=dataset.parse_ids(session or [], 2, "session"), cameras=dataset.parse_ids(camera or [], 3, "camera"),
        expressions=tuple(e.strip() for value in expression or [] for e in value.split(",") if e.strip()),
        shots=dataset.parse_ids(illumination or [], 2, "illumination"), depth=depth,
        min_depth_quality=min_depth_quality, skip_missing=skip_missing, csv=csv,
    )  # fmt: skip
    with progress_bar("triplets") as progress:
        written = stage.run(work, out, cfg, data=data, overwrite=overwrite, progress=progress)
    print_paths(written, json_out)
