"""The code's shape, as README.md "How the code is laid out" describes it: one stage contract, modules
of one job, and a README section that names what is in the tree (and nothing that is not)."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

from stages import pipeline

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 600


def _readme_layout() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## How the code is laid out", 1)[1]
    return section.split("\n## ", 1)[0]


def _tree_block() -> str:
    return _readme_layout().split("```", 2)[1]


@pytest.mark.parametrize("folder", ["stages", "stages/core", "stages/core/io", "nvfcli"])
def test_the_readme_layout_names_every_module_and_package(folder):
    block = _tree_block()
    named = set(re.findall(r"[\w.]+/?", block))
    for entry in sorted((ROOT / folder).iterdir()):
        if entry.name.startswith(("_", ".")):
            continue
        name = entry.name + "/" if entry.is_dir() else entry.name
        if entry.suffix == ".py" or entry.is_dir():
            assert name in named or entry.stem in named, f"README layout does not name {folder}/{name}"


def test_every_path_the_readme_layout_names_exists():
    folders = [ROOT, ROOT / "stages", ROOT / "stages" / "core", ROOT / "stages" / "core" / "io", ROOT / "nvfcli"]
    for name in re.findall(r"^ *([\w.]+(?:\.py|/))", _tree_block(), re.M):  # the tree's first column
        assert any((folder / name.rstrip("/")).exists() for folder in folders), f"README names {name}: not in the tree"
    for path in re.findall(r"`((?:stages|nvfcli)/[\w/]+\.py)", _readme_layout()):
        assert (ROOT / path).is_file(), path


def test_no_module_in_stages_or_nvfcli_is_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for folder in ("stages", "nvfcli") for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}  # fmt: skip
    assert not long, f"split these modules along their seams: {long}"


@pytest.mark.parametrize("module_name", sorted({s.module for s in pipeline.STEPS} | {pipeline.GROUNDTRUTH_POSES}))
def test_every_stage_has_the_one_contract(module_name):
    """`run(ctx, cfg)`, a Config with a docstring per field (the --help), PRESETS of that Config, and
    PATHS naming the paths a Context may set."""
    from nvfcli.options import field_docs

    module = importlib.import_module(module_name)
    assert list(inspect.signature(module.run).parameters) == ["ctx", "cfg"]
    assert module.PRESETS and all(isinstance(cfg, module.Config) for cfg in module.PRESETS.values())
    docs = field_docs(module.Config)
    undocumented = [name for name in module.Config.__dataclass_fields__ if not docs.get(name)]
    assert not undocumented, f"{module_name}.Config fields without a docstring: {undocumented}"
    paths = getattr(module, "PATHS", {})
    clashes = set(paths) & set(module.Config.__dataclass_fields__)
    assert not clashes, (
        f"{module_name}: PATHS names that are Config fields too (a config section means both): {clashes}"
    )
