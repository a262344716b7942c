from __future__ import annotations

import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stages.core import models
from stages.core.errors import InputError, ModelError
from stages.core.models import (
    ALTERNATIVES,
    PRESETS,
    ModelRef,
    build_tiny_clip,
    build_tiny_depth,
    build_tiny_diffusion,
    hub_offline,
    hub_reachable,
    load_clip_model,
    load_depth_model,
    load_diffusion_parts,
    resolve_model,
)

ROLES = ("depth", "clip", "diffusion")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NVF_CACHE", str(tmp_path / "nvf-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty hub cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, ModelRef]:
    """The three tiny models, built once for the module through resolve_model."""
    root = tmp_path_factory.mktemp("tiny-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NVF_CACHE", str(root))
        mp.setenv("HF_HUB_OFFLINE", "1")
        return {role: resolve_model(role, "tiny") for role in ROLES}


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _image(h: int = 48, w: int = 80, seed: int = 0) -> Image.Image:
    rgb = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(rgb)


# --- presets -----------------------------------------------------------------------------------


def test_paper_preset_ids():
    paper = PRESETS["paper"]
    assert paper["depth"] == ModelRef("depth", "Intel/dpt-large", note=paper["depth"].note)
    assert (paper["clip"].id, paper["clip"].pretrained) == ("ViT-B-32-quickgelu", "openai")
    assert paper["diffusion"].id == "kxic/zero123-xl"
    assert ALTERNATIVES["depth-anything-v2-small"].id == "depth-anything/Depth-Anything-V2-Small-hf"
    assert "non-commercial" in ALTERNATIVES["depth-anything-v2-small"].note
    assert resolve_model("diffusion") is paper["diffusion"]


