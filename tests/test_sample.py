"""`stages.sample` on a 2-step tiny run (CPU, 32 px): views, cameras, determinism, Eq. 9 batching."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import sample, train, triplets
from stages.core import faces, geometry, io, models
from stages.core.errors import InputError, ModelError
from stages.train import checkpoint
from stages.train.data import preprocess_image
from tests.train.fixtures import build_triplets, tiny_config


def build_tiny_run(root: Path) -> tuple[Path, Path]:
    """(run folder, a Multi-PIE frontal photo): 2 synthetic persons at 32 px, 2 training steps."""
    index = build_triplets(root, subjects=2, train_split=0.5)
    run = root / "run"
    train.train(index, run, tiny_config(max_steps=2, checkpoint_every=2), device="cpu")
    photo = next((root / "data").rglob("*_051_*.png"))
    return run, photo


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and 2 shared cores under load make them crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny_run(tmp_path_factory.mktemp("sample-run"))


@pytest.fixture(scope="module")
def model(tiny_run):
    return checkpoint.load_checkpoint(tiny_run[0], "cpu")


def tiny_cfg(**changes) -> sample.Config:
    """2 DDIM steps, 3 targets (+ the frontal input), the tiny CLIP model."""
    base = sample.Config(steps=2, azimuths=(-30.0, 0.0, 30.0, 60.0), clip_model=models.resolve_model("clip", "tiny").id)
    return dataclasses.replace(base, **changes)


def read_views(out: Path) -> np.ndarray:
    return np.stack([io.read_image(p) for p in sorted((out / "views").glob("*.png"))])


# --- views and cameras ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orbit", "frames", "slot"), [("ring13", 13, 6), ("16", 16, 0), ("36", 36, 0), ("6x16", 96, 16)]
)
def test_orbit_presets_count_the_input_once(orbit, frames, slot):
    plan = sample.plan_views(sample.Config(orbit=orbit))
    assert plan.n_frames == frames and plan.grid_slot[0] == slot  # the frontal input fills its own slot
    assert (plan.azimuth_deg[0], plan.elevation_deg[0]) == (0.0, 0.0)
    assert sorted(plan.grid_slot.tolist()) == list(range(frames))
    if orbit == "ring13":
        np.testing.assert_array_equal(plan.azimuth_deg[1:], [-90, -75, -60, -45, -30, -15, 15, 30, 45, 60, 75, 90])


def test_an_input_off_the_orbit_is_an_extra_frame_and_explicit_lists_form_a_grid():
    plan = sample.plan_views(sample.Config(orbit="16"), input_azimuth=-30.0)
    assert plan.n_frames == 17 and plan.grid_slot[0] == -1
    grid = sample.plan_views(sample.Config(azimuths=(0.0, 90.0, 180.0), elevations=(0.0, 20.0)))
    assert grid.n_frames == 6 and grid.grid_shape == (2, 3)
    np.testing.assert_array_equal(grid.elevation_deg, [0, 0, 0, 20, 20, 20])
    assert sample.plan_views(sample.Config(orbit="36"), input_azimuth=360.0).n_frames == 36  # same angle mod 360
    with pytest.raises(InputError, match="--orbit"):
        sample.plan_views(sample.Config(orbit="12"))
    with pytest.raises(InputError, match="between -90 and 90"):
        sample.plan_views(sample.Config(elevations=(90.0,)))


def test_multipie_file_names_give_the_input_camera(tmp_path):
    assert sample.input_angles(sample.Config(), Path("001_01_01_130_00.png")) == (-30.0, 0.0)
    assert sample.input_angles(sample.Config(), Path("001_01_01_081_00.png")) == (-45.0, 30.0)
    assert sample.input_angles(sample.Config(input_azimuth=10.0), Path("001_01_01_130_00.png")) == (10.0, 0.0)
    assert sample.input_angles(sample.Config(), Path("portrait.jpg")) == (0.0, 0.0)


def test_pose_codes_are_the_training_codes_of_the_same_rig():
    """A frontal photo and ring13 targets at radius 4 get exactly the codes `nvf triplets` gives a
    Multi-PIE ring capture (frontal source), and the estimator recovers that capture's ρ."""
    plan = sample.plan_views(sample.Config(orbit="ring13"))
    cameras = sample.plan_cameras(plan, 4.0, 49.1, 32)
    scale = triplets.pose_scale(cameras.R, cameras.T)
    rho = 4.0 * scale  # camera distance in the normalised frame
    targets = np.arange(1, 13)
    expected = triplets.pair_codes(cameras.R, cameras.T, scale, np.zeros(12, int), targets)
    np.testing.assert_allclose(sample.pose_codes("paper", cameras.R, cameras.T, rho / 4.0), expected, atol=1e-6)
    frame = triplets.capture_frame(cameras.R, cameras.T)
    expected4 = triplets.pair_zero123_codes(cameras.R, cameras.T, scale, frame, np.zeros(12, int), targets)
    codes16 = sample.pose_codes("zero123", cameras.R, cameras.T, rho / 4.0)
    np.testing.assert_allclose(codes16[:, :4], expected4, atol=1e-6)
    assert geometry.pose_code_radius(expected) == pytest.approx(rho, rel=1e-9)
    assert rho == pytest.approx(sample.MULTIPIE_POSE_RADIUS, abs=2e-3)
    assert geometry.pose_code_radius(np.tile(np.hstack([np.eye(3), np.zeros((3, 1))]).ravel(), (3, 1))) is None


