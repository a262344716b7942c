"""The stage contract's per-capture driver: select, plan, skip what is up to date, compute, write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stages.core import dataset, io, worktree
from stages.core.contract import CaptureJob, Context, for_each_capture, pending
from stages.core.errors import InputError

CAPTURES = [dataset.Capture(f"cap{i}", f"{i % 3 + 1:03d}", ()) for i in range(6)]


def _stage(work: Path, values: dict[str, float], computed: list[str], outputs: int = 1):
    """A toy stage: each capture's record holds its value; its input hash is the value."""

    def plan(capture: dataset.Capture) -> CaptureJob[float]:
        value = values[capture.id]
        if np.isnan(value):
            raise InputError(f"{capture.id}: no value")
        record = worktree.record_path(work, capture.id, "depth")
        paths = (record,) if outputs == 1 else (record, record.parent / "mark.json")
        return CaptureJob(capture, paths, io.hash_inputs("toy", value), value)

    def compute(job: CaptureJob[float]):
        computed.append(job.capture.id)
        if job.state < 0:
            raise InputError(f"{job.capture.id}: negative")

        def write() -> list[Path]:
            record = io.save_record(job.outputs[0], {"depth": np.full((1, 2, 2), job.state, np.float32)}, kind="depth",
                                    stage="toy", capture=job.capture.id, names=["v"], inputs_hash=job.inputs_hash)  # fmt: skip
            if len(job.outputs) == 1:
                return [record]
            return [record, io.write_json(job.outputs[1], {"inputs": job.inputs_hash})]

        return write

    return plan, compute


def test_skips_what_is_up_to_date_and_redoes_only_what_changed(tmp_path):
    values = {c.id: float(i) for i, c in enumerate(CAPTURES)}
    computed: list[str] = []
    progress: list[tuple[int, int]] = []
    ctx = Context(tmp_path, progress=lambda done, total: progress.append((done, total)))
    written = for_each_capture(ctx, "toy", CAPTURES, *_stage(tmp_path, values, computed))
    assert [p.parent.name for p in written] == [c.id for c in CAPTURES] and len(computed) == 6
    assert progress == [(i, 6) for i in range(7)]
    computed.clear()
    assert for_each_capture(Context(tmp_path), "toy", CAPTURES, *_stage(tmp_path, values, computed)) == []
    assert computed == []
    values["cap4"] = 40.0
    written = for_each_capture(Context(tmp_path), "toy", CAPTURES, *_stage(tmp_path, values, computed))
    assert computed == ["cap4"] and io.load_record(written[0])["depth"][0, 0, 0] == 40.0
    computed.clear()
    for_each_capture(Context(tmp_path, overwrite=True), "toy", CAPTURES, *_stage(tmp_path, values, computed))
    assert len(computed) == 6


def test_selects_the_captures_and_the_shard(tmp_path):
    values = {c.id: 1.0 for c in CAPTURES}
    computed: list[str] = []
    for_each_capture(Context(tmp_path, captures=["cap5", "cap1"]), "toy", CAPTURES, *_stage(tmp_path, values, computed))
    assert computed == ["cap5", "cap1"]
    computed.clear()
    for_each_capture(
        Context(tmp_path, shard=worktree.Shard(0, 3)), "toy", CAPTURES, *_stage(tmp_path, values, computed)
    )
    assert computed == ["cap0", "cap3"]  # subject 001 of 001-003
    with pytest.raises(InputError, match="not in the dataset"):
        for_each_capture(Context(tmp_path, captures=["nope"]), "toy", CAPTURES, *_stage(tmp_path, values, computed))


def test_a_bad_input_leaves_the_old_outputs_and_the_captures_before_it_done(tmp_path):
    values = {c.id: 1.0 for c in CAPTURES}
    for_each_capture(Context(tmp_path), "toy", CAPTURES, *_stage(tmp_path, values, [], outputs=2))
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    values.update(cap0=2.0, cap2=-1.0)  # cap2's compute fails after cap0 was rewritten
    computed: list[str] = []
    with pytest.raises(InputError, match="cap2: negative"):
        for_each_capture(Context(tmp_path), "toy", CAPTURES, *_stage(tmp_path, values, computed, outputs=2))
    assert computed == ["cap0", "cap2"]
    after = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    changed = sorted({p.parent.name for p in before if before[p] != after.get(p)})
    assert changed == ["cap0"]  # cap2's record and its mark are untouched


def test_pending_keeps_the_order_and_drops_the_up_to_date(tmp_path):
    values = {c.id: 1.0 for c in CAPTURES}
    plan, _compute = _stage(tmp_path, values, [])
    for_each_capture(Context(tmp_path, captures=["cap1", "cap3"]), "toy", CAPTURES, plan, _compute)
    jobs = [plan(c) for c in CAPTURES]
    assert [j.capture.id for j in pending(Context(tmp_path), "toy", jobs)] == ["cap0", "cap2", "cap4", "cap5"]
    assert len(pending(Context(tmp_path, overwrite=True), "toy", jobs)) == 6


def test_context_paths_default_into_the_work_tree(tmp_path):
    ctx = Context(tmp_path / "work", paths={"out": tmp_path / "elsewhere.safetensors"})
    assert ctx.path("out", "triplets.safetensors") == tmp_path / "elsewhere.safetensors"
    assert ctx.path("model", "train") == tmp_path / "work" / "train"
    assert ctx.given("image") is None and ctx.given("out") == tmp_path / "elsewhere.safetensors"
