from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages import synth, triplets
from stages.core import dataset, geometry, io, worktree
from stages.core.contract import Context
from stages.core.errors import InputError, RecordError
from tests.train.fixtures import EMBED_DIM, fake_embed


@pytest.fixture(scope="module")
def synth_tree(tmp_path_factory) -> tuple[Path, Path]:
    """3 subjects x 2 sessions with every expression (15 captures of the 13-camera ring, 16 px),
    ground-truth poses copied in as the work tree's poses records, and fake embed records."""
    root = tmp_path_factory.mktemp("triplets")
    data, work = root / "data", root / "work"
    synth.run(data, synth.Config(subjects=3, sessions=(1, 2), recordings="all", resolution=16, elevated=False,
                                 surface_points=100))  # fmt: skip
    for i, capture in enumerate(dataset.scan(data).captures):
        (work / capture.id).mkdir(parents=True)
        shutil.copy(synth.groundtruth_dir(data, capture.id) / "poses.safetensors", work / capture.id)
        fake_embed(work, data, capture, seed=i, norms=False)  # unit rows only, as older nvf embed wrote
    return data, work


def _copy_work(work: Path, dest: Path) -> Path:
    shutil.copytree(work, dest)
    return dest


# --- the conditioning code ----------------------------------------------------------------------


def test_code12_matches_hand_computed_poses():
    r = 4.0
    R_s, T_s = np.eye(3), np.array([0.0, 0.0, r])  # frontal camera at (0, 0, -r) looking along +z
    R_t = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # at (r, 0, 0) looking along -x
    T_t = np.array([0.0, 0.0, r])
    np.testing.assert_allclose(geometry.ring_pose(90.0, 0.0, r)[0], R_t, atol=1e-12)  # the rig agrees
    R, T = np.stack([R_s, R_t]), np.stack([T_s, T_t])
    scale = triplets.pose_scale(R, T)
    assert scale == pytest.approx(math.sqrt(2) / r)  # centres r/sqrt(2) from their centroid
    code = triplets.pair_codes(R, T, scale, np.array([0]), np.array([1]))
    s2 = math.sqrt(2)
    np.testing.assert_allclose(code[0], [0, 0, 1, -s2, 0, 1, 0, 0, -1, 0, 0, s2], atol=1e-12)
    np.testing.assert_allclose(triplets.pair_codes(R, T, 1.0, np.array([0]), np.array([1]))[0, [3, 7, 11]],
                               [-r, 0, r], atol=1e-12)  # fmt: skip
    frame = triplets.capture_frame(R, T)
    np.testing.assert_allclose(frame.center, 0.0, atol=1e-12)
    np.testing.assert_allclose(frame.up, [0, -1, 0], atol=1e-12)
    zero123 = triplets.pair_zero123_codes(R, T, scale, frame, np.array([0]), np.array([1]))
    np.testing.assert_allclose(zero123[0], [0.0, 1.0, 0.0, 0.0], atol=1e-12)  # +90° azimuth, same polar/radius


unit_quats = st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(lambda q: np.linalg.norm(q) > 0.1)
vectors3 = st.lists(st.floats(-10, 10), min_size=3, max_size=3)


@settings(max_examples=200, deadline=None)
@given(unit_quats, unit_quats, vectors3, vectors3, st.floats(0.01, 100))
def test_applying_the_relative_pose_to_the_source_gives_the_target(q_s, q_t, t_s, t_t, scale):
    R = geometry.quat_to_rotmat(np.array([q_s, q_t]))
    T = np.array([t_s, t_t])
    code = triplets.pair_codes(R, T, scale, np.array([0]), np.array([1]))[0]
    R_rel, T_rel = triplets.decode_code12(code)
    R_hat, T_hat = geometry.apply_relative_pose(R_rel, T_rel, R[0], scale * T[0])
    np.testing.assert_allclose(R_hat, R[1], atol=1e-9)
    np.testing.assert_allclose(T_hat, scale * T[1], atol=1e-7 * (1 + scale * 10))