def test_pose_radius_comes_from_model_json_else_the_triplet_index_else_multipie(tiny_run, tmp_path):
    run, _ = tiny_run
    info = json.loads((run / checkpoint.MODEL_JSON).read_text())
    rho, source = sample.run_pose_radius(info, run)
    assert source == "model.json" and rho == pytest.approx(1.298, abs=1e-3)  # written by train
    rho_index, source = sample.run_pose_radius({**info, "pose_radius": None}, run)
    assert source.startswith("estimated from") and rho_index == pytest.approx(rho, rel=1e-9)
    assert sample.run_pose_radius({"triplets": str(tmp_path / "gone.safetensors")}, run) == (
        sample.MULTIPIE_POSE_RADIUS, "Multi-PIE layout (the run's triplet index was not found)")  # fmt: skip


def test_cameras_follow_the_fov_and_rig():
    cameras = sample.plan_cameras(sample.plan_views(sample.Config(orbit="ring13")), 4.0, 90.0, 32)
    assert cameras.names[:2] == ["000.png", "001.png"] and cameras.K[0, 0, 0] == pytest.approx(16.0)
    np.testing.assert_allclose(geometry.camera_centers(cameras.R[0], cameras.T[0]), [0, 0, -4], atol=1e-12)
    np.testing.assert_allclose(geometry.camera_centers(cameras.R[1], cameras.T[1]), [-4, 0, 0], atol=1e-12)  # -90°


# --- the sampling loop -----------------------------------------------------------------------------


def _inputs(model, n_views: int):
    torch.manual_seed(0)
    h = model.resolution // 2
    source = torch.randn(1, 4, h, h)
    z_cond = torch.randn(n_views, model.clip_dim + model.pose_dim)
    return source, z_cond


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "dpm++", "euler"])
def test_every_scheduler_keeps_the_runs_noise_schedule(model, scheduler):
    built = sample.make_scheduler(scheduler, model.scheduler_config)
    assert built.config.beta_schedule == "scaled_linear" and built.config.beta_end == 0.012
    assert built.config.steps_offset == 1 and not built.config.get("clip_sample", False)
    assert (
        type(built).__name__
        == {
            "ddim": "DDIMScheduler",
            "ddpm": "DDPMScheduler",
            "dpm++": "DPMSolverMultistepScheduler",
            "euler": "EulerDiscreteScheduler",
        }[scheduler]
    )


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "dpm++", "euler"])
def test_batched_guidance_equals_the_two_pass_reference(model, scheduler):
    source, z_cond = _inputs(model, 2)
    cfg = sample.Config(scheduler=scheduler, steps=3)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    batched = sample.denoise(model, source, z_cond, gens(), cfg)
    two_pass = sample.denoise(model, source, z_cond, gens(), cfg, two_pass=True)
    assert batched.shape == (2, 4, 16, 16) and torch.isfinite(batched).all()
    torch.testing.assert_close(batched, two_pass, rtol=1e-4, atol=1e-4)
    unguided = sample.denoise(model, source, z_cond, gens(), dataclasses.replace(cfg, guidance=0.0))
    assert (unguided - batched).abs().max() > 1e-3  # guidance does change the result


