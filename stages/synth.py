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
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from stages.core import batching, dataset, geometry, io
from stages.core.errors import InputError

log = logging.getLogger("nvf")

STAGE = "synth"


@dataclass(frozen=True)
class Config:
    """How synthetic captures are made. Fields in `SELECTION_FIELDS` choose which captures exist;
    the others decide what they look like (and enter the captures' input hash)."""

    subjects: int = 2
    """Number of subjects, ids 001..N; each has its own shape and texture."""
    sessions: tuple[int, ...] = (1,)
    """Multi-PIE sessions to make (1-4); the session decides which expressions exist."""
    recordings: Literal["neutral", "all"] = "neutral"
    """'neutral': recording 01 of each session only; 'all': every expression of the session."""
    shots: int = 1
    """Shots per recording (1-19). Shot 00 is the ambient light; later shots move the light."""
    lighting_change: bool = True
    """Shots after 00 change light direction and intensity (as Multi-PIE's flashes); else all alike."""
    resolution: int = 256
    """Image width and height in pixels."""
    elevated: bool = True
    """Also render the two elevated cameras 081 and 191 (15 views instead of 13)."""
    texture_contrast: float = 1.0
    """Strength of the skin texture: 0 = plain skin tone (shading only), 1 = rich texture."""
    textureless_cameras: tuple[str, ...] = ()
    """Camera ids (e.g. '051') rendered with the texture removed, to make registration fail there."""
    radius: float = 4.0
    """Distance of every camera from the head centre, in scene units (head ~2 units tall)."""
    fov_deg: float = 42.0
    """Field of view of the square images; 42° makes the head fill ~65-70% of the frame height."""
    background: tuple[float, float, float] = (0.45, 0.47, 0.50)
    """Uniform background colour, RGB in 0..1 (never textured: a static texture would match falsely)."""
    ambient: float = 0.45
    """Ambient light level of the Lambertian shading (diffuse adds up to 0.6 more)."""
    surface_points: int = 100_000
    """Points of the ground-truth surface PLY (uniform in direction from the head centre)."""
    seed: int = 0
    """Seed of every random choice; subject k of seed s always looks the same."""
    overwrite: bool = False
    """Render captures again even if their files exist with the same config."""


SELECTION_FIELDS = ("subjects", "sessions", "recordings", "shots", "overwrite")

PRESETS: dict[str, Config] = {
    "default": Config(),
    "tiny": Config(subjects=1, resolution=64, elevated=False, surface_points=5_000),
    "lowcontrast": Config(texture_contrast=0.15),
    "expressions": Config(subjects=2, sessions=(1, 2, 3, 4), recordings="all"),
    "lighting": Config(subjects=1, shots=19),
}


@dataclass(frozen=True)
class CaptureRender:
    """One rendered capture in memory; rows ordered as `camera_ids` (ring by azimuth, then elevated)."""

    capture: str  # capture id, e.g. "001_01_01_00"
    expression: str
    images_nhw3: np.ndarray  # uint8 RGB
    depth_nhw: np.ndarray  # float32 z-depth, 0 = background
    normals_nhw3: np.ndarray  # float32 world-frame unit normals, 0 = background
    R: np.ndarray  # [N, 3, 3] float64 world-to-camera
    T: np.ndarray  # [N, 3] float64
    K: np.ndarray  # [N, 3, 3] float64
    camera_ids: list[str]
    names: list[str]  # image file names, e.g. 001_01_01_051_00.png
    light: dict[str, object] = field(default_factory=dict)  # direction (toward the light), intensity

    @property
    def mask_nhw(self) -> np.ndarray:
        """Where a pixel sees the head (bool)."""
        return self.depth_nhw > 0


# ----------------------------------------------------------------------------------------------
# Head shapes
# ----------------------------------------------------------------------------------------------


