"""Stage `masks`: label mapping, the tiny SegFormer batched with resume and shards, and the masks
reaching align, cloud, reconstruct (nerfstudio's mask_path) and evaluate."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save_file

from stages import align, cloud, evaluate, masks, reconstruct, synth
from stages.core import io, models, worktree
from stages.core import masks as headmasks
from stages.core.contract import Context
from stages.core.errors import InputError, RecordError
from tests.helpers import groundtruth_work

CAPTURE = "001_01_01_00"


def _dataset(root: Path, captures: int = 2, views: int = 3, hw: tuple[int, int] = (40, 56)) -> Path:
    """Folders of smooth random RGB images (blobs, so the masks are not salt): one capture per folder."""
    rng = np.random.default_rng(0)
    for c in range(captures):
        (root / f"cap{c}").mkdir(parents=True, exist_ok=True)
        for v in range(views):
            coarse = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
            image = cv2.resize(coarse, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
            Image.fromarray(image).save(root / f"cap{c}" / f"v{v}.png")
    return root


@pytest.fixture(scope="module")
def tiny_ref() -> models.ModelRef:
    return models.resolve_model("masks", "tiny")


# -- label mapping -----------------------------------------------------------------------------


def test_face_parsing_labels_map_to_head_hair_and_background():
    table = headmasks.label_classes(dict(enumerate(models.FACE_PARSING_LABELS)))
    by_name = dict(zip(models.FACE_PARSING_LABELS, table.tolist(), strict=True))
    assert {n for n, c in by_name.items() if c == 2} == {"hair", "hat"}
    assert {n for n, c in by_name.items() if c == 0} == {"background", "neck_l", "neck", "cloth"}
    assert by_name["l_ear"] == by_name["r_ear"] == by_name["skin"] == by_name["eye_g"] == by_name["ear_r"] == 1
    # logits [1, 19, 2, 3] whose argmax is one chosen label per pixel
    chosen = [["l_ear", "skin", "hair"], ["cloth", "background", "hat"]]
    logits = torch.zeros((1, 19, 2, 3))
    for r, row in enumerate(chosen):
        for c, label in enumerate(row):
            logits[0, models.FACE_PARSING_LABELS.index(label), r, c] = 5.0
    classes = headmasks.classes_from_logits(logits, torch.from_numpy(table), (2, 3))
    assert classes.dtype == torch.uint8 and classes[0].tolist() == [[1, 1, 2], [0, 0, 2]]
    assert headmasks.head_mask(classes.numpy())[0].tolist() == [[True, True, True], [False, False, True]]


def test_logits_are_upsampled_before_the_argmax():
    table = torch.tensor([0, 1, 2], dtype=torch.uint8)
    logits = torch.zeros((1, 3, 1, 2))  # left: label 1 strongly; right: label 2 weakly
    logits[0, 1, 0, 0], logits[0, 2, 0, 1] = 4.0, 1.0
    classes = headmasks.classes_from_logits(logits, table, (2, 8))[0]
    # bilinear logits cross where 4 (1 - t) = t: 4/5 of the way from the left centre (column 1.5) to
    # the right one (5.5): columns up to 4 (centre 4.5) are head, 5 onwards hair
    assert classes.tolist() == [[1, 1, 1, 1, 1, 2, 2, 2]] * 2


def test_a_model_without_face_labels_is_refused():
    with pytest.raises(InputError, match="face-parsing model"):
        headmasks.label_classes({0: "cat", 1: "dog"})
    assert headmasks.label_classes({0: "Background", 1: "Left-Eye", 2: "HAIR"}).tolist() == [0, 1, 2]


# -- the stage ---------------------------------------------------------------------------------


def _transformers_classes(ref: models.ModelRef, image_path: Path) -> np.ndarray:
    """transformers' own path, one image at a time: processor -> model -> upsample -> argmax -> mapping."""
    model, processor = models.load_segmentation_model(ref)
    image = Image.open(image_path).convert("RGB")
    with torch.no_grad():
        logits = model(**processor(images=image, return_tensors="pt")).logits
    up = torch.nn.functional.interpolate(logits, size=image.size[::-1], mode="bilinear", align_corners=False)
    return headmasks.label_classes(model.config.id2label)[up[0].argmax(0).numpy()]


