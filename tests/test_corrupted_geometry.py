"""align and cloud on monocular-like depth (synth.corrupt_depth), on a capture posed by SfM.

One 256 px ring is rendered and posed by `stages.poses` once per module (calibrated rig: the
focal length is known, as Multi-PIE's; the free-focal SfM settles 3-6 % low at this size, which
alone puts a perfect depth's cloud 0.6-1.3 % of the head away from the surface). Every test then
swaps in a corrupted prediction of the ground-truth depth and runs the stages with their defaults.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from stages import align, cloud, poses, synth
from stages.core import depthmaps, io, worktree
from stages.core.contract import Context

CAPTURE = "001_01_01_00"
CORRUPTIONS = {
    "salt": synth.Corruption(salt=0.10),
    "noise+salt": synth.Corruption(noise=0.02, salt=0.10),
    "bend+noise": synth.Corruption(bend=0.05, noise=0.02),
}
FIT_TARGET = {"salt": 0.005, "noise+salt": 0.01, "bend+noise": 0.01}  # issue 17's AbsRel of the fit


@dataclasses.dataclass
class Posed:
    data: Path
    work: Path
    depth_gt: np.ndarray  # [V, H, W] in the ground truth's row order
    names: list[str]
    gt_poses: io.Record
    head_size: float


@pytest.fixture(scope="module")
def posed(tmp_path_factory) -> Posed:
    root = tmp_path_factory.mktemp("corrupted")
    cfg = synth.Config(subjects=1, resolution=256, elevated=False, surface_points=20_000)
    synth.run(root / "data", cfg)
    calibrated = dataclasses.replace(poses.PRESETS["calibrated"], focal_px=float(synth.intrinsics(cfg)[0, 0]))
    poses.run(Context(root / "sfm", data=root / "data"), calibrated)
    gt = synth.groundtruth_dir(root / "data", CAPTURE)
    depth = io.load_record(gt / "depth.safetensors")
    size = float(np.linalg.norm(np.ptp(io.read_ply(gt / "surface.ply").points, axis=0)))
    return Posed(root / "data", root / "sfm", np.asarray(depth["depth"], np.float64), list(depth.names),
                 io.load_record(gt / "poses.safetensors"), size)  # fmt: skip


def _work(posed: Posed, tmp_path: Path, corrupted: synth.Corrupted) -> Path:
    """A work tree: SfM's poses and sparse points, the corrupted prediction as the depth record."""
    work = tmp_path / "work"
    (work / CAPTURE).mkdir(parents=True)
    for name in ("poses.safetensors", "sparse.safetensors"):
        shutil.copy(posed.work / CAPTURE / name, work / CAPTURE / name)
    io.save_record(worktree.record_path(work, CAPTURE, "depth"), {"depth": corrupted.depth_nhw.astype(np.float32)},
                   kind="depth", stage="test", capture=CAPTURE, names=posed.names,
                   extra={"depth_kind": "disparity"})  # fmt: skip
    return work


def _aligned(work: Path, names: list[str]) -> io.Record:
    record = io.load_record(worktree.record_path(work, CAPTURE, "aligned"), kind="aligned")
    assert sorted(record.names) == sorted(names)
    return record


def _fit_error(work: Path, posed: Posed, corrupted: synth.Corrupted) -> float:
    record = _aligned(work, posed.names)
    rows = [record.names.index(name) for name in posed.names]
    return synth.alignment_error(np.asarray(record["depth"], np.float64)[rows], corrupted.ideal_depth(),
                                 posed.depth_gt > 0)  # fmt: skip


def _mask_dir(posed: Posed, tmp_path: Path) -> Path:
    folder = tmp_path / "masks"
    for name, mask in zip(posed.names, posed.depth_gt > 0, strict=True):
        io.write_image(folder / name, np.repeat(mask[:, :, None] * np.uint8(255), 3, axis=2))
    return folder


def _surface_distance(work: Path, posed: Posed) -> np.ndarray:
    """Distances of the written cloud from the true surface, as a fraction of the head's size."""
    points = io.read_ply(work / CAPTURE / cloud.CLOUD_FILE).points
    sfm = io.load_record(worktree.record_path(work, CAPTURE, "poses"))
    rows = [sfm.names.index(name) for name in posed.names]
    shape = synth.head_shape(1, "neutral", 0)
    found = synth.surface_distance(points, shape, sfm["R"][rows], sfm["T"][rows], posed.gt_poses["R"],
                                   posed.gt_poses["T"])  # fmt: skip
    return found / posed.head_size


def _relative_noise(corrupted: synth.Corrupted, noise: float, fg_nhw: np.ndarray) -> np.ndarray:
    """[V] the relative noise of the prediction D = (p - b) / s when p has relative noise `noise`:
    noise x p / (p - b), median over the head (the shift changes the relative size of the noise)."""
    p = corrupted.scale[:, None, None] * corrupted.depth_nhw + corrupted.shift[:, None, None]
    return np.array([noise * np.median(v[m] / (v[m] - b)) for v, m, b in zip(p, fg_nhw, corrupted.shift, strict=True)])


# --- the corruption model -----------------------------------------------------------------------