@settings(max_examples=100, deadline=None)
@given(unit_quats, vectors3, st.floats(0.05, 50), st.integers(0, 2**31))
def test_normalised_codes_do_not_depend_on_the_world_frame_or_scale(q_world, t_world, world_scale, seed):
    """A similarity of the world (what SfM leaves free) leaves the stored codes unchanged."""
    rng = np.random.default_rng(seed)
    R = geometry.quat_to_rotmat(rng.normal(size=(5, 4)))
    T = rng.normal(size=(5, 3)) * 3
    Q = geometry.quat_to_rotmat(np.array(q_world))
    # x' = c Q x + t  =>  R' = R Q^T, T' = c T - R Q^T t
    R2 = R @ Q.T
    T2 = world_scale * T - np.einsum("nij,j->ni", R2, np.array(t_world))
    src, tgt = np.array([0, 1, 2, 3, 4, 0]), np.array([1, 2, 3, 4, 0, 3])
    codes = triplets.pair_codes(R, T, triplets.pose_scale(R, T), src, tgt)
    codes2 = triplets.pair_codes(R2, T2, triplets.pose_scale(R2, T2), src, tgt)
    np.testing.assert_allclose(codes2, codes, atol=1e-7)


@settings(max_examples=50, deadline=None)
@given(unit_quats, vectors3, st.floats(0.1, 10))
def test_azimuth_from_poses_matches_the_multipie_table_in_any_world_frame(q_world, t_world, world_scale):
    cams = [dataset.MULTIPIE_CAMERAS[c] for c in (*dataset.RING_CAMERAS, *dataset.ELEVATED_CAMERAS)]
    R, T = geometry.ring_pose([c.azimuth_deg for c in cams], [c.elevation_deg for c in cams], 4.0)
    Q = geometry.quat_to_rotmat(np.array(q_world))
    R2 = R @ Q.T
    T2 = world_scale * T - np.einsum("nij,j->ni", R2, np.array(t_world))
    frame = triplets.capture_frame(R2, T2)
    np.testing.assert_allclose(frame.azimuth_deg, [c.azimuth_deg for c in cams], atol=1e-6)
    np.testing.assert_allclose(frame.elevation_deg, [c.elevation_deg for c in cams], atol=1e-6)


# --- splits -------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(1, 999), min_size=1, max_size=60, unique=True),
    st.floats(0.05, 1.0),
    st.one_of(st.none(), st.floats(0.0, 0.5)),
    st.floats(0.0, 0.5),
    st.integers(0, 2**32 - 1),
)
def test_no_person_is_in_two_splits(subject_numbers, train, val, test, seed):
    subjects = [f"{n:03d}" for n in subject_numbers]
    try:
        counts = triplets.split_counts(len(subjects), train, val, test)
    except InputError:
        return  # fractions above 1, or nobody left for training: refused, nothing to check
    split_of = triplets.assign_splits(subjects, train, val, test, seed)
    assert sorted(split_of) == sorted(subjects)  # every person in exactly one split
    assert tuple(sum(v == name for v in split_of.values()) for name in triplets.SPLITS) == counts
    assert counts[0] >= 1
    assert split_of == triplets.assign_splits(list(reversed(subjects)), train, val, test, seed)  # order-free


def test_loading_refuses_a_person_in_two_splits(synth_tree, tmp_path):
    _data, work = synth_tree
    work = _copy_work(work, tmp_path / "work")
    [path, *_csv] = triplets.run(Context(work), triplets.Config(train_split=0.6, seed=3))
    loaded = triplets.load_triplets(path)
    split = loaded["split"].copy()
    person = loaded["subject_index"] == 0
    split[np.flatnonzero(person)[0]] = (split[person][1] + 1) % 2  # one image of person 0 leaks
    record = loaded.record
    extra = {k: v for k, v in record.extra.items() if not k.endswith("_convention")}
    io.save_record(path, {**record.tensors, "split": split}, kind="triplets", stage="triplets", capture="*",
                   names=record.names, extra=extra)  # fmt: skip
    with pytest.raises(RecordError, match=f"person {loaded.subjects[0]} is in the"):
        triplets.load_triplets(path)


