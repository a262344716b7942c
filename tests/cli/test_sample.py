"""`nvf sample` as a user runs it: views of a photo from a tiny run, then the one-line error paths."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from nvfcli.app import app
from stages.core import io, models
from tests.test_sample import build_tiny_run

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; 2 shared cores
    yield build_tiny_run(tmp_path_factory.mktemp("cli-sample-run"))
    torch.set_num_threads(threads)


def test_sample_writes_views_ready_for_reconstruct(tiny_run, tmp_path):
    run, photo = tiny_run
    out = tmp_path / "views"
    args = ["sample", str(run), "--image", str(photo), "--out", str(out), "--preset", "tiny", "--orbit", "ring13",
            "--steps", "1", "--clip-model", models.resolve_model("clip", "tiny").id, "--device", "cpu", "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    assert written[0] == str(out / "transforms.json") and len(written) == 3 + 13
    assert io.read_transforms(out / "transforms.json").names[0] == "000.png"
    again = runner.invoke(app, [*args, "--seed", "5"])
    assert again.exit_code == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert runner.invoke(app, [*args, "--seed", "5", "--overwrite"]).exit_code == 0


def test_bad_options_are_one_clear_line(tiny_run, tmp_path):
    run, photo = tiny_run
    base = ["sample", str(run), "--image", str(photo), "--out", str(tmp_path / "v"), "--device", "cpu"]
    for extra, message in [(["--azimuths", "0,left"], "--azimuths"), (["--strength", "1.5"], "--strength"),
                           (["--orbit", "12"], "--orbit")]:  # fmt: skip
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.stderr, result.output
    missing = runner.invoke(app, ["sample", str(run), "--image", str(tmp_path / "nope.png"), "--out",
                                  str(tmp_path / "v"), "--clip-model", models.resolve_model("clip", "tiny").id])  # fmt: skip
    assert missing.exit_code == 2 and "nope.png" in missing.stderr
