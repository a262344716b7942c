"""`sift_matching`: exact SIFT matching against a loop reference, and the database it writes against
pycolmap's own matcher where that one is exact too (images under 512 features use a flat index)."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from stages import poses, synth
from stages.poses import sift_matching


def _one_way_reference(dist_nm: np.ndarray, max_ratio: float, max_distance: float) -> list[int]:
    """COLMAP's FindBestMatchesOneWayIndex over every neighbour: a loop, ties to the lower index."""
    found = []
    for row in dist_nm:
        best_j, best, second = -1, math.inf, math.inf
        for j, dist in enumerate(row):
            if dist < best:
                best_j, best, second = j, dist, best
            elif dist < second:
                second = dist
        ok = best_j >= 0 and best <= 512 * 512 * max_distance**2 and math.sqrt(best) < max_ratio * math.sqrt(second)
        found.append(best_j if ok else -1)
    return found


def _reference(desc1: np.ndarray, desc2: np.ndarray, max_ratio: float, max_distance: float) -> np.ndarray:
    a, b = desc1.astype(np.int64), desc2.astype(np.int64)
    dist_nm = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    m12 = _one_way_reference(dist_nm, max_ratio, max_distance)
    m21 = _one_way_reference(dist_nm.T, max_ratio, max_distance)
    pairs = [(i, j) for i, j in enumerate(m12) if j >= 0 and m21[j] == i]
    return np.array(pairs, dtype=np.uint32).reshape(-1, 2)


def test_mutual_matches_equal_the_loop_reference_ties_included():
    rng = np.random.default_rng(3)
    total = 0
    for _ in range(120):
        n1, n2 = (int(n) for n in rng.integers(1, 30, 2))
        levels = int(rng.integers(2, 5))  # few grey levels: many equal distances
        desc1 = (rng.integers(0, levels, (n1, 128)) * (255 // levels)).astype(np.float32)
        desc2 = (rng.integers(0, levels, (n2, 128)) * (255 // levels)).astype(np.float32)
        shared = min(n1, n2) // 2
        desc2[:shared] = desc1[:shared]  # exact duplicates: distance 0, and ties with repeats
        if n1 > 3:
            desc1[1:3] = desc1[0]
        for max_ratio, max_distance in ((0.8, 0.7), (1.0, 10.0)):
            expected = _reference(desc1, desc2, max_ratio, max_distance)
            np.testing.assert_array_equal(sift_matching.mutual_matches(desc1, desc2, max_ratio, max_distance), expected)
            total += len(expected)
    assert total > 500  # the cases did produce matches


def test_mutual_matches_of_empty_and_single_descriptor_sets():
    one = np.full((1, 128), 45, np.float32)
    assert sift_matching.mutual_matches(np.empty((0, 128), np.float32), one, 0.8, 0.7).shape == (0, 2)
    # one candidate each way: no second nearest, so the ratio test passes
    np.testing.assert_array_equal(sift_matching.mutual_matches(one, one, 0.8, 0.7), [[0, 0]])


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A 192 px synthetic ring with its features extracted (fast-pass SIFT) into a COLMAP database."""
    import pycolmap

    root = tmp_path_factory.mktemp("sift-match")
    cfg = dataclasses.replace(synth.PRESETS["default"], subjects=1, elevated=False, surface_points=2000, resolution=192)
    synth.run(root / "data", cfg)
    data = root / "data"
    names = sorted(str(p.relative_to(data)) for p in data.rglob("*.png") if "groundtruth" not in p.parts)
    options = poses.build_options(poses.fast_pass(poses.Config()))
    database = root / "features.db"
    poses.extract_features(database, data, names, options, pycolmap.CameraMode.SINGLE)
    return database, options


def _database_matches(database: Path) -> tuple[dict, dict]:
    import pycolmap

    with pycolmap.Database.open(database) as db:
        pair_ids, matches = db.read_all_matches()
        geometry_ids, geometries = db.read_two_view_geometries()
        raw = {int(p): np.asarray(m).tobytes() for p, m in zip(pair_ids, matches)}
        verified = {}
        for p, g in zip(geometry_ids, geometries):
            models = tuple(None if m is None else np.asarray(m).tobytes() for m in (g.E, g.F, g.H))
            verified[int(p)] = (int(g.config), np.asarray(g.inlier_matches).tobytes(), models)
        return raw, verified


def test_database_equals_pycolmaps_matcher_where_its_index_is_exact(extracted, tmp_path):
    import pycolmap

    database, options = extracted
    with pycolmap.Database.open(database) as db:
        counts = [db.num_keypoints_for_image(image.image_id) for image in db.read_all_images()]
    assert len(counts) == 13 and 200 < max(counts) < 512  # pycolmap searches a flat (exact) index below 512
    assert sift_matching.unsupported_reason(options["matching"], counts) is None
    ours, theirs = tmp_path / "ours.db", tmp_path / "theirs.db"
    shutil.copy(database, ours)
    shutil.copy(database, theirs)
    verified = sift_matching.match_exhaustive(ours, options["matching"], options["verification"])
    pycolmap.match_exhaustive(theirs, matching_options=options["matching"], pairing_options=options["pairing"],
                              verification_options=options["verification"])  # fmt: skip
    raw, geometries = _database_matches(ours)
    assert (raw, geometries) == _database_matches(theirs)  # matches and two-view geometries, bit for bit
    assert verified == sum(config > 1 for config, _, _ in geometries.values()) >= 20


def test_unsupported_options_fall_back_to_pycolmap():
    base = poses.build_options(poses.Config())["matching"]
    assert sift_matching.unsupported_reason(base, [600, 700]) is None
    guided = type(base)(base.todict())
    guided.guided_matching = True
    assert sift_matching.unsupported_reason(guided, [600]) == "guided matching"
    one_way = type(base)(base.todict())
    one_way.sift.cross_check = False
    assert sift_matching.unsupported_reason(one_way, [600]) == "cross_check off"
    assert "features per image" in sift_matching.unsupported_reason(base, [sift_matching.MAX_MEAN_FEATURES + 1])