# --- the index on a synthetic Multi-PIE tree ----------------------------------------------------

# 15 captures (3 subjects: session 1 neutral + smile, session 2 neutral + surprise + squint), 13 views
# each; 6 of them neutral. Protocol E: every expression, frontal source; P: neutral, ring sources;
# U: neutral, frontal source.
PAIR_COUNTS = [
    ("all", None, 15 * 13 * 12),
    ("adjacent", None, 15 * 2 * 12),
    ("nearest:2", None, 15 * 13 * 2),
    ("random:3", None, 15 * 13 * 3),
    ("all", "E", 15 * 12),
    ("adjacent", "E", 15 * 2),
    ("all", "P", 6 * 13 * 12),
    ("nearest:2", "P", 6 * 13 * 2),
    ("all", "U", 6 * 12),
    ("random:3", "U", 6 * 3),
]


@pytest.mark.parametrize(("pairs", "protocol", "expected"), PAIR_COUNTS)
def test_pair_counts_per_protocol(synth_tree, tmp_path, pairs, protocol, expected):
    _data, work = synth_tree
    out = tmp_path / "triplets.safetensors"
    triplets.run(Context(work, paths={"out": out}), triplets.Config(pairs=pairs, protocol=protocol, csv=False))
    loaded = triplets.load_triplets(out)
    assert loaded.n_pairs == expected
    src, tgt = loaded["pair_source"], loaded["pair_target"]
    assert np.all(src != tgt) and np.all(loaded["capture_index"][src] == loaded["capture_index"][tgt])
    if protocol in ("E", "U"):
        cameras = json.loads(loaded.record.extra["camera_ids"])
        assert {cameras[s] for s in src} == {"051"}
    if pairs == "adjacent":
        assert np.all(np.abs(loaded["order"][src] - loaded["order"][tgt]) == 1)


