"""`nvf embed` and `nvf triplets` as a user runs them: synth data -> embed -> triplets, and the error path."""

from __future__ import annotations

import json
import shutil

import numpy as np
from typer.testing import CliRunner

from nvfcli.app import app
from stages import synth, triplets
from stages.core import dataset, io

runner = CliRunner()


def test_embed_then_triplets(tmp_path):
    data, work = tmp_path / "data", tmp_path / "work"
    synth.run(data, synth.Config(subjects=2, resolution=16, elevated=False, surface_points=100))
    embedded = runner.invoke(app, ["embed", str(data), "--out", str(work), "--preset", "tiny", "--device", "cpu",
                                   "--batch-size", "8", "--json"])  # fmt: skip
    assert embedded.exit_code == 0, embedded.output
    paths = json.loads(embedded.stdout)
    assert len(paths) == 2 and io.load_record(paths[0], kind="embed")["embedding"].shape == (13, 512)
    again = runner.invoke(app, ["embed", str(data), "--out", str(work), "--preset", "tiny", "--device", "cpu"])
    assert again.exit_code == 0 and again.stdout.strip() == ""  # up to date
    for capture in dataset.scan(data).captures:  # ground-truth poses stand in for nvf poses
        shutil.copy(synth.groundtruth_dir(data, capture.id) / "poses.safetensors", work / capture.id)
    result = runner.invoke(app, ["triplets", str(work), "--pairs", "adjacent", "--train-split", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    index_path, pairs_csv, images_csv = json.loads(result.stdout)
    loaded = triplets.load_triplets(index_path)
    assert loaded.n_pairs == 2 * 24 and loaded.record.extra["z_cond_dim"] == "524"
    assert loaded.z_cond().shape == (48, 524)
    assert sorted(len(v) for v in loaded.splits.values()) == [0, 1, 1]
    assert loaded.image_path(0).is_file()
    assert np.all(loaded["embed_row"] == loaded["pose_row"])  # same view order in both records here


def test_triplets_without_records_is_one_clear_line(tmp_path):
    (tmp_path / "work").mkdir()
    result = runner.invoke(app, ["triplets", str(tmp_path / "work")])
    assert result.exit_code == 2
    assert "pass --data DATA" in result.stderr and "Traceback" not in result.stderr
