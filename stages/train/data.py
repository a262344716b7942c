"""Training data: pixels -> cached VAE latents, z_cond per pair, and batches of pairs.

Images are centre-cropped to a square and resized to `resolution` (bicubic), then mapped to
[-1, 1] (`preprocess_image`; the sample stage must use the same). The VAE runs once per image and
resolution: its latent distribution (mean ‖ logvar, [8, h, w] float32) goes to an in-memory LRU and
a disk cache keyed by sha256(image bytes) + VAE fingerprint + resolution (`LatentCache`), so epochs
after the first, reruns and resumed runs never run the VAE. The target latent is *sampled* from the
cached distribution each step (as Zero123 does), the source latent is its mode.

z_cond of a pair = [CLIP(source) ‖ pose], CLIP rows from the embed records the triplet index points
to (L2-normalised), pose = the 12-D code (`paper`) or [4-number Zero123 T ‖ 12-D code] (`zero123`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.core import io
from stages.core.cache import ArrayCache
from stages.core.errors import InputError
from stages.triplets import SPLITS, TripletSet

log = logging.getLogger("nvf")


def preprocess_image(image_hw3: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 RGB [H, W, 3] -> float32 [3, S, S] in [-1, 1]: centre crop to a square, bicubic resize to S."""
    from PIL import Image

    h, w = image_hw3.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(np.ascontiguousarray(image_hw3[top : top + side, left : left + side]))
    if side != resolution:
        square = square.resize((resolution, resolution), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(square, dtype=np.float32)).permute(2, 0, 1)  # [3, S, S]
    return pixels / 127.5 - 1.0


class LatentCache:
    """VAE latent distributions [8, h, w] (mean ‖ logvar) per image: a `core.cache.ArrayCache`
    (memory LRU over files on disk) that encodes what it does not hold.

    Key: sha256 of the image file's bytes; the folder is per VAE fingerprint and resolution.
    `folder=None` keeps the memory tier only. `get` encodes what neither tier holds (batched,
    `encode_batch` images per VAE call).
    """

    def __init__(
        self,
        vae: torch.nn.Module,
        vae_fingerprint: str,
        resolution: int,
        device: torch.device,
        folder: Path | None,
        capacity: int = 4096,
        encode_batch: int = 16,
    ) -> None:
        self.vae, self.resolution, self.device = vae, resolution, device
        self.encode_batch = encode_batch
        self.store = ArrayCache(folder / f"{vae_fingerprint}-{resolution}" if folder is not None else None,
                                max_items=capacity)  # fmt: skip
        self.encoded = 0  # images the VAE ran on (tests and logs)
        self._keys: dict[Path, str] = {}

    def key(self, path: Path) -> str:
        if path not in self._keys:
            if not path.is_file():
                raise InputError(f"{path}: image listed in the triplet index is missing; rebuild it with nvf triplets")
            self._keys[path] = io.hash_file(path)
        return self._keys[path]

    def get(self, paths: Sequence[Path]) -> torch.Tensor:
        """Moments [N, 8, h, w] float32 (CPU) of `paths`, encoding the missing ones."""
        keys = [self.key(Path(p)) for p in paths]
        found = {k: m for k in dict.fromkeys(keys) if (m := self.store.get(k)) is not None}
        missing = [(k, Path(p)) for k, p in dict(zip(keys, paths, strict=True)).items() if k not in found]
        for start in range(0, len(missing), self.encode_batch):
            chunk = missing[start : start + self.encode_batch]
            for (key, _), moments in zip(chunk, self._encode([p for _, p in chunk]), strict=True):
                found[key] = moments.numpy()
                self.store.put(key, found[key])
        return torch.stack([torch.from_numpy(found[k]) for k in keys])

    def prefetch(self, paths: Sequence[Path], progress: Callable[[int, int], None] | None = None) -> None:
        """Make sure every image of `paths` is encoded (into the disk cache when there is one)."""
        unique = list(dict.fromkeys(Path(p) for p in paths))
        step = max(self.encode_batch, 1) * 8
        for start in range(0, len(unique), step):
            chunk = [p for p in unique[start : start + step] if not self.store.contains(self.key(p))]
            if chunk:
                self.get(chunk)
            if progress is not None:
                progress(min(start + step, len(unique)), len(unique))

    @torch.no_grad()
    def _encode(self, paths: Sequence[Path]) -> torch.Tensor:
        pixels = torch.stack([preprocess_image(io.read_image(p), self.resolution) for p in paths])  # [B, 3, S, S]
        dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(pixels.to(self.device, dtype)).latent_dist
        self.encoded += len(paths)
        return torch.cat([dist.mean, dist.logvar], dim=1).float().cpu()  # [B, 8, h, w]


@dataclass(frozen=True)
class PairTable:
    """The pairs of one split, everything a batch needs except pixels.

    pairs [P] (indices into the triplet index), source/target [P] image rows, subject [P] (person of
    the pair), source_azimuth/target_azimuth [P] degrees, z_cond [P, D] float32.
    """

    pairs: np.ndarray
    source: np.ndarray
    target: np.ndarray
    subject: np.ndarray
    source_azimuth: np.ndarray
    target_azimuth: np.ndarray
    z_cond: np.ndarray

    def __len__(self) -> int:
        return len(self.pairs)


