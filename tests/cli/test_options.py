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


def test_help_is_readable_at_80_columns():
    shown = runner.invoke(app, ["cloud", "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"}).stdout
    lines = [line.strip("│ ") for line in shown.splitlines() if "Statistical outlier removal" in line]
    assert lines and all(len(line.split()) >= 3 for line in lines), shown
    help_lines = [line for line in shown.splitlines() if line.startswith("│ ") and len(line.split()) > 2]
    assert max(len(line) for line in help_lines) <= 80


def test_options_override_the_preset_and_nothing_else(monkeypatch, tmp_path):
    from stages import depth as stage

    seen = {}

    def fake_run(data, out, cfg, **kwargs):
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
