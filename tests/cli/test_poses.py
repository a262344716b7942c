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
    result = runner.invoke(app, ["poses", str(tmp_path / "data"), "--out", str(tmp_path / "work"), "--json",
                                 "--export", "transforms,colmap", "--colmap", "mapping.mapper.init_min_tri_angle=4"])
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    assert written[-1].endswith(f"{capture}/poses.safetensors") and len(written) == 4
    record = io.load_record(written[-1], kind="poses", capture=capture)
    assert len(record) == 13 and record["source"].dtype == np.int8
    assert (tmp_path / "work" / capture / "colmap" / "images.txt").is_file()
    again = runner.invoke(app, ["poses", str(tmp_path / "data"), "--out", str(tmp_path / "work"), "--json",
                                "--export", "transforms,colmap", "--colmap", "mapping.mapper.init_min_tri_angle=4"])
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
    result = runner.invoke(app, ["poses", str(_folder(tmp_path)), "--out", str(tmp_path / "w"), "--rig", "auto"])
    _one_line_error(result, "fixed camera rig")


def test_empty_folder_and_bad_choices(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(runner.invoke(app, ["poses", str(tmp_path / "empty"), "--out", str(tmp_path / "w")]), "no images")
    _one_line_error(runner.invoke(app, ["poses", str(_folder(tmp_path)), "--out", str(tmp_path / "w"),
                                        "--mapper", "magic"]), "unknown --mapper")  # fmt: skip
    assert not (tmp_path / "w").exists()