def pair_table(triplets: TripletSet, split: str, conditioning: str, embeddings: np.ndarray) -> PairTable:
    """The pairs of `split` with their z_cond for `conditioning` (paper: [CLIP ‖ 12]; zero123: [CLIP ‖ 4 ‖ 12])."""
    rec = triplets.record
    pairs = triplets.pairs(split)
    source, target = rec["pair_source"][pairs], rec["pair_target"][pairs]
    layout = io.CONDITIONING_LAYOUTS[conditioning]  # zero123 conditioning: [4 ‖ 12]
    if all(name in rec.tensors for name in io.POSE_LAYOUTS[layout]):
        pose = io.pose_part({name: rec[name][pairs] for name in io.POSE_LAYOUTS[layout]}, layout)
    else:
        raise InputError(
            f"{triplets.path}: --conditioning zero123 needs the Zero123 pose code in the index: "
            "rebuild it with `nvf triplets WORK --pose-code both`"
        )
    z_cond = io.join_z_cond(embeddings[source], pose)
    return PairTable(
        pairs,
        source,
        target,
        rec["subject_index"][source],
        rec["azimuth_deg"][source],
        rec["azimuth_deg"][target],
        z_cond,
    )


def split_has_images(triplets: TripletSet, split: str) -> bool:
    return bool(np.any(triplets.record["split"] == SPLITS[split]))


class PersonAwareSampler:
    """Global batches of pair positions (into a `PairTable`), each from one person (Eq. 10-11).

    Persons are visited in a seeded random order (a new permutation each round); the current person
    supplies `steps_per_person` consecutive batches, then the next person takes over (Eq. 10: "after
    N steps the identity index is rotated"). Within a person the pairs form a cycle read in windows
    of `global_batch`: `monotonic` order sorts them by (source azimuth, target azimuth, pair), i.e.
    -90° -> +90° (Eq. 11); `shuffle_within_person` shuffles them (seeded, reshuffled each visit).
    A person with fewer pairs than a batch repeats pairs (the cycle wraps). `person_aware=False`
    gives plain seeded shuffled batches over all pairs (the baseline of Table IV).

    Distributed: every rank draws the same global batch (batch_size x world_size) and keeps its
    slice (`shard`), so N processes with batch b see exactly the batches one process with N·b sees.
    The state is a few integers (`state_dict` / `load_state_dict`): a resumed run continues exactly.
    """

    def __init__(
        self,
        table: PairTable,
        batch_size: int,
        *,
        seed: int = 0,
        steps_per_person: int = 8,
        shuffle_within_person: bool = False,
        person_aware: bool = True,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        if len(table) == 0:
            raise InputError("the training split has no pairs: check --train-split of nvf triplets")
        if batch_size < 1 or steps_per_person < 1:
            raise InputError("--batch-size and --steps-per-person must be at least 1")
        self.table, self.batch_size, self.seed = table, batch_size, seed
        self.steps_per_person, self.shuffle, self.person_aware = steps_per_person, shuffle_within_person, person_aware
        self.world_size, self.rank = world_size, rank
        self.global_batch = batch_size * world_size
        persons = np.unique(table.subject) if person_aware else np.zeros(1, np.int64)
        self.persons = [int(p) for p in persons]
        order = np.lexsort((table.pairs, table.target_azimuth, table.source_azimuth))
        self.cycles = {p: order[table.subject[order] == p] for p in self.persons} if person_aware else {0: order}
        self.step = 0  # global batches drawn so far

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed, "global_batch": self.global_batch, "n_pairs": len(self.table)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        for key in ("seed", "global_batch", "n_pairs"):
            if int(state[key]) != mine[key]:
                raise InputError(
                    f"cannot resume: the checkpoint's sampler had {key}={state[key]}, this run has "
                    f"{mine[key]}; resume with the same triplets, --seed and batch size x processes"
                )
        self.step = int(state["step"])

    def _person_at(self, visit: int) -> int:
        n = len(self.persons)
        perm = np.random.default_rng([self.seed, 1, visit // n]).permutation(n)
        return self.persons[int(perm[visit % n])]

    def global_batch_at(self, step: int) -> np.ndarray:
        """Positions [global_batch] of the pairs of global batch number `step` (a pure function of step)."""
        if not self.person_aware:
            n = len(self.table)
            per_epoch = max(n // self.global_batch, 1)
            perm = np.random.default_rng([self.seed, 2, step // per_epoch]).permutation(n)
            start = (step % per_epoch) * self.global_batch
            return perm[np.arange(start, start + self.global_batch) % n]
        visit, within = divmod(step, self.steps_per_person)
        person = self._person_at(visit)
        cycle = self.cycles[person]
        if self.shuffle:
            cycle = cycle[np.random.default_rng([self.seed, 3, visit]).permutation(len(cycle))]
        # each round visits every person once, so earlier visits of this person = the round number
        offset = (((visit // len(self.persons)) * self.steps_per_person + within) * self.global_batch) % len(cycle)
        return cycle[(offset + np.arange(self.global_batch)) % len(cycle)]

    def shard(self, global_positions: np.ndarray) -> np.ndarray:
        """This rank's contiguous slice of a global batch."""
        return global_positions[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """(global positions, this rank's positions) of the next batch; advances the state."""
        positions = self.global_batch_at(self.step)
        self.step += 1
        return positions, self.shard(positions)


@dataclass
class Batch:
    """One rank's batch: source/target latent moments [B, 8, h, w], z_cond [B, D], its offset in the global batch."""

    source_moments: torch.Tensor
    target_moments: torch.Tensor
    z_cond: torch.Tensor
    global_offset: int
    global_size: int


def make_batch(
    table: PairTable,
    positions: np.ndarray,
    cache: LatentCache,
    image_path: Callable[[int], Path],
    global_offset: int,
    global_size: int,
) -> Batch:
    """Gather a batch: latents of sources and targets from the cache, z_cond from the table."""
    sources = [image_path(int(r)) for r in table.source[positions]]
    targets = [image_path(int(r)) for r in table.target[positions]]
    moments = cache.get(sources + targets)  # [2B, 8, h, w]
    b = len(positions)
    return Batch(moments[:b], moments[b:], torch.from_numpy(table.z_cond[positions]), global_offset, global_size)
