"""Every command, every kind of bad input: exit 2, one line on stderr naming the file, no traceback,
and the input tree unchanged byte for byte (what `issues 16` item 3 asks).

One small world is built once (synth -> tiny pipeline up to triplets -> a 1-step tiny run); each
case copies what its command reads into its own folder, spoils one thing, and runs the command
in-process through the real CLI (`nvfcli.app`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from typer.testing import CliRunner

from nvfcli.app import app
from stages import pipeline, synth, train
from stages.core import io

runner = CliRunner()
A, B = "001_01_01_00", "002_01_01_00"  # two captures of the world


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    from tests.train.fixtures import tiny_config

    root = tmp_path_factory.mktemp("bad-input")
    data, work = root / "data", root / "work"
    synth.run(data, synth.Config(subjects=3, resolution=32, elevated=False, surface_points=300))
    cfg = dataclasses.replace(pipeline.PRESETS["tiny"], until="triplets", poses_source="groundtruth")
    pipeline.run(data, work, cfg, device="cpu")
    train.train(work / "triplets.safetensors", root / "run", tiny_config(max_steps=1, checkpoint_every=1), device="cpu")
    return {"data": data, "work": work, "run": root / "run"}


# -- spoilers -------------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00not what the name says\xff" * 4)


def edit_record(path: Path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Rewrite a safetensors record's tensors (metadata kept, so only the values are wrong)."""
    with safe_open(str(path), "np") as handle:
        meta = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    change(tensors)
    path.unlink()
    save_file(tensors, str(path), metadata=meta)


def nan_in(key: str, value: float = np.nan) -> Callable[[Path], None]:
    def spoil(path: Path) -> None:
        def change(tensors):
            array = tensors[key].astype(np.float64 if tensors[key].dtype == np.float64 else np.float32)
            array.reshape(-1)[0] = value
            tensors[key] = array

        edit_record(path, change)

    return spoil


def drop_row(key: str) -> Callable[[Path], None]:
    def spoil(path: Path) -> None:
        def change(tensors):
            tensors[key] = np.ascontiguousarray(tensors[key][1:])

        edit_record(path, change)

    return spoil


def out_of_range(key: str) -> Callable[[Path], None]:
    def spoil(path: Path) -> None:
        def change(tensors):
            tensors[key] = tensors[key].copy()
            tensors[key].reshape(-1)[0] = 9

        edit_record(path, change)

    return spoil


def first_image(root: Path) -> Path:
    return sorted(p for p in root.rglob("*.png") if "groundtruth" not in p.parts)[0]


# -- the cases --------------------------------------------------------------------------------------
# A case: (command, what is wrong, build(world, case) -> (argv, the file the message must name)).
# The input of a case is everything under its folder except its `out` folder.

Build = Callable[[dict[str, Path], Path], tuple[list[str], str]]


def data_copy(world, case) -> Path:
    shutil.copytree(world["data"], case / "data", ignore=shutil.ignore_patterns("groundtruth"))
    return case / "data"


def work_copy(world, case) -> Path:
    """The world's work tree (every capture's records, the triplet index), to spoil, with its data
    beside it (records name their images relative to the work tree)."""
    shutil.copytree(world["work"], case / "work")
    data_copy(world, case)
    return case / "work"


def per_data(command: str, *extra: str) -> list[tuple[str, str, Build]]:
    """The dataset cases of a command that reads DATA."""

    def missing(world, case):
        return [command, str(case / "nowhere"), *extra, "--out", str(case / "out")], "nowhere"

    def empty(world, case):
        (case / "data").mkdir()
        return [command, str(case / "data"), *extra, "--out", str(case / "out")], str(case / "data")

    def spoiled(spoil):
        def build(world, case):
            image = first_image(data_copy(world, case))
            spoil(image)
            return [command, str(case / "data"), *extra, "--out", str(case / "out")], image.name

        return build

    return [(command, "missing path", missing), (command, "empty folder", empty),
            (command, "truncated image", spoiled(truncate)), (command, "undecodable image", spoiled(garbage))]  # fmt: skip