def test_tiny_segformer_batched_equals_one_by_one_and_transformers(tmp_path, tiny_ref):
    data = _dataset(tmp_path / "data", captures=1)
    batched = masks.run(Context(tmp_path / "b2", data=data, device="cpu", paths={"cache_dir": tmp_path / "cache2"}), masks.Config(model_preset="tiny", batch_size=2))  # fmt: skip
    single = masks.run(Context(tmp_path / "b1", data=data, device="cpu", paths={"cache_dir": tmp_path / "cache1"}), masks.Config(model_preset="tiny", batch_size=1))  # fmt: skip
    record = headmasks.load_masks(batched[0], "cap0")
    classes = record["classes"]
    assert classes.shape == (3, 40, 56) and classes.dtype == np.uint8
    assert record.names == ["v0.png", "v1.png", "v2.png"] and record["image_hw"].tolist() == [[40, 56]] * 3
    labels = json.loads(record.extra["label_classes"])
    assert labels["l_ear"] == "head" and labels["hair"] == "hair" and labels["cloth"] == "background"
    assert record.extra["model"] == tiny_ref.id and json.loads(record.extra["classes"])["2"] == "hair"
    np.testing.assert_array_equal(headmasks.load_masks(single[0])["classes"], classes)
    np.testing.assert_array_equal(classes[2], _transformers_classes(tiny_ref, data / "cap0" / "v2.png"))
    assert len(np.unique(classes)) >= 2  # the random model gives a map, not a constant


def test_resume_overwrite_cache_and_shards(tmp_path, monkeypatch, caplog):
    data = _dataset(tmp_path / "data", captures=2)
    cfg = masks.Config(model_preset="tiny", batch_size=2)
    cache = tmp_path / "cache"
    first = masks.run(Context(tmp_path / "work", data=data, device="cpu", paths={"cache_dir": cache}), cfg)
    assert [p.parent.name for p in first] == ["cap0", "cap1"]
    stamp = first[0].stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="nvf"):
        assert masks.run(Context(tmp_path / "work", data=data, device="cpu", paths={"cache_dir": cache}), cfg) == []
    assert "0 of 2 capture(s) to write" in caplog.text and first[0].stat().st_mtime_ns == stamp
    calls: list[int] = []
    original = masks.MaskPredictor.predict

    def counting(self, images, out_hw):
        calls.append(len(images))
        return original(self, images, out_hw)

    monkeypatch.setattr(masks.MaskPredictor, "predict", counting)
    again = masks.run(
        Context(tmp_path / "work", data=data, device="cpu", overwrite=True, paths={"cache_dir": cache}), cfg
    )
    assert len(again) == 2 and calls == []  # recomputed records, every map from the disk cache
    fresh = masks.run(
        Context(tmp_path / "other", data=data, device="cpu", overwrite=True, paths={"cache_dir": tmp_path / "c2"}), cfg
    )
    assert calls == [2, 1, 2, 1]  # the model ran: 3 views per capture in batches of 2
    for a, b in zip(first, fresh, strict=True):
        assert a.read_bytes() == b.read_bytes()  # the record depends only on its inputs
    shards = [masks.run(Context(tmp_path / f"s{k}", data=data, shard=worktree.Shard(k, 2), device="cpu", paths={"cache_dir": cache}), cfg)
              for k in range(2)]  # fmt: skip
    assert sorted(p.parent.name for s in shards for p in s) == ["cap0", "cap1"] and all(len(s) == 1 for s in shards)


def test_corrupt_masks_records_are_refused(tmp_path):
    path = tmp_path / CAPTURE / "masks.safetensors"
    classes = np.zeros((2, 4, 4), np.uint8)
    classes[0, 0, 0] = 7
    io.save_record(path, {"classes": classes, "image_hw": np.full((2, 2), 4)}, kind="masks", stage="masks",
                   capture=CAPTURE, names=["a.png", "b.png"])  # fmt: skip
    with pytest.raises(RecordError, match="uint8 values 0..2"):
        headmasks.load_masks(path)
    with safe_open(str(path), "np") as handle:  # a row short, the metadata kept
        meta, hw = handle.metadata(), handle.get_tensor("image_hw")
    save_file({"classes": classes[:1], "image_hw": hw}, str(path), metadata=meta)
    with pytest.raises(RecordError, match="shape"):
        headmasks.load_masks(path)


# -- consumers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("synth") / "data"
    synth.run(data, synth.Config(subjects=1, resolution=32, elevated=False, surface_points=300))
    return data


