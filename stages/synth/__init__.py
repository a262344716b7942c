"""Synthetic Multi-PIE-style captures with exact ground truth: what tests, the demo and benchmarks run on.

Each subject is a procedurally textured, head-like *star-shaped* surface around the world origin,
rendered by ray casting from the 13 head-height cameras of the Multi-PIE ring (and the 2 elevated
ones) with Lambertian shading. Every capture comes with its ground truth: the camera poses (as a
``poses`` record), exact z-depth maps (a ``depth`` record) and the surface as a dense coloured PLY.

Convention:
    - World frame as in `stages.core.geometry`: up is -y, the face looks toward -z (the frontal
      camera 051 sits at ``(0, 0, -radius)``), positive azimuth toward +x. Scene units: the head
      is about 2 units tall (1 unit is roughly 11 cm of a real head).
    - The surface is ``{ r(d) d : |d| = 1 }`` with the radius function
      ``r(d) = E(d) (1 + sum_k a_k exp((d.c_k - 1) / s_k^2))``: ``E`` the radius of an ellipsoid
      with semi-axes ``axes`` and each term a smooth bump (a_k > 0) or dent (a_k < 0) centred on the
      unit direction c_k with angular width s_k radians. Nose, brow, cheeks, chin, lips, eye sockets
      and ears are bumps whose sizes and places are drawn per subject (seeded by subject id, so
      subject k looks the same in every session); an expression adds a few more bumps (smile
      widens the mouth region and lifts the cheeks, surprise raises the brow and drops the jaw...).
    - Albedo is multi-octave 3D value noise plus freckle-like spots around a per-subject skin
      tone, evaluated where a point's direction d meets the subject's neutral surface: it is
      view-consistent and moves with the skin when an expression deforms it. ``texture_contrast``
      scales it; ``textureless_cameras`` see the plain skin tone (shading only).
    - Depth is z-depth (0 where a ray misses the head); hits are solved on the analytic surface to
      ~1e-9 units, so back-projected ground-truth depth lies on the surface.
    - Images are square, ``resolution`` pixels, pinhole K with the principal point at the centre.

Rendering is numpy, vectorised over all pixels of all views (`trace_depth`): coarse-to-fine
sphere tracing with a Lipschitz bound, Newton on the analytic surface, Lambertian shading (ambient
plus one directional light per shot). A 13-view 256² capture takes ~1.2 s on one busy CPU core.

Modules: `config` (Config, presets, validation), `head` (head shapes and albedo), `raycast` (ray
casting), `rig` (cameras and light), `render` (one capture in memory), `stage` (`run`: the Multi-PIE
layout on disk), `corruption` (monocular-depth corruptions and their error measures). Everything is
re-exported here: use ``from stages import synth`` and ``synth.X``.
"""

from stages.synth.config import PRESETS, SELECTION_FIELDS, Config, validate
from stages.synth.corruption import Corrupted, Corruption, alignment_error, corrupt_depth, surface_distance
from stages.synth.head import HeadShape, head_shape
from stages.synth.head import _fibonacci_dirs as _fibonacci_dirs  # tests sample the sphere with it
from stages.synth.raycast import cast_rays, trace_depth, view_rays
from stages.synth.render import CaptureRender, render_capture, surface_cloud
from stages.synth.rig import camera_ids, intrinsics, light_for_shot, rig_poses
from stages.synth.stage import STAGE, captures, groundtruth_dir, run

__all__ = [
    "PRESETS",
    "SELECTION_FIELDS",
    "STAGE",
    "CaptureRender",
    "Config",
    "Corrupted",
    "Corruption",
    "HeadShape",
    "alignment_error",
    "camera_ids",
    "captures",
    "cast_rays",
    "corrupt_depth",
    "groundtruth_dir",
    "head_shape",
    "intrinsics",
    "light_for_shot",
    "render_capture",
    "rig_poses",
    "run",
    "surface_cloud",
    "surface_distance",
    "trace_depth",
    "validate",
    "view_rays",
]
