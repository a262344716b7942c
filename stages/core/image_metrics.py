"""Image metrics for novel views: PSNR, SSIM, LPIPS, CLIP/ArcFace identity similarity and FID.

Convention (recorded by `stages.evaluate` next to every figure):
    - Images are RGB float64 in [0, 1], shape ``[H, W, 3]`` (uint8 inputs are divided by 255);
      data range 1. A mask ``[H, W]`` (bool) restricts PSNR and SSIM to the pixels it marks.
    - PSNR = 10 log10(1 / MSE) over the (masked) pixels and all channels. Identical images have
      MSE 0 and PSNR = +inf: Python gets ``math.inf``; JSON has no infinity, so `stages.evaluate`
      writes ``null`` there with a note (see its docstring).
    - SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, population
      (not sample) covariances, the map averaged over the "valid" region (5 px border dropped, no
      padding) and over RGB channels: the same number as
      ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
      use_sample_covariance=False, data_range=1, channel_axis=-1)``.
    - LPIPS (Zhang et al. 2018, v0.1) through torchmetrics: its bundled linear-layer weights and
      torchvision's ImageNet backbone (AlexNet by default), inputs mapped [0, 1] -> [-1, 1]. The
      backbone weights are read from torch's hub cache only (never downloaded here):
      `lpips_weights_path` says where, `lpips_unavailable` why it cannot run.
    - Identity: cosine similarity of L2-normalised embeddings; I2O = mean over views of
      cos(input, view), O2O = mean over pairs i < j of cos(view_i, view_j), to-GT = per view
      cos(view, ground truth view). CLIP through `stages.core.models`; ArcFace (insightface,
      buffalo_l) only when installed with its weights.
    - FID: Inception-v3 pool-3 (2048-D) via torchmetrics/torch-fidelity, weights from the hub cache.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stages.core.errors import InputError, ModelError

log = logging.getLogger("nvf")

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # 11x11 window: skimage's truncate=3.5 gives int(3.5 * 1.5 + 0.5) = 5
SSIM_K1, SSIM_K2 = 0.01, 0.03

LpipsBackbone = Literal["alex", "vgg", "squeeze"]
# torchvision's ImageNet weight files (the basenames of `<Arch>_Weights.DEFAULT.url`), named here so that
# checking for them does not import torchvision
_LPIPS_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
_LPIPS_BUILDER = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}
FID_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
ARCFACE_PACK = "buffalo_l"


def as_float01(image: Any) -> np.ndarray:
    """An image as float64 in [0, 1]: uint8 is divided by 255, floats are kept (and checked)."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    image = image.astype(np.float64)
    if image.size and (np.nanmin(image) < -1e-6 or np.nanmax(image) > 1 + 1e-6):
        raise InputError("float images must lie in [0, 1]; pass uint8 or rescale first")
    return image


