"""`nvf train` as a user runs it: a 2-step tiny run, resume, and the one-line error path."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from nvfcli.app import app
from tests.train.fixtures import build_triplets

runner = CliRunner()


def test_train_two_steps_then_resume(tmp_path):
    index = build_triplets(tmp_path / "data", subjects=2, train_split=0.5)
    run = tmp_path / "run"
    args = [
        "train",
        str(index),
        "--out",
        str(run),
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--max-steps",
        "2",
        "--checkpoint-every",
        "1",
        "--validate-every",
        "0",
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    final, model_json = json.loads(result.stdout)
    assert final.endswith("checkpoints/step-00000002") and json.loads(Path(model_json).read_text())["resolution"] == 32
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--resume latest" in again.stderr and "Traceback" not in again.stderr
    more = runner.invoke(app, [*args[:8], "--max-steps", "3", "--validate-every", "0", "--resume", "latest"])
    assert more.exit_code == 0, more.output
    assert more.stdout.strip().splitlines()[0].endswith("checkpoints/step-00000003")


def test_missing_index_is_one_clear_line(tmp_path):
    result = runner.invoke(
        app, ["train", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "run"), "--preset", "tiny"]
    )
    assert result.exit_code != 0 and "nvf triplets" in result.stderr and "Traceback" not in result.stderr