def test_guided_noise_is_eq9_with_the_trained_null_condition(model):
    source, z_cond = _inputs(model, 2)
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor(500)
    ctx_c, ctx_u = model.projection(z_cond), model.projection(model.null_z_cond(z_cond))
    with torch.no_grad():
        eps = sample.guided_noise(model, x, t, source.expand(2, -1, -1, -1), ctx_c, ctx_u, 5.0)
        cond = model.unet(torch.cat([x, source.expand(2, -1, -1, -1)], 1), t, encoder_hidden_states=ctx_c).sample
        null = model.unet(torch.cat([x, torch.zeros(2, 4, 16, 16)], 1), t, encoder_hidden_states=ctx_u).sample
    torch.testing.assert_close(eps, 6.0 * cond - 5.0 * null, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.null_z_cond(z_cond)[:, : model.clip_dim], torch.zeros(2, model.clip_dim))


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_strength_runs_the_tail_of_the_schedule(model, scheduler):
    sched = sample.make_scheduler(scheduler, model.scheduler_config)
    sched.set_timesteps(30)
    tail = sample.start_timesteps(sched, 30, 0.5)
    assert len(tail) == 15 and torch.equal(tail, sched.timesteps[15:])
    source, z_cond = _inputs(model, 1)
    cfg = sample.Config(scheduler=scheduler, steps=4)
    full = sample.denoise(model, source, z_cond, [torch.Generator().manual_seed(0)], cfg)
    half = sample.denoise(
        model, source, z_cond, [torch.Generator().manual_seed(0)], dataclasses.replace(cfg, strength=0.5)
    )
    assert torch.isfinite(half).all() and (full - half).abs().max() > 1e-3


# --- the stage end to end -------------------------------------------------------------------------


def test_views_transforms_and_contact_sheet(tiny_run, tmp_path):
    run, photo = tiny_run
    paths = sample.sample(run, photo, tmp_path / "views", tiny_cfg(), device="cpu")
    out = tmp_path / "views"
    assert paths[:3] == [out / "transforms.json", out / "contact_sheet.png", out / "sample.json"]
    assert [p.name for p in paths[3:]] == ["000.png", "001.png", "002.png", "003.png"]
    views = read_views(out)
    assert views.shape == (4, 32, 32, 3) and views.dtype == np.uint8
    expected_input = ((preprocess_image(io.read_image(photo), 32).permute(1, 2, 0).numpy() + 1) * 127.5).round()
    np.testing.assert_array_equal(views[0], expected_input.astype(np.uint8))  # frame 0 = the photo as the model saw it
    cameras = io.read_transforms(out / "transforms.json")
    assert cameras.names == ["000.png", "001.png", "002.png", "003.png"] and set(cameras.width) == {32}
    np.testing.assert_allclose(geometry.camera_centers(cameras.R, cameras.T)[0], [0, 0, -4], atol=1e-9)
    info = json.loads((out / "sample.json").read_text())
    assert [f["azimuth_deg"] for f in info["frames"]] == [0.0, -30.0, 30.0, 60.0]
    assert [f["seed"] for f in info["frames"]] == [None, 1, 2, 3] and info["diffusers_guidance_scale"] == 6.0
    assert info["pose_radius_source"] == "model.json" and info["pose_radius"] == pytest.approx(1.298, abs=1e-3)
    sheet = io.read_image(out / "contact_sheet.png")
    assert sheet.shape == (2 + 34, 2 + 4 * 34, 3)  # one row: input in its slot (azimuth 0) among the targets
    np.testing.assert_array_equal(sheet[2:34, 2 + 34 : 2 + 34 + 32], views[0])  # slot 1 of (-30, 0, 30, 60)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_same_seed_same_pngs_and_batch_size_changes_only_rounding(tiny_run, tmp_path):
    """Same seed and batch size: bitwise the same PNGs. Another batch size: each view's noise is the
    same (one generator per view), only CPU kernels' float rounding differs (convolutions of oneDNN
    and the native path both give ~1e-6 differences between batch sizes), so at most 1 grey level on
    a handful of values."""
    run, photo = tiny_run

    def views(name: str, **changes) -> np.ndarray:
        return read_views(Path(sample.sample(run, photo, tmp_path / name, tiny_cfg(**changes), device="cpu")[0]).parent)

    one = views("a", batch_size=1)
    np.testing.assert_array_equal(views("b", batch_size=1), one)
    for size in (2, 3):
        diff = np.abs(views(f"size{size}", batch_size=size).astype(int) - one)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (size, diff.max(), (diff > 0).mean())
    other = views("seed7", seed=7, batch_size=1)
    np.testing.assert_array_equal(other[0], one[0])
    assert all(np.abs(other[k].astype(int) - one[k]).max() > 10 for k in range(1, 4))