def _pair(pred: Any, ref: Any, mask: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    pred_hw3, ref_hw3 = as_float01(pred), as_float01(ref)
    if pred_hw3.shape != ref_hw3.shape or pred_hw3.ndim != 3 or pred_hw3.shape[-1] != 3:
        raise InputError(f"images must both be [H, W, 3] of one size, got {pred_hw3.shape} and {ref_hw3.shape}")
    if mask is None:
        return pred_hw3, ref_hw3, None
    mask_hw = np.asarray(mask, dtype=bool)
    if mask_hw.shape != pred_hw3.shape[:2]:
        raise InputError(f"mask must be [H, W] = {list(pred_hw3.shape[:2])}, got {list(mask_hw.shape)}")
    if not mask_hw.any():
        raise InputError("mask selects no pixel; nothing to score")
    return pred_hw3, ref_hw3, mask_hw


def composite_on_white(image: Any, mask_hw: Any) -> np.ndarray:
    """Image [H, W, 3] in [0, 1] with the pixels outside the mask set to white (1.0)."""
    image_hw3 = as_float01(image)
    return np.where(np.asarray(mask_hw, dtype=bool)[..., None], image_hw3, 1.0)


def psnr(pred: Any, ref: Any, mask: Any = None) -> float:
    """PSNR in dB (data range 1) over the masked pixels and all channels; +inf when identical."""
    pred_hw3, ref_hw3, mask_hw = _pair(pred, ref, mask)
    sq = (pred_hw3 - ref_hw3) ** 2
    mse = float(sq[mask_hw].mean() if mask_hw is not None else sq.mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def gaussian_1d(sigma: float = SSIM_SIGMA, radius: int = SSIM_RADIUS) -> np.ndarray:
    """Normalised Gaussian taps [2 radius + 1], float64."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def filter_valid(x_chw: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of [C, H, W] with a 1-D kernel along H then W."""
    from numpy.lib.stride_tricks import sliding_window_view

    k = len(kernel)
    rows = sliding_window_view(x_chw, k, axis=1) @ kernel  # [C, H-k+1, W]
    return sliding_window_view(rows, k, axis=2) @ kernel  # [C, H-k+1, W-k+1]


def ssim_map(pred: Any, ref: Any) -> np.ndarray:
    """SSIM map [H - 10, W - 10] (valid region of the 11x11 window), averaged over channels."""
    pred_hw3, ref_hw3, _ = _pair(pred, ref)
    if min(pred_hw3.shape[:2]) < 2 * SSIM_RADIUS + 1:
        raise InputError(f"SSIM needs images of at least {2 * SSIM_RADIUS + 1} px a side, got {pred_hw3.shape[:2]}")
    x, y = np.moveaxis(pred_hw3, -1, 0), np.moveaxis(ref_hw3, -1, 0)  # [3, H, W]
    g = gaussian_1d()
    mu_x, mu_y = filter_valid(x, g), filter_valid(y, g)
    var_x = filter_valid(x * x, g) - mu_x**2
    var_y = filter_valid(y * y, g) - mu_y**2
    cov = filter_valid(x * y, g) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data range 1
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean(axis=0)


def ssim(pred: Any, ref: Any, mask: Any = None) -> float:
    """Mean SSIM (11x11 Gaussian, sigma 1.5) over the valid region, restricted to the mask if given."""
    pred_hw3, ref_hw3, mask_hw = _pair(pred, ref, mask)
    s_map = ssim_map(pred_hw3, ref_hw3)
    if mask_hw is None:
        return float(s_map.mean())
    inner = mask_hw[SSIM_RADIUS:-SSIM_RADIUS, SSIM_RADIUS:-SSIM_RADIUS]
    if not inner.any():
        raise InputError("mask selects no pixel away from the 5 px SSIM border; nothing to score")
    return float(s_map[inner].mean())


# --- LPIPS -----------------------------------------------------------------------------------------


def lpips_weights_path(backbone: LpipsBackbone = "alex") -> Path:
    """Where torchvision keeps the backbone's ImageNet weights: ``<torch hub dir>/checkpoints/<file>``."""
    import torch

    if backbone not in _LPIPS_FILES:
        raise InputError(f"unknown LPIPS backbone {backbone!r}: choose alex, vgg or squeeze")
    return Path(torch.hub.get_dir()) / "checkpoints" / _LPIPS_FILES[backbone]


def lpips_fetch_hint(backbone: LpipsBackbone = "alex") -> str:
    """One line saying how to get the backbone weights onto an offline machine."""
    name = _LPIPS_BUILDER[backbone]
    return (
        f'where the network is reachable run `python -c "import torchvision; torchvision.models.{name}'
        f"(weights='DEFAULT')\"` (it caches {lpips_weights_path(backbone).name} in torch's hub cache), "
        f"or copy that file to {lpips_weights_path(backbone)} (set TORCH_HOME to move the cache)"
    )


def lpips_unavailable(backbone: LpipsBackbone = "alex") -> str | None:
    """Why LPIPS cannot run offline (missing package or backbone weights), or None when it can."""
    missing = [name for name in ("torchmetrics", "torchvision") if importlib.util.find_spec(name) is None]
    if missing:
        return f"LPIPS needs {' and '.join(missing)}: pip install torchmetrics torchvision"
    path = lpips_weights_path(backbone)
    if not path.is_file():
        return f"LPIPS ({backbone}) backbone weights are not in the local cache ({path}): {lpips_fetch_hint(backbone)}"
    return None


class LpipsScorer:
    """LPIPS v0.1 distances between image batches; construct only when `lpips_unavailable` is None."""

    def __init__(self, backbone: LpipsBackbone = "alex", device: str = "cpu") -> None:
        reason = lpips_unavailable(backbone)
        if reason is not None:
            raise ModelError(reason)
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.backbone = backbone
        self.device = device
        # the backbone file exists in the hub cache, so torchvision loads it without a download
        self.metric = LearnedPerceptualImagePatchSimilarity(net_type=backbone, reduction="none", normalize=True)
        self.metric = self.metric.to(device)

    def __call__(self, pred_bhw3: Sequence[Any], ref_bhw3: Sequence[Any], batch_size: int = 8) -> np.ndarray:
        """LPIPS [B] of image pairs ([H, W, 3] each, uint8 or [0, 1]); 0 for identical images."""
        import torch

        out = []
        for start in range(0, len(pred_bhw3), batch_size):
            pred = np.stack([as_float01(p) for p in pred_bhw3[start : start + batch_size]])
            ref = np.stack([as_float01(r) for r in ref_bhw3[start : start + batch_size]])
            pred_t = torch.as_tensor(pred, dtype=torch.float32, device=self.device).permute(0, 3, 1, 2)  # [B,3,H,W]
            ref_t = torch.as_tensor(ref, dtype=torch.float32, device=self.device).permute(0, 3, 1, 2)
            with torch.no_grad():
                value = self.metric.net(pred_t, ref_t, normalize=True)  # [B, 1, 1, 1]
            out.append(value.reshape(-1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)


# --- identity ------------------------------------------------------------------------------------


def _unit_rows(emb_nd: np.ndarray) -> np.ndarray:
    emb_nd = np.asarray(emb_nd, dtype=np.float64)
    return emb_nd / np.maximum(np.linalg.norm(emb_nd, axis=-1, keepdims=True), 1e-12)


def cosine_to(anchor_d: Any, emb_nd: Any) -> np.ndarray:
    """cos(anchor, row) [N] for every row of emb_nd (I2O per view, or view-to-GT with paired rows)."""
    return _unit_rows(emb_nd) @ _unit_rows(np.asarray(anchor_d)[None])[0]


def cosine_paired(a_nd: Any, b_nd: Any) -> np.ndarray:
    """cos(a_i, b_i) [N] of paired rows (generated view i vs its ground truth view)."""
    return np.sum(_unit_rows(a_nd) * _unit_rows(b_nd), axis=-1)


def mean_pairwise_cosine(emb_nd: Any) -> float:
    """O2O: mean cos(e_i, e_j) over pairs i < j; NaN with fewer than two rows."""
    unit = _unit_rows(emb_nd)
    if len(unit) < 2:
        return math.nan
    gram = unit @ unit.T
    upper = np.triu_indices(len(unit), k=1)
    return float(gram[upper].mean())


class ClipEmbedder:
    """CLIP image embeddings [N, D] (L2-normalised) through `stages.core.models`."""

    def __init__(self, preset: str = "paper", override: str | None = None, device: str = "cpu") -> None:
        from stages.core import models

        self.ref = models.resolve_model("clip", preset, override)
        self.model, self.preprocess, self.dim = models.load_clip_model(self.ref, device)
        self.device = device
        self.name = self.ref.id if not self.ref.pretrained else f"{self.ref.id}@{self.ref.pretrained}"
        if preset == "tiny" and not override:
            self.name = "tiny (random weights)"

    def __call__(self, images: Sequence[Any], batch_size: int = 16) -> np.ndarray:
        import torch
        from PIL import Image

        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = torch.stack([self.preprocess(Image.fromarray(_to_uint8(img))) for img in chunk]).to(
                self.device
            )  # [B, 3, S, S]
            with torch.no_grad():
                out.append(self.model.encode_image(pixels).float().cpu().numpy())
        return _unit_rows(np.concatenate(out)) if out else np.zeros((0, self.dim))


def _to_uint8(image: Any) -> np.ndarray:
    image = np.asarray(image)
    return image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def arcface_root() -> Path:
    """insightface's model root: ``$INSIGHTFACE_HOME`` or ``~/.insightface``."""
    return Path(os.environ.get("INSIGHTFACE_HOME", Path.home() / ".insightface")).expanduser()


def arcface_unavailable() -> str | None:
    """Why ArcFace identity cannot run offline, or None when insightface and its weights are present."""
    if importlib.util.find_spec("insightface") is None:
        return (
            "ArcFace skipped: insightface is not installed (pip install insightface onnxruntime; then put the "
            f"{ARCFACE_PACK} model pack in {arcface_root() / 'models' / ARCFACE_PACK})"
        )
    pack = arcface_root() / "models" / ARCFACE_PACK
    if not pack.is_dir() or not any(pack.glob("*.onnx")):
        return (
            f"ArcFace skipped: the {ARCFACE_PACK} model pack is not at {pack}; where the network is reachable run "
            f"`python -c \"from insightface.app import FaceAnalysis; FaceAnalysis(name='{ARCFACE_PACK}')"
            '.prepare(ctx_id=-1)"` and copy that folder here'
        )
    return None


class ArcFaceEmbedder:
    """ArcFace (insightface buffalo_l: RetinaFace + 5-point alignment + iresnet) embeddings.

    Returns [N, 512] L2-normalised rows, NaN rows where no face is detected (counted by callers).
    Construct only when `arcface_unavailable()` is None.
    """

    def __init__(self) -> None:
        reason = arcface_unavailable()
        if reason is not None:
            raise ModelError(reason)
        from insightface.app import FaceAnalysis

        self.app = FaceAnalysis(
            name=ARCFACE_PACK, root=str(arcface_root()), allowed_modules=["detection", "recognition"]
        )
        self.app.prepare(ctx_id=-1, det_size=(640, 640))
        self.name = f"insightface {ARCFACE_PACK} (ArcFace)"

    def __call__(self, images: Sequence[Any]) -> np.ndarray:
        rows = []
        for image in images:
            faces = self.app.get(_to_uint8(image)[..., ::-1].copy())  # insightface wants BGR
            if not faces:
                rows.append(np.full(512, np.nan))
                continue
            best = max(faces, key=lambda f: float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])))
            rows.append(np.asarray(best.normed_embedding, dtype=np.float64))
        return np.stack(rows) if rows else np.zeros((0, 512))