def test_corruption_model_makes_what_it_says(posed):
    z = posed.depth_gt
    fg = z > 0
    exact = synth.corrupt_depth(z, synth.Corruption(seed=3))
    assert (exact.depth_nhw > 0).all()  # the background is a far wall, D > 0 everywhere (as DPT)
    np.testing.assert_allclose(exact.ideal_depth()[fg], z[fg], rtol=1e-9)
    bent = synth.corrupt_depth(z, synth.Corruption(bend=0.05, noise=0.02, salt=0.1, flying_px=2.0, seed=3))
    assert 0.09 < bent.salt_nhw.mean() < 0.11
    peak = np.array([np.abs(b[m] - 1).max() for b, m in zip(bent.bend_nhw, fg, strict=True)])
    np.testing.assert_allclose(peak, 0.05, rtol=1e-9)
    # the true alignment undoes scale, shift and bend: what is left is the 2 % noise (away from salt
    # and flying pixels) and the flying pixels lie within 2 px of the silhouette
    clean = fg & ~bent.salt_nhw & ~bent.flying_nhw
    ratio = bent.ideal_depth(unbend=True)[clean] / z[clean]
    assert abs(np.std(ratio) - 0.02) < 0.002 and abs(np.median(ratio) - 1) < 0.002
    assert bent.flying_nhw.any() and not (bent.flying_nhw & ~fg).all()
    # seeded: the same corruption twice is the same prediction; another seed is another
    again = synth.corrupt_depth(z, synth.Corruption(bend=0.05, noise=0.02, salt=0.1, flying_px=2.0, seed=3))
    np.testing.assert_array_equal(again.depth_nhw, bent.depth_nhw)
    other = synth.corrupt_depth(z, synth.Corruption(bend=0.05, noise=0.02, salt=0.1, flying_px=2.0, seed=4))
    assert not np.allclose(other.depth_nhw, bent.depth_nhw)


def test_depthmaps_find_salt_edges_and_noise(posed):
    z = posed.depth_gt
    fg = z > 0
    noisy = synth.corrupt_depth(z, synth.Corruption(noise=0.01, seed=1))
    # noise: within 10 % of the 1 % put in, in every view (the head's relief adds a little)
    np.testing.assert_allclose(depthmaps.inspect_maps(noisy.depth_nhw, fg).noise_v, _relative_noise(noisy, 0.01, fg),
                               rtol=0.1)  # fmt: skip
    corrupted = synth.corrupt_depth(z, synth.Corruption(noise=0.01, salt=0.1, flying_px=2.0, seed=1))
    check = depthmaps.inspect_maps(corrupted.depth_nhw, np.ones_like(fg))
    # salt and flying pixels hardly move the estimate (its second pass leaves out the gross residuals)
    np.testing.assert_allclose(check.noise_v, _relative_noise(corrupted, 0.01, fg), rtol=0.25)
    # salt: most far-off salt is found (salt that lands near the true value cannot be and need not be)
    gross = corrupted.salt_nhw & fg & (np.abs(corrupted.ideal_depth() / np.where(fg, z, 1) - 1) > 0.1)
    assert check.outlier_vhw[gross].mean() > 0.9
    assert check.outlier_vhw[fg & ~corrupted.salt_nhw & ~corrupted.flying_nhw].mean() < 0.01
    # flying pixels: the silhouette band is an edge, the head's interior is not
    band = corrupted.flying_nhw & ~check.outlier_vhw
    assert (check.edge_vhw | check.outlier_vhw)[corrupted.flying_nhw].mean() > 0.6 and band.any()
    interior = fg & ~corrupted.flying_nhw
    assert check.edge_vhw[interior].mean() < 0.1


# --- align --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_align_fit_error_under_corruptions(posed, tmp_path, kind):
    """Issue 17's targets, seeds 0-2: AbsRel of the fit < 0.5 % (salt), < 1 % (noise + salt, bend + noise).

    Measured (256 px, calibrated SfM, ~950 points, seeds 0-2): salt 0.089-0.093 %, noise + salt
    0.17-0.24 %, bend + noise 0.28-0.36 %; the previous default (`tukey` preset) 0.089-0.102 %,
    1.8-2.5 % and 0.62-0.68 %.
    """
    for seed in range(3):
        corrupted = synth.corrupt_depth(posed.depth_gt, dataclasses.replace(CORRUPTIONS[kind], seed=seed))
        work = _work(posed, tmp_path / f"seed{seed}", corrupted)
        align.run(Context(work), align.Config())
        error = _fit_error(work, posed, corrupted)
        assert error < FIT_TARGET[kind], (kind, seed, error)
        record = _aligned(work, posed.names)
        assert (record["quality"] == align.QUALITY["good"]).all()
        assert (record["inliers"] >= 0.5 * record["samples"]).all() and (record["samples"] >= 20).all()
        if "noise" in kind:
            rows = [posed.names.index(name) for name in record.names]
            expected = _relative_noise(corrupted, 0.02, posed.depth_gt > 0)[rows]
            # 10 % salt widens the estimate by up to 40 % in a view (measured), noise alone by < 10 %
            np.testing.assert_allclose(record["prediction_noise"], expected, rtol=0.5)


