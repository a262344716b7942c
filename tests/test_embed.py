from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages import embed
from stages.core import batching, io, models
from stages.core.contract import Context


def _dataset(root: Path, captures: int = 2, views: int = 3, hw: tuple[int, int] = (40, 56), seed: int = 0) -> Path:
    """Folders of random RGB images (one capture per folder); cap1/v0.png repeats cap0/v0.png's bytes."""
    rng = np.random.default_rng(seed)
    for c in range(captures):
        (root / f"cap{c}").mkdir(parents=True, exist_ok=True)
        for v in range(views):
            Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(root / f"cap{c}" / f"v{v}.png")
    if captures > 1:
        (root / "cap1" / "v0.png").write_bytes((root / "cap0" / "v0.png").read_bytes())
    return root


@pytest.fixture(scope="module")
def tiny_ref() -> models.ModelRef:
    return models.resolve_model("clip", "tiny")


def _open_clip_one_by_one(ref: models.ModelRef, path: Path, normalize: bool = True) -> np.ndarray:
    """open_clip's README recipe for one image: preprocess(Image.open) -> encode_image -> normalise."""
    model, preprocess, _dim = models.load_clip_model(ref)
    with torch.no_grad():
        features = model.encode_image(preprocess(Image.open(path)).unsqueeze(0))
    return (features / features.norm(dim=-1, keepdim=True) if normalize else features)[0].numpy()


def test_tiny_open_clip_folder_embeds_like_open_clip(tmp_path, tiny_ref):
    assert (Path(tiny_ref.id) / "open_clip_config.json").is_file()  # a saved folder, loaded by path
    data = _dataset(tmp_path / "data")
    paths = embed.run(Context(tmp_path / "work", data=data, device="cpu", paths={"cache_dir": tmp_path / "cache"}), embed.Config(model_preset="tiny", batch_size=2))  # fmt: skip
    assert [p.parent.name for p in paths] == ["cap0", "cap1"]
    record = io.load_record(paths[0], kind="embed", capture="cap0")
    vectors = record["embedding"]
    assert vectors.shape == (3, 512) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert record.names == ["v0.png", "v1.png", "v2.png"]
    assert record.extra["model"] == tiny_ref.id and record.extra["embed_dim"] == "512"
    assert record.extra["data_root"] == str(data.resolve())
    assert record["norm"].shape == (3,) and record["norm"].dtype == np.float32
    for row in range(3):
        expected = _open_clip_one_by_one(tiny_ref, data / "cap0" / f"v{row}.png")
        np.testing.assert_allclose(vectors[row], expected, atol=2e-6)
        raw = _open_clip_one_by_one(tiny_ref, data / "cap0" / f"v{row}.png", normalize=False)  # Zero123's input
        np.testing.assert_allclose(vectors[row] * record["norm"][row], raw, rtol=1e-5, atol=1e-6 * np.abs(raw).max())
    # different images give different embeddings; the same bytes (in another capture's batch) the same one
    other = io.load_record(paths[1])["embedding"]
    assert np.abs(vectors[1] - vectors[2]).max() > 1e-3
    np.testing.assert_allclose(other[0], vectors[0], rtol=1e-6, atol=1e-7)


