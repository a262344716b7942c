"""nvf poses vs the COLMAP command line (feature_extractor, exhaustive_matcher, mapper), same data, same run.

Data: a synthetic 13-camera ring (256 px, default texture), a low-contrast one (192 px, texture
contrast 0.15) and ../shared/data/kermit (11 real photos, when present).

- candidate: `stages.poses.run` end to end (validation, SfM with the fast-then-tuned passes,
  records written), default config;
- baseline: Debian's `colmap` binary with its defaults, single camera per capture, CPU SIFT
  (`feature_extractor`, `exhaustive_matcher`, `mapper`), as a user would run it.

Each side runs once untimed, then three times interleaved; the medians count (a single run on a
shared 2-core machine swings by 10 % or more).

Goals: time ratio <= 0.5x and views registered >= COLMAP's (reported in `extra`). Skips the
baseline with a note when no `colmap` binary is on PATH (`apt-get install colmap`).

`poses-matching/*` times matching and verification alone on one database of extracted features
(the fast pass's SIFT): `sift_matching.match_exhaustive` vs `pycolmap.match_exhaustive`, the
matcher it replaces on a CPU (goal: faster, ratio < 1). `poses-throughput/*` poses 4 ring captures
2 at a time (the default) vs one by one (goal: ratio < 1). These run without `colmap` too.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import Result, Side, compare
from stages.core.contract import Context

SHARED_KERMIT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kermit"


def _datasets(root: Path) -> dict[str, Path]:
    from stages import synth

    base = dataclasses.replace(synth.PRESETS["default"], subjects=1, elevated=False, surface_points=2000)
    found = {}
    for name, cfg in (("synth-ring-256", dataclasses.replace(base, resolution=256)),
                      ("synth-lowcontrast-192", dataclasses.replace(base, resolution=192, texture_contrast=0.15))):  # fmt: skip
        synth.run(root / name, cfg)
        shutil.rmtree(root / name / "groundtruth")  # COLMAP would read its files as images otherwise
        found[name] = root / name
    if SHARED_KERMIT.is_dir():
        shutil.copytree(SHARED_KERMIT, root / "kermit", ignore=shutil.ignore_patterns("results*"))
        found["kermit"] = root / "kermit"
    return found


def _nvf(data: Path, out: Path) -> dict:
    from stages import poses

    shutil.rmtree(out, ignore_errors=True)
    from stages.core.errors import InputError

    registered = 0
    try:
        written = poses.run(Context(out, data=data, overwrite=True), poses.Config())
    except InputError as exc:  # fewer than 2 views registered
        return {"registered": 0, "failed": str(exc)}
    for path in written:
        if path.name == "poses.safetensors":
            from stages.core import io

            registered += int((io.load_record(path)["source"] == poses.SOURCES["sfm"]).sum())
    return {"registered": registered}


def _colmap(data: Path, work: Path) -> dict:
    import pycolmap

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    db, sparse = work / "database.db", work / "sparse"
    sparse.mkdir()
    steps = [
        ["feature_extractor", "--database_path", db, "--image_path", data, "--ImageReader.single_camera", "1",
         "--SiftExtraction.use_gpu", "0"],
        ["exhaustive_matcher", "--database_path", db, "--SiftMatching.use_gpu", "0"],
        ["mapper", "--database_path", db, "--image_path", data, "--output_path", sparse],
    ]  # fmt: skip
    for step in steps:
        done = subprocess.run(["colmap", *map(str, step)], env=env, capture_output=True)
        if done.returncode != 0:  # the mapper exits 1 when it builds no model at all
            return {"registered": 0, "failed": step[0]}
    sizes = [pycolmap.Reconstruction(str(model)).num_reg_images() for model in sorted(sparse.iterdir())]
    return {"registered": max(sizes, default=0)}


def _extracted(data: Path, database: Path) -> dict:
    """Extract the fast pass's features of ``data`` into ``database``; the pycolmap options used."""
    import pycolmap

    from stages import poses

    names = sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.suffix.lower() in (".png", ".jpg"))
    checked = poses.inspect_images(data, names)
    options = poses.build_options(poses.fast_pass(poses.Config(), checked.contrast))
    mode = pycolmap.CameraMode.SINGLE if len(set(checked.sizes)) == 1 else pycolmap.CameraMode.AUTO
    poses.extract_features(database, data, names, options, mode)
    return options


def _matching(name: str, data: Path, work: Path) -> Result:
    import pycolmap

    from stages.poses import sift_matching

    work.mkdir(parents=True)
    features = work / "features.db"
    options = _extracted(data, features)
    with pycolmap.Database.open(features) as db:
        counts = [db.num_keypoints_for_image(image.image_id) for image in db.read_all_images()]

    def fresh() -> Path:
        database = work / "matching.db"
        shutil.copy(features, database)
        return database

    def candidate():
        sift_matching.match_exhaustive(fresh(), options["matching"], options["verification"])

    def baseline():
        pycolmap.match_exhaustive(fresh(), matching_options=options["matching"], pairing_options=options["pairing"],
                                  verification_options=options["verification"])  # fmt: skip

    result = compare(f"poses-matching/{name}", Side("nvf sift_matching", candidate),
                     Side("pycolmap match_exhaustive", baseline), repeats=5, warmup=1,
                     goal="ratio < 1 (replaces it up to 2,500 features per image)")  # fmt: skip
    result.extra["features_per_image"] = int(sum(counts) / max(1, len(counts)))
    return result


def _throughput(root: Path) -> Result:
    from stages import poses, synth

    data = root / "data" / "synth-4-captures"
    synth.run(data, dataclasses.replace(synth.PRESETS["default"], subjects=4, elevated=False, surface_points=2000))
    cfg = poses.Config(rig="off")

    def posed(at_once: int):
        return lambda: poses.run(
            Context(root / f"at-once-{at_once}", data=data, overwrite=True),
            dataclasses.replace(cfg, captures_at_once=at_once),
        )

    return compare("poses-throughput/synth-4-captures-256", Side("2 captures at a time", posed(2)),
                   Side("one by one", posed(1)), repeats=3, warmup=1, goal="ratio < 1")  # fmt: skip


def run() -> list[Result]:
    results = []
    with tempfile.TemporaryDirectory(prefix="nvf-bench-poses-") as tmp:
        root = Path(tmp)
        found = _datasets(root / "data")
        for name in ("synth-ring-256", "kermit"):
            if name in found:
                results.append(_matching(name, found[name], root / "matching" / name))
        results.append(_throughput(root))
        if shutil.which("colmap") is None:
            print("bench_poses: end-to-end comparison skipped: no `colmap` binary on PATH; install it "
                  "(apt-get install colmap) to compare", file=sys.stderr)  # fmt: skip
            return results
        for name, data in found.items():
            counts: dict[str, dict] = {}

            def candidate(data=data, name=name, counts=counts):
                counts["nvf"] = _nvf(data, root / "nvf" / name)

            def baseline(data=data, name=name, counts=counts):
                counts["colmap"] = _colmap(data, root / "colmap" / name)

            result = compare(f"poses/{name}", Side("nvf poses", candidate), Side("colmap CLI 3.x", baseline),
                             repeats=3, warmup=1, goal="ratio <= 0.5, registered >= colmap's")  # fmt: skip
            result.extra.update({"nvf_registered": counts["nvf"]["registered"],
                                 "colmap_registered": counts["colmap"]["registered"]})  # fmt: skip
            results.append(result)
    return results
