"""No nvf command deletes a file it did not write: folders nvf writes whole are replaced only when
every file in them is nvf's (`io.OWNED_MARK`); anything else is refused with one line, exit 2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nvfcli.app import app
from stages import synth
from stages.core import io
from stages.core.errors import InputError

runner = CliRunner()


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> sha256 of its bytes)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loss") / "data"
    synth.run(root, synth.Config(subjects=1, resolution=32, elevated=False, surface_points=200))
    return root


def _evaluate(data: Path, out: Path, *extra: str):
    gt = str(data / "groundtruth")
    return runner.invoke(app, ["evaluate", "--out", str(out), "--poses", gt, "--poses-ref", gt, "--preset", "tiny",
                               "--device", "cpu", *extra])  # fmt: skip


def test_evaluate_out_on_a_tree_of_inputs_deletes_nothing(data):
    before = tree_digest(data)
    assert len(before) > 15
    for extra in ([], ["--overwrite"]):
        result = _evaluate(data, data, *extra)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "nvf did not write" in lines[0] and str(data) in lines[0], result.stderr
        assert "Traceback" not in result.output
        assert tree_digest(data) == before


def test_a_report_is_replaced_only_while_it_holds_nvf_files_alone(data, tmp_path):
    report = tmp_path / "report"
    assert _evaluate(data, report).exit_code == 0
    written = tree_digest(report)
    assert {"metrics.json", "report.md", io.OWNED_MARK} <= written.keys()
    assert _evaluate(data, report, "--overwrite").exit_code == 0  # nvf's own report: replaced
    assert tree_digest(report).keys() == written.keys()
    (report / "figures" / "notes.txt").write_text("mine")  # a file the user put in the report folder
    before = tree_digest(report)
    result = _evaluate(data, report, "--overwrite")
    assert result.exit_code == 2 and "figures/notes.txt" in result.stderr
    assert tree_digest(report) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left beside it


def test_atomic_dir_swaps_own_folders_and_refuses_others(tmp_path):
    target = tmp_path / "out"
    with io.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("2")
    assert json.loads((target / io.OWNED_MARK).read_text()) == {"files": ["a.txt", "sub/b.txt"]}
    with io.atomic_dir(target) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(tree_digest(target)) == [io.OWNED_MARK, "c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old folder and the temp are gone
    (target / "user.txt").write_text("keep")
    with pytest.raises(InputError, match=r"out holds 1 file\(s\) nvf did not write \(e\.g\. user\.txt\)"):
        with io.atomic_dir(target) as tmp:
            raise AssertionError("the body must not run for a folder that holds a user's file")
    with pytest.raises(InputError, match="user.txt"):
        io.remove_owned_dir(target)
    assert (target / "user.txt").read_text() == "keep" and (target / "c.txt").is_file()
    # a file appearing while the body runs is caught before the swap
    fresh = tmp_path / "fresh"
    with pytest.raises(InputError, match="late.txt"):
        with io.atomic_dir(fresh) as tmp:
            fresh.mkdir()
            (fresh / "late.txt").write_text("x")
    assert (fresh / "late.txt").read_text() == "x"
    # an empty folder is free to take; a folder claimed for a tool is nvf's whole
    (tmp_path / "empty").mkdir()
    with io.atomic_dir(tmp_path / "empty", mark=False) as tmp:
        (tmp / "x").write_text("x")
    assert sorted(tree_digest(tmp_path / "empty")) == ["x"]
    run = io.claim_dir(tmp_path / "run")
    (run / "deep" / "ckpt").mkdir(parents=True)
    (run / "deep" / "ckpt" / "w.bin").write_bytes(b"w")
    io.remove_owned_dir(run)
    assert not run.exists()
    with pytest.raises(InputError, match="is a file"):
        io.claim_dir(tmp_path / "empty" / "x")
