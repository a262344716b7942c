"""Stage `align`: per-view scale and shift of monocular depth against a reference (paper Eq. 5).

For each view i, (s_i, b_i) = argmin sum_p (s_i D_i(p) + b_i - Dbar(p))^2 over the reference
samples p of that view (Algorithm 2, first half). The reference Dbar is, by `Config.reference`:

- ``sparse`` (default): the SfM points of ``sparse.safetensors`` whose track includes view i,
  projected into view i with its pose from ``poses.safetensors``; Dbar = their z in view i.
- ``view``: one chosen view's depth (aligned to the sparse points first when a sparse record
  exists, else taken as it is), back-projected to 3D and projected into every other view, keeping
  the nearest point per pixel (a z-buffer) so that surfaces the reference sees behind others drop out.
- ``depth``: given z-depth maps (a depth record, e.g. synthetic ground truth), pixel by pixel: for
  evaluating the fit or the depth model.

Convention: a ``disparity`` record (relative inverse depth: DPT, Depth Anything) is fitted in
disparity space, target 1/z (MiDaS's scale-and-shift-invariant fit), and converted with
z = 1 / (s D + b); a ``depth`` record is fitted to z directly, z = s D + b. Pixels whose aligned
value is not positive become 0 (invalid) and are counted per view in ``nonpositive``. Output
``aligned.safetensors``: ``depth`` [N, H, W] float32 z-depth in the poses' units (0 = invalid),
``scale``/``shift`` [N] (in the fit space), ``residual_rms`` [N] (z-depth residual of the inlier
reference samples, poses' units: the view's quality figure), ``inliers`` [N], ``nonpositive`` [N],
``samples`` [N] (reference samples used), ``residual_rel`` [N] (residual_rms / median reference z),
``quality`` [N] int8 (`QUALITY`: failed 0, weak 1, good 2; cloud filters on it), and with
``prefilter`` ``prediction_noise`` [N] (relative per-pixel noise of the prediction) and
``rejected_samples`` [N] (samples dropped on depth edges or salt, `stages.core.depthmaps`).
The default estimator (``lmeds``) is robust to gross errors in the prediction, the regressor:
see `fit_scale_shift`.
Head masks: with ``use_masks`` and ``WORK/<capture>/masks.safetensors`` present (`nvf masks`), samples
are read only inside each view's head mask (head ∪ hair, resampled nearest to the map), so SfM
points and reference pixels on the background, neck or clothes do not pull the fit; the aligned
maps themselves cover every valid pixel as before. A view whose head mask holds no valid pixel is
sampled unmasked (with a warning). The record's ``sample_mask`` metadata names the masks used.
A view that cannot be fitted (too few samples, all equal) gets NaN scale/shift/residual, 0 inliers

Modules: `config` (`Config`, `PRESETS`, `QUALITY`), `estimators` (`fit_scale_shift` and its
solvers), `samples` (reference samples per view, prefiltered reads, loading the depth record),
`stage` (`align_views`, `align_capture`, `run`). Every name stays importable from `stages.align`.
"""

# ruff: noqa: F401  (re-exports: every name of the former single-file module stays reachable as align.X)

from __future__ import annotations

import logging

from stages.align.config import PRESETS, QUALITY, STAGE, Config, FitSpace, Reference, Robust
from stages.align.estimators import (
    _LMEDS_PROBES,
    _MAD_TO_SIGMA,
    _TUKEY_C,
    Fit,
    _lmeds,
    _pair_hypotheses,
    _ransac,
    _residual,
    _robust_sigma,
    _row_median,
    fit_scale_shift,
    solve_errors_in_variables,
    solve_normal_equations,
)
from stages.align.samples import (
    _BLOCKS_FOR_NOISE,
    _image_hw,
    _load_views,
    _pad,
    _sample_mask,
    _sample_points,
    _subsample,
    _Views,
    depth_samples,
    sparse_samples,
    view_samples,
)
from stages.align.stage import (
    _HOW_TO_MAKE,
    Aligned,
    _check_config,
    _reference_depth_path,
    _reference_view_fit,
    align_capture,
    align_views,
    apply_fit,
    run,
    to_fit_space,
    work_captures,
)
from stages.core import dataset, depthmaps, geometry, io, worktree
from stages.core import masks as headmasks

log = logging.getLogger("nvf")