def per_work(command: str, record: str, spoils: dict[str, Callable[[Path], None]], *extra: str,
             argv: Callable[[Path, Path], list[str]] | None = None) -> list[tuple[str, str, Build]]:  # fmt: skip
    """Cases of a command that reads WORK/<capture>/<record>: each spoiler applied to capture A's."""
    make_argv = argv or (lambda work, case: [command, str(work), *extra])
    cases = []
    for what, spoil in spoils.items():

        def build(world, case, spoil=spoil):
            work = work_copy(world, case)
            spoil(work / A / record)
            return make_argv(work, case), f"{A}/{record}"

        cases.append((command, f"{record}: {what}", build))

    def other_capture(world, case):
        work = work_copy(world, case)
        shutil.copy2(work / B / record, work / A / record)
        return make_argv(work, case), f"{A}/{record}"

    def wrong_kind(world, case):
        work = work_copy(world, case)
        other = "embed.safetensors" if record != "embed.safetensors" else "depth.safetensors"
        shutil.copy2(work / A / other, work / A / record)
        return make_argv(work, case), f"{A}/{record}"

    cases += [(command, f"{record}: another capture's", other_capture), (command, f"{record}: wrong kind", wrong_kind)]
    return cases


def per_missing_work(command: str, *extra: str) -> list[tuple[str, str, Build]]:
    def missing(world, case):
        return [command, str(case / "nowhere"), *extra], "nowhere"

    def empty(world, case):
        (case / "work").mkdir()
        return [command, str(case / "work"), *extra], str(case / "work")

    return [(command, "missing path", missing), (command, "empty folder", empty)]


RECORD_SPOILS = {"truncated": truncate, "not safetensors": garbage}
ALIGN_TO_DEPTH = ("--reference-depth", "{groundtruth}", "--overwrite")  # as `nvf run` with synth poses
ALIGN_TO_VIEW = ("--reference-view", "001_01_01_051_00.png", "--captures", "{only_a}", "--overwrite")  # reads poses
CASES: list[tuple[str, str, Build]] = [
    *per_data("scan")[:2],  # scan reads names, not pixels: a spoiled image is no bad input to it
    *per_data("poses"),
    *per_data("depth", "--preset", "tiny", "--device", "cpu", "--no-cache"),
    *per_data("embed", "--preset", "tiny", "--device", "cpu", "--no-cache"),
    *per_missing_work("align"),
    *per_work(
        "align",
        "poses.safetensors",
        {**RECORD_SPOILS, "NaN in T": nan_in("T"), "a row short": drop_row("R")},
        *ALIGN_TO_VIEW,
    ),  # fmt: skip
    *per_work(
        "align",
        "depth.safetensors",
        {**RECORD_SPOILS, "Inf depth": nan_in("depth", np.inf), "a row short": drop_row("depth")},
        *ALIGN_TO_DEPTH,
    ),  # fmt: skip
    *per_data("masks", "--preset", "tiny", "--device", "cpu", "--no-cache"),
    *per_work(
        "align", "masks.safetensors", {**RECORD_SPOILS, "a row short": drop_row("classes")}, *ALIGN_TO_DEPTH
    ),  # fmt: skip
    *per_missing_work("cloud"),
    *per_work(
        "cloud",
        "masks.safetensors",
        {**RECORD_SPOILS, "a row short": drop_row("classes"), "a class out of range": out_of_range("classes")},
    ),  # fmt: skip
    *per_work("cloud", "aligned.safetensors", {**RECORD_SPOILS, "a row short": drop_row("depth")}),
    *per_work("cloud", "poses.safetensors", {"NaN in R": nan_in("R")}),
    *per_missing_work("triplets", "--out", "{out}/triplets.safetensors"),
    *per_work(
        "triplets",
        "embed.safetensors",
        {**RECORD_SPOILS, "NaN in embedding": nan_in("embedding"), "a row short": drop_row("embedding")},
    ),  # fmt: skip
    *per_work("triplets", "poses.safetensors", {"NaN in T": nan_in("T")}),
]
for index, (command, what, build) in enumerate(CASES):
    if command == "triplets" and "path" not in what and "empty" not in what:
        CASES[index] = (command, what, lambda world, case, build=build: _with_out(build(world, case), case))


def _with_out(built: tuple[list[str], str], case: Path) -> tuple[list[str], str]:
    argv, named = built
    return [*argv, "--out", str(case / "out" / "triplets.safetensors")], named


# -- train, sample, reconstruct, evaluate, merge, run, synth ---------------------------------------


def _triplets(spoil):
    def build(world, case):
        index = work_copy(world, case) / "triplets.safetensors"
        spoil(index)
        return ["train", str(index), "--out", str(case / "out"), "--preset", "tiny", "--device", "cpu"], index.name

    return build


def _train_missing(world, case):
    return ["train", str(case / "nowhere.safetensors"), "--out", str(case / "out"), "--preset", "tiny"], "nowhere"