def test_deterministic_and_cached_reruns(tmp_path, tiny_ref, monkeypatch, caplog):
    data = _dataset(tmp_path / "data")
    cfg = embed.Config(model=tiny_ref.id, batch_size=4)
    first = embed.run(Context(tmp_path / "w1", data=data, device="cpu", paths={"cache_dir": tmp_path / "cache"}), cfg)
    uncached = embed.run(
        Context(tmp_path / "w0", data=data, device="cpu"), embed.Config(model=tiny_ref.id, cache=False)
    )
    for a, b in zip(first, uncached, strict=True):
        np.testing.assert_allclose(io.load_record(a)["embedding"], io.load_record(b)["embedding"], atol=1e-6)
    assert (
        embed.run(Context(tmp_path / "w1", data=data, device="cpu", paths={"cache_dir": tmp_path / "cache"}), cfg) == []
    )  # up to date

    def no_model(*args, **kwargs):
        raise AssertionError("the model ran although every embedding is cached")

    monkeypatch.setattr(embed.ClipEmbedder, "embed_with_norm", no_model)
    with caplog.at_level(logging.INFO, logger="nvf"):
        second = embed.run(
            Context(tmp_path / "w2", data=data, device="cpu", paths={"cache_dir": tmp_path / "cache"}), cfg
        )
    # 6 rows: cap1/v0 repeats cap0/v0's bytes but in another batch, so it is keyed (and cached) apart
    assert "0 image(s) computed; cache hits 0 memory, 6 disk" in caplog.text
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(io.load_record(a)["embedding"], io.load_record(b)["embedding"])


def test_changed_image_rewrites_only_its_capture(tmp_path, tiny_ref):
    data = _dataset(tmp_path / "data")
    cfg = embed.Config(model=tiny_ref.id)
    embed.run(Context(tmp_path / "work", data=data, device="cpu", paths={"cache_dir": tmp_path / "cache"}), cfg)
    Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(data / "cap1" / "v2.png")
    rewritten = embed.run(
        Context(tmp_path / "work", data=data, device="cpu", paths={"cache_dir": tmp_path / "cache"}), cfg
    )
    assert [p.parent.name for p in rewritten] == ["cap1"]
    only = embed.run(
        Context(tmp_path / "solo", data=data, captures=["cap0"], device="cpu", paths={"cache_dir": tmp_path / "cache"}),
        cfg,
    )
    assert [p.parent.name for p in only] == ["cap0"]


def test_simulated_oom_halves_the_batch_and_changes_nothing(tmp_path, tiny_ref, monkeypatch):
    data = _dataset(tmp_path / "data", captures=1, views=8)
    cfg = embed.Config(model=tiny_ref.id, batch_size=8, cache=False)
    [plain] = embed.run(Context(tmp_path / "plain", data=data, device="cpu"), cfg)
    original = embed.ClipEmbedder.embed_with_norm
    sizes: list[int] = []

    def embed_with_oom(self, pixels):
        sizes.append(len(pixels))
        if len(pixels) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, pixels)

    monkeypatch.setattr(embed.ClipEmbedder, "embed_with_norm", embed_with_oom)
    [forced] = embed.run(Context(tmp_path / "forced", data=data, device="cpu"), cfg)
    assert sizes == [8, 4, 2, 2, 2, 2]
    np.testing.assert_allclose(io.load_record(forced)["embedding"], io.load_record(plain)["embedding"], atol=1e-6)


def test_fp16_on_cpu_falls_back_and_bad_settings_are_input_errors(tmp_path, caplog):
    from stages.core.errors import InputError

    with caplog.at_level(logging.WARNING, logger="nvf"):
        assert batching.effective_precision("fp16", torch.device("cpu")) == "fp32"
    assert "fp16 needs a CUDA device" in caplog.text
    with pytest.raises(InputError, match="unknown precision"):
        batching.effective_precision("fp8", torch.device("cpu"))
    with pytest.raises(InputError, match="--workers"):
        embed.run(Context(tmp_path / "work", data=tmp_path, device="cpu"), embed.Config(workers=0))


def test_a_rerun_reads_no_unchanged_image_and_an_edited_one_reruns_its_capture(tmp_path, tiny_ref, monkeypatch):
    data = _dataset(tmp_path / "data")
    cfg = embed.Config(model=tiny_ref.id, cache=False)
    first = embed.run(Context(tmp_path / "work", data=data, device="cpu"), cfg)
    reads: list[str] = []
    original = io.hash_file
    monkeypatch.setattr(io, "hash_file", lambda path, *a, **k: reads.append(Path(path).name) or original(path, *a, **k))
    assert (
        embed.run(Context(tmp_path / "work", data=data, device="cpu"), cfg) == [] and reads == []
    )  # up to date from the memo
    Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(data / "cap1" / "v2.png")
    assert embed.run(Context(tmp_path / "work", data=data, device="cpu"), cfg) == [first[1]] and reads == ["v2.png"]
    assert np.abs(io.load_record(first[1])["embedding"][2]).sum() > 0


