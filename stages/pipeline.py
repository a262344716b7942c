"""`nvf run`: the stages chained over one work tree, with a manifest of what ran.

``run(data, out, cfg)`` walks the stage registry `STEPS` in order: scan -> poses -> depth -> masks
-> align -> cloud -> embed -> triplets (align, cloud and reconstruct use the head masks), then
train / sample / reconstruct / evaluate where the config has a section for them. ``out`` is the
work tree itself (``OUT/<capture>/*.safetensors``, ``OUT/index.json``, ``OUT/triplets.safetensors``,
``OUT/train/`` ...), so every single-stage command works on it too.

Every stage is called the same way, through the stage contract (`stages.core.contract`):
``module.run(Context(OUT, data=DATA, captures=..., device=..., overwrite=..., paths=...), cfg)``,
``cfg`` the stage's preset with the config section's fields over it, ``paths`` the section's
named paths (keys the module's ``PATHS`` lists, and an ``inputs`` table).

What reruns: every stage is called on every run and skips the captures whose outputs carry the
same input hash (content of the inputs + config) -- the stages' own resume logic. The pipeline adds
versions: when the nvf or library versions differ from those a stage last completed with, the stage
runs with ``overwrite`` (and keeps doing so until one run of it completes). Nothing is trusted by
timestamp, so outputs are never stale; a killed run leaves only temp files, which the next run
removes (`worktree.clean_stale_temp`) before redoing the unfinished captures.

``OUT/manifest.json`` (written atomically after every stage) holds the nvf and library versions,
the dataset and the captures covered, the shard, and per stage: status (`STATUSES`), the config,
wall time, files and bytes written this run, bytes of its outputs in total, the error line of a
failure, why a stage is unavailable.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib
import json
import logging
import os
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import tomllib

from stages import __version__
from stages.core import dataset, io, worktree
from stages.core.batching import ProgressFn
from stages.core.contract import Context
from stages.core.environment import library_versions
from stages.core.errors import InputError, NvfError, StageFailure

log = logging.getLogger("nvf")

MANIFEST = "manifest.json"
INDEX = "index.json"
TRIPLETS = "triplets.safetensors"
STATUSES = ("done", "up-to-date", "failed", "unavailable", "not-configured", "not-run", "running")
"""done: wrote files; up-to-date: ran, nothing to redo; failed: raised (error line kept); unavailable:
its module cannot be imported yet; not-configured: optional and not in the config; not-run: after
--until, a failure, or a global stage in a sharded run; running: the run was killed during it."""

PipelinePreset = Literal["paper", "tiny"]
PosesSource = Literal["sfm", "groundtruth"]


@dataclass(frozen=True)
class Config:
    """What `nvf run` runs and with which settings."""

    preset: PipelinePreset = "paper"
    """Model and stage presets: `paper` (DPT-Large, CLIP ViT-B/32, Zero123-XL) or `tiny` (random tiny
    models built locally: smoke runs, tests, throughput of the plumbing)."""
    until: str | None = None
    """Stop after this stage (None: the last configured one)."""
    poses_source: PosesSource = "sfm"
    """`sfm` (the poses stage) or `groundtruth` (copy a synth dataset's DATA/groundtruth poses; align
    then fits against the ground-truth depth; for synthetic smoke runs where images are too small for SfM)."""
    stages: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Per-stage settings: ``{stage: {"preset": NAME, FIELD: VALUE, ...}}`` over the stage's preset. A
    section for train, sample, reconstruct or evaluate switches that stage on."""
    overwrite: bool = False
    """Redo every stage's work even where its outputs are up to date."""


PRESETS: dict[str, Config] = {"paper": Config(), "tiny": Config(preset="tiny")}