def _train_wrong_kind(world, case):
    index = work_copy(world, case) / "triplets.safetensors"
    shutil.copy2(index.parent / A / "poses.safetensors", index)
    return ["train", str(index), "--out", str(case / "out"), "--preset", "tiny", "--device", "cpu"], index.name


def _run_copy(world, case) -> Path:
    shutil.copytree(world["run"], case / "run")
    return case / "run"


def _sample(spoil_run=None, photo=None, photo_spoil=None, named=""):
    def build(world, case):
        run = _run_copy(world, case)
        if spoil_run is not None:
            spoil_run(run)
        image = case / "photo.png"
        shutil.copy2(first_image(world["data"]), image)
        if photo_spoil is not None:
            photo_spoil(image)
        argv = ["sample", str(run), "--image", str(case / photo) if photo else str(image), "--out", str(case / "out"),
                "--preset", "tiny", "--device", "cpu", "--azimuths", "30"]  # fmt: skip
        return argv, named

    return build


def _recon(spoil=None, empty=False, missing=False, named="transforms.json"):
    def build(world, case):
        views = case / "views"
        if missing:
            return ["reconstruct", str(views), "--out", str(case / "out"), "--device", "cpu"], "views"
        views.mkdir()
        if not empty:
            for image in sorted((world["data"]).rglob("*.png"))[:4]:
                if "groundtruth" not in image.parts:
                    shutil.copy2(image, views / image.name)
            io.write_transforms(
                views / "transforms.json", _cameras(world, [p.name for p in sorted(views.glob("*.png"))])
            )
            spoil(views / "transforms.json")
        return ["reconstruct", str(views), "--out", str(case / "out"), "--device", "cpu"], named

    return build


def _cameras(world, names: list[str]) -> io.CameraSet:
    gt = io.load_record(synth.groundtruth_dir(world["data"], A) / "poses.safetensors", kind="poses")
    rows = [gt.names.index(name) for name in names]
    return io.CameraSet(names, gt["R"][rows], gt["T"][rows], gt["K"][rows], gt["width"][rows], gt["height"][rows])


def _drop_file_path(path: Path) -> None:
    doc = json.loads(path.read_text())
    del doc["frames"][1]["file_path"]
    path.write_text(json.dumps(doc))


def _evaluate(section: str, spoil, named_from: str = "estimate"):
    """evaluate with one section whose estimate (a copy of the world's) is spoiled."""

    def build(world, case):
        gt = synth.groundtruth_dir(world["data"], A)
        if section == "views":
            est, ref = case / "views", case / "ref"
            est.mkdir()
            ref.mkdir()
            for image in sorted(p for p in world["data"].rglob("*.png") if "groundtruth" not in p.parts)[:3]:
                shutil.copy2(image, est / image.name)
                shutil.copy2(image, ref / image.name)
            target = sorted(est.glob("*.png"))[1]
            extra = ["--lpips", "off"]
        else:
            source = {"poses": world["work"] / A / "poses.safetensors", "depth": world["work"] / A / "aligned.safetensors",
                      "cloud": world["work"] / A / "cloud.ply"}[section]  # fmt: skip
            reference = {"poses": gt / "poses.safetensors", "depth": gt / "depth.safetensors",
                         "cloud": gt / "surface.ply"}[section]  # fmt: skip
            est, ref = case / source.name, case / ("ref" + reference.suffix)
            shutil.copy2(source, est)
            shutil.copy2(reference, ref)
            target, extra = est, []
        if named_from == "reference":
            target = ref
        spoil(target)
        argv = ["evaluate", "--out", str(case / "out"), f"--{section}", str(est), f"--{section}-ref", str(ref),
                "--preset", "tiny", "--device", "cpu", *extra]  # fmt: skip
        return argv, target.name

    return build


def _merge(spoil_manifest=None, empty=False):
    def build(world, case):
        shard = case / "shard"
        if empty:
            shard.mkdir()
            return ["merge", str(shard), "--out", str(case / "out")], "shard"
        shutil.copytree(world["work"], shard)
        spoil_manifest(shard / "manifest.json")
        return ["merge", str(shard), "--out", str(case / "out")], "manifest.json"

    return build


def _synth_onto_file(world, case):
    (case / "file").write_text("mine")
    return ["synth", str(case / "file"), "--subjects", "1"], "file"


