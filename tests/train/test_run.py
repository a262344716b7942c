"""`stages.train.run` end to end on tiny models, CPU, 32 px synthetic faces."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stages import train
from stages.core import models
from stages.core.errors import InputError
from stages.train import checkpoint, data, model, monitor
from stages.triplets import load_triplets
from tests.train.fixtures import build_triplets, tiny_config, tiny_zero123_base


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """3 persons (2 train, 1 val) x 13 views at 32 px, adjacent pairs (24 per person)."""
    return build_triplets(tmp_path_factory.mktemp("train-data"))


def _weights(ckpt_dir):
    return {
        **load_file(str(ckpt_dir / "unet" / "diffusion_pytorch_model.safetensors")),
        **{f"projection.{k}": v for k, v in load_file(str(ckpt_dir / "projection.safetensors")).items()},
    }


def test_two_steps_write_a_loadable_run(index, tmp_path):
    cfg = tiny_config(max_steps=2, checkpoint_every=1, validate_every=2, preview_images=1, preview_steps=2)
    final, model_json = train.train(index, tmp_path / "run", cfg, device="cpu")
    run = tmp_path / "run"
    assert final == run / "checkpoints" / "step-00000002" and model_json == run / "model.json"
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step-00000001", "step-00000002"]
    for name in (
        "unet/diffusion_pytorch_model.safetensors",
        "unet/config.json",
        "projection.safetensors",
        "trainer_state.safetensors",
    ):
        assert (final / name).is_file(), name
    for name in ("vae/config.json", "scheduler/scheduler_config.json", "config.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert list((run / "logs").glob("events.out.tfevents.*")) and list((run / "samples").glob("val-*.png"))
    rows = monitor.read_metrics(run)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    assert any("val/loss" in r and np.isfinite(r["val/loss"]) for r in rows)
    info = json.loads(model_json.read_text())
    assert info["conditioning"] == "paper" and info["clip_dim"] == 512 and info["pose_dim"] == 12
    trained = train.load_checkpoint(run, "cpu")
    assert trained.step == 2 and trained.resolution == 32 and trained.clip_model["id"] == "fake"
    assert trained.unet.config.in_channels == 8 and trained.projection.spec["in_features"] == 524
    assert trained.scheduler_config["num_train_timesteps"] == 1000 and trained.scaling_factor == pytest.approx(0.18215)
    for name, value in _weights(final).items():  # what load_checkpoint returns is what was saved
        module = trained.projection if name.startswith("projection.") else trained.unet
        key = name.removeprefix("projection.")
        assert torch.equal(module.state_dict()[key], value), name
    with pytest.raises(InputError, match="--resume latest"):
        train.train(index, run, cfg, device="cpu")


def test_resuming_at_step_k_gives_the_uninterrupted_weights_bitwise(index, tmp_path):
    cfg = tiny_config(max_steps=4, checkpoint_every=2, warmup_steps=2, ema=True, steps_per_person=1)
    train.train(index, tmp_path / "straight", cfg, device="cpu")
    train.train(index, tmp_path / "split", dataclasses.replace(cfg, max_steps=2), device="cpu")
    train.train(index, tmp_path / "split", cfg, device="cpu", resume="latest")
    straight = tmp_path / "straight" / "checkpoints" / "step-00000004"
    split = tmp_path / "split" / "checkpoints" / "step-00000004"
    a, b = _weights(straight), _weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema_a, ema_b = load_file(str(straight / "ema.safetensors")), load_file(str(split / "ema.safetensors"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    state_a, state_b = (load_file(str(p / "trainer_state.safetensors")) for p in (straight, split))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a if k.startswith("optimizer."))
    first = _weights(tmp_path / "split" / "checkpoints" / "step-00000002")
    assert any(not torch.equal(first[k], a[k]) for k in a)  # the last two steps did change the weights


def test_loss_falls_on_a_tiny_overfit_set(index, tmp_path):
    """20 steps at lr 1e-3 (no warm-up) on 2 persons: the fixed-draw loss on 8 train pairs drops by > 20%."""
    cfg = tiny_config(max_steps=20, checkpoint_every=20, drop_clip=0.0, drop_image=0.0, drop_both=0.0)
    triplets = load_triplets(index)
    table = data.pair_table(triplets, "train", "paper", triplets.embeddings())
    parts = model.build_parts(models.resolve_model("diffusion", "tiny").id, "paper", 512, torch.device("cpu"))
    cache = data.LatentCache(parts.vae, parts.vae_fingerprint, 32, torch.device("cpu"), None)
    positions = train.val_positions(table, 8)

    def loss_of(unet, projection):
        return train.validation_loss(
            model.Denoiser(unet, projection),
            parts,
            table,
            cache,
            triplets.image_path,
            positions,
            8,
            512,
            torch.device("cpu"),
            "fp32",
            seed=0,
        )

    before = loss_of(parts.unet, parts.projection)
    train.train(index, tmp_path / "run", cfg, device="cpu")
    trained = train.load_checkpoint(tmp_path / "run")
    after = loss_of(trained.unet, trained.projection)
    print(f"overfit: fixed-draw train loss {before:.4f} -> {after:.4f} after 20 steps")
    assert after < 0.8 * before


def test_zero123_conditioning_trains_from_the_base_projection(tmp_path):
    index = build_triplets(tmp_path / "data", subjects=2, pose_code="both", train_split=0.5)
    base = tiny_zero123_base(tmp_path / "base")
    cfg = tiny_config(max_steps=1, base_model=str(base), conditioning="zero123")
    train.train(index, tmp_path / "run", cfg, device="cpu")
    trained = train.load_checkpoint(tmp_path / "run")
    assert trained.conditioning == "zero123" and trained.pose_dim == 16
    assert trained.projection.spec["in_features"] == 512 + 4 + 12
    # Zero123's projection was trained on raw CLIP image_embeds: the run feeds unit rows x norms
    assert json.loads((tmp_path / "run" / "model.json").read_text())["clip_model"]["normalization"] == "none"
    index_set = load_triplets(index)
    unit, raw = index_set.embeddings(), index_set.embeddings(raw=True)
    norms = np.linalg.norm(raw, axis=1)
    assert norms.min() > 5.0 - 1e-4 and norms.max() < 15.0 + 1e-4
    np.testing.assert_allclose(raw / norms[:, None], unit, atol=1e-6)
    table = data.pair_table(index_set, "train", "zero123", raw)
    np.testing.assert_array_equal(table.z_cond[:, :512], raw[index_set.record["pair_source"][index_set.pairs("train")]])
    with pytest.raises(InputError, match="pose-code both"):
        train.train(
            build_triplets(tmp_path / "paper-only", subjects=2, train_split=0.5), tmp_path / "run2", cfg, device="cpu"
        )
