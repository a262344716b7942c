from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages import depth
from stages.core import io, models, worktree
from stages.core.contract import Context
from stages.core.errors import InputError


def _dataset(root: Path, captures: int = 2, views: int = 5, hw: tuple[int, int] = (40, 56), seed: int = 0) -> Path:
    """Folders of random RGB images: one capture per folder."""
    rng = np.random.default_rng(seed)
    for c in range(captures):
        for v in range(views):
            (root / f"cap{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(root / f"cap{c}" / f"v{v}.png")
    return root


@pytest.fixture(scope="module")
def tiny_ref() -> models.ModelRef:
    return models.resolve_model("depth", "tiny")


def _pipeline_depth(ref: models.ModelRef, image_path: Path) -> np.ndarray:
    """transformers' own path, one image at a time: processor -> model -> post-process to image size."""
    model, processor = models.load_depth_model(ref)
    image = Image.open(image_path).convert("RGB")
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    post = processor.post_process_depth_estimation(outputs, [image.size[::-1]])
    return post[0]["predicted_depth"].numpy()


def test_tiny_model_from_a_folder_runs_batched_and_matches_transformers(tmp_path, tiny_ref):
    data = _dataset(tmp_path / "data")
    cfg = depth.Config(model=tiny_ref.id, batch_size=3)  # a saved folder, through --model
    paths = depth.run(Context(tmp_path / "work", data=data, device="cpu", paths={"cache_dir": tmp_path / "cache"}), cfg)
    assert [p.parent.name for p in paths] == ["cap0", "cap1"]
    record = io.load_record(paths[0], kind="depth", capture="cap0")
    assert record["depth"].shape == (5, 40, 56) and record["depth"].dtype == np.float32
    assert record.names == [f"v{v}.png" for v in range(5)]
    assert record.extra["depth_kind"] == "disparity" and record.extra["model"] == tiny_ref.id
    assert record["image_hw"].tolist() == [[40, 56]] * 5
    expected = _pipeline_depth(tiny_ref, data / "cap0" / "v3.png")
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(record["depth"][3], expected, atol=1e-5 * scale)


def test_simulated_oom_halves_the_batch_and_changes_nothing(tmp_path, tiny_ref, monkeypatch, caplog):
    data = _dataset(tmp_path / "data", captures=1, views=8)
    cfg = depth.Config(model=tiny_ref.id, batch_size=8, cache=False)
    [plain] = depth.run(Context(tmp_path / "plain", data=data, device="cpu"), cfg)
    original = depth.DepthPredictor.predict
    sizes: list[int] = []

    def predict_with_oom(self, images, out_hw):
        sizes.append(len(images))
        if len(images) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, images, out_hw)

    monkeypatch.setattr(depth.DepthPredictor, "predict", predict_with_oom)
    with caplog.at_level(logging.WARNING, logger="nvf"):
        [forced] = depth.run(Context(tmp_path / "forced", data=data, device="cpu"), cfg)
    assert sizes == [8, 4, 2, 2, 2, 2]
    assert "retrying at 4" in caplog.text and "retrying at 2" in caplog.text
    np.testing.assert_allclose(io.load_record(forced)["depth"], io.load_record(plain)["depth"], rtol=1e-6, atol=1e-12)