def test_index_rows_codes_order_and_csv(synth_tree, tmp_path):
    data, work = synth_tree
    out = tmp_path / "idx" / "triplets.safetensors"
    written = triplets.run(Context(work, paths={"out": out}), triplets.Config(pairs="nearest:2", pose_code="both", train_split=0.5,
                                                      test_split=0.2, seed=7))  # fmt: skip
    assert written == [out, out.with_suffix(".csv"), out.with_suffix(".images.csv")]
    loaded = triplets.load_triplets(out)
    assert loaded.n_images == 15 * 13
    assert {name: len(people) for name, people in loaded.splits.items()} == {"train": 1, "val": 1, "test": 1}
    # D_I: the image file, and the rows of the records it points to
    row = 20
    capture = loaded.captures[int(loaded["capture_index"][row])]
    assert loaded.image_path(row).resolve() == (data / loaded.record.names[row]).resolve()
    poses = io.load_record(loaded.record_path(int(loaded["capture_index"][row]), "poses"))
    assert poses.names[int(loaded["pose_row"][row])] == Path(loaded.record.names[row]).name
    assert capture["depth"] == "" and loaded["depth_row"][row] == -1
    # the azimuth order -90 -> +90 per capture
    first = loaded["capture_index"] == 0
    np.testing.assert_array_equal(loaded["azimuth_deg"][first][np.argsort(loaded["order"][first])],
                                  np.arange(-90, 91, 15))  # fmt: skip
    # the stored codes take the source's scaled pose to the target's
    p = 5
    s, t = int(loaded["pair_source"][p]), int(loaded["pair_target"][p])
    c = int(loaded["capture_index"][s])
    scale = loaded["pose_scale"][c]
    R_rel, T_rel = triplets.decode_code12(loaded["pose_code"][p])
    R_t, T_t = geometry.apply_relative_pose(R_rel, T_rel, poses["R"][loaded["pose_row"][s]],
                                            scale * poses["T"][loaded["pose_row"][s]])  # fmt: skip
    np.testing.assert_allclose(R_t, poses["R"][loaded["pose_row"][t]], atol=1e-6)
    np.testing.assert_allclose(T_t, scale * poses["T"][loaded["pose_row"][t]], atol=1e-6)
    # z_cond = [CLIP(source) ‖ 4 ‖ 12] with both codes (io.POSE_LAYOUTS)
    z = loaded.z_cond(loaded.pairs("train"))
    assert z.shape == (len(loaded.pairs("train")), EMBED_DIM + 16)
    embeddings = loaded.embeddings()
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)
    train = loaded.pairs("train")
    np.testing.assert_array_equal(z[:, :EMBED_DIM], embeddings[loaded["pair_source"][train]])
    np.testing.assert_array_equal(z[:, EMBED_DIM : EMBED_DIM + 4], loaded["zero123_code"][train])
    np.testing.assert_array_equal(z[:, EMBED_DIM + 4 :], loaded["pose_code"][train])
    # the CSV views
    with open(out.with_suffix(".csv"), newline="") as handle:
        pair_rows = list(csv.DictReader(handle))
    assert len(pair_rows) == loaded.n_pairs
    assert float(pair_rows[p]["pose_3"]) == pytest.approx(float(loaded["pose_code"][p, 3]), rel=1e-6)
    assert (out.parent / pair_rows[p]["source_image"]).resolve() == loaded.image_path(s).resolve()
    with open(out.with_suffix(".images.csv"), newline="") as handle:
        assert len(list(csv.DictReader(handle))) == loaded.n_images
    # unchanged inputs: nothing to do
    assert triplets.run(Context(work, paths={"out": out}), triplets.Config(pairs="nearest:2", pose_code="both", train_split=0.5,
                                                   test_split=0.2, seed=7)) == []  # fmt: skip


def test_interpolated_views_can_be_left_out(synth_tree, tmp_path):
    _data, work = synth_tree
    work = _copy_work(work, tmp_path / "work")
    capture = "001_01_01_00"
    poses = io.load_record(worktree.record_path(work, capture, "poses"))
    source = np.zeros(13, np.int8)
    source[[0, 6]] = triplets.POSE_SOURCES["interp"]
    io.save_record(poses.path, {**poses.tensors, "source": source}, kind="poses", stage="poses", capture=capture,
                   names=poses.names)  # fmt: skip
    out = tmp_path / "t.safetensors"
    triplets.run(
        Context(work, paths={"out": out}),
        triplets.Config(subjects=("001",), sessions=("01",), exclude_interp=True, csv=False),
    )
    loaded = triplets.load_triplets(out)
    per_capture = np.bincount(loaded["capture_index"], minlength=2)
    assert per_capture.tolist() == [11, 13] and loaded.n_pairs == 11 * 10 + 13 * 12
    assert triplets.POSE_SOURCES["interp"] not in loaded["pose_source"].tolist()


def test_missing_records_are_one_clear_error(synth_tree, tmp_path):
    _data, work = synth_tree
    work = _copy_work(work, tmp_path / "work")
    worktree.record_path(work, "002_02_03_00", "embed").unlink()
    with pytest.raises(InputError, match=r"1 of 15 capture\(s\) lack records .*002_02_03_00: no embed"):
        triplets.run(Context(work), triplets.Config())
    [path, *_] = triplets.run(Context(work), triplets.Config(skip_missing=True))
    assert len(triplets.load_triplets(path).captures) == 14
    with pytest.raises(InputError, match="bad --pairs"):
        triplets.run(Context(work), triplets.Config(pairs="nearest:0"))
    with pytest.raises(InputError, match="add up to"):
        triplets.run(Context(work), triplets.Config(train_split=0.9, val_split=0.2))