# --- FID -----------------------------------------------------------------------------------------


def fid_weights_path() -> Path:
    """torch-fidelity's Inception-v3 weights in torch's hub cache."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def fid_unavailable(n_images: int, min_images: int) -> str | None:
    """Why FID is not computed (too few images, package or weights missing), or None."""
    if n_images < min_images:
        return f"FID skipped: {n_images} image pairs, fewer than fid_min_images={min_images} (FID is biased below ~2k)"
    missing = [name for name in ("torchmetrics", "torch_fidelity") if importlib.util.find_spec(name) is None]
    if missing:
        return f"FID skipped: {' and '.join(missing)} not installed; pip install torchmetrics torch-fidelity"
    path = fid_weights_path()
    if not path.is_file():
        return (
            f"FID skipped: Inception-v3 weights are not at {path}; where the network is reachable run "
            '`python -c "from torchmetrics.image.fid import FrechetInceptionDistance as F; F()"`, or download '
            f"{FID_WEIGHTS_FILE} from the torch-fidelity v0.2.0 release into that folder"
        )
    return None


def fid(real: Sequence[Any], fake: Sequence[Any], device: str = "cpu", batch_size: int = 16) -> float:
    """FID between two image sets (Inception-v3 pool-3, 2048-D), images uint8 or [0, 1] [H, W, 3]."""
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(
        feature=2048, normalize=True, feature_extractor_weights_path=str(fid_weights_path())
    ).to(device)
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, len(images), batch_size):
            batch = np.stack([as_float01(i) for i in images[start : start + batch_size]])
            metric.update(torch.as_tensor(batch, dtype=torch.float32, device=device).permute(0, 3, 1, 2), real=is_real)
    return float(metric.compute())
