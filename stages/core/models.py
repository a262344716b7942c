"""Model presets: the paper's hub checkpoints, and tiny ones built locally for tests and offline runs.

Two presets, one per row of `PRESETS`:

- `paper`: what NVF-360 uses (and, for head masks, which the paper does not name, the face-parsing
  SegFormer `jonathandinu/face-parsing`). Depth: DPT-Large (`Intel/dpt-large`, relative inverse depth).
  CLIP: ViT-B/32 with OpenAI's weights through open_clip, named `ViT-B-32-quickgelu` because
  those weights were trained with QuickGELU and open_clip (2.32 and 3.3 checked) no longer
  special-cases `openai`: plain `ViT-B-32` + `openai` builds GELU layers and only warns. Diffusion: Zero123-XL in
  diffusers layout, `kxic/zero123-xl` (see `PAPER_DIFFUSION_NOTE`).
- `tiny`: architecturally the same families, a few hundred KB to ~2 MB each, built from configs
  with a fixed seed into `cache_dir()/tiny/` and loaded back through the very `from_pretrained` /
  open_clip `create_model_and_transforms` calls the real models take. Random weights: for tests and smoke runs only.

Loading never reaches the hub when `HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE` is set; a model that
is neither in a local folder nor in the hub cache raises `ModelError` saying how to get it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from stages.core.errors import InputError, ModelError

log = logging.getLogger("nvf")

Role = Literal["depth", "clip", "diffusion", "masks"]
ROLES: tuple[Role, ...] = ("depth", "clip", "diffusion", "masks")

TINY_SEED = 0
TINY_VERSION = 1  # bump when a tiny config changes, so stale cached builds are not reused

PAPER_DIFFUSION_NOTE = (
    "Zero123-XL converted to diffusers by the author of the diffusers Zero1to3 community pipeline "
    "(github kxhit/zero123-hf, merged as examples/community/pipeline_zero1to3.py); the folder is a "
    "Zero1to3StableDiffusionPipeline: unet/ (8 input channels), vae/, image_encoder/, "
    "feature_extractor/, cc_projection/, scheduler/ (DDIM). Weights on main are .bin; a safetensors "
    "copy is at revision refs/pr/1. bennyguo/ and ashawkey/zero123-xl-diffusers hold the same "
    "weights for threestudio's Zero123Pipeline (clip_camera_projection/ instead of cc_projection/)."
)


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from.

    `id` is a hub repo id (`Intel/dpt-large`), a local folder, or for CLIP an open_clip model name
    (`ViT-B-32-quickgelu`, `hf-hub:org/repo`) or a local folder holding `open_clip_config.json`.
    `pretrained` is open_clip's weight tag (`openai`) for a built-in name; None elsewhere.
    """

    role: Role
    id: str
    pretrained: str | None = None
    revision: str | None = None
    note: str = ""


PRESETS: dict[str, dict[str, ModelRef]] = {
    "paper": {
        "depth": ModelRef(
            "depth",
            "Intel/dpt-large",
            note="DPT-Large (ViT-L/16, 384x384), predicts relative inverse depth; Apache-2.0",
        ),
        "clip": ModelRef(
            "clip",
            "ViT-B-32-quickgelu",
            pretrained="openai",
            note="CLIP ViT-B/32, OpenAI weights, 512-D embeddings, QuickGELU activations; MIT",
        ),
        "diffusion": ModelRef("diffusion", "kxic/zero123-xl", note=PAPER_DIFFUSION_NOTE),
        "masks": ModelRef(
            "masks",
            "jonathandinu/face-parsing",
            note="SegFormer-B5 face parsing (CelebAMask-HQ, 19 labels: skin, hair, ears, ...); not in the paper",
        ),
    },
    "tiny": {role: ModelRef(role, f"tiny:{role}", note="random weights built locally; tests only") for role in ROLES},
}

