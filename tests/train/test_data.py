from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stages.core import io
from stages.core.errors import InputError
from stages.train import data

AZIMUTHS = np.array([-90, -75, -60, -45, -30, -15, 0, 15, 30, 45, 60, 75, 90], dtype=np.float32)


def ring_table(persons: int = 3) -> data.PairTable:
    """Adjacent pairs of a 13-camera ring per person (24 pairs each), rows listed in a scrambled order."""
    src, tgt, subj = [], [], []
    for p in range(persons):
        for i in range(13):
            for j in (i - 1, i + 1):
                if 0 <= j < 13:
                    src.append(13 * p + i)
                    tgt.append(13 * p + j)
                    subj.append(p)
    order = np.random.default_rng(5).permutation(len(src))
    src, tgt, subj = np.array(src)[order], np.array(tgt)[order], np.array(subj)[order]
    az = np.tile(AZIMUTHS, persons)
    return data.PairTable(np.arange(len(src)), src, tgt, subj, az[src], az[tgt], np.zeros((len(src), 3), np.float32))


def test_batches_are_single_person_monotonic_and_rotate_after_n_steps():
    table = ring_table()
    sampler = data.PersonAwareSampler(table, batch_size=4, seed=3, steps_per_person=3)
    batches = [sampler.next()[1] for _ in range(18)]
    persons = [set(table.subject[b].tolist()) for b in batches]
    assert all(len(p) == 1 for p in persons)
    visits = [persons[i].pop() for i in range(0, 18, 3)]
    for k in range(6):  # the same person for N = 3 consecutive steps
        assert {int(table.subject[b][0]) for b in batches[3 * k : 3 * k + 3]} == {visits[k]}
    assert sorted(visits[:3]) == [0, 1, 2] and sorted(visits[3:]) == [0, 1, 2]  # every person once a round
    # monotonic: a person's pairs are read -90° -> +90° by source azimuth, then target azimuth
    first_visit = np.concatenate(batches[:3])
    keys = list(zip(table.source_azimuth[first_visit], table.target_azimuth[first_visit], strict=True))
    assert keys == sorted(keys) and keys[0] == (-90.0, -75.0)
    second_visit_same_person = np.concatenate(batches[9:12]) if visits[3] == visits[0] else None
    if second_visit_same_person is not None:  # continues where the first visit stopped
        assert table.source_azimuth[second_visit_same_person][0] >= keys[-1][0]


def test_shuffle_within_person_keeps_the_person_and_changes_the_order():
    table = ring_table()
    mono = data.PersonAwareSampler(table, 6, seed=0, steps_per_person=4)
    shuf = data.PersonAwareSampler(table, 6, seed=0, steps_per_person=4, shuffle_within_person=True)
    a = np.concatenate([mono.next()[1] for _ in range(4)])
    b = np.concatenate([shuf.next()[1] for _ in range(4)])
    assert len(set(table.subject[b])) == 1 and set(table.subject[a]) == set(table.subject[b])
    assert sorted(a.tolist()) == sorted(b.tolist()) and a.tolist() != b.tolist()  # one full cycle, reordered
    again = data.PersonAwareSampler(table, 6, seed=0, steps_per_person=4, shuffle_within_person=True)
    assert np.array_equal(np.concatenate([again.next()[1] for _ in range(4)]), b)  # seeded


def test_state_dict_resumes_exactly_and_ranks_split_the_global_batch():
    table = ring_table()
    one = data.PersonAwareSampler(table, 4, seed=1, steps_per_person=2)
    reference = [one.next()[1] for _ in range(10)]
    first = data.PersonAwareSampler(table, 4, seed=1, steps_per_person=2)
    for _ in range(6):
        first.next()
    resumed = data.PersonAwareSampler(table, 4, seed=1, steps_per_person=2)
    resumed.load_state_dict(first.state_dict())
    assert all(np.array_equal(resumed.next()[1], reference[k]) for k in range(6, 10))
    ranks = [data.PersonAwareSampler(table, 2, seed=1, steps_per_person=2, world_size=2, rank=r) for r in (0, 1)]
    for k in range(10):
        assert np.array_equal(np.concatenate([r.next()[1] for r in ranks]), reference[k])
    with pytest.raises(InputError, match="same triplets"):
        data.PersonAwareSampler(table, 8, seed=1).load_state_dict(first.state_dict())


def test_random_batches_mix_persons():
    table = ring_table()
    sampler = data.PersonAwareSampler(table, 8, seed=0, person_aware=False)
    assert any(len(set(table.subject[sampler.next()[1]])) > 1 for _ in range(5))


