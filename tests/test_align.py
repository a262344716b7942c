from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stages import align, synth
from stages.core import io, worktree
from stages.core.contract import Context
from stages.core.errors import InputError, RecordError

CAPTURE = "001_01_01_00"


@pytest.fixture(scope="module")
def render() -> synth.CaptureRender:
    """A 48 px synthetic capture (13 ring views) with exact z-depth and poses."""
    cfg = synth.Config(resolution=48, elevated=False, surface_points=500)
    return synth.render_capture(1, 1, 1, 0, cfg)


def _disparity(z_nhw: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """The prediction whose alignment s D + b gives back 1/z exactly (0 where z is 0)."""
    valid = z_nhw > 0
    return np.where(valid, (1.0 / np.where(valid, z_nhw, 1.0) - shift[:, None, None]) / scale[:, None, None], 0.0)


def _absrel(depth: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    return float(np.mean(np.abs(depth[mask] - truth[mask]) / truth[mask]))


def _sparse_record(path: Path, render: synth.CaptureRender, n_points: int = 400, seed: int = 0) -> Path:
    """SfM-like points from the ground truth: surface points seen by each view (GT depth test)."""
    rng = np.random.default_rng(seed)
    z = render.depth_nhw.astype(np.float64)
    view, line, col = np.nonzero(z > 0)
    pick = rng.choice(len(view), n_points, replace=False)
    K, R, T = render.K[0], render.R, render.T
    points = []
    for v, r, c in zip(view[pick], line[pick], col[pick], strict=False):
        ray = np.linalg.solve(K, [c + 0.5, r + 0.5, 1.0]) * z[v, r, c]
        points.append(R[v].T @ (ray - T[v]))
    points = np.asarray(points)
    offsets, images, uvs = [0], [], []
    for point in points:  # the track: every view where the point is in front of the GT surface
        for v in range(len(R)):
            cam = R[v] @ point + T[v]
            uv = (K @ cam)[:2] / cam[2]
            c, r = int(uv[0]), int(uv[1])
            if 0 <= c < z.shape[2] and 0 <= r < z.shape[1] and z[v, r, c] > 0 and cam[2] <= z[v, r, c] * 1.01:
                images.append(v)
                uvs.append(uv)
        offsets.append(len(images))
    tensors = {
        "points": points,
        "colors": np.zeros((len(points), 3), np.uint8),
        "error": np.zeros(len(points)),
        "track_offsets": np.asarray(offsets),
        "track_images": np.asarray(images),
        "track_uv": np.asarray(uvs),
    }
    return io.save_record(path, tensors, kind="sparse", stage="test", capture=CAPTURE, names=render.names)


def _work(tmp_path: Path, render: synth.CaptureRender, depth_nhw: np.ndarray, kind: str = "disparity") -> Path:
    """A work tree with depth + poses (+ sparse) of the synthetic capture."""
    work = tmp_path / "work"
    io.save_record(
        worktree.record_path(work, CAPTURE, "depth"),
        {"depth": depth_nhw.astype(np.float32)},
        kind="depth",
        stage="test",
        capture=CAPTURE,
        names=render.names,
        extra={"depth_kind": kind},
    )
    n, size = len(render.names), render.depth_nhw.shape[1]
    io.save_record(
        worktree.record_path(work, CAPTURE, "poses"),
        {"R": render.R, "T": render.T, "K": render.K, "width": np.full(n, size), "height": np.full(n, size)},
        kind="poses",
        stage="test",
        capture=CAPTURE,
        names=render.names,
    )
    return work


# --- the fit ------------------------------------------------------------------------------------


@pytest.mark.parametrize("robust", ["none", "huber", "tukey", "ransac"])
def test_fit_recovers_scale_and_shift_exactly_without_noise(robust):
    rng = np.random.default_rng(1)
    x = rng.uniform(0.1, 2.0, (4, 300))
    scale, shift = np.array([0.5, 2.0, 10.0, 1e-3]), np.array([-0.2, 0.0, 3.0, 1e-4])
    y = scale[:, None] * x + shift[:, None]
    valid = np.ones_like(x, dtype=bool)
    valid[3, 150:] = False  # rows with different sample counts
    fit = align.fit_scale_shift(x, y, valid, align.Config(robust=robust))
    np.testing.assert_allclose(fit.scale, scale, rtol=1e-10)
    np.testing.assert_allclose(fit.shift, shift, rtol=1e-9, atol=1e-12)
    assert fit.ok.all() and fit.inlier_nm.sum(axis=1)[3] == 150


def test_fit_flags_degenerate_rows():
    x = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    y = np.array([[1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 0.0, 0.0], [-1.0, -2.0, -3.0, -4.0]])
    valid = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=bool)
    fit = align.fit_scale_shift(x, y, valid, align.Config(robust="none"))
    # all x equal: det = 0; two samples < min_samples; negative scale: not a valid alignment
    assert fit.ok.tolist() == [False, False, False]
    assert np.isnan(fit.scale).all() and not fit.inlier_nm.any()


def test_huber_survives_bad_reference_points_and_tukey_bad_predictions():
    rng = np.random.default_rng(2)
    x = rng.uniform(0.2, 0.4, (1, 2000))
    y = 3.0 * x + 0.1 + 0.001 * rng.standard_normal(x.shape)
    bad = rng.random(x.shape) < 0.1
    valid = np.ones_like(x, dtype=bool)
    y_bad = np.where(bad, y * rng.uniform(0.3, 3.0, x.shape), y)  # wrong reference z
    for robust in ("huber", "tukey", "ransac"):
        assert align.fit_scale_shift(x, y_bad, valid, align.Config(robust=robust)).scale[0] == pytest.approx(
            3.0, rel=0.01
        )
    assert abs(align.fit_scale_shift(x, y_bad, valid, align.Config(robust="none")).scale[0] - 3.0) > 0.1
    x_bad = np.where(bad, x * rng.uniform(0.3, 3.0, x.shape), x)  # wrong predictions: leverage points
    for robust in ("tukey", "ransac"):
        assert align.fit_scale_shift(x_bad, y, valid, align.Config(robust=robust)).scale[0] == pytest.approx(
            3.0, rel=0.01
        )
    # measured: Huber is pulled by high-leverage outliers; documented in the Config
    assert abs(align.fit_scale_shift(x_bad, y, valid, align.Config(robust="huber")).scale[0] - 3.0) > 0.02


# --- the stage on synthetic ground truth --------------------------------------------------------


def test_align_to_groundtruth_depth_noisy_disparity_with_outliers(tmp_path, render):
    rng = np.random.default_rng(3)
    z = render.depth_nhw.astype(np.float64)
    n = len(z)
    scale, shift = rng.uniform(0.2, 5.0, n), rng.uniform(-0.05, 0.05, n)
    disparity = _disparity(z, scale, shift) * (1 + 0.003 * rng.standard_normal(z.shape))
    outlier = (rng.random(z.shape) < 0.10) & (z > 0)
    disparity = np.where(outlier, disparity * rng.uniform(0.3, 3.0, z.shape), disparity)
    work = _work(tmp_path, render, disparity)
    reference = io.save_record(
        tmp_path / "gt" / "depth.safetensors",
        {"depth": render.depth_nhw},
        kind="depth",
        stage="synth",
        capture=CAPTURE,
        names=render.names,
        extra={"depth_kind": "depth"},
    )
    [path] = align.run(Context(work), align.Config(reference="depth", reference_depth=str(reference)))
    out = io.load_record(path, kind="aligned", capture=CAPTURE)
    clean = (z > 0) & ~outlier
    assert _absrel(out["depth"], z, clean) < 0.01
    np.testing.assert_allclose(out["scale"], scale, rtol=0.02)
    # samples skip the salt found and the depth edges (many at 48 px: a pixel spans ~0.06 units)
    assert (out["inliers"] > 0.8 * out["samples"]).all() and (out["samples"] > 0.3 * (z > 0).sum(axis=(1, 2))).all()
    # the salt found is left out of the samples: most of the 10 % outliers, and the edges at 48 px
    assert (out["rejected_samples"] > 0.6 * outlier.sum(axis=(1, 2))).all()
    assert (out["quality"] == align.QUALITY["good"]).all()
    assert (out["residual_rms"] < 0.05).all()
    # the outlier pixels keep their (wrong) prediction; the background stays invalid
    assert (out["depth"][z == 0] == 0).all()


def test_align_to_groundtruth_depth_is_exact_without_noise(tmp_path, render):
    rng = np.random.default_rng(7)
    z = render.depth_nhw.astype(np.float64)
    scale, shift = rng.uniform(0.2, 5.0, len(z)), rng.uniform(-0.05, 0.05, len(z))
    work = _work(tmp_path, render, _disparity(z, scale, shift))
    reference = io.save_record(
        tmp_path / "gt" / CAPTURE / "depth.safetensors",
        {"depth": render.depth_nhw},
        kind="depth",
        stage="synth",
        capture=CAPTURE,
        names=render.names,
        extra={"depth_kind": "depth"},
    )
    [path] = align.run(Context(work), align.Config(reference="depth", reference_depth=str(reference.parent.parent)))
    out = io.load_record(path)
    # exact up to the float32 storage of the prediction and the reference
    np.testing.assert_allclose(out["scale"], scale, rtol=1e-5)
    np.testing.assert_allclose(out["shift"], shift, atol=1e-6)
    assert _absrel(out["depth"], z, z > 0) < 1e-5 and (out["residual_rms"] < 1e-5).all()


def test_align_to_sparse_points_recovers_scale_and_shift(tmp_path, render):
    rng = np.random.default_rng(4)
    z = render.depth_nhw.astype(np.float64)
    scale, shift = rng.uniform(0.5, 2.0, len(z)), rng.uniform(-0.02, 0.02, len(z))
    work = _work(tmp_path, render, _disparity(z, scale, shift))
    _sparse_record(worktree.record_path(work, CAPTURE, "sparse"), render)
    [path] = align.run(Context(work), align.Config(robust="none"))
    out = io.load_record(path, kind="aligned")
    ok = np.isfinite(out["scale"])
    assert ok.sum() >= len(z) - 1  # every view sees enough of the 400 points (maybe not one profile)
    # exact data, but the prediction is read bilinearly between 48 px pixel centres: measured
    # scale errors ~1% (errors in x bias least squares toward a flatter fit), AbsRel ~0.1%
    np.testing.assert_allclose(out["scale"][ok], scale[ok], rtol=0.03)
    assert _absrel(out["depth"][ok], z[ok], z[ok] > 0) < 0.005
    assert align.run(Context(work), align.Config(robust="none")) == []  # up to date: skipped


def test_align_to_a_reference_view(tmp_path, render):
    rng = np.random.default_rng(5)
    z = render.depth_nhw.astype(np.float64)
    scale, shift = rng.uniform(0.5, 2.0, len(z)), np.zeros(len(z))
    scale[6] = 1.0  # the reference view (frontal camera 051) is taken as it is: z = 1 / D
    work = _work(tmp_path, render, _disparity(z, scale, shift))
    reference = render.names[6]
    [path] = align.run(Context(work), align.Config(reference="view", reference_view=reference, robust="tukey"))
    out = io.load_record(path, kind="aligned")
    seen = np.isfinite(out["scale"])  # views that share surface with the frontal one
    assert seen.sum() >= 7 and seen[6]
    np.testing.assert_allclose(out["scale"][seen], scale[seen], rtol=0.03)
    # nothing measured the reference view (no sparse points): no residual, no inliers, not 0 and all pixels
    assert np.isnan(out["residual_rms"][6]) and out["inliers"][6] == 0
    assert (out["residual_rms"][seen & (np.arange(len(z)) != 6)] > 0).all()


def test_the_reference_view_reports_its_own_fit_to_the_sparse_points(tmp_path, render):
    """With sparse points the reference view is fitted to them: its residual and inliers are that
    fit's, the same figures the default (sparse) alignment reports for the view."""
    rng = np.random.default_rng(6)
    z = render.depth_nhw.astype(np.float64)
    scale, shift = rng.uniform(0.5, 2.0, len(z)), rng.uniform(0.0, 0.2, len(z))
    work = _work(tmp_path, render, _disparity(z, scale, shift))
    _sparse_record(worktree.record_path(work, CAPTURE, "sparse"), render)
    # prefilter off: with it, the view reference reads its own map raw where the sparse path reads medians
    cfg = align.Config(reference="view", reference_view=render.names[6], robust="tukey", prefilter=False)
    [path] = align.run(Context(work), cfg)
    by_view = io.load_record(path, kind="aligned")
    [path] = align.run(Context(work, overwrite=True), align.Config(robust="tukey", prefilter=False))
    by_sparse = io.load_record(path, kind="aligned")
    assert 0 < by_view["inliers"][6] < (z[6] > 0).sum()  # the sparse points it sees, not every pixel
    assert by_view["inliers"][6] == by_sparse["inliers"][6]
    assert by_view["residual_rms"][6] > 0
    np.testing.assert_allclose(by_view["residual_rms"][6], by_sparse["residual_rms"][6], rtol=1e-9)
    np.testing.assert_allclose(by_view["scale"][6], by_sparse["scale"][6], rtol=1e-9)


def test_depth_record_stored_smaller_than_the_images(tmp_path, render):
    """--max-res maps: K is scaled to the map, so the sparse fit still lands on the right pixels."""
    z = render.depth_nhw.astype(np.float64)
    work = _work(tmp_path, render, _disparity(z, np.ones(len(z)), np.zeros(len(z)))[:, ::2, ::2])
    depth_path = worktree.record_path(work, CAPTURE, "depth")
    record = io.load_record(depth_path)
    io.save_record(
        depth_path,
        {"depth": record["depth"], "image_hw": np.full((len(z), 2), 48)},
        kind="depth",
        stage="test",
        capture=CAPTURE,
        names=record.names,
        extra={"depth_kind": "disparity"},
    )
    _sparse_record(worktree.record_path(work, CAPTURE, "sparse"), render)
    [path] = align.run(
        Context(work), align.Config(robust="none", prefilter=False)
    )  # 24 px: too coarse for the 3x3 checks
    out = io.load_record(path)
    assert out["depth"].shape[1:] == (24, 24)
    # subsampled pixel (i, j) covers image pixels 2i..2i+1: scale stays ~1 for a smooth surface
    assert np.nanmedian(np.abs(out["scale"] - 1.0)) < 0.05


# --- bad input ----------------------------------------------------------------------------------


def test_bad_inputs_give_one_clear_error(tmp_path, render):
    z = render.depth_nhw.astype(np.float64)
    work = _work(tmp_path, render, _disparity(z, np.ones(len(z)), np.zeros(len(z))))
    with pytest.raises(InputError, match="sparse.safetensors: not found"):
        align.run(Context(work))
    empty = {
        "points": np.zeros((0, 3)),
        "colors": np.zeros((0, 3), np.uint8),
        "error": np.zeros(0),
        "track_offsets": np.zeros(1, np.int64),
        "track_images": np.zeros(0, np.int64),
        "track_uv": np.zeros((0, 2)),
    }
    io.save_record(
        worktree.record_path(work, CAPTURE, "sparse"),
        empty,
        kind="sparse",
        stage="t",
        capture=CAPTURE,
        names=render.names,
    )
    with pytest.raises(InputError, match="no sparse points"):
        align.run(Context(work))
    other = io.save_record(
        tmp_path / "other.safetensors",
        {"depth": render.depth_nhw},
        kind="depth",
        stage="t",
        capture="002_01_01_00",
        names=render.names,
        extra={"depth_kind": "depth"},
    )
    with pytest.raises(InputError, match="different captures"):
        align.run(Context(work), align.Config(reference="depth", reference_depth=str(other)))
    nan_depth = _disparity(z, np.ones(len(z)), np.zeros(len(z)))
    nan_depth[2, 5, 5] = np.nan
    work_nan = _work(tmp_path / "nan", render, nan_depth)
    with pytest.raises(InputError, match="NaN"):
        align.run(Context(work_nan), align.Config(reference="view", reference_view=render.names[0]))
    work_zero = _work(tmp_path / "zero", render, np.zeros_like(z))
    with pytest.raises(InputError, match="every depth pixel is invalid"):
        align.run(Context(work_zero), align.Config(reference="view", reference_view=render.names[0]))
    small = io.load_record(worktree.record_path(work, CAPTURE, "poses"))
    io.save_record(
        worktree.record_path(work, CAPTURE, "poses"),
        {**small.tensors, "width": np.full(len(z), 64)},
        kind="poses",
        stage="t",
        capture=CAPTURE,
        names=render.names,
    )
    with pytest.raises(InputError, match="disagree on the size"):
        align.run(Context(work), align.Config(reference="view", reference_view=render.names[0]))
    with pytest.raises(InputError, match="--reference-view"):
        align.run(Context(work), align.Config(reference="view"))
    with pytest.raises(RecordError):
        io.save_record(
            worktree.record_path(work, CAPTURE, "depth"),
            {"depth": np.zeros((2, 4, 4))},
            kind="depth",
            stage="t",
            capture=CAPTURE,
            names=["a"],
        )


def test_depth_kind_is_read_one_way_by_align_and_evaluate(tmp_path, render):
    """`io.depth_kind` everywhere: align's fit space, align's reference check and evaluate agree on
    what a depth record holds, and an unknown kind stops each of them naming the file."""
    from stages.evaluate.depth import _load_depth

    z = render.depth_nhw.astype(np.float64)
    view = align.Config(reference="view", reference_view=render.names[6])
    odd = _work(tmp_path / "odd", render, z, kind="inverse")
    with pytest.raises(InputError, match=r"depth\.safetensors: depth_kind 'inverse' is not one of depth, disparity"):
        align.run(Context(odd), view)
    with pytest.raises(InputError, match="depth_kind 'inverse'"):
        _load_depth(worktree.record_path(odd, CAPTURE, "depth"))
    for kind in ("depth", "disparity"):
        work = _work(tmp_path / kind, render, z if kind == "depth" else _disparity(z, np.ones(len(z)), np.zeros(len(z))),
                     kind=kind)  # fmt: skip
        [path] = align.run(Context(work), view)
        assert io.load_record(path).extra["fit_space"] == kind
        assert _load_depth(worktree.record_path(work, CAPTURE, "depth"))[1] == kind
        assert _load_depth(path)[1] == "depth"  # aligned records hold z-depth
        ref = io.save_record(tmp_path / f"ref-{kind}.safetensors", {"depth": render.depth_nhw}, kind="depth",
                             stage="t", capture=CAPTURE, names=render.names, extra={"depth_kind": kind})  # fmt: skip
        depth_ref = align.Config(reference="depth", reference_depth=str(ref))
        if kind == "disparity":
            with pytest.raises(InputError, match="a reference must hold z-depth, not disparity"):
                align.run(Context(work, overwrite=True), depth_ref)
        else:
            align.run(Context(work, overwrite=True), depth_ref)


# --- real data ----------------------------------------------------------------------------------


def test_middlebury_disparity_fit(shared_data):
    """Real-data check of the fit on the Middlebury motorcycle ground truth.

    What it checks: the disparity-space fit and the depth conversion on a real scene's disparity
    statistics (occlusion holes = inf, a wide disparity range), with the ground-truth disparity
    affinely distorted, noised by 1% and 10% of pixels corrupted. It does not check a depth model.
    """
    gt = np.load(shared_data / "stereo_motorcycle" / "motorcycle_disp.npz")["arr_0"].astype(np.float64)[None]
    valid = np.isfinite(gt) & (gt > 0)
    rng = np.random.default_rng(6)
    prediction = np.where(valid, (gt - 4.0) / 25.0, 0.0) * (1 + 0.01 * rng.standard_normal(gt.shape))
    bad = rng.random(gt.shape) < 0.10
    prediction = np.where(bad & valid, prediction * rng.uniform(0.3, 3.0, gt.shape), prediction)
    z_true = np.where(valid, 1.0 / np.where(valid, gt, 1.0), 0.0)  # depth up to the rig's constant
    rows = np.flatnonzero(valid[0].reshape(-1))
    samples = [(prediction[0].reshape(-1)[rows], z_true[0].reshape(-1)[rows])]
    out = align.align_views(prediction, valid & (prediction > 0), samples, "disparity", align.Config(robust="tukey"))
    assert out.scale[0] == pytest.approx(25.0, rel=0.01) and out.shift[0] == pytest.approx(4.0, abs=0.5)
    clean = valid & ~bad
    assert _absrel(out.depth_nhw.astype(np.float64), z_true, clean) < 0.015


@pytest.mark.parametrize("robust", ["none", "huber", "ransac", "tukey", "lmeds"])
def test_no_samples_in_any_view_fits_no_view(robust):
    """Every sample rejected (the demo's random tiny depth model: all noise) leaves [N, 0] arrays:
    no view is fitted, and nothing raises."""
    empty = np.zeros((3, 0))
    fit = align.fit_scale_shift(empty, empty, empty.astype(bool), align.Config(robust=robust))
    assert not fit.ok.any() and np.isnan(fit.scale).all() and np.isnan(fit.shift).all()
