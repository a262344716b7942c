"""The one stage contract: every stage is ``run(ctx, cfg) -> list[Path]``.

`Context` is what a stage runs on and for whom: the work tree, the dataset, which captures (a
``--captures`` list and a ``--shard``), the device, whether to redo up-to-date work, a progress
callback, and the few named paths a stage reads or writes outside its default place in the work
tree (`Context.paths`: e.g. train's ``triplets`` and ``out``, sample's ``image``). ``cfg`` is the
stage's own frozen Config. The stage returns the paths it wrote ([] when everything was up to date).

Per-capture stages walk their captures through `for_each_capture`, which owns the loop:
select (captures, shard) -> plan (input hash of the capture's inputs + config, the outputs) ->
up to date? (skip unless ``overwrite``) -> compute and write -> progress. A capture's outputs are
written atomically (`io.save_record`, `io.write_json`, `io.write_ply` write a temp file and rename
it) only after every input was read and every output computed (a bad input leaves the old
outputs untouched); a capture with several outputs is written as one `io.record_set`, whose
completion mark (the job's last output) is removed first and written last, so a kill leaves the
old set or a set the next run redoes, never a mix. The batched model stages (depth, masks, embed) plan every capture first
(`pending`) and then run their batches across captures (`stages.core.view_batches`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from stages.core import io, worktree
from stages.core.batching import ProgressFn
from stages.core.dataset import Capture
from stages.core.errors import InputError

log = logging.getLogger("nvf")

Captured = TypeVar("Captured")


@dataclass(frozen=True)
class Context:
    """What a stage runs on. Paths are used as given (relative to the current folder)."""

    work: Path
    """The work tree: ``WORK/<capture>/<kind>.safetensors``, ``WORK/triplets.safetensors``, ``WORK/train/`` ..."""
    data: Path | None = None
    """The dataset the work tree is made from (the images); None where a stage reads only the work tree."""
    captures: Sequence[str] | None = None
    """Capture ids to process (unknown ids are an InputError); None: every capture."""
    shard: worktree.Shard = worktree.Shard()
    """This job's shard of the captures (subjects dealt round-robin)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N (stages that run no model ignore it)."""
    overwrite: bool = False
    """Redo work whose outputs are up to date."""
    progress: ProgressFn | None = None
    """``progress(done, total)`` as the stage goes (units are the stage's: captures, images, steps)."""
    paths: Mapping[str, Path] = field(default_factory=dict)
    """Named paths in place of the stage's defaults in the work tree; each stage's ``PATHS`` lists
    the names it takes and their defaults (e.g. ``{"out": WORK/train}``)."""
    partial: bool = False
    """The captures are a subset of the dataset (a ``--captures`` list or one shard of several): a
    stage over every capture (triplets) indexes what was made rather than requiring all."""

    def given(self, name: str) -> Path | None:
        """``paths[name]``, or None when not given."""
        return Path(self.paths[name]) if self.paths.get(name) is not None else None

    def path(self, name: str, default: str | Path) -> Path:
        """``paths[name]``, else ``default`` (relative to the work tree when relative)."""
        given = self.given(name)
        if given is not None:
            return given
        default = Path(default)
        return default if default.is_absolute() else self.work / default

    def select(self, captures: Sequence[Capture]) -> list[Capture]:
        """The captures of this run: the ``captures`` ids (in their order) and then the shard."""
        return worktree.select_captures(captures, shard=self.shard, capture_ids=self.captures)


def selected(ctx: Context, stage: str, captures: Sequence[Capture]) -> list[Capture]:
    """`Context.select`, with a warning when the shard or the ``--captures`` list leaves nothing to do."""
    chosen = ctx.select(captures)
    if not chosen:
        log.warning("%s: no captures in this shard/selection (shard %d/%d); nothing to do", stage, ctx.shard.index,
                    ctx.shard.count)  # fmt: skip
    return chosen


def require_data(ctx: Context, stage: str) -> Path:
    """``ctx.data``, or an InputError saying the stage reads the dataset's images."""
    if ctx.data is None:
        raise InputError(f"{stage} reads the dataset's images: give the dataset folder (DATA)")
    return Path(ctx.data)


@dataclass
class CaptureJob(Generic[Captured]):
    """One capture's unit of work: its outputs, the hash of its inputs, and what the plan read."""

    capture: Capture
    outputs: tuple[Path, ...]
    """What it writes; the last one is the completion mark of a multi-file set (`io.record_set`)."""
    inputs_hash: str
    state: Captured
    """Whatever the plan found that the compute step needs (inputs read, paths resolved)."""
    is_current: Callable[[], bool] | None = None
    """Whether the outputs carry ``inputs_hash``; None: the first output is a record (`worktree.is_up_to_date`)."""

    def up_to_date(self) -> bool:
        if self.is_current is not None:
            return self.is_current()
        return worktree.is_up_to_date(self.outputs[0], self.inputs_hash)


Plan = Callable[[Capture], CaptureJob[Any]]
Write = Callable[[], Sequence[Path]]
Compute = Callable[[CaptureJob[Any]], Write]
"""Reads the capture's inputs and computes its outputs; returns ``write``, which writes them (through
`io`'s atomic writers) and returns their paths. Nothing is written before every input was read, so
a bad input fails with the old outputs untouched."""


def pending(ctx: Context, stage: str, jobs: Sequence[CaptureJob[Captured]]) -> list[CaptureJob[Captured]]:
    """The jobs whose outputs are not up to date (all of them with ``overwrite``), logged."""
    todo = []
    for job in jobs:
        if ctx.overwrite or not job.up_to_date():
            todo.append(job)
        else:
            log.debug("%s: %s is up to date, skipped", stage, job.capture.id)
    log.info("%s: %d of %d capture(s) to write", stage, len(todo), len(jobs))
    return todo


def for_each_capture(ctx: Context, stage: str, captures: Sequence[Capture], plan: Plan, compute: Compute) -> list[Path]:
    """Run a per-capture stage: select the captures of ``ctx``; for each, ``plan`` it (inputs hash,
    outputs), skip it when up to date (unless ``ctx.overwrite``), else ``compute`` it and write what
    it made (a multi-file set as one `io.record_set`); report progress per capture.

    Captures are planned one at a time, just before they run, so a capture's inputs are read once
    and a failure stops the run with every earlier capture complete. Returns the paths written.
    """
    chosen = selected(ctx, stage, captures)
    if not chosen:
        return []
    written: list[Path] = []
    if ctx.progress is not None:
        ctx.progress(0, len(chosen))
    for done, capture in enumerate(chosen, start=1):
        job = plan(capture)
        if not ctx.overwrite and job.up_to_date():
            log.debug("%s: %s is up to date, skipped", stage, capture.id)
        else:
            written.extend(_write_job(job, compute))
        if ctx.progress is not None:
            ctx.progress(done, len(chosen))
    return written


def _write_job(job: CaptureJob[Any], compute: Compute) -> list[Path]:
    write = compute(job)  # every input read, every output computed: only now is anything replaced
    if len(job.outputs) == 1:
        return [Path(p) for p in write()]
    with io.record_set(job.outputs[-1]):  # the mark goes first and comes back last
        return [Path(p) for p in write()]