def _half_masks(data: Path, work: Path) -> np.ndarray:
    """A masks record for the ground truth: head where the GT depth is > 0, hair on its top rows,
    background on the left half of every image. Returns the GT depth [V, H, W]."""
    gt = io.load_record(synth.groundtruth_dir(data, CAPTURE) / "depth.safetensors")
    depth = gt["depth"]
    classes = np.where(depth > 0, 1, 0).astype(np.uint8)
    classes[:, :4][depth[:, :4] > 0] = 2
    classes[:, :, : depth.shape[2] // 2] = 0
    io.save_record(headmasks.masks_path(work, CAPTURE),
                   {"classes": classes, "image_hw": np.tile(depth.shape[1:], (len(depth), 1))},
                   kind="masks", stage="masks", capture=CAPTURE, names=gt.names)  # fmt: skip
    return depth


def test_masks_reach_the_cloud_and_it_names_the_source(synth_data, tmp_path):
    work = groundtruth_work(synth_data, tmp_path / "work")
    cfg = cloud.PRESETS["raw"]
    cloud.run(Context(work, data=synth_data), cfg)
    plain = io.read_json(work / CAPTURE / cloud.METRICS_FILE)
    depth = _half_masks(synth_data, work)
    written = cloud.run(Context(work, data=synth_data), cfg)  # the new record makes the cloud out of date
    assert written == [work / CAPTURE / cloud.CLOUD_FILE, work / CAPTURE / cloud.METRICS_FILE]
    masked = io.read_json(work / CAPTURE / cloud.METRICS_FILE)
    assert plain["mask"] == {"kind": "none"}
    assert masked["mask"]["kind"] == "masks_record" and masked["mask"]["path"].endswith(f"{CAPTURE}/masks.safetensors")
    fg = {s["name"]: s for s in plain["filters"]}["foreground"], {s["name"]: s for s in masked["filters"]}["foreground"]
    half = depth.shape[2] // 2
    assert fg[0]["after"] == int((depth > 0).sum())
    assert fg[1]["after"] == int((depth[:, :, half:] > 0).sum()) < fg[0]["after"]
    assert fg[1]["params"]["mask"].endswith("masks.safetensors")
    assert len(io.read_ply(work / CAPTURE / cloud.CLOUD_FILE).points) == fg[1]["after"]
    # --mask-dir wins over the record; --no-masks ignores it
    mask_dir = tmp_path / "user-masks"
    mask_dir.mkdir()
    for name in io.load_record(work / CAPTURE / "aligned.safetensors").names:
        Image.fromarray(np.full((32, 32), 255, np.uint8)).save(mask_dir / name)
    cloud.run(
        Context(work, data=synth_data), cloud.Config(**{**cloud.PRESETS["raw"].__dict__, "mask_dir": str(mask_dir)})
    )
    user = io.read_json(work / CAPTURE / cloud.METRICS_FILE)
    assert user["mask"] == {"kind": "mask_dir", "path": str(mask_dir)}
    assert {s["name"]: s for s in user["filters"]}["foreground"]["after"] == fg[0]["after"]
    cloud.run(Context(work, data=synth_data), cloud.Config(**{**cloud.PRESETS["raw"].__dict__, "use_masks": False}))
    assert io.read_json(work / CAPTURE / cloud.METRICS_FILE)["mask"] == {"kind": "none"}


def test_align_samples_inside_the_head_mask_only(synth_data, tmp_path):
    work = groundtruth_work(synth_data, tmp_path / "work")
    gt = synth.groundtruth_dir(synth_data, CAPTURE)
    depth = io.load_record(gt / "depth.safetensors")
    io.save_record(worktree.record_path(work, CAPTURE, "depth"), {"depth": depth["depth"]}, kind="depth",
                   stage="depth", capture=CAPTURE, names=depth.names, extra={"depth_kind": "depth"})  # fmt: skip
    cfg = align.Config(reference="depth", reference_depth=str(gt / "depth.safetensors"), prefilter=False)
    [plain_path] = align.run(Context(work), cfg)
    plain = io.load_record(plain_path)
    _half_masks(synth_data, work)
    [masked_path] = align.run(Context(work), cfg)  # the masks record makes the aligned record out of date
    masked = io.load_record(masked_path)
    half = depth["depth"].shape[2] // 2
    assert plain["samples"].tolist() == (depth["depth"] > 0).sum(axis=(1, 2)).tolist()
    assert masked["samples"].tolist() == (depth["depth"][:, :, half:] > 0).sum(axis=(1, 2)).tolist()
    assert masked.extra["sample_mask"].endswith("masks.safetensors") and plain.extra["sample_mask"] == "none"
    np.testing.assert_allclose(masked["depth"], plain["depth"], rtol=1e-6)  # the maps still cover every pixel
    assert align.run(Context(work), cfg) == []  # up to date with the record
    assert align.run(Context(work), align.Config(**{**cfg.__dict__, "use_masks": False})) != []


def test_reconstruct_dataset_has_a_mask_path_per_frame(synth_data, tmp_path):
    work = groundtruth_work(synth_data, tmp_path / "work")
    depth = _half_masks(synth_data, work)
    views = reconstruct.load_views(work / CAPTURE, data=synth_data)
    reconstruct.write_dataset(tmp_path / "dataset", views, reconstruct.Config())
    doc = io.read_json(tmp_path / "dataset" / "transforms.json")
    assert len(doc["frames"]) == len(depth) == 13
    half = depth.shape[2] // 2
    for row, frame in enumerate(doc["frames"]):
        stem = Path(frame["file_path"]).stem
        assert frame["mask_path"] == f"masks/{stem}.png"
        mask = cv2.imread(str(tmp_path / "dataset" / frame["mask_path"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (frame.get("h", doc.get("h")), frame.get("w", doc.get("w"))) == (32, 32)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        name = views.cameras.names[row]
        assert Path(frame["file_path"]).name == name
        np.testing.assert_array_equal(mask == 255, np.pad(depth[row][:, half:] > 0, ((0, 0), (half, 0))))
    without = reconstruct.load_views(work / CAPTURE, data=synth_data, use_masks=False)
    assert without.masks is None and reconstruct.inputs_hash(without, reconstruct.Config()) != reconstruct.inputs_hash(
        views, reconstruct.Config()
    )


def test_evaluate_scores_depth_inside_the_head_mask(synth_data, tmp_path):
    work = tmp_path / "work"
    gt = synth.groundtruth_dir(synth_data, CAPTURE)
    depth = io.load_record(gt / "depth.safetensors")
    spoiled = depth["depth"].copy()
    half = spoiled.shape[2] // 2
    spoiled[:, :, :half] *= np.where(np.arange(half) % 2, 1.5, 0.7)  # wrong depth on the left only
    io.save_record(worktree.record_path(work, CAPTURE, "depth"), {"depth": spoiled}, kind="depth", stage="depth",
                   capture=CAPTURE, names=depth.names, extra={"depth_kind": "depth"})  # fmt: skip
    inputs = evaluate.Inputs(depth=work, depth_ref=synth_data / "groundtruth")
    cfg = evaluate.Config(depth_alignment="none")
    evaluate.evaluate(inputs, tmp_path / "plain", cfg, device="cpu")
    _half_masks(synth_data, work)
    evaluate.evaluate(inputs, tmp_path / "masked", cfg, device="cpu")
    plain = io.read_json(tmp_path / "plain" / "metrics.json")["depth"]
    masked = io.read_json(tmp_path / "masked" / "metrics.json")["depth"]
    assert plain["protocol"]["mask"] == "none" and "masks.safetensors" in masked["protocol"]["mask"]
    assert plain["captures"][CAPTURE]["summary"]["abs_rel"] > 0.05
    assert masked["captures"][CAPTURE]["summary"]["abs_rel"] < 1e-6
    assert masked["captures"][CAPTURE]["mask"].endswith("masks.safetensors")
    with pytest.raises(InputError, match="depth_mask=masks"):
        evaluate.evaluate(evaluate.Inputs(depth=gt, depth_ref=gt), tmp_path / "x", evaluate.Config(depth_mask="masks"))


def test_nerfstudio_reads_the_masks_of_the_dataset(synth_data, tmp_path):
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
    from nerfstudio.data.datasets.base_dataset import InputDataset

    work = groundtruth_work(synth_data, tmp_path / "work")
    depth = _half_masks(synth_data, work)
    views = reconstruct.load_views(work / CAPTURE, data=synth_data)
    split = reconstruct.write_dataset(tmp_path / "dataset", views, reconstruct.Config())
    parsed = NerfstudioDataParserConfig(data=tmp_path / "dataset").setup().get_dataparser_outputs("train")
    assert sorted(p.name for p in parsed.mask_filenames) == sorted(f"{Path(n).stem}.png" for n in split["train"])
    item = InputDataset(parsed)[0]  # nerfstudio sorts the frames by file name
    row = views.cameras.names.index(parsed.image_filenames[0].name)
    assert parsed.mask_filenames[0].stem == parsed.image_filenames[0].stem
    half = depth.shape[2] // 2
    assert item["mask"].shape == (32, 32, 1)
    np.testing.assert_array_equal(item["mask"][..., 0].numpy(), np.pad(depth[row][:, half:] > 0, ((0, 0), (half, 0))))