def test_transforms_load_in_nerfstudio_dataparser(tiny_run, tmp_path):
    pytest.importorskip("nerfstudio")
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    run, photo = tiny_run
    out = tmp_path / "views"
    sample.sample(run, photo, out, tiny_cfg(orbit="ring13", azimuths=None, steps=1), device="cpu")
    parser = NerfstudioDataParserConfig(data=out, eval_mode="all", auto_scale_poses=False, center_method="none",
                                        orientation_method="none").setup()  # fmt: skip
    outputs = parser.get_dataparser_outputs(split="train")
    assert [p.name for p in outputs.image_filenames] == [f"{i:03d}.png" for i in range(13)]
    assert outputs.image_filenames[0] == out / "views" / "000.png"
    cameras = io.read_transforms(out / "transforms.json")
    c2w = geometry.opencv_w2c_to_opengl_c2w(cameras.R, cameras.T)[:, :3, :]
    np.testing.assert_allclose(outputs.cameras.camera_to_worlds.numpy(), c2w, atol=1e-5)
    assert float(outputs.cameras.fx[0]) == pytest.approx(16 / np.tan(np.radians(sample.ZERO123_FOV_DEG) / 2))


def test_an_odd_size_photo_with_a_mask_goes_through(tiny_run, tmp_path):
    run, _ = tiny_run
    rng = np.random.default_rng(0)
    photo = io.write_image(tmp_path / "odd.png", rng.integers(0, 255, (61, 97, 3), dtype=np.uint8))
    mask_hw = np.zeros((61, 97, 3), np.uint8)
    mask_hw[15:45, 35:65] = 255
    mask = io.write_image(tmp_path / "mask.png", mask_hw)
    sample.sample(run, photo, tmp_path / "views", tiny_cfg(azimuths=(30.0,)), mask=mask, device="cpu")
    views = read_views(tmp_path / "views")
    assert views.shape == (2, 32, 32, 3)
    assert (views[0][:3, :3] >= 250).all() and (views[0][:3, -3:] >= 250).all()  # background composited on white
    with pytest.raises(InputError, match="mask"):
        sample.load_photo(photo, io.write_image(tmp_path / "small.png", mask_hw[:10]))


def test_the_real_astronaut_portrait_goes_through(tiny_run, shared_data, tmp_path):
    photo = shared_data / "astronaut.png"
    if not photo.is_file():
        pytest.skip(f"{photo} is absent")
    sample.sample(tiny_run[0], photo, tmp_path / "views", tiny_cfg(azimuths=(45.0,)), device="cpu")
    assert read_views(tmp_path / "views").shape == (2, 32, 32, 3)
    crop = json.loads((tmp_path / "views" / "sample.json").read_text())["crop"]
    found = faces.unavailable_reason() is None
    assert crop["mode"] == ("face" if found else "center")  # auto: her face when dlib is there
    side = crop["box_x0_y0_side"][2]
    assert (side < 512) == found and np.allclose(np.asarray(crop["photo_K"])[0, 0], side / 32 * (16 / np.tan(
        np.radians(sample.ZERO123_FOV_DEG) / 2)))  # fmt: skip
    frame0 = json.loads((tmp_path / "views" / "transforms.json").read_text())["frames"][0]
    assert frame0["nvf_crop_box_x0_y0_side"] == crop["box_x0_y0_side"]