ALTERNATIVES: dict[str, ModelRef] = {
    "depth-anything-v2-small": ModelRef(
        "depth",
        "depth-anything/Depth-Anything-V2-Small-hf",
        note="Depth Anything V2 Small, relative inverse depth; Apache-2.0 (the Base and Large "
        "checkpoints are CC-BY-NC-4.0, non-commercial)",
    ),
}
"""Models a user may name with `--model NAME` instead of a preset's; loaded like the preset's."""

_FETCH_HINT = "run `nvf fetch-models` where the hub is reachable, or pass --preset tiny for a smoke run"
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_TRUE = {"1", "ON", "YES", "TRUE"}
_OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


# --- where models live -------------------------------------------------------------------------


def cache_dir() -> Path:
    """nvf's cache folder: `$NVF_CACHE`, else `$XDG_CACHE_HOME/nvf`, else `~/.cache/nvf`."""
    if os.environ.get("NVF_CACHE"):
        return Path(os.environ["NVF_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "nvf"


def hub_offline() -> bool:
    """True when `HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` is set to 1/on/yes/true."""
    return any(os.environ.get(name, "").strip().upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    """The model hub's base URL: `$HF_ENDPOINT`, else https://huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether a HEAD request to the hub endpoint gets an answer below 500. Never raises."""
    try:
        request = urllib.request.Request(hub_endpoint(), method="HEAD")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status) < 500
    except urllib.error.HTTPError as err:  # the server answered, just not with 2xx/3xx
        return err.code < 500
    except Exception:  # no route, DNS, TLS, timeout, malformed endpoint: not reachable
        return False


def resolve_model(role: Role, preset: str = "paper", override: str | None = None) -> ModelRef:
    """The model to load for `role` under `preset`, or `override` when given.

    `override` is a hub id, a local folder, a name from `ALTERNATIVES`, or for CLIP `NAME@TAG`
    (open_clip name and weight tag, e.g. `ViT-L-14@laion2b_s32b_b82k`) or `hf-hub:org/repo`.
    The `tiny` preset builds its model once into `cache_dir()/tiny/` and returns that folder.
    """
    if role not in ROLES:
        raise ValueError(f"unknown model role {role!r}; expected one of {ROLES}")
    if override:
        return _override_ref(role, override)
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if preset == "tiny":
        return ModelRef(role, str(_cached_tiny(role)), note=PRESETS["tiny"][role].note)
    return PRESETS[preset][role]


def _override_ref(role: Role, override: str) -> ModelRef:
    if override in ALTERNATIVES:
        ref = ALTERNATIVES[override]
        if ref.role != role:
            raise InputError(f"{override!r} is a {ref.role} model, not a {role} model")
        return ref
    if role != "clip" or _looks_local(override) or override.startswith("hf-hub:"):
        return ModelRef(role, override)
    name, sep, tag = override.partition("@")
    if not sep or not name or not tag:
        raise InputError(
            f"CLIP model {override!r} names no weights: pass NAME@TAG (e.g. "
            "ViT-B-32-quickgelu@openai), hf-hub:org/repo, or a local open_clip folder"
        )
    return ModelRef("clip", name, pretrained=tag)


def _looks_local(model_id: str) -> bool:
    """A path rather than a hub id: exists, or starts like a path (/, ./, ../, ~)."""
    return model_id.startswith(("/", "./", "../", "~")) or Path(model_id).exists()


def _local_folder(ref: ModelRef) -> Path | None:
    """`ref.id` as a local folder, or None for a hub id; ModelError if the folder is missing."""
    if not _looks_local(ref.id):
        return None
    folder = Path(ref.id).expanduser()
    if not folder.is_dir():
        raise ModelError(f"the {ref.role} model folder {folder} does not exist: check the path, or {_FETCH_HINT}")
    return folder


def _load_failed(ref: ModelRef, err: BaseException) -> ModelError:
    reason = " ".join(str(err).split())[:300] or type(err).__name__
    where = " (offline: HF_HUB_OFFLINE is set)" if hub_offline() else ""
    return ModelError(f"cannot load the {ref.role} model {ref.id!r}{where}: {reason}. Fix: {_FETCH_HINT}")


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What a failed from_pretrained raises: missing files, offline, bad folder, hub HTTP errors."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    try:
        from huggingface_hub.errors import EntryNotFoundError  # not an OSError in hub 1.x/2.x

        errors.append(EntryNotFoundError)
    except ImportError:  # older huggingface_hub: its errors are OSErrors already
        pass
    return tuple(errors)


def _from_pretrained_kwargs(ref: ModelRef) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"local_files_only": hub_offline()}
    if ref.revision:
        kwargs["revision"] = ref.revision
    return kwargs


# --- loading -----------------------------------------------------------------------------------


def load_depth_model(
    ref: ModelRef, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode on `device`, image processor) for a transformers depth model.

    The model maps `pixel_values` [B, 3, H, W] to `predicted_depth` [B, H, W]: relative inverse
    depth (disparity-like, larger = nearer) for DPT and Depth Anything.
    """
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    folder = _local_folder(ref)
    source = str(folder) if folder else ref.id
    kwargs = _from_pretrained_kwargs(ref)
    try:
        processor = AutoImageProcessor.from_pretrained(source, **kwargs)
        model = AutoModelForDepthEstimation.from_pretrained(source, **kwargs)
    except _hub_errors() as err:
        raise _load_failed(ref, err) from err
    # cast after loading: the dtype keyword was renamed (torch_dtype -> dtype) across transformers
    return model.to(device=device, dtype=dtype).eval(), processor


def load_segmentation_model(
    ref: ModelRef, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode on `device`, image processor) for a transformers semantic segmentation model.

    The model maps `pixel_values` [B, 3, h, w] to `logits` [B, L, h', w'] (SegFormer: h' = h / 4) over
    the labels of `model.config.id2label`.
    """
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    folder = _local_folder(ref)
    source = str(folder) if folder else ref.id
    kwargs = _from_pretrained_kwargs(ref)
    try:
        processor = AutoImageProcessor.from_pretrained(source, **kwargs)
        model = AutoModelForSemanticSegmentation.from_pretrained(source, **kwargs)
    except _hub_errors() as err:
        raise _load_failed(ref, err) from err
    return model.to(device=device, dtype=dtype).eval(), processor


def load_clip_model(
    ref: ModelRef, device: torch.device | str = "cpu", precision: str = "fp32"
) -> tuple[torch.nn.Module, Callable[[Any], torch.Tensor], int]:
    """(open_clip model in eval mode, its image preprocess, embedding size D).

    `preprocess(PIL image) -> [3, S, S]`; `model.encode_image([B, 3, S, S]) -> [B, D]`
    (not normalised). A built-in name whose weight tag was trained with QuickGELU gets QuickGELU.
    A local folder is open_clip's hub layout (`open_clip_config.json` + weights).
    """
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    folder = _local_folder(ref)
    kwargs: dict[str, Any] = {"device": torch.device(device), "precision": precision}
    try:
        if folder is not None:
            name, local_kwargs = _register_open_clip_folder(folder)
            kwargs.update(local_kwargs)
        else:
            name = ref.id  # a built-in name (with a weight tag) or hf-hub:org/repo
            if not name.startswith("hf-hub:"):
                kwargs["pretrained"] = ref.pretrained
                tag_cfg = get_pretrained_cfg(name, ref.pretrained) if ref.pretrained else {}
                kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        model, _, preprocess = open_clip.create_model_and_transforms(name, **kwargs)
    except (RuntimeError, KeyError, *_hub_errors()) as err:  # open_clip: unknown name/tag -> RuntimeError
        raise _load_failed(ref, err) from err
    return model.eval(), preprocess, int(model.visual.output_dim)


def _register_open_clip_folder(folder: Path) -> tuple[str, dict[str, Any]]:
    """Make a local open_clip folder loadable by name: (name, create_model_and_transforms kwargs).

    open_clip 2.x loads only built-in or `hf-hub:` configs, so the folder's `model_cfg` is copied to
    `cache_dir()/open_clip_configs/<name>.json` (name from a hash of the folder and its config) and
    registered with `open_clip.add_model_config`; the weights file goes in as `pretrained`, and the
    folder's `preprocess_cfg` as the image_* overrides. The same call works on open_clip 3.x.
    """
    import open_clip

    config_path = folder / "open_clip_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no open_clip_config.json (not an open_clip folder)")
    config = json.loads(config_path.read_text())
    model_cfg = config.get("model_cfg", config)
    weights = next((folder / f for f in _OPEN_CLIP_WEIGHTS if (folder / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder} holds no weights ({' or '.join(_OPEN_CLIP_WEIGHTS)})")
    digest = hashlib.sha1(f"{folder.resolve()}\n{json.dumps(model_cfg, sort_keys=True)}".encode())
    name = f"nvf-local-{digest.hexdigest()[:12]}"
    if name not in open_clip.list_models():
        registry = cache_dir() / "open_clip_configs"
        registry.mkdir(parents=True, exist_ok=True)
        target = registry / f"{name}.json"
        staging = registry / f".{name}.{os.getpid()}.json"
        staging.write_text(json.dumps(model_cfg, indent=2))
        os.replace(staging, target)
        open_clip.add_model_config(target)
    preprocess = config.get("preprocess_cfg", {})
    overrides = {
        "image_mean": preprocess.get("mean"),
        "image_std": preprocess.get("std"),
        "image_interpolation": preprocess.get("interpolation"),
        "image_resize_mode": preprocess.get("resize_mode"),
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    return name, {"pretrained": str(weights), **overrides}


def load_diffusion_parts(
    ref: ModelRef, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """`{"unet", "vae", "scheduler"}` from a diffusers folder or hub repo (subfolders of those names).

    unet: [B, 8, h, w] (noisy latent ‖ source latent) + encoder_hidden_states [B, L, C] -> [B, 4, h, w].
    vae: images in [-1, 1], latent scale factor `2 ** (len(vae.config.block_out_channels) - 1)`.
    scheduler: a DDIMScheduler built from the saved config (build others with `.from_config`).
    Zero123-XL's own image_encoder/ and cc_projection/ are not loaded: nvf conditions on its own
    CLIP embedding and pose projection.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    folder = _local_folder(ref)
    source = str(folder) if folder else ref.id
    kwargs = _from_pretrained_kwargs(ref)
    # without accelerate, diffusers falls back to low_cpu_mem_usage=False and warns each load
    low_mem = importlib.util.find_spec("accelerate") is not None
    try:
        unet = UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", torch_dtype=dtype, low_cpu_mem_usage=low_mem, **kwargs
        )
        vae = AutoencoderKL.from_pretrained(
            source, subfolder="vae", torch_dtype=dtype, low_cpu_mem_usage=low_mem, **kwargs
        )
        scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
    except _hub_errors() as err:
        raise _load_failed(ref, err) from err
    return {"unet": unet.to(device).eval(), "vae": vae.to(device).eval(), "scheduler": scheduler}


# --- tiny models -------------------------------------------------------------------------------


def build_tiny_depth(folder: Path | str) -> Path:
    """A 4-layer DPT (hidden 32, 64x64 input, ~136 k parameters) + its processor, in `folder`."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    folder = Path(folder)
    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=64,
        patch_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_in_index=-1,
        readout_type="project",
        is_hybrid=False,
    )
    with _seeded():
        model = DPTForDepthEstimation(config)
    model.save_pretrained(folder)
    # the same preprocessing as Intel/dpt-large, at 64x64
    DPTImageProcessor(
        size={"height": 64, "width": 64},
        keep_aspect_ratio=False,
        ensure_multiple_of=1,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(folder)
    return folder


def build_tiny_clip(folder: Path | str) -> Path:
    """A 2-layer ViT (32 px, patch 8) + 1-layer text tower with 512-D output, as an open_clip folder.

    The folder holds `open_clip_config.json` and `open_clip_model.safetensors` (open_clip's hub
    layout) and loads with `load_clip_model`. The full 49408-token vocabulary is kept so
    open_clip's tokenizer works with it (that table is most of its ~1.8 MB).
    """
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = {
        "embed_dim": 512,
        "quick_gelu": True,  # like the OpenAI weights the paper preset uses
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 8, "heads": 1, "layers": 1},
    }
    preprocess_cfg = {
        "mean": list(_OPENAI_MEAN),
        "std": list(_OPENAI_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    with _seeded():
        model = open_clip.CLIP(**model_cfg)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return folder


def build_tiny_diffusion(folder: Path | str) -> Path:
    """A Zero123-shaped UNet (8 in, 4 out channels, cross-attention 32), a 4-channel VAE and a DDIM
    scheduler, saved as `unet/`, `vae/`, `scheduler/` in `folder`.

    Shapes: unet [B, 8, h, w] + encoder_hidden_states [B, L, 32] -> [B, 4, h, w], h and w
    multiples of 2; vae [B, 3, H, W] <-> [B, 4, H/2, W/2] (the real VAE divides by 8).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    folder = Path(folder)
    with _seeded():
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=8,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=32,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=16,
            scaling_factor=0.18215,
        )
    # Stable Diffusion's (and Zero123's) noise schedule
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    scheduler.save_pretrained(folder / "scheduler")
    return folder


FACE_PARSING_LABELS: tuple[str, ...] = (
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth",
    "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)  # fmt: skip
"""The 19 CelebAMask-HQ labels of `jonathandinu/face-parsing`, in id order (eye_g: glasses, ear_r:
earring, neck_l: necklace)."""


def build_tiny_masks(folder: Path | str) -> Path:
    """A 2-stage SegFormer (hidden 8/16, decoder 16, ~7 k parameters, 64x64 input) with the
    face-parsing label set (`FACE_PARSING_LABELS` as id2label) + its processor, in `folder`."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    folder = Path(folder)
    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=len(FACE_PARSING_LABELS),
        id2label=dict(enumerate(FACE_PARSING_LABELS)),
        label2id={label: i for i, label in enumerate(FACE_PARSING_LABELS)},
    )
    with _seeded():
        model = SegformerForSemanticSegmentation(config)
    model.save_pretrained(folder)
    # the face-parsing model's preprocessing (ImageNet mean/std), at 64x64
    SegformerImageProcessor(size={"height": 64, "width": 64}, do_reduce_labels=False).save_pretrained(folder)
    return folder


_TINY_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "depth": build_tiny_depth,
    "clip": build_tiny_clip,
    "diffusion": build_tiny_diffusion,
    "masks": build_tiny_masks,
}


@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    """Run a block with torch's CPU generator seeded to TINY_SEED, restoring its state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        yield


def tiny_folder(role: Role) -> Path:
    """Where the tiny model for `role` is cached: `cache_dir()/tiny/<role>-v<TINY_VERSION>`."""
    return cache_dir() / "tiny" / f"{role}-v{TINY_VERSION}"


def _cached_tiny(role: Role) -> Path:
    """The tiny model folder for `role`, built first if absent (temp folder + rename: atomic)."""
    final = tiny_folder(role)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{role}-", dir=final.parent))
    try:
        _TINY_BUILDERS[role](staging)
        try:
            os.rename(staging, final)
        except OSError:
            if not final.is_dir():  # not a concurrent build that finished first
                raise
        log.info("built the tiny %s model in %s", role, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def model_fingerprint(ref: ModelRef) -> str:
    """A short hash naming a model's weights (cache keys): id + pretrained tag + revision, or a local folder's files.

    A local folder is fingerprinted by its JSON configs' contents and its weight files' sizes and
    modification times, so re-saving other weights into the same folder invalidates the cache.
    """
    parts: list[Any] = [ref.id, ref.pretrained, ref.revision]
    folder = Path(ref.id).expanduser()
    if folder.is_dir():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            if path.suffix == ".json":
                parts.append([rel, path.read_text(errors="replace")])
            else:
                stat = path.stat()
                parts.append([rel, stat.st_size, stat.st_mtime_ns])
    from stages.core.io import hash_inputs

    return hash_inputs(*parts)