# the stage preset each pipeline preset picks, where the stage has presets of that name. `tiny`'s
# random depth model predicts noise around 0 (a tenth of its pixels positive): the robust defaults
# rightly reject all of it, so its smoke run aligns with the plain estimator (align `tukey`) to let
# every later stage run
STAGE_PRESETS: dict[str, dict[str, str]] = {
    "paper": {"poses": "default", "depth": "paper", "masks": "paper", "align": "default", "cloud": "default", "embed": "paper",
              "triplets": "paper", "train": "paper", "reconstruct": "default", "evaluate": "default"},
    "tiny": {"poses": "default", "depth": "tiny", "masks": "tiny", "align": "tukey", "cloud": "default", "embed": "tiny",
             "triplets": "paper", "train": "tiny", "reconstruct": "test", "evaluate": "tiny"},
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The registry of stage steps
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One stage in the chain: its module (whose ``run(ctx, cfg)`` is the stage contract,
    `stages.core.contract`), what it reads and writes, and where it may run."""

    name: str
    module: str
    scope: Literal["dataset", "capture", "global"]
    """dataset: reads DATA once; capture: one output set per capture (shardable); global: the whole tree."""
    needs: tuple[str, ...]
    """Steps whose outputs it reads."""
    outputs: tuple[str, ...]
    """Files it writes: per capture (names in OUT/<capture>/) or, global, paths relative to OUT."""
    optional: bool = False
    """Runs only when the config has a section for it."""
    on_a_subset: bool = False
    """A global step that also runs on a --captures subset (on what was made); never on a shard."""


STEPS: tuple[Step, ...] = (
    Step("scan", "stages.scan", "dataset", (), (INDEX,)),
    Step("poses", "stages.poses", "capture", (), ("poses.safetensors",)),
    Step("depth", "stages.depth", "capture", (), ("depth.safetensors",)),
    Step("masks", "stages.masks", "capture", (), ("masks.safetensors",)),
    Step("align", "stages.align", "capture", ("poses", "depth"), ("aligned.safetensors",)),
    Step("cloud", "stages.cloud", "capture", ("align",), ("cloud.ply", "cloud_metrics.json")),
    Step("embed", "stages.embed", "capture", (), ("embed.safetensors",)),
    Step("triplets", "stages.triplets", "global", ("poses", "embed", "align"),
         (TRIPLETS, "triplets.csv", "triplets.images.csv"), on_a_subset=True),
    Step("train", "stages.train", "global", ("triplets",), ("train",), optional=True),
    Step("sample", "stages.sample", "global", ("train",), ("samples",), optional=True),
    Step("reconstruct", "stages.reconstruct", "capture", ("poses", "depth"), (), optional=True),
    Step("evaluate", "stages.evaluate", "global", ("poses",), ("report",), optional=True),
)  # fmt: skip
GROUNDTRUTH_POSES = "stages.groundtruth"  # the poses step's module with poses_source = "groundtruth"
STEP_NAMES = tuple(step.name for step in STEPS)
CAPTURE_STEPS = tuple(step.name for step in STEPS if step.scope == "capture")


def step(name: str) -> Step:
    """The registered step called ``name`` (InputError listing the names otherwise)."""
    for candidate in STEPS:
        if candidate.name == name:
            return candidate
    raise InputError(f"unknown stage '{name}': choose one of {', '.join(STEP_NAMES)}")


def module_name(item: Step, cfg: Config) -> str:
    """The module a step runs: its own, or for poses with ``poses_source = "groundtruth"`` the copy
    of a synth dataset's ground truth."""
    return GROUNDTRUTH_POSES if item.name == "poses" and cfg.poses_source == "groundtruth" else item.module


def load_module(item: Step, cfg: Config = Config()) -> ModuleType | str:
    """The step's module, or why it cannot be used (not importable yet, or no ``run``)."""
    name = module_name(item, cfg)
    item = dataclasses.replace(item, module=name)
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and item.module.startswith(exc.name):
            return f"{item.module} does not exist in this install; this stage is not written or not installed yet"
        return f"{item.module} cannot be imported ({exc}); install what it needs"
    except ImportError as exc:
        return f"{item.module} cannot be imported ({exc})"
    if not callable(getattr(module, "run", None)):
        return f"{item.module} has no run(...) yet"
    return module


def enabled(item: Step, cfg: Config) -> bool:
    """Mandatory steps always; optional ones when the config has a section for them."""
    return not item.optional or item.name in cfg.stages


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

_SECTION_KEYS = {"preset", "inputs"}  # keys of a stage section that are not its Config fields


def stage_config(item: Step, module: ModuleType, cfg: Config) -> Any:
    """The stage's Config: its preset (the section's `preset`, else the pipeline preset's pick),
    with the section's fields replaced. Lists become tuples; unknown fields are an InputError."""
    section = dict(cfg.stages.get(item.name, {}))
    presets = getattr(module, "PRESETS", {})
    name = section.get("preset") or STAGE_PRESETS[cfg.preset].get(item.name)
    if name is not None and name not in presets:
        if "preset" in section:
            raise InputError(f"[stages.{item.name}] preset '{name}' is not one of: {', '.join(presets)}")
        name = None
    base = presets[name] if name is not None else module.Config()
    if item.name == "align" and cfg.poses_source == "groundtruth" and "reference" not in section:
        section.update(reference="depth", reference_depth=section.get("reference_depth") or "{data}/groundtruth")
    fields = {f.name: f for f in dataclasses.fields(base)}
    changes: dict[str, Any] = {}
    for key, value in section.items():
        if key in _SECTION_KEYS or key in getattr(module, "PATHS", {}):
            continue
        if key not in fields:
            raise InputError(f"[stages.{item.name}] has no setting '{key}' for {module.__name__}; settings: "
                             f"{', '.join(fields)}")  # fmt: skip
        changes[key] = _coerce(value, fields[key], base)
    if item.name == "scan" and isinstance(changes.get("filters"), Mapping):
        changes["filters"] = dataset.Filters(**{k: tuple(v) if isinstance(v, list) else v
                                                for k, v in changes["filters"].items()})  # fmt: skip
    return dataclasses.replace(base, **changes)


def _coerce(value: Any, spec: dataclasses.Field, base: Any) -> Any:
    if isinstance(value, str) and "{" in value:
        return value  # placeholders are filled by `_fill`
    if isinstance(value, list):
        current = getattr(base, spec.name)
        hint = str(spec.type)
        if isinstance(current, tuple) or "tuple" in hint:
            return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


def stage_paths(item: Step, module: ModuleType, cfg: Config, data: Path, out: Path) -> dict[str, Path]:
    """The named paths of a stage section (`Context.paths`): its keys the module's ``PATHS`` names
    (e.g. sample's ``image``) and its ``inputs`` table (e.g. evaluate's), ``{data}``/``{out}`` filled."""
    section = cfg.stages.get(item.name, {})
    names = getattr(module, "PATHS", {})
    given = {key: value for key, value in section.items() if key in names}
    inputs = section.get("inputs", {})
    unknown = sorted(set(inputs) - set(names))
    if unknown:
        raise InputError(
            f"[stages.{item.name}.inputs] has no input '{unknown[0]}'; inputs: {', '.join(names) or 'none'}"
        )
    given.update(inputs)
    return {key: Path(str(value).format(data=data, out=out)) for key, value in given.items()}


def _fill(cfg: Any, data: Path, out: Path) -> Any:
    """Replace ``{data}`` and ``{out}`` in a stage config's string fields."""
    changes = {}
    for spec in dataclasses.fields(cfg):
        value = getattr(cfg, spec.name)
        if isinstance(value, str) and ("{data}" in value or "{out}" in value):
            changes[spec.name] = value.format(data=data, out=out)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def load_config(path: str | os.PathLike | None, base: Config) -> Config:
    """``base`` updated from a TOML or JSON file: top-level keys are Config fields, ``[stages.NAME]``
    tables the per-stage settings. None returns ``base``."""
    if path is None:
        return base
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    try:
        doc = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({exc})") from None
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise InputError(f"{path}: unknown setting '{unknown[0]}'; top-level settings: {', '.join(sorted(known))}")
    stages = doc.get("stages", {})
    bad = sorted(set(stages) - set(STEP_NAMES))
    if bad:
        raise InputError(f"{path}: [stages.{bad[0]}] is not a stage; stages: {', '.join(STEP_NAMES)}")
    return dataclasses.replace(base, **{k: v for k, v in doc.items() if k != "stages"},
                               stages={**base.stages, **stages})  # fmt: skip


def validate(cfg: Config) -> None:
    if cfg.preset not in STAGE_PRESETS:
        raise InputError(f"unknown preset '{cfg.preset}': choose one of {', '.join(STAGE_PRESETS)}")
    if cfg.poses_source not in typing.get_args(PosesSource):
        raise InputError(f"unknown poses_source '{cfg.poses_source}': use sfm or groundtruth")
    if cfg.until is not None:
        step(cfg.until)


# ----------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------


def versions() -> dict[str, Any]:
    """nvf and library versions, and their hash (a change reruns the stages)."""
    libraries = library_versions()
    return {"nvf": __version__, "libraries": libraries, "hash": io.hash_inputs(__version__, libraries)}


def read_manifest(out: str | os.PathLike) -> dict[str, Any]:
    """OUT/manifest.json, or {} when absent or unreadable (then nothing is assumed from it)."""
    path = Path(out) / MANIFEST
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, not JSON, not UTF-8
        return {}
    return doc if isinstance(doc, dict) else {}


def capture_ids_hash(ids: Sequence[str]) -> str:
    """Order-free hash of a set of capture ids (for merge checks)."""
    return io.hash_inputs(sorted(ids))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _bytes(paths: Sequence[Path]) -> int:
    total = 0
    for path in paths:
        path = Path(path)
        if path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            total += path.stat().st_size
    return total


def stage_outputs(item: Step, out: Path, capture_ids: Sequence[str]) -> list[Path]:
    """Every output path of a step for these captures (existing or not)."""
    if item.scope == "capture":
        return [worktree.capture_dir(out, c) / name for c in capture_ids for name in item.outputs]
    return [out / name for name in item.outputs]


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def run(
    data: Path,
    out: Path,
    cfg: Config = Config(),
    *,
    shard: worktree.Shard = worktree.Shard(),
    capture_ids: Sequence[str] | None = None,
    device: str = "auto",
    progress: Callable[[str], ProgressFn | None] | None = None,
) -> dict[str, Any]:
    """Run the chain over ``data`` into the work tree ``out``; returns the manifest (also in OUT/manifest.json).

    ``shard`` / ``capture_ids`` restrict the per-capture stages (global stages then wait for the
    merged tree and are `not-run`); ``progress(stage)`` may return a per-stage progress callback.
    Raises the first stage failure (after recording it); raises StageFailure at the end when a
    configured stage is unavailable.
    """
    validate(cfg)
    started = time.time()
    data, out = Path(data).resolve(), Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    removed = worktree.clean_stale_temp(out, before=started)
    if removed:
        log.info("run: removed %d temp file(s) left by an interrupted run (e.g. %s)", len(removed), removed[0].name)
    scan_cfg = stage_config(step("scan"), importlib.import_module("stages.scan"), cfg)
    index = dataset.scan(data, scan_cfg.layout, scan_cfg.filters)
    everything = [c.id for c in index.captures]
    selected = [c.id for c in worktree.select_captures(index.captures, shard=shard, capture_ids=capture_ids)]
    partial = len(selected) < len(everything)
    current = versions()
    previous = read_manifest(out)
    manifest: dict[str, Any] = {
        "nvf_version": __version__,
        "versions": current,
        "data": str(data),
        "out": str(out),
        "dataset": {"layout": index.layout, "captures": len(everything), "ids_hash": capture_ids_hash(everything),
                    "images": sum(len(c.images) for c in index.captures)},
        "shard": {"index": shard.index, "count": shard.count},
        "captures": selected,
        "config": io.to_jsonable(cfg),
        "device": device,
        "started": _now(),
        "status": "running",
        "stages": {},
    }  # fmt: skip
    last = _last_step(cfg)
    unavailable: list[str] = []
    blocked: dict[str, str] = {}  # step -> why it cannot run
    try:
        for item in STEPS:
            before = previous.get("stages", {}).get(item.name, {})
            entry = _run_step(item, cfg, last, blocked, before, current, manifest, out, data, index, selected,
                              partial, device, progress)  # fmt: skip
            if "versions_hash" not in entry and before.get("versions_hash"):
                entry["versions_hash"] = before["versions_hash"]  # a stage that did not run keeps what it was made with
            manifest["stages"][item.name] = entry
            if entry["status"] == "unavailable":
                unavailable.append(f"{item.name} ({entry['reason']})")
            io.write_json(out / MANIFEST, manifest)
    except BaseException as exc:
        manifest["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        manifest["finished"] = _now()
        manifest["seconds"] = round(time.time() - started, 3)
        io.write_json(out / MANIFEST, manifest)
        raise
    manifest["status"] = "done" if not unavailable else "incomplete"
    manifest["finished"] = _now()
    manifest["seconds"] = round(time.time() - started, 3)
    io.write_json(out / MANIFEST, manifest)
    if unavailable:
        raise StageFailure(f"configured stage(s) unavailable: {'; '.join(unavailable)}; the stages before them ran "
                           f"(see {out / MANIFEST})")  # fmt: skip
    return manifest


def _last_step(cfg: Config) -> str:
    if cfg.until is not None:
        return cfg.until
    return [item.name for item in STEPS if enabled(item, cfg)][-1]


def _run_step(
    item: Step, cfg: Config, last: str, blocked: dict[str, str], before: Mapping[str, Any], current: dict[str, Any],
    manifest: dict[str, Any], out: Path, data: Path, index: dataset.DatasetIndex, selected: list[str],
    partial: bool, device: str, progress: Callable[[str], ProgressFn | None] | None,
) -> dict[str, Any]:  # fmt: skip
    """Run one step (or say why not); returns its manifest entry. Re-raises a failure after recording it."""
    past_end = STEP_NAMES.index(item.name) > STEP_NAMES.index(last)
    if not enabled(item, cfg):
        return {"status": "not-configured"}
    if past_end:
        blocked[item.name] = f"after --until {last}"
        return {"status": "not-run", "reason": blocked[item.name]}
    needs = [name for name in item.needs if name in blocked]
    if needs:
        blocked[item.name] = f"needs {needs[0]}, which did not run ({blocked[needs[0]]})"
        return {"status": "not-run", "reason": blocked[item.name]}
    sharded = manifest["shard"]["count"] > 1
    if item.scope == "global" and partial and (sharded or not item.on_a_subset):
        blocked[item.name] = "needs every capture: merge the shards (nvf merge) and rerun nvf run on the merged tree"
        return {"status": "not-run", "reason": blocked[item.name]}
    module = load_module(item, cfg)
    if isinstance(module, str):
        blocked[item.name] = "unavailable"
        log.warning("run: %s unavailable: %s", item.name, module)
        return {"status": "unavailable", "reason": module}
    stage_cfg = _fill(stage_config(item, module, cfg), data, out)
    paths = stage_paths(item, module, cfg, data, out)
    # a version change forces a full redo, and keeps forcing it until one run of the stage completes
    changed = bool(before) and before.get("versions_hash") not in (None, current["hash"])
    redo = cfg.overwrite or changed or (before.get("status") in ("running", "failed") and before.get("overwrite"))
    if changed:
        log.info("run: %s: versions changed since it last ran; redoing all its work", item.name)
    ctx = Context(out, data=data, captures=selected, device=device, overwrite=bool(redo), paths=paths, partial=partial,
                  progress=progress(item.name) if progress is not None else None)  # fmt: skip
    entry: dict[str, Any] = {"status": "running", "config": io.to_jsonable(stage_cfg), "overwrite": bool(redo),
                             "versions_hash": before.get("versions_hash") if not redo and before else current["hash"],
                             "started": _now()}  # fmt: skip
    manifest["stages"][item.name] = entry
    io.write_json(out / MANIFEST, manifest)
    log.info("run: %s ...", item.name)
    clock, cpu_clock = time.perf_counter(), time.process_time()
    try:
        written = [Path(p) for p in module.run(ctx, stage_cfg)]
    except BaseException as exc:
        entry.update(status="failed", seconds=round(time.perf_counter() - clock, 3),
                     error=str(exc) if isinstance(exc, NvfError) else f"{type(exc).__name__}: {exc}")  # fmt: skip
        if isinstance(exc, KeyboardInterrupt):
            entry["status"] = "running"  # interrupted: the next run finishes it
        raise
    seconds = time.perf_counter() - clock
    outputs = stage_outputs(item, out, selected)
    entry.update(
        status="done" if written else "up-to-date",
        seconds=round(seconds, 3),
        cpu_seconds=round(time.process_time() - cpu_clock, 3),  # all threads of this process (not other processes)
        files_written=len(written),
        bytes_written=_bytes(written),
        bytes_total=_bytes(outputs) if item.outputs else _bytes(written),
        captures=len(selected) if item.scope == "capture" else None,
        captures_written=len({p.parent.name for p in written if p.parent.parent == out})
        if item.scope == "capture"
        else None,
        versions_hash=current["hash"],
        overwrite=False,
        outputs=list(item.outputs),
    )
    if item.scope == "capture" and seconds > 0:
        entry["captures_per_s"] = round(entry["captures_written"] / seconds, 3)
    log.info("run: %s %s in %.1f s (%d file(s), %.1f MB)", item.name, entry["status"], seconds, len(written),
             entry["bytes_written"] / 1e6)  # fmt: skip
    return entry