def _unit_rows(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# Identity features: (direction toward the feature, amplitude, angular width in radians). Paired
# features are mirrored in x. Directions: -z is the face, -y is up, +x is the head's left (cam 240).
_FEATURES: tuple[tuple[str, tuple[float, float, float], float, float, bool], ...] = (
    # name, direction, amplitude, width, mirrored
    ("nose", (0.0, 0.08, -1.0), 0.20, 0.13, False),
    ("nose_bridge", (0.0, -0.12, -1.0), 0.07, 0.10, False),
    ("brow", (0.24, -0.36, -0.90), 0.07, 0.16, True),
    ("eye_socket", (0.30, -0.14, -0.94), -0.08, 0.10, True),
    ("cheek", (0.46, 0.14, -0.88), 0.07, 0.18, True),
    ("lips", (0.0, 0.38, -0.92), 0.06, 0.10, False),
    ("chin", (0.0, 0.62, -0.78), 0.10, 0.15, False),
    ("jaw", (0.62, 0.62, -0.45), -0.10, 0.28, True),
    ("ear", (1.0, 0.05, 0.10), 0.15, 0.12, True),
    ("occiput", (0.0, -0.30, 0.95), 0.08, 0.40, False),
)

# Expression deformations, added as more bumps: (direction, amplitude, width, mirrored).
_EXPRESSIONS: dict[str, tuple[tuple[tuple[float, float, float], float, float, bool], ...]] = {
    "neutral": (),
    # mouth corners pulled out and up, cheeks lifted
    "smile": (((0.26, 0.36, -0.93), 0.06, 0.08, True), ((0.42, 0.10, -0.90), 0.04, 0.12, True)),
    # brow raised, jaw dropped, mouth opened
    "surprise": (
        ((0.24, -0.46, -0.86), 0.05, 0.14, True),
        ((0.0, 0.72, -0.70), 0.09, 0.17, False),
        ((0.0, 0.42, -0.91), -0.06, 0.07, False),
    ),
    # lids filling the eye sockets, cheeks up
    "squint": (((0.30, -0.14, -0.94), 0.05, 0.08, True), ((0.40, 0.05, -0.91), 0.03, 0.10, True)),
    # nose wrinkled, upper lip raised, brow lowered
    "disgust": (
        ((0.0, -0.04, -1.0), 0.03, 0.06, False),
        ((0.0, 0.30, -0.95), 0.05, 0.07, False),
        ((0.20, -0.30, -0.93), -0.03, 0.10, True),
    ),
    # jaw wide open, deep mouth, eyes squeezed
    "scream": (
        ((0.0, 0.74, -0.67), 0.15, 0.20, False),
        ((0.0, 0.43, -0.90), -0.13, 0.09, False),
        ((0.30, -0.14, -0.94), 0.04, 0.08, True),
    ),
}

_SKIN_TONES = np.array(
    [
        [0.87, 0.70, 0.58],
        [0.78, 0.58, 0.45],
        [0.62, 0.44, 0.32],
        [0.90, 0.76, 0.66],
        [0.70, 0.52, 0.40],
        [0.52, 0.36, 0.27],
    ]
)
_NOISE_GRID = 48  # lattice cells per period of the value noise
# (frequency in cycles per unit, amplitude) of the colour-noise octaves
_OCTAVES = ((2.5, 0.25), (6.0, 0.30), (12.0, 0.30), (20.0, 0.30))


@dataclass(frozen=True, eq=False)
class HeadShape:
    """A subject's head (with an expression): the analytic radius function and its albedo.

    ``axes`` [3] ellipsoid semi-axes; ``bump_dirs_k3`` unit centres, ``bump_amps_k``, ``bump_widths_k``
    (radians) of the bumps; the texture fields drive `albedo`.
    """

    axes: np.ndarray
    bump_dirs_k3: np.ndarray
    bump_amps_k: np.ndarray
    bump_widths_k: np.ndarray
    skin_rgb: np.ndarray  # [3] base albedo
    noise_lattice_g3: np.ndarray  # [G*G*G, 4] float32 values in -1..1: luminance, 2 x hue, spots
    octave_offsets_o3: np.ndarray  # [octaves, 3] lattice offset of each octave
    spot_rgb: np.ndarray  # [3] colour the spots blend toward
    n_identity_bumps: int  # the first bumps are the identity's, the rest the expression's
    r_min: float  # strict lower bound of r(d)
    r_max: float  # strict upper bound of r(d)
    lipschitz: float  # bound of |grad implicit| outside the surface (for sphere tracing)

    # -- geometry ------------------------------------------------------------------------------

    def radius(self, dirs_n3: np.ndarray) -> np.ndarray:
        """r(d) [N] for unit directions [N, 3] (dtype follows the input: float32 or float64)."""
        return self._ellipse(dirs_n3) * (1.0 + self._bump_terms(dirs_n3) @ self.bump_amps_k.astype(dirs_n3.dtype))

    def _ellipse(self, dirs_n3: np.ndarray) -> np.ndarray:
        """Radius [N] of the ellipsoid in unit directions [N, 3]."""
        return 1.0 / np.sqrt((dirs_n3 * dirs_n3) @ (1.0 / self.axes**2).astype(dirs_n3.dtype))

    def _bump_terms(self, dirs_n3: np.ndarray) -> np.ndarray:
        """exp((d.c_k - 1) / s_k^2) [N, K] (without the amplitudes), in the input's dtype."""
        dtype = dirs_n3.dtype
        inv_w2 = 1.0 / self.bump_widths_k**2
        terms = dirs_n3 @ (self.bump_dirs_k3.T * inv_w2).astype(dtype)  # (d.c_k) / s_k^2
        terms -= inv_w2.astype(dtype)
        return np.exp(terms, out=terms)

    def implicit(self, points_n3: np.ndarray) -> np.ndarray:
        """f(x) = |x| - r(x/|x|) [N]: negative inside the head, 0 on the surface (input dtype)."""
        norm = np.sqrt(np.sum(points_n3 * points_n3, axis=-1))
        return norm - self.radius(points_n3 / norm[:, None])

    def gradient(self, points_n3: np.ndarray) -> np.ndarray:
        """Gradient [N, 3] of `implicit` (float64): d - (I - d d^T) grad r(d) / |x|."""
        return self.implicit_and_gradient(points_n3)[1]

    def implicit_and_gradient(self, points_n3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(`implicit` [N], its gradient [N, 3]) in float64, sharing the work."""
        points = np.asarray(points_n3, dtype=np.float64)
        norm = np.linalg.norm(points, axis=-1, keepdims=True)
        d = points / norm
        ellipse = self._ellipse(d)  # [N]
        terms = self._bump_terms(d)  # [N, K]
        radius = ellipse * (1.0 + terms @ self.bump_amps_k)
        grad_ellipse = -(ellipse**3)[:, None] * d / self.axes**2  # [N, 3]
        grad_bumps = terms @ ((self.bump_amps_k / self.bump_widths_k**2)[:, None] * self.bump_dirs_k3)  # [N, 3]
        grad_r = grad_ellipse * (radius / ellipse)[:, None] + ellipse[:, None] * grad_bumps
        tangential = grad_r - np.sum(grad_r * d, axis=-1, keepdims=True) * d
        return norm[:, 0] - radius, d - tangential / norm

    def normals(self, points_n3: np.ndarray) -> np.ndarray:
        """Outward unit normals [N, 3] at surface points."""
        return _unit_rows(self.gradient(points_n3))

    def surface(self, dirs_n3: np.ndarray) -> np.ndarray:
        """Surface points [N, 3] (float64) in the given directions."""
        d = _unit_rows(dirs_n3)
        return d * self.radius(d)[:, None]

    # -- texture -------------------------------------------------------------------------------

    def albedo(self, dirs_n3: np.ndarray, contrast: float) -> np.ndarray:
        """Albedo [N, 3] in 0..1 at unit directions; contrast 0 gives the plain skin tone.

        Skin tone times (1 + contrast * luminance noise), plus a faint hue noise, plus dark
        freckle-like spots: multi-octave value noise of the point where the direction meets the
        *identity* surface (no expression), so every view agrees, the texture's scale is even over
        nose and cheeks alike, and an expression stretches the skin instead of sliding under it.
        """
        skin = self.skin_rgb.astype(np.float32)
        if contrast <= 0:
            return np.broadcast_to(skin, np.shape(dirs_n3)).copy()
        dirs = np.asarray(dirs_n3, dtype=np.float64)
        n_id = self.n_identity_bumps
        identity_radius = self._ellipse(dirs) * (1.0 + self._bump_terms(dirs)[:, :n_id] @ self.bump_amps_k[:n_id])
        dirs = (dirs * identity_radius[:, None]).astype(np.float32)  # texture coordinates
        luminance = np.zeros(len(dirs), dtype=np.float32)
        hue = np.zeros((len(dirs), 2), dtype=np.float32)
        for (freq, amp), offset in zip(_OCTAVES, self.octave_offsets_o3, strict=True):
            noise = self._value_noise(dirs, freq, offset)  # [N, 4]: luminance, 2 x hue, spots
            luminance += amp * noise[:, 0]
            hue += amp * noise[:, 1:3]
        tint = np.stack([hue[:, 0], 0.5 * (hue[:, 1] - hue[:, 0]), -hue[:, 1]], axis=-1)  # [N, 3]
        colour = skin * (1.0 + contrast * luminance[:, None]) + (0.15 * contrast) * tint
        spot_weight = np.clip((noise[:, 3] - 0.3) * 5.0, 0.0, 1.0) * min(contrast, 1.0) * 0.75  # finest octave
        colour += spot_weight[:, None] * (self.spot_rgb.astype(np.float32) - colour)
        return np.clip(colour, 0.02, 1.0)

    def _value_noise(self, points_n3: np.ndarray, freq: float, offset: np.ndarray) -> np.ndarray:
        """Smooth periodic 3D value noise [N, C] in about -1..1 (C lattice channels), trilinear
        with smoothstep weights."""
        g = _NOISE_GRID
        q = points_n3 * np.float32(freq) + offset.astype(np.float32)
        cell = np.floor(q)
        frac = q - cell
        w1 = frac * frac * (3.0 - 2.0 * frac)  # [N, 3] weight of the upper corner per axis
        w0 = 1.0 - w1
        i0 = cell.astype(np.int64) % g
        i1 = (i0 + 1) % g
        stride = np.array([g * g, g, 1])
        low, high = i0 * stride, i1 * stride  # [N, 3] flat-index parts per axis
        out = np.zeros((len(points_n3), self.noise_lattice_g3.shape[1]), dtype=np.float32)
        for bx, by, bz in np.ndindex(2, 2, 2):
            index = (high if bx else low)[:, 0] + (high if by else low)[:, 1] + (high if bz else low)[:, 2]
            weight = (w1 if bx else w0)[:, 0] * (w1 if by else w0)[:, 1] * (w1 if bz else w0)[:, 2]
            out += weight[:, None] * np.take(self.noise_lattice_g3, index, axis=0)
        return out


def _feature_bumps(features, rng: np.random.Generator | None):
    """Unit directions [K, 3], amplitudes [K], widths [K] of mirrored/jittered features."""
    dirs, amps, widths = [], [], []
    for direction, amp, width, mirrored in features:
        if rng is not None:  # per-subject variation: place, size, width
            direction = np.asarray(direction) + rng.normal(scale=0.03, size=3)
            amp = amp * rng.uniform(0.7, 1.3)
            width = width * rng.uniform(0.85, 1.15)
        for sign in (1.0, -1.0) if mirrored else (1.0,):
            dirs.append(np.asarray(direction, dtype=np.float64) * (sign, 1.0, 1.0))
            amps.append(amp)
            widths.append(width)
    return _unit_rows(np.array(dirs).reshape(-1, 3)), np.array(amps, dtype=np.float64), np.array(widths)


def _fibonacci_dirs(n: int) -> np.ndarray:
    """n nearly uniform unit directions [n, 3] (Fibonacci sphere)."""
    i = np.arange(n) + 0.5
    y = 1.0 - 2.0 * i / n
    ring = np.sqrt(1.0 - y * y)
    phi = np.pi * (3.0 - np.sqrt(5.0)) * i
    return np.stack([ring * np.cos(phi), y, ring * np.sin(phi)], axis=-1)


@functools.lru_cache(maxsize=32)
def head_shape(subject: int, expression: str = "neutral", seed: int = 0) -> HeadShape:
    """The head of `subject` (1-based) wearing `expression`; deterministic in (subject, seed).

    Identity, texture and expression strength come from separate random streams, so an
    expression changes only its own bumps and never the identity or the texture.
    """
    if expression not in _EXPRESSIONS:
        raise InputError(f"unknown expression '{expression}'; known: {', '.join(_EXPRESSIONS)}")
    identity_rng = np.random.default_rng([seed, subject, 0])
    texture_rng = np.random.default_rng([seed, subject, 1])
    expression_rng = np.random.default_rng([seed, subject, 2])
    axes = np.array(
        [identity_rng.uniform(0.74, 0.86), identity_rng.uniform(0.98, 1.08), identity_rng.uniform(0.90, 1.00)]
    )
    dirs, amps, widths = _feature_bumps([feature[1:] for feature in _FEATURES], identity_rng)
    strength = expression_rng.uniform(0.8, 1.2)
    n_identity = len(amps)
    if _EXPRESSIONS[expression]:
        e_dirs, e_amps, e_widths = _feature_bumps(_EXPRESSIONS[expression], None)
        dirs = np.concatenate([dirs, e_dirs])
        amps = np.concatenate([amps, strength * e_amps])
        widths = np.concatenate([widths, e_widths])
    skin = _SKIN_TONES[texture_rng.integers(len(_SKIN_TONES))] * texture_rng.uniform(0.92, 1.05, size=3)
    lattice = texture_rng.uniform(-1.0, 1.0, size=(_NOISE_GRID**3, 4)).astype(np.float32)
    offsets = texture_rng.uniform(0.0, _NOISE_GRID, size=(len(_OCTAVES), 3))
    spot_rgb = np.clip(skin * texture_rng.uniform(0.25, 0.5) + texture_rng.uniform(0, 0.15, size=3), 0, 1)
    shape = HeadShape(axes, dirs, amps, widths, skin, lattice, offsets, spot_rgb, n_identity, 0.0, 0.0, 0.0)
    probe = _fibonacci_dirs(20_000)
    radii = shape.radius(probe)
    slope = np.linalg.norm(shape.gradient(probe) - probe, axis=-1).max()  # max |tangential grad r|
    # probe spacing ~0.025 rad and |grad r| < 1.5: the margins keep the bounds strict
    r_min, r_max = float(radii.min()) * 0.94, float(radii.max()) * 1.06
    return replace(shape, r_min=r_min, r_max=r_max, lipschitz=float(np.hypot(1.0, 1.2 * slope / r_min)))


# ----------------------------------------------------------------------------------------------
# Ray casting
# ----------------------------------------------------------------------------------------------

_NEAR = 4e-3  # sphere tracing stops this close to the surface (implicit units ~ scene units)
_MAX_TRACE_STEPS = 400
_FINE_STEP = 2.5e-3  # fallback march for grazing rays, scene units
_FINE_SAMPLES = 40


def _sphere_hits(origins_n3: np.ndarray, dirs_n3: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit t [N] of rays o + t v through the sphere |x| = radius (NaN where missed)."""
    a = np.sum(dirs_n3 * dirs_n3, axis=-1)
    b = np.sum(origins_n3 * dirs_n3, axis=-1)
    c = np.sum(origins_n3 * origins_n3, axis=-1) - radius**2
    disc = b * b - a * c
    root = np.sqrt(np.where(disc > 0, disc, np.nan))
    return (-b - root) / a, (-b + root) / a


def cast_rays(
    shape: HeadShape,
    origins_n3: np.ndarray,
    dirs_n3: np.ndarray,
    t_lo: np.ndarray | None = None,
    t_hi: np.ndarray | None = None,
) -> np.ndarray:
    """Parameter t [N] of the first hit of rays ``o + t v`` with the head (NaN where missed).

    Only hits in [t_lo, t_hi] (per ray, NaN = skip the ray) are looked for when those are given.

    Sphere tracing (float32) from the bounding sphere with steps ``f / (L |v|)`` never passes
    through the surface because ``L`` bounds the implicit's gradient; within `_NEAR` of it, Newton
    on the analytic surface (float64) solves the hit to ~1e-10. Grazing rays, where Newton is
    unsafe, get a fine march plus regula falsi instead. Vectorised over all rays: the loops run
    over iterations, each on the rays still active.
    """
    origins = np.asarray(origins_n3, dtype=np.float64)
    dirs = np.asarray(dirs_n3, dtype=np.float64)
    t_hit = np.full(len(origins), np.nan)
    t_in, t_out = _sphere_hits(origins, dirs, shape.r_max)
    t_in = np.maximum(t_in, 0.0)
    if t_lo is not None and t_hi is not None:
        t_in, t_out = np.maximum(t_in, t_lo), np.minimum(t_out, t_hi)  # NaN propagates: skipped
    rays = np.flatnonzero(np.isfinite(t_in) & np.isfinite(t_out) & (t_out > t_in))
    if rays.size == 0:
        return t_hit
    o32, v32 = origins[rays].astype(np.float32), dirs[rays].astype(np.float32)
    speed = np.linalg.norm(dirs[rays], axis=-1)
    t = t_in[rays].astype(np.float32)
    t_end = t_out[rays].astype(np.float32)
    inv_lip_speed = (1.0 / (shape.lipschitz * speed)).astype(np.float32)
    near = np.zeros(rays.size, dtype=bool)
    active = np.arange(rays.size)
    for _ in range(_MAX_TRACE_STEPS):
        if active.size == 0:
            break
        f = shape.implicit(o32[active] + t[active, None] * v32[active])
        close = f < _NEAR
        near[active[close]] = True
        t_next = t[active] + f * inv_lip_speed[active]
        going = ~close & (t_next < t_end[active])
        t[active[going]] = t_next[going]
        active = active[going]
    if active.size:
        log.debug("synth: %d rays still tracing after %d steps, counted as misses", active.size, _MAX_TRACE_STEPS)
    close_rows = np.flatnonzero(near)
    t_hit[rays[close_rows]] = _solve_near(
        shape, origins[rays[close_rows]], dirs[rays[close_rows]], t[close_rows].astype(np.float64)
    )
    return t_hit


def _newton(
    shape: HeadShape,
    origins: np.ndarray,
    dirs: np.ndarray,
    t0: np.ndarray,
    t_max: np.ndarray,
    t_min: np.ndarray | None = None,
    iterations: int = 6,
) -> np.ndarray:
    """Hits t [N] by Newton on the analytic implicit (float64) from t0 (near the surface).

    A ray's answer is NaN unless Newton converged (|f| < 1e-9, or a last step < 1e-8) to a t in
    [t_min, t_max] (t_min defaults to t0): Newton is only trusted close to where it started;
    callers fall back for the rest.
    """
    t = t0.astype(np.float64).copy()
    converged = np.zeros(len(t), dtype=bool)
    active = np.arange(len(t))
    for step in range(iterations + 1):
        points = origins[active] + t[active, None] * dirs[active]
        if step == iterations:
            f = shape.implicit(points)
        else:
            f, grad = shape.implicit_and_gradient(points)
        done = np.abs(f) < 1e-9
        converged[active[done]] = True
        if step == iterations:
            break
        active, f, grad = active[~done], f[~done], grad[~done]
        if active.size == 0:
            break
        slope = np.sum(grad * dirs[active], axis=-1)  # df/dt, negative when entering the head
        delta = f / np.minimum(slope, -1e-3)
        t[active] -= delta
        settled = np.abs(delta) < 1e-8  # quadratic convergence: the error left is ~1e-15
        converged[active[settled]] = True
        active = active[~settled]
        if active.size == 0:
            break
    t_min = t0 - 1e-6 / np.linalg.norm(dirs, axis=-1) if t_min is None else t_min
    good = converged & (t >= t_min) & (t <= t_max)
    return np.where(good, t, np.nan)


def _solve_near(shape: HeadShape, origins: np.ndarray, dirs: np.ndarray, t0: np.ndarray) -> np.ndarray:
    """Hits t [N] of rays that sphere tracing brought within `_NEAR` of the surface at t0.

    Newton from t0 where it converges close by; the rest (grazing rays) are marched finely from t0
    and bracketed for regula falsi; no sign change within the march means a miss (NaN).
    """
    speed = np.linalg.norm(dirs, axis=-1)
    t = _newton(shape, origins, dirs, t0, t0 + 20 * _NEAR / speed)
    rest = np.flatnonzero(np.isnan(t))
    if rest.size == 0:
        return t
    offsets = np.arange(_FINE_SAMPLES + 1) * _FINE_STEP - 1e-4  # [S+1] scene units from t0
    t_samples = t0[rest, None] + offsets / speed[rest, None]  # [R, S+1]
    points = origins[rest, None, :] + t_samples[..., None] * dirs[rest, None, :]
    inside = shape.implicit(points.reshape(-1, 3)).reshape(t_samples.shape) <= 0
    first = np.argmax(inside, axis=1)
    found = inside[np.arange(rest.size), first] & (first > 0)  # sample 0 inside: bracket lost, a miss
    if np.any(found):
        rows = np.flatnonzero(found)
        t[rest[rows]] = _regula_falsi(
            shape, origins[rest[rows]], dirs[rest[rows]], t_samples[rows, first[rows] - 1], t_samples[rows, first[rows]]
        )
    return t


def _regula_falsi(
    shape: HeadShape,
    origins: np.ndarray,
    dirs: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    iterations: int = 60,
    tol: float = 1e-10,
) -> np.ndarray:
    """Root t [N] of the implicit along rays bracketed by f(lo) > 0 >= f(hi) (Illinois, float64)."""

    def f(t, rows):
        return shape.implicit(origins[rows] + t[:, None] * dirs[rows])

    lo, hi = lo.copy(), hi.copy()
    all_rows = np.arange(len(lo))
    f_lo, f_hi = f(lo, all_rows), f(hi, all_rows)
    t = hi.copy()
    active = np.flatnonzero(np.abs(f_hi) > tol)
    side = np.zeros(len(lo), dtype=np.int8)  # which end moved last time: 1 = lo, -1 = hi
    for _ in range(iterations):
        if active.size == 0:
            break
        a, b, fa, fb = lo[active], hi[active], f_lo[active], f_hi[active]
        t_new = b - fb * (b - a) / (fb - fa)
        f_new = f(t_new, active)
        outside = f_new > 0
        # Illinois: an end that stays twice in a row gets its value halved
        f_hi[active] = np.where(outside, np.where(side[active] == 1, fb * 0.5, fb), f_new)
        f_lo[active] = np.where(outside, f_new, np.where(side[active] == -1, fa * 0.5, fa))
        lo[active] = np.where(outside, t_new, a)
        hi[active] = np.where(outside, b, t_new)
        side[active] = np.where(outside, 1, -1)
        t[active] = t_new
        active = active[(np.abs(f_new) > tol) & (hi[active] - lo[active] > tol)]
    return t


_COARSE_FACTOR = 4  # each level of `trace_depth` is this much coarser than the next
_COARSEST = 64  # images up to this size are traced directly
_DEPTH_MARGIN = 0.03  # scene units around the coarse neighbours' depth range that fine rays search
_KINK = 0.06  # largest second difference of coarse depth (scene units) still counted as one sheet
_RIM_MARGIN = 0.15  # the same in front of the range next to a silhouette, where the surface turns
_RIM_DEPTH = 0.5  # away steeply: a grazing hit lies up to ~sqrt(2 r h) behind its coarse neighbours


def view_rays(R: np.ndarray, T: np.ndarray, K: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Origins and directions [V, size*size, 3] of every pixel centre, row-major. Directions have
    camera z = 1, so a hit's ray parameter t is its z-depth."""
    pixels = geometry.pixel_grid(size, size).reshape(-1, 2)  # [P, 2]
    rays_cam = np.concatenate([pixels, np.ones((len(pixels), 1))], axis=1) @ np.linalg.inv(K).T  # [P, 3]
    dirs = rays_cam @ R  # [V, P, 3] world: R^T applied to each row
    origins = np.broadcast_to(geometry.camera_centers(R, T)[:, None, :], dirs.shape)
    return origins, dirs


def trace_depth(shape: HeadShape, R: np.ndarray, T: np.ndarray, K: np.ndarray, size: int) -> np.ndarray:
    """z-depth [V, size, size] of the head seen by V cameras sharing K (NaN where the ray misses).

    Coarse to fine: the image `_COARSE_FACTOR` times smaller is traced first (recursively); a fine
    ray then searches only within `_DEPTH_MARGIN` of the depth range of the 3x3 coarse pixels
    around it, and is a miss when all of them missed. Next to a silhouette (some of them missed)
    the surface turns away steeply, so the search spans `_RIM_MARGIN` in front to `_RIM_DEPTH` behind.
    Where the neighbourhood is one continuous sheet (all hit, small second differences of depth),
    Newton starts from the bilinearly interpolated coarse depth and no tracing is needed. The
    surface is smooth (no feature narrower than a few coarse pixels), so this finds the same
    first hit as tracing every whole ray, several times faster.
    """
    origins, dirs = view_rays(R, T, K, size)
    n_views = len(R)
    if size <= _COARSEST:
        return cast_rays(shape, origins.reshape(-1, 3), dirs.reshape(-1, 3)).reshape(n_views, size, size)
    coarse_size = -(-size // _COARSE_FACTOR)
    scale = np.diag([coarse_size / size, coarse_size / size, 1.0])
    coarse = trace_depth(shape, R, T, scale @ K, coarse_size)  # [V, c, c]
    padded = np.pad(coarse, ((0, 0), (1, 1), (1, 1)), constant_values=np.nan)
    shifts = np.stack(
        [
            padded[:, 1 + dy : 1 + dy + coarse_size, 1 + dx : 1 + dx + coarse_size]
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ]
    )  # [9, V, c, c]
    near, far = np.fmin.reduce(shifts, axis=0), np.fmax.reduce(shifts, axis=0)  # NaN only if all miss
    rim = np.isnan(shifts).any(axis=0) & np.isfinite(near)  # [V, c, c] some but not all missed
    t_lo_c = near - np.where(rim, _RIM_MARGIN, _DEPTH_MARGIN)
    t_hi_c = far + np.where(rim, _RIM_DEPTH, _DEPTH_MARGIN)
    index = np.floor((np.arange(size) + 0.5) * coarse_size / size).astype(np.int64)  # fine -> coarse
    t_lo = t_lo_c[:, index[:, None], index[None, :]].reshape(-1)  # [V*size*size]
    t_hi = t_hi_c[:, index[:, None], index[None, :]].reshape(-1)
    # Newton is safe where the whole neighbourhood hit one continuous sheet of surface: no miss
    # and no fold (second differences of the depth stay small; an occlusion makes them jump)
    centre = shifts[4]
    kink = np.fmax.reduce([np.abs(shifts[a] - 2 * centre + shifts[8 - a]) for a in range(4)])  # 4 directions
    smooth_c = kink < _KINK  # [V, c, c]; NaN (a miss in the neighbourhood) compares False
    inner = np.flatnonzero(smooth_c[:, index[:, None], index[None, :]])
    origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    depth = np.full(len(origins), np.nan)
    # inside the silhouette: Newton from the coarse depth interpolated, no tracing needed
    start = _upsample_bilinear(np.where(np.isnan(coarse), np.nanmean(coarse), coarse), size).reshape(-1)
    depth[inner] = _newton(shape, origins[inner], dirs[inner], start[inner], t_hi[inner], t_lo[inner])
    rest = np.flatnonzero(np.isnan(depth) & np.isfinite(t_lo))
    depth[rest] = cast_rays(shape, origins[rest], dirs[rest], t_lo[rest], t_hi[rest])
    return depth.reshape(n_views, size, size)


def _upsample_bilinear(image_vhw: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize [V, c, c] -> [V, size, size] with pixel centres aligned (+0.5 convention)."""
    coarse = image_vhw.shape[-1]
    pos = np.clip((np.arange(size) + 0.5) * coarse / size - 0.5, 0.0, coarse - 1.0)
    i0 = np.minimum(np.floor(pos).astype(np.int64), coarse - 2)
    w = pos - i0  # [size]
    rows = image_vhw[:, i0, :] * (1 - w)[:, None] + image_vhw[:, i0 + 1, :] * w[:, None]  # [V, size, c]
    return rows[:, :, i0] * (1 - w) + rows[:, :, i0 + 1] * w


# ----------------------------------------------------------------------------------------------
# Cameras, light, rendering
# ----------------------------------------------------------------------------------------------


def camera_ids(cfg: Config) -> list[str]:
    """Cameras of a capture in row order: the ring by azimuth, then the elevated ones."""
    return list(dataset.RING_CAMERAS) + (list(dataset.ELEVATED_CAMERAS) if cfg.elevated else [])


def intrinsics(cfg: Config) -> np.ndarray:
    """K [3, 3] of every camera: square pixels, principal point at the image centre."""
    size = cfg.resolution
    focal = 0.5 * size / np.tan(np.radians(cfg.fov_deg) / 2)
    return np.array([[focal, 0.0, size / 2], [0.0, focal, size / 2], [0.0, 0.0, 1.0]])


def rig_poses(cfg: Config, cameras: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera (R [N, 3, 3], T [N, 3]) of the cameras, all looking at the head centre."""
    cameras = camera_ids(cfg) if cameras is None else cameras
    info = [dataset.MULTIPIE_CAMERAS[cam] for cam in cameras]
    return geometry.ring_pose([c.azimuth_deg for c in info], [c.elevation_deg for c in info], cfg.radius)


def light_for_shot(shot: int, cfg: Config) -> tuple[np.ndarray, float]:
    """(unit direction toward the light [3], intensity) of a shot; the same for every subject.

    Shot 0 (ambient, and every shot without lighting_change): front, above and to the subject's
    right. Shots 1-18 sweep the light across the ring like Multi-PIE's flashes, alternating in
    height, with an intensity jitter.
    """
    azimuth, elevation, intensity = -25.0, 35.0, 1.0
    if shot > 0 and cfg.lighting_change:
        rng = np.random.default_rng([cfg.seed, 7, shot])
        azimuth = -80.0 + 160.0 * ((shot - 1) % 18) / 17.0
        elevation = 10.0 if shot % 2 else 35.0
        intensity = float(rng.uniform(0.8, 1.2))
    direction = geometry.ring_centers(azimuth, elevation, 1.0)
    return direction, intensity


def render_capture(subject: int, session: int, recording: int, shot: int, cfg: Config) -> CaptureRender:
    """Render one capture (all cameras of `cfg`) in memory, with its ground truth."""
    with batching.one_blas_thread():
        return _render_capture(subject, session, recording, shot, cfg)


def _render_capture(subject: int, session: int, recording: int, shot: int, cfg: Config) -> CaptureRender:
    validate(cfg)
    expressions = dataset.SESSION_EXPRESSIONS.get(f"{session:02d}")
    if expressions is None or not 1 <= recording <= len(expressions) or subject < 1 or not 0 <= shot < dataset.N_SHOTS:
        raise InputError(
            f"no synthetic capture subject {subject}, session {session}, recording {recording}, shot {shot}: subjects "
            f"start at 1, sessions are {', '.join(dataset.SESSION_EXPRESSIONS)}, session {session} has recordings "
            f"1..{len(expressions or ())}, shots are 0..{dataset.N_SHOTS - 1}"
        )
    expression = expressions[recording - 1]
    shape = head_shape(subject, expression, cfg.seed)
    cameras = camera_ids(cfg)
    R, T = rig_poses(cfg, cameras)
    K = intrinsics(cfg)
    size = cfg.resolution
    n_views = len(cameras)
    depth = trace_depth(shape, R, T, K, size).reshape(-1)  # [V*P]
    origins, dirs = view_rays(R, T, K, size)
    hit = np.flatnonzero(np.isfinite(depth))
    points = origins.reshape(-1, 3)[hit] + depth[hit, None] * dirs.reshape(-1, 3)[hit]
    normals = shape.normals(points)
    surface_dirs = _unit_rows(points)
    n_pixels = size * size

    light_dir, intensity = light_for_shot(shot, cfg)
    shading = intensity * (cfg.ambient + 0.6 * np.clip(normals @ light_dir, 0.0, None))  # [H]
    view_of_hit = hit // n_pixels
    plain = np.isin(np.asarray(cameras)[view_of_hit], cfg.textureless_cameras)
    albedo = np.empty((len(hit), 3), dtype=np.float32)
    albedo[~plain] = shape.albedo(surface_dirs[~plain], cfg.texture_contrast)
    albedo[plain] = shape.albedo(surface_dirs[plain], 0.0)
    colour = np.empty((n_views * n_pixels, 3), dtype=np.float32)
    colour[:] = np.asarray(cfg.background, dtype=np.float32)
    colour[hit] = albedo * shading[:, None].astype(np.float32)
    images = (np.clip(colour, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).reshape(n_views, size, size, 3)
    depth = np.nan_to_num(depth, nan=0.0).astype(np.float32)
    normal_map = np.zeros((n_views * n_pixels, 3), dtype=np.float32)
    normal_map[hit] = normals
    return CaptureRender(
        capture=dataset.capture_id(subject, session, recording, shot),
        expression=expression,
        images_nhw3=images,
        depth_nhw=depth.reshape(n_views, size, size),
        normals_nhw3=normal_map.reshape(n_views, size, size, 3),
        R=R,
        T=T,
        K=np.repeat(K[None], n_views, axis=0),
        camera_ids=cameras,
        names=[dataset.multipie_filename(subject, session, recording, cam, shot) for cam in cameras],
        light={"direction": light_dir.tolist(), "intensity": intensity},
    )


def surface_cloud(subject: int, expression: str, cfg: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense ground-truth surface: points [N, 3], albedo colours [N, 3] uint8, unit normals [N, 3]."""
    shape = head_shape(subject, expression, cfg.seed)
    dirs = _fibonacci_dirs(cfg.surface_points)
    points = shape.surface(dirs)
    colours = (shape.albedo(dirs, cfg.texture_contrast) * 255.0 + 0.5).astype(np.uint8)
    return points, colours, shape.normals(points)


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def validate(cfg: Config) -> None:
    """Raise InputError for a config that cannot be rendered."""
    known_sessions = sorted(int(s) for s in dataset.SESSION_EXPRESSIONS)
    if cfg.subjects < 1 or cfg.subjects > 999:
        raise InputError(f"subjects must be 1..999, got {cfg.subjects}")
    bad = [s for s in cfg.sessions if s not in known_sessions]
    if not cfg.sessions or bad:
        raise InputError(f"sessions must be chosen from {known_sessions}, got {list(cfg.sessions)}")
    if cfg.recordings not in ("neutral", "all"):
        raise InputError(f"recordings must be 'neutral' or 'all', got '{cfg.recordings}'")
    if not 1 <= cfg.shots <= dataset.N_SHOTS:
        raise InputError(f"shots must be 1..{dataset.N_SHOTS}, got {cfg.shots}")
    if not 16 <= cfg.resolution <= 4096:
        raise InputError(f"resolution must be 16..4096 pixels, got {cfg.resolution}")
    if not 0.0 <= cfg.texture_contrast <= 2.0:
        raise InputError(f"texture_contrast must be in 0..2 (0 = plain, 1 = rich), got {cfg.texture_contrast}")
    unknown = [c for c in cfg.textureless_cameras if c not in camera_ids(cfg)]
    if unknown:
        raise InputError(f"textureless_cameras {unknown} are not rendered; choose from {', '.join(camera_ids(cfg))}")
    if not 2.5 <= cfg.radius <= 100.0:
        raise InputError(f"radius must be 2.5..100 scene units (the head is ~2 units tall), got {cfg.radius}")
    if not 5.0 <= cfg.fov_deg <= 120.0:
        raise InputError(f"fov_deg must be 5..120 degrees, got {cfg.fov_deg}")
    if cfg.surface_points < 100:
        raise InputError(f"surface_points must be at least 100, got {cfg.surface_points}")


def captures(cfg: Config) -> list[tuple[int, int, int, int]]:
    """(subject, session, recording, shot) of every capture the config asks for, in order."""
    out = []
    for subject in range(1, cfg.subjects + 1):
        for session in cfg.sessions:
            n_rec = len(dataset.SESSION_EXPRESSIONS[f"{session:02d}"]) if cfg.recordings == "all" else 1
            for recording in range(1, n_rec + 1):
                out.extend((subject, session, recording, shot) for shot in range(cfg.shots))
    return out


def groundtruth_dir(out: Path, capture: str) -> Path:
    """Folder of a capture's ground truth: ``OUT/groundtruth/<capture id>``."""
    return Path(out) / "groundtruth" / capture


def _render_config(cfg: Config) -> dict:
    """The fields that decide how captures look (what the input hash covers)."""
    return {k: v for k, v in asdict(cfg).items() if k not in SELECTION_FIELDS}


def run(
    out: Path, cfg: Config, *, overwrite: bool = False, progress: Callable[[int, int], None] | None = None
) -> list[Path]:
    """Render every capture of `cfg` under `out` in the Multi-PIE layout, with ground truth.

    Writes ``out/sessionNN/multiview/...png``, per capture ``out/groundtruth/<id>/`` holding
    ``poses.safetensors``, ``depth.safetensors`` and ``surface.ply``, and ``out/synth.json``.
    A capture whose files exist with the same render config is skipped unless `overwrite` (or
    ``cfg.overwrite``). Returns the paths written.
    """
    validate(cfg)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file: synth writes a dataset folder; pass a new or empty folder")
    overwrite = overwrite or cfg.overwrite
    todo = captures(cfg)
    written: list[Path] = []
    render_cfg = _render_config(cfg)
    for done, (subject, session, recording, shot) in enumerate(todo):
        cid = dataset.capture_id(subject, session, recording, shot)
        inputs_hash = io.hash_inputs(render_cfg, cid)
        if not overwrite and _complete(out, cfg, cid, (subject, session, recording, shot), inputs_hash):
            log.debug("synth: %s exists, skipped", cid)
        else:
            written.extend(_write_capture(out, cfg, (subject, session, recording, shot), inputs_hash))
            log.info("synth: wrote %s", cid)
        if progress is not None:
            progress(done + 1, len(todo))
    summary = {
        "stage": STAGE,
        "config": cfg,
        "conventions": {
            "poses": io.POSE_CONVENTION,
            "depth": io.DEPTH_CONVENTION,
            "world": "up is -y; the face looks toward -z; head ~2 units tall, centred at the origin",
        },
        "cameras": camera_ids(cfg),
        "captures": [dataset.capture_id(*key) for key in todo],
    }
    written.append(io.write_json(out / "synth.json", summary))
    return written


def _image_paths(out: Path, cfg: Config, key: tuple[int, int, int, int]) -> list[Path]:
    subject, session, recording, shot = key
    return [out / dataset.multipie_relpath(subject, session, recording, cam, shot) for cam in camera_ids(cfg)]


def _complete(out: Path, cfg: Config, cid: str, key: tuple[int, int, int, int], inputs_hash: str) -> bool:
    """Whether a capture is fully written with this render config (poses are written last)."""
    gt = groundtruth_dir(out, cid)
    poses = gt / "poses.safetensors"
    if not poses.is_file() or not (gt / "depth.safetensors").is_file() or not (gt / "surface.ply").is_file():
        return False
    try:
        if io.read_record_metadata(poses).get("inputs") != inputs_hash:
            return False
    except Exception:  # safetensors raises its own error type for a corrupt file: render again
        return False
    return all(path.is_file() for path in _image_paths(out, cfg, key))


def _write_capture(out: Path, cfg: Config, key: tuple[int, int, int, int], inputs_hash: str) -> list[Path]:
    """Render and write one capture: images, depth, surface, then poses (the completion mark)."""
    subject, session, recording, shot = key
    render = render_capture(subject, session, recording, shot, cfg)
    gt = groundtruth_dir(out, render.capture)
    paths = [
        io.write_image(path, image) for path, image in zip(_image_paths(out, cfg, key), render.images_nhw3, strict=True)
    ]
    meta = {"stage": STAGE, "capture": render.capture, "names": render.names, "config": cfg, "inputs_hash": inputs_hash}
    paths.append(
        io.save_record(
            gt / "depth.safetensors",
            {"depth": render.depth_nhw},
            kind="depth",
            extra={"depth_kind": "depth", "source": "synth-groundtruth"},
            **meta,
        )
    )
    points, colours, normals = surface_cloud(subject, render.expression, cfg)
    paths.append(io.write_ply(gt / "surface.ply", points, colours, normals))
    n = len(render.names)
    size = cfg.resolution
    tensors = {
        "R": render.R,
        "T": render.T,
        "K": render.K,
        "width": np.full(n, size, dtype=np.int32),
        "height": np.full(n, size, dtype=np.int32),
    }
    paths.append(
        io.save_record(
            gt / "poses.safetensors",
            tensors,
            kind="poses",
            extra={
                "camera_ids": json.dumps(render.camera_ids),
                "source": "synth-groundtruth",
                "expression": render.expression,
                "light": json.dumps(render.light),
            },
            **meta,
        )
    )
    return paths


# ----------------------------------------------------------------------------------------------
# Monocular-depth corruptions (what align and cloud are measured against)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corruption:
    """How exact z-depth is turned into a prediction with the failures of real monocular depth.

    Convention (per view v, on the metric disparity p = 1/z of the ground truth):

    - bend: p <- p (1 + bend g_v(u, v)), g_v a smooth field with |g_v| <= 1 on the head (peak
      exactly 1): the sum of three random plane waves of at most 0.6 cycles per image;
    - noise: p <- p (1 + noise n), n i.i.d. standard normal per pixel (multiplicative);
    - flying pixels: the pixels within `flying_px` of the silhouette (both sides) take
      p_fg a + p_bg (1 - a), a uniform in 0..1: values between the head and the background behind it;
    - salt: a fraction `salt` of all pixels is replaced by values uniform over the view's map range;
    - the background (where z = 0) is a far wall at `background_depth` x the farthest head depth;
    - the prediction D = (p - b_v) / s_v with a log-uniform per-view scale s_v in `scale_range`
      and shift b_v = u p_bg, u uniform in `shift_range` (so D > 0 everywhere, as DPT's outputs).

    ``kind = "depth"`` applies the same to z instead of 1/z (a depth-predicting model).
    """

    kind: Literal["disparity", "depth"] = "disparity"
    scale_range: tuple[float, float] = (0.2, 5.0)
    shift_range: tuple[float, float] = (-0.5, 0.5)
    noise: float = 0.0
    salt: float = 0.0
    bend: float = 0.0
    flying_px: float = 0.0
    background_depth: float = 2.0
    seed: int = 0


@dataclass(frozen=True)
class Corrupted:
    """A corrupted prediction [N, H, W] and what made it (rows as the input's views).

    ``depth_nhw`` is the prediction D; ``scale``/``shift`` [N] the true s_v, b_v (s D + b gives the
    corrupted metric value back); ``ideal_scale``/``ideal_shift`` [N] the best affine alignment
    of the prediction: least squares of the true 1/z (z for ``depth``) on the prediction without
    noise, salt and flying pixels, over the head's pixels (the true s_v, b_v when there is no
    bend); ``bend_nhw`` the factor 1 + bend g_v; ``salt_nhw`` and ``flying_nhw`` the pixels
    replaced by salt and by flying values.
    """

    depth_nhw: np.ndarray
    scale: np.ndarray
    shift: np.ndarray
    ideal_scale: np.ndarray
    ideal_shift: np.ndarray
    bend_nhw: np.ndarray
    salt_nhw: np.ndarray
    flying_nhw: np.ndarray
    kind: str

    def ideal_depth(self, *, unbend: bool = False) -> np.ndarray:
        """z-depth [N, H, W] of the ideal alignment of this prediction: (ideal_scale, ideal_shift)
        applied to it (0 where not positive). With `unbend`, the true (s_v, b_v) and the bend divided
        out: the smooth part of the corruption undone, noise, salt and flying pixels kept."""
        if unbend:
            value = (self.scale[:, None, None] * self.depth_nhw + self.shift[:, None, None]) / self.bend_nhw
        else:
            value = self.ideal_scale[:, None, None] * self.depth_nhw + self.ideal_shift[:, None, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            z = 1.0 / value if self.kind == "disparity" else value
        return np.where(np.isfinite(z) & (z > 0), z, 0.0)


def _bend_field(rng: np.random.Generator, size_hw: tuple[int, int], mask_hw: np.ndarray) -> np.ndarray:
    """A smooth field [H, W] with peak |g| = 1 over `mask_hw`: three random plane waves."""
    height, width = size_hw
    v, u = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")
    field_hw = np.zeros((height, width))
    for _ in range(3):
        angle, cycles, phase = rng.uniform(0, np.pi), rng.uniform(0.25, 0.6), rng.uniform(0, 2 * np.pi)
        field_hw += rng.uniform(0.5, 1.0) * np.cos(2 * np.pi * cycles * (u * np.cos(angle) + v * np.sin(angle)) + phase)
    peak = np.abs(field_hw[mask_hw]).max() if mask_hw.any() else np.abs(field_hw).max()
    return field_hw / max(peak, 1e-12)


def corrupt_depth(depth_nhw: np.ndarray, corruption: Corruption) -> Corrupted:
    """Corrupt exact z-depth [N, H, W] (0 = background) as `corruption` says (seeded, per view)."""
    from scipy import ndimage

    z = np.asarray(depth_nhw, dtype=np.float64)
    n_views, height, width = z.shape
    rng = np.random.default_rng([corruption.seed, 17])
    inverse = corruption.kind == "disparity"
    out = np.zeros_like(z)
    bend_all, salt_all, flying_all = np.ones_like(z), np.zeros(z.shape, bool), np.zeros(z.shape, bool)
    scales, shifts, ideal_scales, ideal_shifts = (np.zeros(n_views) for _ in range(4))
    for view in range(n_views):
        fg = z[view] > 0
        far = corruption.background_depth * (z[view][fg].max() if fg.any() else 1.0)
        metric = np.where(fg, z[view], far)
        p = 1.0 / metric if inverse else metric
        p_bg = 1.0 / far if inverse else far
        bend = 1.0 + corruption.bend * _bend_field(rng, (height, width), fg)
        p = p * np.where(fg, bend, 1.0)
        smooth = p[fg]  # the bent prediction before noise, salt and flying pixels (metric, unscaled)
        if corruption.noise > 0:
            p = p * (1.0 + corruption.noise * rng.standard_normal(p.shape))
        flying = np.zeros_like(fg)
        if corruption.flying_px > 0 and fg.any() and not fg.all():
            inside = ndimage.distance_transform_edt(fg)
            outside = ndimage.distance_transform_edt(~fg)
            flying = np.where(fg, inside, outside) <= corruption.flying_px
            # a flying pixel mixes the head's value (the nearest head pixel's, outside) with the background's
            _, (rows, cols) = ndimage.distance_transform_edt(~fg, return_indices=True)
            mix = rng.uniform(0.0, 1.0, p.shape)
            p = np.where(flying, mix * p[rows, cols] + (1 - mix) * p_bg, p)
        salt = rng.random(p.shape) < corruption.salt
        low, high = float(p.min()), float(p.max())
        p = np.where(salt, rng.uniform(low, high, p.shape), p)
        scale = float(np.exp(rng.uniform(*np.log(corruption.scale_range))))
        shift = float(rng.uniform(*corruption.shift_range) * (p_bg if inverse else low))
        out[view] = (p - shift) / scale
        scales[view], shifts[view] = scale, shift
        ideal_scales[view], ideal_shifts[view] = scale, shift
        if corruption.bend > 0 and fg.sum() >= 2:  # least squares of the truth on the bent prediction
            x, y = (smooth - shift) / scale, (1.0 / z[view][fg] if inverse else z[view][fg])
            slope = float(np.cov(x, y, bias=True)[0, 1] / np.var(x))
            ideal_scales[view], ideal_shifts[view] = slope, float(y.mean() - slope * x.mean())
        bend_all[view], salt_all[view], flying_all[view] = np.where(fg, bend, 1.0), salt, flying
    return Corrupted(out, scales, shifts, ideal_scales, ideal_shifts, bend_all, salt_all, flying_all, corruption.kind)


def alignment_error(aligned_nhw: np.ndarray, ideal_nhw: np.ndarray, mask_nhw: np.ndarray) -> float:
    """AbsRel of aligned z-depth against the ideal alignment, after one global scale (the median
    ratio ideal / aligned over every pixel of `mask_nhw` where both are positive): the error of the
    fit alone, in any scene units (e.g. SfM's). Pixels the aligner left invalid (0) are not scored."""
    both = mask_nhw & (aligned_nhw > 0) & (ideal_nhw > 0)
    if not both.any():
        raise InputError("alignment_error: no pixel is valid in both maps")
    a, b = np.asarray(aligned_nhw, np.float64)[both], np.asarray(ideal_nhw, np.float64)[both]
    g = float(np.median(b / a))
    return float(np.mean(np.abs(g * a - b) / b))


def surface_distance(
    points_n3: np.ndarray, shape: HeadShape, R_est: np.ndarray, T_est: np.ndarray, R_true: np.ndarray,
    T_true: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """Distance [N] of points in the frame of estimated poses (e.g. SfM's) from the true surface.

    The points are brought into the ground-truth frame by the similarity that best maps the
    estimated camera centres onto the true ones (`geometry.similarity_align_poses`); the distance is
    the first-order distance |f| / |grad f| to the analytic surface f = 0 (`HeadShape.implicit`),
    exact to ~1e-4 of the head size at the distances that matter here.
    """
    alignment = geometry.similarity_align_poses(R_est, T_est, R_true, T_true)
    points = alignment.scale * np.asarray(points_n3, np.float64) @ alignment.R_world.T + alignment.t_world
    value, grad = shape.implicit_and_gradient(points)
    return np.abs(value) / np.maximum(np.linalg.norm(grad, axis=-1), 1e-12)