def test_the_old_estimator_fails_where_lmeds_holds(posed, tmp_path):
    """The leverage points of noise + salt pull the previous default (tukey, no prefilter) past 1 %."""
    corrupted = synth.corrupt_depth(posed.depth_gt, dataclasses.replace(CORRUPTIONS["noise+salt"], seed=0))
    work = _work(posed, tmp_path, corrupted)
    align.run(Context(work), align.PRESETS["tukey"])
    assert _fit_error(work, posed, corrupted) > 0.015
    align.run(Context(work, overwrite=True), align.Config())
    assert _fit_error(work, posed, corrupted) < 0.01


def test_weak_views_are_flagged(posed, tmp_path):
    """A view whose prediction is pure salt has no consistent majority: weak, and cloud drops it."""
    corrupted = synth.corrupt_depth(posed.depth_gt, dataclasses.replace(CORRUPTIONS["salt"], seed=0))
    depth = corrupted.depth_nhw.copy()
    rng = np.random.default_rng(0)
    depth[4] = rng.uniform(depth[4].min(), depth[4].max(), depth[4].shape)
    work = _work(posed, tmp_path, dataclasses.replace(corrupted, depth_nhw=depth))
    align.run(Context(work), align.Config())
    record = _aligned(work, posed.names)
    bad = record.names.index(posed.names[4])
    assert record["quality"][bad] == align.QUALITY["weak"]
    assert (np.delete(record["quality"], bad) == align.QUALITY["good"]).all()
    [_, metrics_path] = cloud.run(Context(work), cloud.Config())  # the default keeps weak views (consistency drops
    steps = {step["name"]: step for step in io.read_json(metrics_path)["filters"]}  # their points)
    assert steps["quality"]["params"]["views_dropped"] == []
    [_, metrics_path] = cloud.run(Context(work), cloud.Config(min_quality="good"))
    steps = {step["name"]: step for step in io.read_json(metrics_path)["filters"]}
    assert steps["quality"]["params"]["views_dropped"] == [posed.names[4]]
    assert steps["quality"]["after"] < steps["quality"]["before"]


# --- cloud --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_default_cloud_lies_on_the_surface_under_corruptions(posed, tmp_path, kind):
    """Issue 17's targets, seeds 0-1: mean distance < 0.5 % of the head's size, p95 < 1.5 %.

    Measured (seeds 0-2, mean / p95): salt 0.078 % / 0.16-0.17 %, noise + salt 0.18-0.19 % / 0.45-0.47 %,
    bend + noise 0.38-0.41 % / 1.07-1.11 %; the previous defaults (`tukey` align, `legacy` cloud)
    1.4-1.5 % / 9.3-9.7 %, 1.4-1.5 % / 3.8 % and 1.0 % / 2.4-2.5 %.
    """
    masks = _mask_dir(posed, tmp_path)
    for seed in range(2):
        corrupted = synth.corrupt_depth(posed.depth_gt, dataclasses.replace(CORRUPTIONS[kind], seed=seed))
        work = _work(posed, tmp_path / f"seed{seed}", corrupted)
        align.run(Context(work), align.Config())
        [_, metrics_path] = cloud.run(Context(work, data=posed.data), cloud.Config(mask_dir=str(masks)))
        distance = _surface_distance(work, posed)
        assert distance.mean() < 0.005 and np.percentile(distance, 95) < 0.015, (kind, seed, distance.mean())
        report = io.read_json(metrics_path)
        steps = {step["name"]: step for step in report["filters"]}
        assert steps["consistency"]["enabled"] and steps["consistency"]["after"] < steps["consistency"]["before"]
        assert report["config"]["consistency_views"] == cloud.Config().consistency_views
        assert steps["foreground"]["params"]["outlier_pixels"] > 0


def test_salt_flies_far_without_the_new_defaults(posed, tmp_path):
    """The legacy pipeline (no consistency, no edge filter) keeps salt points far off the surface."""
    masks = _mask_dir(posed, tmp_path)
    corrupted = synth.corrupt_depth(posed.depth_gt, dataclasses.replace(CORRUPTIONS["salt"], seed=0))
    work = _work(posed, tmp_path, corrupted)
    align.run(Context(work), align.Config())
    cloud.run(Context(work), dataclasses.replace(cloud.PRESETS["legacy"], mask_dir=str(masks)))
    assert np.percentile(_surface_distance(work, posed), 95) > 0.03


def test_flying_pixels_do_not_reach_the_cloud(posed, tmp_path):
    masks = _mask_dir(posed, tmp_path)
    corrupted = synth.corrupt_depth(posed.depth_gt, synth.Corruption(noise=0.02, salt=0.1, flying_px=2.0, seed=0))
    work = _work(posed, tmp_path, corrupted)
    align.run(Context(work), align.Config())
    assert _fit_error(work, posed, corrupted) < 0.01
    cloud.run(Context(work), cloud.Config(mask_dir=str(masks)))
    distance = _surface_distance(work, posed)
    assert distance.mean() < 0.005 and np.percentile(distance, 99) < 0.03
