"""`nvf synth`'s configuration: `Config`, its presets and `validate`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stages.core import dataset
from stages.core.errors import InputError
from stages.synth.rig import camera_ids


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