def test_paper_clip_tag_is_quickgelu_in_open_clip():
    """The paper's CLIP name and tag agree on QuickGELU, so open_clip builds the right activation."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    ref = PRESETS["paper"]["clip"]
    assert ref.pretrained in open_clip.list_pretrained_tags_by_model(ref.id)
    assert get_pretrained_cfg(ref.id, ref.pretrained)["quick_gelu"] is True
    assert open_clip.get_model_config(ref.id)["quick_gelu"] is True
    assert open_clip.get_model_config(ref.id)["embed_dim"] == 512


def test_resolve_model_overrides():
    assert resolve_model("depth", override="org/some-depth") == ModelRef("depth", "org/some-depth")
    assert resolve_model("depth", override="depth-anything-v2-small") is ALTERNATIVES["depth-anything-v2-small"]
    clip = resolve_model("clip", override="ViT-L-14@laion2b_s32b_b82k")
    assert (clip.id, clip.pretrained) == ("ViT-L-14", "laion2b_s32b_b82k")
    assert resolve_model("clip", override="hf-hub:org/clip").id == "hf-hub:org/clip"
    with pytest.raises(InputError, match="NAME@TAG"):
        resolve_model("clip", override="ViT-L-14")
    with pytest.raises(InputError, match="not a clip model"):
        resolve_model("clip", override="depth-anything-v2-small")
    with pytest.raises(InputError, match="paper, tiny"):
        resolve_model("depth", preset="huge")


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NVF_CACHE", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("NVF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "nvf"


# --- tiny models: build, size, load, forward ---------------------------------------------------


def test_tiny_models_are_small_and_cached_where_documented(tiny):
    sizes = {role: _folder_bytes(Path(ref.id)) for role, ref in tiny.items()}
    assert all(0 < size < 2.5 * 2**20 for size in sizes.values()), sizes
    assert Path(tiny["depth"].id).name == f"depth-v{models.TINY_VERSION}"
    for sub in ("unet", "vae", "scheduler"):
        assert (Path(tiny["diffusion"].id) / sub).is_dir()
    assert not list(Path(tiny["depth"].id).parent.glob(".*"))  # no staging folder left behind


def test_tiny_depth_forward(tiny):
    model, processor = load_depth_model(tiny["depth"], "cpu", torch.float32)
    assert not model.training
    inputs = processor(images=[_image(seed=0), _image(seed=1)], return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, 64, 64)
    with torch.no_grad():
        depth_bhw = model(**inputs).predicted_depth
    assert depth_bhw.shape == (2, 64, 64)
    assert torch.isfinite(depth_bhw).all()


def test_tiny_clip_forward(tiny):
    model, preprocess, embed_dim = load_clip_model(tiny["clip"], "cpu")
    assert not model.training and embed_dim == 512
    images_b3ss = torch.stack([preprocess(_image(seed=0)), preprocess(_image(seed=1))])
    assert images_b3ss.shape == (2, 3, 32, 32)
    with torch.no_grad():
        features_bd = model.encode_image(images_b3ss)
    assert features_bd.shape == (2, 512)
    assert not torch.allclose(features_bd[0], features_bd[1])
    saved = load_file(Path(tiny["clip"].id) / "open_clip_model.safetensors")
    loaded = model.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)  # the file's weights, not a fresh init
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_clip_loads_twice_in_one_process(tiny):
    first, _, _ = load_clip_model(tiny["clip"], "cpu")
    second, _, _ = load_clip_model(tiny["clip"], "cpu")
    assert all(
        torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )


def test_unknown_clip_tag_is_model_error():
    with pytest.raises(ModelError, match="clip model 'ViT-B-32'.*nvf fetch-models"):
        load_clip_model(ModelRef("clip", "ViT-B-32", pretrained="no-such-tag"), "cpu")


def test_tiny_diffusion_forward(tiny):
    parts = load_diffusion_parts(tiny["diffusion"], "cpu", torch.float32)
    unet, vae, scheduler = parts["unet"], parts["vae"], parts["scheduler"]
    assert type(scheduler).__name__ == "DDIMScheduler"
    assert scheduler.config.num_train_timesteps == 1000
    generator = torch.Generator().manual_seed(0)
    latents_b8hw = torch.randn(2, 8, 8, 8, generator=generator)
    cond_blc = torch.randn(2, 1, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        noise_b4hw = unet(latents_b8hw, torch.tensor([10, 500]), encoder_hidden_states=cond_blc).sample
        images_b3hw = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
        posterior = vae.encode(images_b3hw).latent_dist
        decoded_b3hw = vae.decode(posterior.mean).sample
    assert noise_b4hw.shape == (2, 4, 8, 8)
    assert posterior.mean.shape == (2, 4, 8, 8)
    assert decoded_b3hw.shape == (2, 3, 16, 16)


def test_tiny_builds_are_deterministic(tmp_path, tiny):
    build_tiny_depth(tmp_path / "depth")
    build_tiny_clip(tmp_path / "clip")
    build_tiny_diffusion(tmp_path / "diffusion")
    pairs = [
        ("depth/model.safetensors", "model.safetensors", "depth"),
        ("clip/open_clip_model.safetensors", "open_clip_model.safetensors", "clip"),
        ("diffusion/unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors", "diffusion"),
        ("diffusion/vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "diffusion"),
    ]
    for again, cached, role in pairs:
        first = load_file(Path(tiny[role].id) / cached)
        second = load_file(tmp_path / again)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), again


def test_building_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_depth(tmp_path / "depth")
    assert torch.equal(torch.rand(3), expected)


def test_resolve_tiny_builds_once(monkeypatch):
    calls: list[Path] = []
    real = models._TINY_BUILDERS["depth"]

    def counting(folder: Path) -> Path:
        calls.append(folder)
        return real(folder)

    monkeypatch.setitem(models._TINY_BUILDERS, "depth", counting)
    first = resolve_model("depth", "tiny")
    second = resolve_model("depth", "tiny")
    assert first == second
    assert len(calls) == 1
    assert Path(first.id) == models.cache_dir() / "tiny" / f"depth-v{models.TINY_VERSION}"
    assert (Path(first.id) / "config.json").is_file()


def test_failed_tiny_build_leaves_nothing(monkeypatch):
    def broken(folder: Path) -> Path:
        (Path(folder) / "half-written").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setitem(models._TINY_BUILDERS, "depth", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model("depth", "tiny")
    assert not list((models.cache_dir() / "tiny").iterdir())


# --- loading failures --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "load", [load_depth_model, load_clip_model, load_diffusion_parts], ids=["depth", "clip", "diffusion"]
)
def test_missing_folder_is_model_error(tmp_path, load):
    role = {"load_depth_model": "depth", "load_clip_model": "clip"}.get(load.__name__, "diffusion")
    ref = ModelRef(role, str(tmp_path / "absent"))
    with pytest.raises(ModelError) as info:
        load(ref, "cpu")
    message = str(info.value)
    assert f"{role} model folder" in message and "absent" in message and "does not exist" in message
    assert "nvf fetch-models" in message and "--preset tiny" in message


def test_hub_id_not_cached_offline_is_model_error():
    ref = ModelRef("depth", "nvf-test/no-such-depth-model")
    with pytest.raises(ModelError) as info:
        load_depth_model(ref, "cpu")
    message = str(info.value)
    assert "depth model 'nvf-test/no-such-depth-model'" in message
    assert "offline" in message and "nvf fetch-models" in message
    with pytest.raises(ModelError, match="diffusion model 'nvf-test/no-such-zero123'"):
        load_diffusion_parts(ModelRef("diffusion", "nvf-test/no-such-zero123"), "cpu")


def test_wrong_kind_of_folder_is_model_error(tiny):
    with pytest.raises(ModelError, match="diffusion model"):
        load_diffusion_parts(ModelRef("diffusion", tiny["depth"].id), "cpu")
    with pytest.raises(ModelError, match="depth model"):
        load_depth_model(ModelRef("depth", tiny["clip"].id), "cpu")


# --- hub status --------------------------------------------------------------------------------


def test_hub_offline_reads_env(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert hub_offline() is False
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "true")
    assert hub_offline() is True
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline() is True


class _HeadHandler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):  # keep test output clean
        pass


def test_hub_reachable_against_local_server(monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _HeadHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}/")
        assert hub_reachable(timeout=2.0) is True
    finally:
        server.shutdown()
        server.server_close()
    # the same port, now closed: refused, not raised
    assert hub_reachable(timeout=2.0) is False
    monkeypatch.setenv("HF_ENDPOINT", "not a url")
    assert hub_reachable(timeout=0.5) is False
