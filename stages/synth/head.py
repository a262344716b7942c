"""Head shapes: the analytic star-shaped surface of a subject (with an expression) and its albedo.

See `stages.synth` for the conventions (world frame, radius function, texture).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

from stages.core.errors import InputError


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