CASES += [
    ("train", "triplets: truncated", _triplets(truncate)),
    ("train", "triplets: not safetensors", _triplets(garbage)),
    ("train", "triplets: NaN pose code", _triplets(nan_in("pose_code"))),
    ("train", "triplets: missing path", _train_missing),
    ("train", "triplets: wrong kind", _train_wrong_kind),
    ("sample", "model.json truncated", _sample(lambda run: truncate(run / "model.json"), named="model.json")),
    ("sample", "model.json not JSON", _sample(lambda run: garbage(run / "model.json"), named="model.json")),
    ("sample", "run missing", _sample(lambda run: shutil.rmtree(run), named="run")),
    ("sample", "photo missing", _sample(photo="nowhere.png", named="nowhere.png")),
    ("sample", "photo undecodable", _sample(photo_spoil=garbage, named="photo.png")),
    ("sample", "photo truncated", _sample(photo_spoil=truncate, named="photo.png")),
    ("reconstruct", "frame without file_path", _recon(_drop_file_path)),
    ("reconstruct", "transforms.json truncated", _recon(truncate)),
    ("reconstruct", "empty folder", _recon(empty=True, named="views")),
    ("reconstruct", "missing path", _recon(missing=True, named="views")),
    ("evaluate", "--depth record truncated", _evaluate("depth", truncate)),
    ("evaluate", "--depth record not safetensors", _evaluate("depth", garbage)),
    ("evaluate", "--depth-ref wrong kind", _evaluate("depth", lambda p: _embed_record(p), named_from="reference")),
    ("evaluate", "--views undecodable PNG", _evaluate("views", garbage)),
    ("evaluate", "--views truncated PNG", _evaluate("views", truncate)),
    ("evaluate", "--poses record truncated", _evaluate("poses", truncate)),
    ("evaluate", "--poses NaN in R", _evaluate("poses", nan_in("R"))),
    ("evaluate", "--cloud PLY truncated", _evaluate("cloud", truncate)),
    ("evaluate", "--cloud-ref PLY not PLY", _evaluate("cloud", garbage, named_from="reference")),
    ("merge", "empty shard folder", _merge(empty=True)),
    ("merge", "manifest not JSON", _merge(garbage)),
    ("merge", "manifest truncated", _merge(truncate)),
    ("run", "missing path", lambda world, case: (["run", str(case / "nowhere"), str(case / "out")], "nowhere")),
    ("run", "truncated image", lambda world, case: _run_spoiled(world, case)),
    ("synth", "OUT is a file", _synth_onto_file),
]


def _embed_record(path: Path) -> None:
    """An embed record where another kind belongs."""
    path.unlink()
    io.save_record(path, {"embedding": np.eye(2, 4, dtype=np.float32)}, kind="embed", stage="test", capture=A,
                   names=["a.png", "b.png"])  # fmt: skip


def _run_spoiled(world, case):
    image = first_image(data_copy(world, case))
    truncate(image)
    argv = ["run", str(case / "data"), str(case / "out"), "--preset", "tiny", "--device", "cpu", "--until", "depth"]
    return argv, image.name


FIXES = ("rerun", "run ", "run `", "pass ", "delete", "replace", "rewrite", "build it", "train first", "add it")
"""What a message tells the user to do: every case's line says one of these."""


def tree_digest(root: Path, skip: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and skip not in p.parents}  # fmt: skip


@pytest.mark.parametrize(("command", "what", "build"), CASES, ids=[f"{c}-{w}" for c, w, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, tmp_path, command, what, build):
    case = tmp_path / "case"
    case.mkdir()
    argv, named = build(world, case)
    groundtruth = str(world["data"] / "groundtruth")
    (case / "only_a.txt").write_text(A + "\n")
    argv = [a.replace("{out}", str(case / "out")).replace("{groundtruth}", groundtruth)
            .replace("{only_a}", str(case / "only_a.txt")) for a in argv]  # fmt: skip
    before = tree_digest(case, case / "out")
    result = runner.invoke(app, ["--quiet", *argv])  # only errors on stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.stderr}{result.exception!r}"
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert named in lines[0], f"{named!r} not named: {lines[0]}"
    assert any(fix in lines[0] for fix in FIXES), f"no fix in: {lines[0]}"
    assert tree_digest(case, case / "out") == before
    out = case / "out"
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) if out.exists() else []
    if (
        command == "run" and written
    ):  # `nvf run` keeps its log of what happened: the scan and a manifest saying it failed
        assert pipeline.read_manifest(out)["status"] == "failed"
        written = [name for name in written if name not in ("manifest.json", "index.json")]
    assert not [name for name in written if not name.startswith(".nvf-digests/")], written