def test_preprocess_crops_the_centre_square_and_maps_to_unit_range():
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, 10:50] = 255  # the centre 40x40 square is white, the side bands black
    pixels = data.preprocess_image(image, 20)
    assert pixels.shape == (3, 20, 20) and pixels.dtype == torch.float32
    assert torch.allclose(pixels, torch.ones_like(pixels))


class CountingVAE(torch.nn.Module):
    """A stand-in VAE: mean = 2x2 average-pooled pixels (3 -> 4 channels), logvar = -2."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def encode(self, pixels):
        pooled = torch.nn.functional.avg_pool2d(pixels, 2) * self.scale
        mean = torch.cat([pooled, pooled[:, :1]], dim=1)

        class Dist:
            pass

        dist = Dist()
        dist.mean, dist.logvar = mean, torch.full_like(mean, -2.0)
        return type("Out", (), {"latent_dist": dist})()


def test_latent_cache_runs_the_vae_once_per_image_and_survives_restarts(tmp_path):
    paths = [io.write_image(tmp_path / f"img{i}.png", np.full((8, 8, 3), 40 * i, np.uint8)) for i in range(3)]
    dup = io.write_image(tmp_path / "copy.png", np.full((8, 8, 3), 40, np.uint8))  # same bytes as img1
    vae = CountingVAE()
    cache = data.LatentCache(vae, "fp", 8, torch.device("cpu"), tmp_path / "cache", capacity=2)
    moments = cache.get([paths[0], paths[1], dup, paths[2], paths[0]])
    assert moments.shape == (5, 8, 4, 4) and cache.encoded == 3  # the copy shares img1's key
    assert torch.equal(moments[1], moments[2]) and torch.equal(moments[0], moments[4])
    assert len(cache.store) == 2  # LRU capacity (items)
    expected = 40 / 127.5 - 1
    assert torch.allclose(moments[1, :4], torch.full((4, 4, 4), expected)) and torch.all(moments[1, 4:] == -2)
    fresh = data.LatentCache(vae, "fp", 8, torch.device("cpu"), tmp_path / "cache")
    assert torch.equal(fresh.get(paths), moments[[0, 1, 3]]) and fresh.encoded == 0  # from disk
    other_res = data.LatentCache(vae, "fp", 4, torch.device("cpu"), tmp_path / "cache")
    assert other_res.get(paths[:1]).shape == (1, 8, 2, 2) and other_res.encoded == 1  # resolution in the key


def test_one_pose_code_order_for_both_codes_in_triplets_train_and_sample(tmp_path):
    """--pose-code both: z_cond = [CLIP ‖ 4 ‖ 12] (io.POSE_LAYOUTS) as the index gives it
    (TripletSet.z_cond), as train conditions on it (pair_table) and as sample builds it (pose_codes)."""
    from stages import sample, synth
    from stages.triplets import load_triplets
    from tests.train.fixtures import build_triplets

    triplets = load_triplets(build_triplets(tmp_path, pose_code="both"))
    embeddings = triplets.embeddings()
    table = data.pair_table(triplets, "train", "zero123", embeddings)
    d = embeddings.shape[1]
    np.testing.assert_array_equal(table.z_cond, triplets.z_cond(table.pairs, embeddings))
    np.testing.assert_array_equal(table.z_cond[:, d : d + 4], triplets["zero123_code"][table.pairs])
    np.testing.assert_array_equal(table.z_cond[:, d + 4 :], triplets["pose_code"][table.pairs])
    # sample's codes for the same two cameras, in the same order
    p = int(table.pairs[3])
    s, t = int(triplets["pair_source"][p]), int(triplets["pair_target"][p])
    c = int(triplets["capture_index"][s])
    capture = triplets.captures[c]["id"]
    poses = io.load_record(synth.groundtruth_dir(tmp_path / "data", capture) / "poses.safetensors", kind="poses")
    rows = [poses.names.index(Path(triplets.record.names[i]).name) for i in (s, t)]
    code = sample.pose_codes("zero123", poses["R"][rows], poses["T"][rows], float(triplets["pose_scale"][c]))
    assert code.shape == (1, 16) and list(io.POSE_LAYOUTS["both"]) == ["zero123_code", "pose_code"]
    np.testing.assert_allclose(code[0, 4:], triplets["pose_code"][p], atol=1e-5)
    np.testing.assert_allclose(code[0, :4], triplets["zero123_code"][p], atol=1e-3)
    assert np.abs(code[0, :4] - triplets["pose_code"][p][:4]).max() > 1e-2  # the two codes are told apart