def test_cache_makes_reruns_and_repeated_images_free(tmp_path, tiny_ref, monkeypatch):
    data = _dataset(tmp_path / "data", captures=2, views=3)
    # the same image bytes in both captures: each capture's batch runs whole, so it is computed in each
    (data / "cap1" / "v0.png").write_bytes((data / "cap0" / "v0.png").read_bytes())
    calls: list[int] = []
    original = depth.DepthPredictor.predict
    monkeypatch.setattr(
        depth.DepthPredictor,
        "predict",
        lambda self, images, out_hw: calls.append(len(images)) or original(self, images, out_hw),
    )
    cfg, cache = depth.Config(model=tiny_ref.id), tmp_path / "cache"
    first = depth.run(Context(tmp_path / "w1", data=data, device="cpu", paths={"cache_dir": cache}), cfg)
    assert calls == [3, 3] and len(first) == 2  # one batch per capture
    repeated = [io.load_record(path)["depth"][0] for path in first]
    np.testing.assert_allclose(repeated[1], repeated[0], rtol=1e-6, atol=1e-6 * np.abs(repeated[0]).max())
    assert (
        depth.run(Context(tmp_path / "w1", data=data, device="cpu", paths={"cache_dir": cache}), cfg) == []
    )  # up to date
    calls.clear()
    second = depth.run(
        Context(tmp_path / "w2", data=data, device="cpu", paths={"cache_dir": cache}), cfg
    )  # a new work tree
    assert calls == [] and len(second) == 2
    for a, b in zip(first, second, strict=False):
        np.testing.assert_array_equal(io.load_record(a)["depth"], io.load_record(b)["depth"])
    assert io.load_record(second[1]).extra["depth_kind"] == "disparity"  # known without loading weights
    # a changed setting is a different key
    depth.run(
        Context(tmp_path / "w3", data=data, device="cpu", paths={"cache_dir": cache}),
        depth.Config(model=tiny_ref.id, max_res=20),
    )
    assert sum(calls) == 6


def test_a_captures_record_depends_on_its_own_batches_only(tmp_path, tiny_ref, monkeypatch, caplog):
    """Batches never mix captures: a capture run alone or beside others is the same bits; another
    --batch-size, or a batch split to fit memory, agrees to float tolerance and is never cached."""
    data = _dataset(tmp_path / "data", captures=3, views=5)
    records: dict[str, dict[str, np.ndarray]] = {}
    for name, batch_size, ids in [("auto", None, None), ("alone", None, ["cap2"]), ("b3", 3, None), ("b4", 4, None)]:
        cfg = depth.Config(model=tiny_ref.id, batch_size=batch_size, cache=False)
        paths = depth.run(Context(tmp_path / name, data=data, captures=ids, device="cpu"), cfg)
        records[name] = {p.parent.name: io.load_record(p)["depth"] for p in paths}
    assert records["alone"]["cap2"].tobytes() == records["auto"]["cap2"].tobytes()
    scale = max(np.abs(maps).max() for maps in records["auto"].values())
    for name in ("b3", "b4"):
        for capture, maps in records["auto"].items():
            np.testing.assert_allclose(records[name][capture], maps, rtol=1e-5, atol=1e-6 * scale)
    calls: list[int] = []
    original = depth.DepthPredictor.predict
    monkeypatch.setattr(depth.DepthPredictor, "predict",
                        lambda self, images, out_hw: calls.append(len(images)) or original(self, images, out_hw))  # fmt: skip
    cache = tmp_path / "cache"
    depth.run(
        Context(tmp_path / "c3", data=data, device="cpu", paths={"cache_dir": cache}),
        depth.Config(model=tiny_ref.id, batch_size=3),
    )
    assert calls == [3, 2] * 3
    calls.clear()  # the cache keys a map by its batch: batches of 4 cannot use those of 3
    depth.run(
        Context(tmp_path / "c4", data=data, device="cpu", paths={"cache_dir": cache}),
        depth.Config(model=tiny_ref.id, batch_size=4),
    )
    assert calls == [4, 1] * 3
    calls.clear()  # free memory for 2 images only: the auto batches of 5 run in slices, with a warning, uncached
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="nvf"):
        patch.setattr(depth.batching, "auto_batch_size", lambda *args, **kwargs: 2)
        split = depth.run(
            Context(tmp_path / "split", data=data, device="cpu", paths={"cache_dir": cache}),
            depth.Config(model=tiny_ref.id),
        )
    assert calls == [2, 2, 1] * 3 and "a batch of 5 items runs in slices of 2" in caplog.text
    for path in split:
        np.testing.assert_allclose(io.load_record(path)["depth"], records["auto"][path.parent.name], rtol=1e-5,
                                   atol=1e-6 * scale)  # fmt: skip
    calls.clear()
    depth.run(
        Context(tmp_path / "whole", data=data, device="cpu", paths={"cache_dir": cache}),
        depth.Config(model=tiny_ref.id),
    )
    assert calls == [5] * 3  # the split maps were not cached


