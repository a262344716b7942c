"""`nvf synth`: synthetic Multi-PIE-style captures with ground truth (poses, z-depth, surface)."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import typer

from nvfcli.console import print_paths, progress_bar
from nvfcli.options import Json, Opt, OutDir, Overwrite, Seed, config_options, preset_help
from stages import synth as stage
from stages.core import dataset
from stages.core.errors import InputError


def _sessions(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in dataset.parse_ids([text], 2, "session"))


@config_options(stage.Config, {
    "subjects": Opt(option={"min": 1}),
    "sessions": Opt(type=str, parse=_sessions, hint="Give e.g. 1 or 1-4."),
    "recordings": Opt(("--expressions/--neutral-only",), type=bool, parse=lambda every: "all" if every else "neutral"),
    "shots": Opt(option={"min": 1}),
    "resolution": Opt(option={"min": 16}),
    "elevated": Opt(("--elevated/--ring-only",)),
    "textureless_cameras": Opt(("--textureless",), type=list[str],
                               parse=lambda ids: dataset.parse_ids(ids, 3, "camera") if ids else None,
                               hint="Give camera ids, e.g. 130,050 (repeatable)."),
})  # fmt: skip
def synth(
    out: OutDir,
    preset: Annotated[str, typer.Option(help=preset_help(stage, "Starting point"))] = "default",
    seed: Seed = 0,
    overwrite: Overwrite = False,
    json_out: Json = False,
    **changes: Any,
) -> None:
    """Render synthetic heads from the 15 Multi-PIE cameras, with ground-truth poses, depth and surface.

    Examples: `nvf synth data/synth --subjects 3`; `nvf synth low --preset lowcontrast --resolution 128`;
    `nvf synth fallback --textureless 130,050,200` (views the poses stage must interpolate).
    """
    if preset not in stage.PRESETS:
        raise InputError(f"unknown preset '{preset}'; choose one of: {', '.join(stage.PRESETS)}")
    cfg = dataclasses.replace(stage.PRESETS[preset], seed=seed, overwrite=overwrite, **changes)
    with progress_bar("rendering captures") as progress:
        written = stage.run(out, cfg, progress=progress)
    print_paths(written, json_out)
