"""`nvf train`: fine-tune the view-conditioned diffusion model on a triplet index."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from nvfcli.console import print_paths, progress_bar
from nvfcli.options import Json, Opt, Overwrite, config_options, preset_help
from stages import train as stage
from stages.core.errors import InputError


@config_options(stage.Config, {
    "person_aware": Opt(("--person-aware/--random-batches",)),
    "shuffle_within_person": Opt(("--shuffle-within-person/--monotonic",)),
    "wandb": Opt(("--wandb",), type=bool, default=False, parse=lambda on: on or None),
})  # fmt: skip
def train(
    triplets: Annotated[Path, typer.Argument(help="Triplet index (nvf triplets).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (checkpoints, logs).", show_default=False)],
    preset: Annotated[str, typer.Option(help=preset_help(stage))] = "paper",
    resume: Annotated[Optional[str], typer.Option(help="latest, or a checkpoint folder.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (torchrun: one GPU per process).")] = "auto",
    overwrite: Overwrite = False,
    json_out: Json = False,
    **changes: Any,
) -> None:
    """Train on the train split of TRIPLETS; checkpoints go to OUT/checkpoints/step-N/.

    Examples: `nvf train work/triplets.safetensors --out run`; `nvf train work/triplets.safetensors --out run
    --resume latest`; several GPUs: `torchrun --nproc-per-node 4 $(which nvf) train ... --out run`.
    """
    if preset not in stage.PRESETS:
        raise InputError(f"unknown --preset '{preset}': choose one of {', '.join(stage.PRESETS)}")
    cfg = dataclasses.replace(stage.PRESETS[preset], **changes)
    with progress_bar("train") as progress:
        written = stage.train(triplets, out, cfg, device=device, resume=resume, overwrite=overwrite, progress=progress)
    print_paths(written, json_out)