def test_crop_none_keeps_the_whole_photo_and_center_the_old_square(tiny_run, tmp_path):
    run, photo = tiny_run
    wide = io.write_image(tmp_path / "wide.png", np.tile(io.read_image(photo), (1, 2, 1)))  # [32, 64] two faces
    for mode, box in (("none", [0, -16, 64]), ("center", [16, 0, 32])):
        sample.sample(run, wide, tmp_path / mode, tiny_cfg(azimuths=(30.0,), crop=mode, steps=1), device="cpu")
        assert json.loads((tmp_path / mode / "sample.json").read_text())["crop"]["box_x0_y0_side"] == box
    assert (read_views(tmp_path / "none")[0][:4] >= 250).all()  # padded with white above the photo


def test_reruns_skip_refuse_or_overwrite(tiny_run, tmp_path):
    run, photo = tiny_run
    out = tmp_path / "views"
    cfg = tiny_cfg(azimuths=(30.0,), steps=1)
    sample.sample(run, photo, out, cfg, device="cpu")
    stamp = (out / "views" / "001.png").stat().st_mtime_ns
    sample.sample(run, photo, out, cfg, device="cpu")  # up to date: nothing rewritten
    assert (out / "views" / "001.png").stat().st_mtime_ns == stamp
    with pytest.raises(InputError, match="--overwrite"):
        sample.sample(run, photo, out, dataclasses.replace(cfg, seed=3), device="cpu")
    sample.sample(
        run, photo, out, dataclasses.replace(cfg, seed=3, azimuths=(30.0, 60.0)), device="cpu", overwrite=True
    )
    assert len(list((out / "views").glob("*.png"))) == 3
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="other files"):
        sample.sample(run, photo, tmp_path / "busy", cfg, device="cpu", overwrite=True)


def test_bad_settings_are_input_errors(tiny_run, tmp_path):
    run, photo = tiny_run
    for change, message in [({"strength": 0.0}, "--strength"), ({"steps": 0}, "--steps"),
                            ({"guidance": -1.0}, "--guidance"), ({"scheduler": "plms"}, "--scheduler")]:  # fmt: skip
        with pytest.raises(InputError, match=message):
            sample.sample(run, photo, tmp_path / "v", tiny_cfg(**change), device="cpu")
    with pytest.raises(ModelError, match="--clip-model"):  # the fixture's embeddings are fake
        sample.sample(run, photo, tmp_path / "v", tiny_cfg(clip_model=None), device="cpu")
    with pytest.raises(InputError, match="no checkpoint"):
        sample.sample(tmp_path, photo, tmp_path / "v", tiny_cfg(), device="cpu")


def test_the_photo_embedding_is_raw_for_runs_trained_on_raw_clip_features(tiny_run):
    _, photo = tiny_run
    ref = models.resolve_model("clip", "tiny")
    rgb = io.read_image(photo)
    unit = sample.embed_photo(rgb, ref, torch.device("cpu"), 512)
    raw = sample.embed_photo(rgb, ref, torch.device("cpu"), 512, raw=True)  # model.json normalization "none"
    assert unit.norm().item() == pytest.approx(1.0, abs=1e-6) and abs(raw.norm().item() - 1.0) > 1e-3
    torch.testing.assert_close(raw / raw.norm(), unit, atol=1e-6, rtol=0)


def test_evaluate_views_of_a_tiny_sample_says_they_carry_no_geometry(tiny_run, tmp_path):
    from stages import evaluate

    run, photo = tiny_run
    sample.sample(run, photo, tmp_path / "views", tiny_cfg(orbit="ring13", azimuths=None, steps=1), device="cpu")
    cfg = dataclasses.replace(evaluate.PRESETS["tiny"], lpips="off", arcface="off")
    evaluate.evaluate(evaluate.Inputs(views=tmp_path / "views"), tmp_path / "report", cfg, device="cpu")
    doc = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert doc["closed_loop"]["n_views"] == 13 and doc["closed_loop"]["anchor"] is None
    assert doc["closed_loop"]["status"].endswith("views carry no consistent geometry")
    assert doc["identity"]["protocol"]["views"] == 12  # the input frame is the anchor, not a generated view
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Closed-loop camera consistency" in report and "## Identity" in report
