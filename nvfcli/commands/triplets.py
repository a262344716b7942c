"""`nvf triplets`: the training index — D_I per image, pairs with relative-pose codes, splits by person."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from nvfcli.console import print_paths, progress_bar
from nvfcli.options import Json, Opt, Overwrite, config_options, stage_context
from stages import triplets as stage
from stages.core import dataset


def _ids(width: int, what: str) -> Any:
    return lambda values: dataset.parse_ids(values, width, what)


@config_options(stage.Config, {
    "protocol": Opt(parse=str.upper),
    "subjects": Opt(("--subject",), type=list[str], parse=_ids(3, "subject"), hint="Give e.g. 1-10,12 (repeatable)."),
    "sessions": Opt(("--session",), type=list[str], parse=_ids(2, "session"), hint="Give e.g. 1,3."),
    "expressions": Opt(("--expression",), type=list[str], hint="Give e.g. neutral,smile.",
                       parse=lambda values: tuple(e.strip() for value in values for e in value.split(",") if e.strip())),
    "shots": Opt(("--illumination",), type=list[str], parse=_ids(2, "illumination"),
                 hint="Give e.g. 0 (no flash) or 1-18 (flashes)."),
    "cameras": Opt(("--camera",), type=list[str], parse=_ids(3, "camera"), hint="Give e.g. 051,050."),
})  # fmt: skip
def triplets(
    work: Annotated[
        Path, typer.Argument(help="Work folder holding <capture>/poses + embed records.", show_default=False)
    ],
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Index file [default: WORK/triplets.safetensors].")
    ] = None,
    data: Annotated[Optional[Path], typer.Option(help="Dataset folder [default: the one nvf embed read].")] = None,
    overwrite: Overwrite = False,
    json_out: Json = False,
    **changes: Any,
) -> None:
    """Build WORK/triplets.safetensors (+ .csv, .images.csv) from the poses and embed records of WORK.

    Examples: `nvf triplets work`; `nvf triplets work --pairs nearest:2 --train-split 0.8 --val-split 0.1 --seed 1`;
    `nvf triplets work --protocol P --exclude-interp --pose-code both`.
    """
    cfg = stage.Config(**changes)
    with progress_bar("triplets") as progress:
        written = stage.run(stage_context(work, data=data, overwrite=overwrite, progress=progress, paths={"out": out}),
                            cfg)  # fmt: skip
    print_paths(written, json_out)