def test_bf16_embeds_on_a_cpu_close_to_fp32(tmp_path, tiny_ref):
    """open_clip's low precision casts convolutions and linears only (class embedding and norms stay
    fp32): images must take the patch convolution's dtype, not the first parameter's. fp16 on CUDA
    crashed on that ("Input type (FloatTensor) and weight type (HalfTensor)"); bf16 takes the same
    path on a CPU."""
    full = embed.ClipEmbedder(tiny_ref, torch.device("cpu"), "fp32")
    pixels = torch.from_numpy(np.random.default_rng(3).uniform(-1, 1, (2, 3, *full.image_hw)).astype(np.float32))
    half = embed.ClipEmbedder(tiny_ref, torch.device("cpu"), "bf16")
    assert half.input_dtype == torch.bfloat16 and half.model.visual.class_embedding.dtype == torch.float32
    cosine = (half.embed(pixels) * full.embed(pixels)).sum(dim=1)
    assert cosine.min() > 0.99


def test_a_captures_record_depends_on_its_own_batches_only(tmp_path, tiny_ref, monkeypatch, caplog):
    """Batches never mix captures: a capture run alone or beside others is the same bits; another
    --batch-size, or a batch split to fit memory, agrees to float tolerance and is never cached."""
    data = _dataset(tmp_path / "data", captures=3, views=5)
    records: dict[str, dict[str, np.ndarray]] = {}
    for name, batch_size, ids in [("auto", None, None), ("alone", None, ["cap1"]), ("b3", 3, None), ("b4", 4, None)]:
        cfg = embed.Config(model=tiny_ref.id, batch_size=batch_size, cache=False)
        paths = embed.run(Context(tmp_path / name, data=data, captures=ids, device="cpu"), cfg)
        records[name] = {p.parent.name: io.load_record(p)["embedding"] for p in paths}
    assert records["alone"]["cap1"].tobytes() == records["auto"]["cap1"].tobytes()
    for name in ("b3", "b4"):
        for capture, rows in records["auto"].items():
            np.testing.assert_allclose(records[name][capture], rows, rtol=1e-5, atol=1e-6)
    # the cache keys a row by its batch: batches of 3 fill it, a run in batches of 4 cannot use it
    cache = tmp_path / "cache"
    embed.run(
        Context(tmp_path / "c3", data=data, device="cpu", paths={"cache_dir": cache}),
        embed.Config(model=tiny_ref.id, batch_size=3),
    )
    with caplog.at_level(logging.INFO, logger="nvf"):
        embed.run(
            Context(tmp_path / "c4", data=data, device="cpu", paths={"cache_dir": cache}),
            embed.Config(model=tiny_ref.id, batch_size=4),
        )
    assert "15 image(s) computed; cache hits 0 memory, 0 disk" in caplog.text
    # free memory for 2 images only: the auto batches of 5 run in slices, with a warning, uncached
    monkeypatch.setattr(batching, "auto_batch_size", lambda *args, **kwargs: 2)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nvf"):
        split = embed.run(
            Context(tmp_path / "split", data=data, device="cpu", paths={"cache_dir": cache}),
            embed.Config(model=tiny_ref.id),
        )
    assert "a batch of 5 items runs in slices of 2" in caplog.text
    for path in split:
        np.testing.assert_allclose(
            io.load_record(path)["embedding"], records["auto"][path.parent.name], rtol=1e-5, atol=1e-6
        )
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nvf"):
        embed.run(
            Context(tmp_path / "whole", data=data, device="cpu", paths={"cache_dir": cache}),
            embed.Config(model=tiny_ref.id),
        )
    assert "15 image(s) computed; cache hits 0 memory, 0 disk" in caplog.text  # the split rows were not cached
