"""`nvf sample`: novel views of one photo with a trained run (DDIM + classifier-free guidance, Eq. 9)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from nvfcli.console import print_paths, progress_bar
from nvfcli.options import Json, Opt, Overwrite, config_options, preset_help
from stages import sample as stage
from stages.core.errors import InputError


def _angles(text: Optional[str], option: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise InputError(f"{option} takes degrees separated by commas (e.g. 0,30,60), got '{text}'") from None
    if not values:
        raise InputError(f"{option} is empty: give degrees separated by commas (e.g. 0,30,60)")
    return values


@config_options(stage.Config, {
    "azimuths": Opt(type=str, parse=lambda text: _angles(text, "--azimuths"), hint="Give degrees, e.g. -60,-30,30,60."),
    "elevations": Opt(type=str, parse=lambda text: _angles(text, "--elevations"), hint="Give degrees, e.g. 0,20."),
    "fov_deg": Opt(("--fov",)),
    "use_ema": Opt(("--ema/--no-ema",)),
})  # fmt: skip
def sample(
    model: Annotated[
        Path,
        typer.Argument(
            help="Run folder of nvf train (its latest checkpoint) or a checkpoint folder.",
            show_default=False,
            metavar="RUN",
        ),
    ],  # fmt: skip
    image: Annotated[
        Path, typer.Option("--image", "-i", help="The photo (any size; framed by --crop).", show_default=False)
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (views/, transforms.json).", show_default=False)
    ],
    mask: Annotated[
        Optional[Path], typer.Option(help="Subject mask of the photo (white = keep); background -> white.")
    ] = None,
    preset: Annotated[str, typer.Option(help=preset_help(stage))] = "paper",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    overwrite: Overwrite = False,
    json_out: Json = False,
    **changes: Any,
) -> None:
    """Sample novel views of PHOTO with the model of a run into OUT/views/, with their poses.

    Writes OUT/views/NNN.png (000 = the photo), OUT/transforms.json (ready for `nvf reconstruct
    OUT`) and OUT/contact_sheet.png.

    Examples: `nvf sample run --image face.jpg --out views`; `nvf sample run --image face.jpg --out views
    --orbit 36 --scheduler dpm++ --steps 20`; `nvf sample run -i face.png --mask face_mask.png -o views
    --azimuths -60,-30,30,60 --elevations 0,20`.
    """
    if preset not in stage.PRESETS:
        raise InputError(f"unknown --preset '{preset}': choose one of {', '.join(stage.PRESETS)}")
    cfg = dataclasses.replace(stage.PRESETS[preset], **changes)
    with progress_bar("sample") as progress:
        written = stage.sample(model, image, out, cfg, mask=mask, device=device, overwrite=overwrite, progress=progress)
    print_paths(written, json_out)
