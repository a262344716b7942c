"""`nvf train`: fine-tune the view-conditioned diffusion model on a triplet index."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from nvfcli.console import print_paths, progress_bar
from nvfcli.options import Json, Overwrite
from stages import train as stage
from stages.core.errors import InputError


def train(
    triplets: Annotated[Path, typer.Argument(help="Triplet index (nvf triplets).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (checkpoints, logs).", show_default=False)],
    preset: Annotated[str, typer.Option(help="paper (Zero123-XL, Tables II-III) or tiny (tests).")] = "paper",
    base_model: Annotated[Optional[str], typer.Option(help="Diffusers folder or hub id of the base.")] = None,
    conditioning: Annotated[stage.Conditioning, typer.Option(help="paper (524-D MLP) or zero123.")] = "paper",
    resolution: Annotated[Optional[int], typer.Option(help="Square image size.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Pairs per step and process.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimisation steps in all.")] = None,
    learning_rate: Annotated[Optional[float], typer.Option(help="AdamW peak learning rate.")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Warm-up steps before cosine decay.")] = None,
    precision: Annotated[Optional[stage.Precision], typer.Option(help="auto, fp32, fp16 or bf16.")] = None,
    steps_per_person: Annotated[Optional[int], typer.Option(help="Steps on one person before rotating.")] = None,
    shuffle_within_person: Annotated[
        Optional[bool], typer.Option("--shuffle-within-person/--monotonic", help="View order within a person.")
    ] = None,
    person_aware: Annotated[Optional[bool], typer.Option("--person-aware/--random-batches")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Save every N steps.")] = None,
    validate_every: Annotated[Optional[int], typer.Option(help="Validate every K steps (0: never).")] = None,
    ema: Annotated[Optional[bool], typer.Option("--ema/--no-ema", help="Keep EMA weights.")] = None,
    wandb: Annotated[bool, typer.Option("--wandb", help="Also log to Weights & Biases.")] = False,
    resume: Annotated[Optional[str], typer.Option(help="latest, or a checkpoint folder.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (torchrun: one GPU per process).")] = "auto",
    seed: Annotated[Optional[int], typer.Option(help="Random seed; the same seed gives the same run.")] = None,
    overwrite: Overwrite = False,
    json_out: Json = False,
) -> None:
    """Train on the train split of TRIPLETS; checkpoints go to OUT/checkpoints/step-N/.

    Examples: `nvf train work/triplets.safetensors --out run`; `nvf train work/triplets.safetensors --out run
    --resume latest`; several GPUs: `torchrun --nproc-per-node 4 $(which nvf) train ... --out run`.
    """
    if preset not in stage.PRESETS:
        raise InputError(f"unknown --preset '{preset}': choose one of {', '.join(stage.PRESETS)}")
    given = {
        "base_model": base_model,
        "conditioning": conditioning,
        "resolution": resolution,
        "batch_size": batch_size,
        "max_steps": max_steps,
        "learning_rate": learning_rate,
        "warmup_steps": warmup_steps,
        "precision": precision,
        "steps_per_person": steps_per_person,
        "shuffle_within_person": shuffle_within_person,
        "person_aware": person_aware,
        "checkpoint_every": checkpoint_every,
        "validate_every": validate_every,
        "ema": ema,
        "seed": seed,
        "wandb": wandb or None,
    }
    cfg = dataclasses.replace(stage.PRESETS[preset], **{k: v for k, v in given.items() if v is not None})
    with progress_bar("train") as progress:
        written = stage.run(triplets, out, cfg, device=device, resume=resume, overwrite=overwrite, progress=progress)
    print_paths(written, json_out)
