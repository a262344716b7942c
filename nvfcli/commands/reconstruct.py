"""`nvf reconstruct`: train nerfstudio on a posed view set; points (+ mesh) in nvf's frame and held-out scores."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from nvfcli.console import print_paths, progress_bar
from nvfcli.options import Json, Opt, Overwrite, config_options, preset_help
from stages import reconstruct as stage
from stages.core.errors import InputError


@config_options(stage.Config, {
    "bounded": Opt(("--bounded/--unbounded",)),
    "mesh": Opt(("--mesh",), type=bool, default=False, parse=lambda on: on or None),
    "use_masks": Opt(("--masks/--no-masks",)),
    "ns": Opt(type=list[str], parse=lambda items: stage.parse_overrides(items) or None,
              hint="Give KEY=VALUE (repeatable), e.g. pipeline.model.num_nerf_samples_per_ray=32; added to the preset's."),
})  # fmt: skip
def reconstruct(
    source: Annotated[
        Path,
        typer.Argument(
            help="WORK/<capture> (with poses.safetensors) or a folder with transforms.json + images.",
            show_default=False,
        ),
    ],  # fmt: skip
    out: Annotated[Path, typer.Option("--out", "-o", help="Reconstruction folder (dataset, model, PLY, metrics).")],
    data: Annotated[
        Optional[Path], typer.Option(help="Dataset folder `nvf poses` read (where the images are).")
    ] = None,
    preset: Annotated[str, typer.Option(help=preset_help(stage, "Starting point"))] = "default",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    overwrite: Overwrite = False,
    json_out: Json = False,
    **changes: Any,
) -> None:
    """Train nerfstudio on the views of SOURCE; write OUT/points.ply in the input's frame and OUT/recon_metrics.json.

    Examples: `nvf reconstruct work/001_01_01_00 --data data --out recon/001`;
    `nvf reconstruct views --out recon/views --preset cpu --bounded`;
    `nvf reconstruct work/001_01_01_00 --data data --out recon/001 --method depth-nerfacto --iterations 5000`.
    """
    if preset not in stage.PRESETS:
        raise InputError(f"unknown preset '{preset}'; choose one of: {', '.join(stage.PRESETS)}")
    base = stage.PRESETS[preset]
    extra_ns = changes.pop("ns", ())  # --ns adds to the preset's overrides
    cfg = dataclasses.replace(base, **changes, ns=base.ns + extra_ns)
    with progress_bar("training") as progress:
        written = stage.reconstruct(source, out, cfg, data=data, overwrite=overwrite, device=device,
                                    progress=progress)  # fmt: skip
    print_paths(written, json_out)