def test_max_res_precision_and_store_dtype(tmp_path, tiny_ref, caplog):
    data = _dataset(tmp_path / "data", captures=1, views=2, hw=(40, 56))
    cfg = depth.Config(model=tiny_ref.id, max_res=28, store_dtype="float16", precision="fp16", cache=False)
    with caplog.at_level(logging.WARNING, logger="nvf"):
        [path] = depth.run(Context(tmp_path / "work", data=data, device="cpu"), cfg)
    assert "fp16 needs a CUDA device" in caplog.text
    record = io.load_record(path)
    assert record["depth"].shape == (2, 20, 28) and record["depth"].dtype == np.float16
    assert record["image_hw"].tolist() == [[40, 56]] * 2
    assert depth.stored_hw((480, 640), 320) == (240, 320) and depth.stored_hw((40, 56), None) == (40, 56)


def test_bf16_runs_on_cpu(tmp_path, tiny_ref):
    data = _dataset(tmp_path / "data", captures=1, views=2)
    [path] = depth.run(
        Context(tmp_path / "work", data=data, device="cpu"),
        depth.Config(model=tiny_ref.id, precision="bf16", cache=False),
    )
    assert np.isfinite(io.load_record(path)["depth"]).all()


def test_shard_and_capture_selection(tmp_path, tiny_ref):
    data = _dataset(tmp_path / "data", captures=3, views=2)
    cfg = depth.Config(model=tiny_ref.id)
    paths = depth.run(
        Context(
            tmp_path / "work", data=data, shard=worktree.Shard(1, 2), device="cpu", paths={"cache_dir": tmp_path / "c"}
        ),
        cfg,
    )
    assert [p.parent.name for p in paths] == ["cap1"]
    paths = depth.run(
        Context(tmp_path / "work", data=data, captures=["cap2"], device="cpu", paths={"cache_dir": tmp_path / "c"}), cfg
    )
    assert [p.parent.name for p in paths] == ["cap2"]


def test_depth_kind_from_model_config():
    from transformers import DepthAnythingConfig, DPTConfig, ZoeDepthConfig

    assert depth.infer_depth_kind(DPTConfig()) == "disparity"
    assert depth.infer_depth_kind(DepthAnythingConfig()) == "disparity"
    assert depth.infer_depth_kind(DepthAnythingConfig(depth_estimation_type="metric")) == "depth"
    assert depth.infer_depth_kind(ZoeDepthConfig()) == "depth"


def test_bad_inputs(tmp_path, tiny_ref):
    data = _dataset(tmp_path / "data", captures=1, views=2)
    with pytest.raises(InputError, match="max-res"):
        depth.run(Context(tmp_path / "w", data=data, device="cpu"), depth.Config(model=tiny_ref.id, max_res=0))
    (data / "cap0" / "v1.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="v1.png"):
        depth.run(Context(tmp_path / "w", data=data, device="cpu"), depth.Config(model=tiny_ref.id, cache=False))


def test_batches_stay_under_int32_indexing(tmp_path, monkeypatch):
    """CUDA's upsample refused DPT-Large's [128, 128, 384, 384] decoder map (over 2**31 elements) with
    138 GiB free: the batch is capped by the model's widest map, whatever the memory says."""
    from types import SimpleNamespace

    dpt_large = SimpleNamespace(fusion_hidden_size=256)
    assert depth.int32_batch_limit(dpt_large, (384, 384)) == 56
    assert 56 * 256 * 384 * 384 < 2**31 <= 57 * 256 * 384 * 384
    assert depth.int32_batch_limit(SimpleNamespace(), (4096, 4096)) == 1  # never 0
    monkeypatch.setattr(depth, "int32_batch_limit", lambda config, input_hw: 2)
    sizes = []
    predict = depth.DepthPredictor.predict
    monkeypatch.setattr(depth.DepthPredictor, "predict",
                        lambda self, images, out_hw: sizes.append(len(images)) or predict(self, images, out_hw))  # fmt: skip
    data = tmp_path / "data"
    for view in range(5):
        io.write_image(data / "cap" / f"v{view}.png", np.full((24, 24, 3), 40 * view, np.uint8))
    depth.run(
        Context(tmp_path / "work", data=data, device="cpu"),
        depth.Config(model_preset="tiny", layout="folder", cache=False),
    )
    assert sizes == [2, 2, 1]
