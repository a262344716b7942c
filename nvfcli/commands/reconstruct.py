"""`nvf reconstruct`: train nerfstudio on a posed view set; points (+ mesh) in nvf's frame and held-out scores."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from nvfcli.console import print_paths, progress_bar
from nvfcli.options import Json, Overwrite
from stages import reconstruct as stage
from stages.core.errors import InputError


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
    preset: Annotated[str, typer.Option(help=f"Starting point: {', '.join(stage.PRESETS)}.")] = "default",
    method: Annotated[Optional[str], typer.Option(help="nerfacto, depth-nerfacto or splatfacto (CUDA).")] = None,
    iterations: Annotated[Optional[int], typer.Option(help="Training iterations.")] = None,
    rays_per_batch: Annotated[Optional[int], typer.Option(help="Rays per training batch.")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Hold out every k-th view for the metrics.")] = None,
    bounded: Annotated[
        Optional[bool],
        typer.Option(
            "--bounded/--unbounded", help="Object in a box (plain background) or nerfstudio's unbounded scene."
        ),
    ] = None,  # fmt: skip
    export_opacity: Annotated[Optional[float], typer.Option(help="Opacity a pixel needs to give a point.")] = None,
    masks: Annotated[
        Optional[bool],
        typer.Option("--masks/--no-masks", help="Give nerfstudio the capture's head masks (masks.safetensors)."),
    ] = None,
    mesh: Annotated[bool, typer.Option("--mesh", help="Also write mesh.ply (Poisson on the points).")] = False,
    lpips: Annotated[
        bool, typer.Option("--lpips/--no-lpips", help="Score LPIPS too (AlexNet weights in the torch cache).")
    ] = True,
    ns: Annotated[
        Optional[list[str]],
        typer.Option(help="nerfstudio config KEY=VALUE (repeatable), e.g. pipeline.model.num_nerf_samples_per_ray=32."),
    ] = None,  # fmt: skip
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    overwrite: Overwrite = False,
    json_out: Json = False,
) -> None:
    """Train nerfstudio on the views of SOURCE; write OUT/points.ply in the input's frame and OUT/recon_metrics.json.

    Examples: `nvf reconstruct work/001_01_01_00 --data data --out recon/001`;
    `nvf reconstruct views --out recon/views --preset cpu --bounded`;
    `nvf reconstruct work/001_01_01_00 --data data --out recon/001 --method depth-nerfacto --iterations 5000`.
    """
    if preset not in stage.PRESETS:
        raise InputError(f"unknown preset '{preset}'; choose one of: {', '.join(stage.PRESETS)}")
    base = stage.PRESETS[preset]
    changes = {"method": method, "iterations": iterations, "rays_per_batch": rays_per_batch, "eval_every": eval_every,
               "bounded": bounded, "export_opacity": export_opacity, "mesh": mesh or None, "use_masks": masks,
               "lpips": None if lpips else False}  # fmt: skip
    cfg = dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None},
                              ns=base.ns + stage.parse_overrides(ns or []))  # fmt: skip
    with progress_bar("training") as progress:
        written = stage.run(source, out, cfg, data=data, overwrite=overwrite, device=device, progress=progress)
    print_paths(written, json_out)