def test_raw_clip_features_need_the_norms_of_a_current_embed_record(synth_tree, tmp_path):
    _, work = synth_tree  # its embed records hold unit rows only, as nvf embed wrote them before norms
    out = tmp_path / "idx" / "triplets.safetensors"
    triplets.run(
        Context(work, paths={"out": out}), triplets.Config(pose_code="both", train_split=0.5, test_split=0.2, seed=1)
    )
    loaded = triplets.load_triplets(out)
    np.testing.assert_allclose(np.linalg.norm(loaded.embeddings(), axis=1), 1.0, atol=1e-6)
    with pytest.raises(InputError, match="rerun nvf embed with --overwrite"):
        loaded.embeddings(raw=True)


def test_pose_scale_makes_the_mean_distance_from_the_centroid_1_not_the_subject_distance(tmp_path):
    """What the README says: after scaling, the camera centres lie on average 1 from their centroid;
    their distance to the subject (at the origin in synth) is about 1.30 on Multi-PIE's 15 cameras."""
    from stages import sample

    data = tmp_path / "data"
    synth.run(data, synth.Config(subjects=1, resolution=16, surface_points=100))
    [folder] = list((data / "groundtruth").iterdir())
    poses = io.load_record(folder / "poses.safetensors", kind="poses")
    assert len(poses.names) == 15
    scale = triplets.pose_scale(poses["R"], poses["T"])
    centres = scale * geometry.camera_centers(poses["R"], poses["T"])
    assert np.linalg.norm(centres - centres.mean(axis=0), axis=1).mean() == pytest.approx(1.0, rel=1e-9)
    assert np.linalg.norm(centres, axis=1).mean() == pytest.approx(sample.MULTIPIE_POSE_RADIUS, abs=2e-3)


def test_views_whose_alignment_is_weak_lose_their_depth_reference(synth_tree, tmp_path):
    _data, work = synth_tree
    work = _copy_work(work, tmp_path / "work")
    capture = "001_01_01_00"
    names = io.read_record_names(worktree.record_path(work, capture, "poses"))
    quality = np.full(13, 2, np.int8)
    quality[[3, 7]] = [1, 0]  # weak, failed (align.QUALITY)
    io.save_record(worktree.record_path(work, capture, "aligned"), {
        "depth": np.ones((13, 16, 16), np.float32), "scale": np.ones(13), "shift": np.zeros(13),
        "residual_rms": np.zeros(13), "inliers": np.full(13, 50), "quality": quality,
    }, kind="aligned", stage="test", capture=capture, names=names)  # fmt: skip
    rows = {}
    for level in ("failed", "weak", "good"):
        out = tmp_path / f"{level}.safetensors"
        triplets.run(Context(work, paths={"out": out}), triplets.Config(subjects=("001",), sessions=("01",), csv=False,
                                                min_depth_quality=level))  # fmt: skip
        loaded = triplets.load_triplets(out)
        first = loaded["capture_index"] == 0
        aligned_names = [Path(n).name for n in np.asarray(loaded.record.names)[first]]
        rows[level] = {name: int(row) for name, row in zip(aligned_names, loaded["depth_row"][first], strict=True)}
        assert loaded.n_images == 26  # images and pairs stay; only the depth reference goes
    assert all(row >= 0 for row in rows["failed"].values())
    assert rows["weak"][names[7]] == -1 and rows["weak"][names[3]] == 3 and rows["weak"][names[0]] == 0
    assert rows["good"][names[7]] == -1 and rows["good"][names[3]] == -1 and rows["good"][names[0]] == 0
    with pytest.raises(InputError, match="min depth quality"):
        triplets.run(
            Context(work, paths={"out": tmp_path / "x.safetensors"}), triplets.Config(min_depth_quality="best")
        )
