"""`nvf poses` on the command line: outputs on stdout, bad input as one line and exit code 2."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from typer.testing import CliRunner

from nvfcli.app import app
from stages import synth
from stages.core import dataset, io
from tests.helpers import write_tiny_png

runner = CliRunner()


def test_poses_command_writes_records_and_exports(tmp_path):
    cfg = dataclasses.replace(synth.PRESETS["tiny"], resolution=160, texture_contrast=1.0)
    synth.run(tmp_path / "data", cfg)
    capture = dataset.capture_id(1, 1, 1, 0)
    result = runner.invoke(
        app,
        [
            "poses",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "work"),
            "--json",
            "--export",
            "transforms,colmap",
            "--colmap",
            "mapping.mapper.init_min_tri_angle=4",
        ],
    )
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    assert written[-1].endswith(f"{capture}/poses.safetensors") and len(written) == 4
    record = io.load_record(written[-1], kind="poses", capture=capture)
    assert len(record) == 13 and record["source"].dtype == np.int8
    assert (tmp_path / "work" / capture / "colmap" / "images.txt").is_file()
    again = runner.invoke(
        app,
        [
            "poses",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "work"),
            "--json",
            "--export",
            "transforms,colmap",
            "--colmap",
            "mapping.mapper.init_min_tri_angle=4",
        ],
    )
    assert again.exit_code == 0 and json.loads(again.stdout) == []  # resumed: nothing to redo


def _folder(tmp_path):
    for name in ("a.png", "b.png"):
        write_tiny_png(tmp_path / "data" / "cap" / name)
    return tmp_path / "data"


def _one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error:") and fragment in result.stderr


def test_unknown_colmap_key_is_one_line(tmp_path):
    result = runner.invoke(app, ["poses", str(_folder(tmp_path)), "--out", str(tmp_path / "w"),
                                 "--colmap", "extraction.sift.nope=1"])  # fmt: skip
    _one_line_error(result, "nope")
    assert not (tmp_path / "w").exists()


def test_rig_on_folder_layout_is_one_line(tmp_path):
    result = runner.invoke(app, ["poses", str(_folder(tmp_path)), "--out", str(tmp_path / "w"), "--rig", "on"])
    _one_line_error(result, "fixed camera rig")


def test_empty_folder_and_bad_choices(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(runner.invoke(app, ["poses", str(tmp_path / "empty"), "--out", str(tmp_path / "w")]), "no images")
    _one_line_error(runner.invoke(app, ["poses", str(_folder(tmp_path)), "--out", str(tmp_path / "w"),
                                        "--mapper", "magic"]), "unknown --mapper")  # fmt: skip
    assert not (tmp_path / "w").exists()


def test_shard_and_captures_select_subjects(tmp_path):
    cfg = dataclasses.replace(synth.PRESETS["tiny"], subjects=2, resolution=128, texture_contrast=1.0)
    synth.run(tmp_path / "data", cfg)
    first, second = dataset.capture_id(1, 1, 1, 0), dataset.capture_id(2, 1, 1, 0)
    base = ["poses", str(tmp_path / "data"), "--json", "--rig", "off"]
    shard = runner.invoke(app, [*base, "--out", str(tmp_path / "shard"), "--shard", "1/2"])
    assert shard.exit_code == 0, shard.output
    assert [p.split("/")[-2] for p in json.loads(shard.stdout)] == [second, second]  # sparse, poses
    assert not (tmp_path / "shard" / first).exists()
    picked = runner.invoke(app, [*base, "--out", str(tmp_path / "picked"), "--captures", "-"],
                           input=f"# one\n{first}\n")  # fmt: skip
    assert picked.exit_code == 0, picked.output
    assert {p.split("/")[-2] for p in json.loads(picked.stdout)} == {first}
    listed = tmp_path / "ids.txt"
    listed.write_text(f"{second}\n")
    again = runner.invoke(app, [*base, "--out", str(tmp_path / "picked"), "--captures", str(listed)])
    assert again.exit_code == 0 and {p.split("/")[-2] for p in json.loads(again.stdout)} == {second}
    assert sorted(p.name for p in (tmp_path / "picked").iterdir()) == [".nvf-digests", first, second]


def test_unknown_capture_in_list_is_one_line(tmp_path):
    cfg = dataclasses.replace(synth.PRESETS["tiny"], resolution=64)
    synth.run(tmp_path / "data", cfg)
    result = runner.invoke(app, ["poses", str(tmp_path / "data"), "--out", str(tmp_path / "w"), "--captures", "-"],
                           input="999_01_01_00\n")  # fmt: skip
    _one_line_error(result, "999_01_01_00")
    assert not (tmp_path / "w").exists()
