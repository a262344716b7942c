"""Options built from the stage Configs (nvfcli.options.config_options): `--help` shows each field's
docstring, and options given on the command line override the preset, nothing else."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from nvfcli.app import COMMANDS, app, load_command
from nvfcli.options import field_docs, field_help, first_sentence

runner = CliRunner()


def _configured() -> list[str]:
    import importlib

    names = []
    for name in COMMANDS:
        module = importlib.import_module(f"nvfcli.commands.{name.replace('-', '_')}")
        if hasattr(getattr(module, name.replace("-", "_")), "config_fields"):
            names.append(name)
    return names


def test_first_sentence_skips_abbreviations():
    assert first_sentence("A (e.g. ViT-L) b. C d.") == "A (e.g. ViT-L) b."
    assert first_sentence("w of Eq. 9 (Table III: 5.0). 0 runs") == "w of Eq. 9 (Table III: 5.0)."
    assert first_sentence("one\n    line.  Two.") == "one line."


@pytest.mark.parametrize("name", _configured())
def test_help_of_every_config_option_is_its_field_docstring(name):
    import importlib

    function = getattr(importlib.import_module(f"nvfcli.commands.{name.replace('-', '_')}"), name.replace("-", "_"))
    cls, fields = function.config_class, function.config_fields
    assert fields, name
    options = {p.name: p for p in load_command(name).params if p.param_type_name == "option"}
    docs = field_docs(cls)
    for field in fields:
        assert docs.get(field), f"{cls.__module__}.{cls.__qualname__}.{field} has no docstring"
        sentence = field_help(cls, field)
        assert options[field].help.startswith(sentence), (name, field)
    shown = " ".join(runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"}).stdout.split())
    for field in fields:  # what a user reads: the first words of every field's docstring
        assert " ".join(first_sentence(docs[field]).replace("`", "").split()[:4]) in shown, (name, field)


def test_scan_filter_options_take_their_help_from_the_filters_docstrings():
    from stages.core import dataset

    options = {p.name: p for p in load_command("scan").params if p.param_type_name == "option"}
    fields = {"subject": "subjects", "session": "sessions", "camera": "cameras", "expression": "expressions",
              "illumination": "shots", "protocol": "protocol"}  # fmt: skip
    docs = field_docs(dataset.Filters)
    assert set(fields.values()) == {f.name for f in dataclasses.fields(dataset.Filters)}
    for option, field in fields.items():
        assert docs.get(field), f"dataset.Filters.{field} has no docstring"
        assert options[option].help.startswith(field_help(dataset.Filters, field)), (option, options[option].help)


def test_help_is_readable_at_80_columns():
    shown = runner.invoke(app, ["cloud", "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"}).stdout
    lines = [line.strip("│ ") for line in shown.splitlines() if "Statistical outlier removal" in line]
    assert lines and all(len(line.split()) >= 3 for line in lines), shown
    help_lines = [line for line in shown.splitlines() if line.startswith("│ ") and len(line.split()) > 2]
    assert max(len(line) for line in help_lines) <= 80


def test_options_override_the_preset_and_nothing_else(monkeypatch, tmp_path):
    from stages import depth as stage

    seen = {}

    def fake_run(ctx, cfg):
        seen["cfg"] = cfg
        return []

    monkeypatch.setattr(stage, "run", fake_run)
    result = runner.invoke(app, ["depth", str(tmp_path), "--out", str(tmp_path / "w"), "--preset", "fast",
                                 "--batch-size", "3", "--dtype", "float16", "--no-cache"])  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = dataclasses.replace(stage.PRESETS["fast"], batch_size=3, store_dtype="float16", cache=False)
    assert seen["cfg"] == expected
    result = runner.invoke(app, ["depth", str(tmp_path), "--out", str(tmp_path / "w"), "--preset", "tiny"])
    assert result.exit_code == 0, result.output
    assert seen["cfg"] == stage.PRESETS["tiny"]


def test_every_command_with_a_stage_config_builds_its_options_from_it():
    assert set(_configured()) == set(COMMANDS) - {"info", "fetch-models", "merge"}


# the function each command calls: the stage contract `run(ctx, cfg)`, or for the commands that take
# explicit paths rather than a work tree, the stage's own entry (train, sample, reconstruct, evaluate)
_ENTRY = {"stages.train": "train", "stages.sample": "sample", "stages.reconstruct": "reconstruct",
          "stages.evaluate": "evaluate"}  # fmt: skip


def _configs_run(monkeypatch, module):
    seen = []
    entry = _ENTRY.get(module.__name__, "run")
    monkeypatch.setattr(
        module, entry, lambda *args, **kwargs: seen.extend(a for a in args if isinstance(a, module.Config)) or []
    )
    return seen


@pytest.mark.parametrize(
    ("command", "module", "preset", "argv", "expected"),
    [
        ("cloud", "cloud", "default", ["--consistency", "0", "--no-outliers", "--depth-range", "1,2"],
         {"consistency": False, "outlier_removal": False, "depth_range": (1.0, 2.0)}),
        ("cloud", "cloud", "strict", ["--consistency", "3", "--smooth", "1"],
         {"consistency": True, "consistency_views": 3, "smooth_px": 1}),
        ("evaluate", "evaluate", "tiny", ["--resolution", "0", "--lpips", "off"], {"resolution": None, "lpips": "off"}),
        ("reconstruct", "reconstruct", "cpu", ["--ns", "pipeline.model.num_nerf_samples_per_ray=32", "--mesh"],
         {"mesh": True}),
        ("synth", "synth", "tiny", ["--neutral-only", "--sessions", "1-2", "--textureless", "130,050"],
         {"recordings": "neutral", "sessions": (1, 2), "textureless_cameras": ("130", "050")}),
        ("poses", "poses", "colmap", ["--fixed-focal", "--export", "transforms", "--colmap", "mapping.mapper.init_min_tri_angle=8"],
         {"refine_focal": False, "export": ("transforms",)}),
        ("train", "train", "tiny", ["--batch-size", "3", "--random-batches", "--wandb"],
         {"batch_size": 3, "person_aware": False, "wandb": True}),
        ("sample", "sample", "tiny", ["--azimuths", "-30,30", "--fov", "40", "--no-ema"],
         {"azimuths": (-30.0, 30.0), "fov_deg": 40.0, "use_ema": False}),
    ],
)  # fmt: skip
def test_options_given_replace_those_fields_of_the_preset(
    monkeypatch, tmp_path, command, module, preset, argv, expected
):
    import importlib

    stage = importlib.import_module(f"stages.{module}")
    seen = _configs_run(monkeypatch, stage)
    paths = {"cloud": [str(tmp_path)], "evaluate": ["--out", str(tmp_path / "r")],
             "reconstruct": [str(tmp_path), "--out", str(tmp_path / "r")], "synth": [str(tmp_path / "s")],
             "poses": [str(tmp_path), "--out", str(tmp_path / "w")], "train": [str(tmp_path / "t"), "--out", str(tmp_path / "r")],
             "sample": [str(tmp_path), "--image", str(tmp_path / "a.png"), "--out", str(tmp_path / "v")]}  # fmt: skip
    result = runner.invoke(app, [command, *paths[command], "--preset", preset, *argv])
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    base = stage.PRESETS[preset]
    for name, value in expected.items():
        assert getattr(cfg, name) == value, name
    if command == "reconstruct":
        assert cfg.ns == base.ns + (("pipeline.model.num_nerf_samples_per_ray", "32"),)
        expected["ns"] = cfg.ns
    if command == "poses":
        expected["colmap"] = cfg.colmap
        assert cfg.colmap[-1] == ("mapping.mapper.init_min_tri_angle", "8")
    assert cfg == dataclasses.replace(base, **expected)  # every other field: the preset's


def test_align_and_triplets_options_build_the_config(monkeypatch, tmp_path):
    from stages import align, triplets

    seen = _configs_run(monkeypatch, align)
    assert runner.invoke(app, ["align", str(tmp_path), "--robust", "tukey", "--no-masks"]).exit_code == 0
    assert seen[-1] == align.Config(robust="tukey", use_masks=False)
    assert runner.invoke(app, ["align", str(tmp_path), "--reference-depth", str(tmp_path)]).exit_code == 0
    assert seen[-1] == align.Config(reference="depth", reference_depth=str(tmp_path))
    seen = _configs_run(monkeypatch, triplets)
    result = runner.invoke(app, ["triplets", str(tmp_path), "--subject", "1-2", "--camera", "51", "--protocol", "p",
                                 "--seed", "3", "--exclude-interp"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen[-1] == triplets.Config(subjects=("001", "002"), cameras=("051",), protocol="P", seed=3,
                                       exclude_interp=True)  # fmt: skip
