"""nvf run / merge / fetch-models on the command line: JSON manifest, SLURM shards, one-line errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from nvfcli.app import app
from stages import synth

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("run-cli")
    synth.run(root, dataclasses.replace(synth.PRESETS["tiny"], subjects=2, resolution=48, surface_points=1000))
    return root


def _run(*args: str, env: dict | None = None):
    return runner.invoke(app, ["run", *args, "--preset", "tiny", "--poses-from-groundtruth", "--device", "cpu"],
                         env=env)  # fmt: skip


def test_run_prints_the_manifest_and_reruns_as_up_to_date(data, tmp_path):
    result = _run(str(data), str(tmp_path / "w"), "--until", "align", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert [manifest["stages"][s]["status"] for s in ("scan", "poses", "depth", "masks", "align", "cloud")] == [
        "done", "done", "done", "done", "done", "not-run"]  # fmt: skip
    assert json.loads((tmp_path / "w" / "manifest.json").read_text())["stages"] == manifest["stages"]
    table = _run(str(data), str(tmp_path / "w"), "--until", "align")
    assert table.exit_code == 0 and table.stdout.count("up-to-date") == 5


def test_slurm_array_shards_then_merge(data, tmp_path):
    for task in ("0", "1"):
        env = {"SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_COUNT": "2"}
        result = _run(str(data), str(tmp_path / f"s{task}"), "--until", "depth", "--json", env=env)
        assert result.exit_code == 0, result.output
        manifest = json.loads(result.stdout)
        assert manifest["shard"] == {"index": int(task), "count": 2} and len(manifest["captures"]) == 1
    merged = runner.invoke(app, ["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")])
    assert merged.exit_code == 0, merged.output
    assert "2 captures from 2 shard(s)" in merged.stdout
    assert sorted(p.parent.name for p in (tmp_path / "m").glob("*/depth.safetensors")) == [
        "001_01_01_00", "002_01_01_00"]  # fmt: skip
    alone = runner.invoke(app, ["merge", str(tmp_path / "s0"), "--out", str(tmp_path / "m2")])
    assert alone.exit_code == 2 and "shard(s) 1/2 missing" in alone.stderr


def test_bad_stage_name_and_offline_fetch_are_one_line_errors(data, tmp_path):
    bad = _run(str(data), str(tmp_path / "w"), "--until", "warp")
    assert bad.exit_code == 2 and "unknown stage 'warp'" in bad.stderr
    offline = runner.invoke(app, ["fetch-models", "--cache", str(tmp_path / "c")], env={"HF_HUB_OFFLINE": "1"})
    assert offline.exit_code == 1
    assert "missing from the caches" in offline.stderr and "Intel/dpt-large" in offline.stderr
