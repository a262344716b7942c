"""`nvf fetch-models`: put every weight a stage loads into the caches, check each loads offline, and
say which environment variables make compute nodes use those caches without a network.

The weights (`weights(preset)`), for the `paper` preset:

- depth: the preset's depth model (`Intel/dpt-large`), a hub repo -> the Hugging Face hub cache;
- masks: the face-parsing SegFormer of `nvf masks` (`jonathandinu/face-parsing`) -> the hub cache;
- clip: open_clip `ViT-B-32-quickgelu` with OpenAI weights (hub repo `timm/vit_base_patch32_clip_224.openai`);
- diffusion: the base model of `nvf train`/`sample` (`kxic/zero123-xl`: unet/, vae/, scheduler/);
- lpips-alexnet: torchvision's ImageNet AlexNet (LPIPS in `nvf evaluate` and nerfstudio's
  `nvf reconstruct`) -> torch's hub cache (`$TORCH_HOME/hub/checkpoints`);
- fid-inception: torch-fidelity's Inception-v3 (FID in `nvf evaluate`) -> the same folder.

The `tiny` preset builds the tiny local models into the nvf cache instead (no network).

Layout under ``--cache DIR``: ``DIR/huggingface`` (HF_HOME; hub cache in ``hub/``), ``DIR/torch``
(TORCH_HOME), ``DIR/nvf`` (NVF_CACHE). Without it, the caches the environment already names.
With ``HF_HUB_OFFLINE=1`` (or an unreachable hub / download host) nothing is downloaded: what the
caches lack is named in one ModelError, at once, instead of after network timeouts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stages.core import models
from stages.core.errors import InputError, ModelError

log = logging.getLogger("nvf")

Kind = Literal["hf", "open_clip", "url", "tiny"]
DIFFUSION_FILES = ("model_index.json", "unet/*", "vae/*", "scheduler/*")  # what load_diffusion_parts reads
LPIPS_ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
FID_INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_REACH_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Weight:
    """One set of weights: what it is, where it comes from, which command loads it."""

    name: str
    kind: Kind
    source: str
    """hf: repo id; open_clip: NAME@TAG; url: the file's URL; tiny: the model role."""
    used_by: str
    revision: str | None = None


@dataclass(frozen=True)
class Caches:
    """Where weights go: the Hugging Face home and hub cache, torch's home, nvf's cache."""

    hf_home: Path
    hub: Path
    torch_home: Path
    nvf: Path

    @classmethod
    def from_env(cls, root: str | os.PathLike | None = None) -> Caches:
        """Under ``root`` (``--cache``), else from HF_HOME / HF_HUB_CACHE / TORCH_HOME / NVF_CACHE."""
        if root is not None:
            root = Path(root).expanduser().resolve()
            return cls(root / "huggingface", root / "huggingface" / "hub", root / "torch", root / "nvf")
        home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
        hub = Path(os.environ.get("HF_HUB_CACHE", home / "hub")).expanduser()
        torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")).expanduser()
        return cls(home, hub, torch_home, models.cache_dir())

    def env(self) -> dict[str, str]:
        """The variables a compute node needs to find these caches and never reach the network."""
        return {
            "HF_HOME": str(self.hf_home),
            "HF_HUB_CACHE": str(self.hub),
            "TORCH_HOME": str(self.torch_home),
            "NVF_CACHE": str(self.nvf),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }

    def checkpoint(self, url: str) -> Path:
        """Where torch.hub keeps a downloaded checkpoint."""
        return self.torch_home / "hub" / "checkpoints" / Path(urllib.parse.urlparse(url).path).name


def weights(preset: str = "paper") -> list[Weight]:
    """Every weight the stages load under ``preset``."""
    if preset == "tiny":
        return [Weight(f"{role}-tiny", "tiny", role, f"tiny preset ({role})") for role in models.ROLES]
    if preset not in models.PRESETS:
        raise InputError(f"unknown preset '{preset}': choose one of {', '.join(models.PRESETS)}")
    refs = models.PRESETS[preset]
    clip = refs["clip"]
    return [
        Weight("depth", "hf", refs["depth"].id, "nvf depth", refs["depth"].revision),
        Weight("masks", "hf", refs["masks"].id, "nvf masks", refs["masks"].revision),
        Weight("clip", "open_clip", f"{clip.id}@{clip.pretrained}", "nvf embed, nvf evaluate (identity)"),
        Weight("diffusion", "hf", refs["diffusion"].id, "nvf train, nvf sample", refs["diffusion"].revision),
        Weight("lpips-alexnet", "url", LPIPS_ALEXNET_URL, "nvf evaluate (LPIPS), nvf reconstruct (nerfstudio)"),
        Weight("fid-inception", "url", FID_INCEPTION_URL, "nvf evaluate (FID)"),
    ]


# ----------------------------------------------------------------------------------------------
# Present in the cache?
# ----------------------------------------------------------------------------------------------


def _open_clip_repo(source: str) -> tuple[str, str | None]:
    """(hub repo, revision) open_clip downloads NAME@TAG from."""
    from open_clip.pretrained import get_pretrained_cfg

    name, _, tag = source.partition("@")
    cfg = get_pretrained_cfg(name, tag)
    if not cfg:
        raise InputError(f"open_clip knows no weights '{tag}' for '{name}'")
    repo, _, revision = cfg.get("hf_hub", "").rstrip("/").partition("@")
    if not repo:
        raise ModelError(f"open_clip's {source} has no hub copy; nvf fetch-models only fetches hub-hosted CLIP weights")
    return repo, revision or None


def present(weight: Weight, caches: Caches) -> bool:
    """Whether the weight is in the caches already (nothing is downloaded)."""
    if weight.kind == "tiny":
        return models.tiny_folder(weight.source).is_dir()  # type: ignore[arg-type]
    if weight.kind == "url":
        return caches.checkpoint(weight.source).is_file()
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    if weight.kind == "open_clip":
        repo, revision = _open_clip_repo(weight.source)
        return any(isinstance(try_to_load_from_cache(repo, name, cache_dir=caches.hub, revision=revision), str)
                   for name in _OPEN_CLIP_FILES)  # fmt: skip
    try:
        folder = Path(snapshot_download(weight.source, revision=weight.revision, cache_dir=caches.hub,
                                        local_files_only=True))  # fmt: skip
    except Exception:  # LocalEntryNotFoundError and friends: not cached
        return False
    wanted = ("unet", "vae", "scheduler") if weight.name == "diffusion" else ()
    has_weights = any(folder.rglob("*.safetensors")) or any(folder.rglob("*.bin"))
    return has_weights and all((folder / sub).is_dir() for sub in wanted)


# ----------------------------------------------------------------------------------------------
# Download
# ----------------------------------------------------------------------------------------------


def reachable(weight: Weight) -> str | None:
    """None when the weight's host answers (within a few seconds), else why not."""
    if weight.kind == "tiny":
        return None
    if models.hub_offline():
        return "offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set)"
    url = weight.source if weight.kind == "url" else models.hub_endpoint()
    try:
        request = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(request, timeout=_REACH_TIMEOUT_S):
            return None
    except urllib.error.HTTPError as err:  # the server answered
        return None if err.code < 500 else f"{urllib.parse.urlparse(url).netloc} answered {err.code}"
    except Exception as exc:
        reason = getattr(exc, "reason", exc)
        return f"{urllib.parse.urlparse(url).netloc or url} unreachable ({reason})"


def download(weight: Weight, caches: Caches) -> None:
    """Fetch (or, tiny, build) one weight into the caches."""
    if weight.kind == "tiny":
        models.resolve_model(weight.source, "tiny")  # type: ignore[arg-type]
        return
    if weight.kind == "url":
        import torch

        target = caches.checkpoint(weight.source)
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weight.source, str(target), progress=False)  # temp file + move
        return
    from huggingface_hub import list_repo_files, snapshot_download

    if weight.kind == "open_clip":
        from open_clip.pretrained import download_pretrained_from_hf

        repo, revision = _open_clip_repo(weight.source)
        download_pretrained_from_hf(repo, revision=revision, cache_dir=str(caches.hub))
        return
    files = list_repo_files(weight.source, revision=weight.revision)
    safetensors = any(name.endswith(".safetensors") for name in files)
    patterns = ["*.json", "*.txt", "*.safetensors" if safetensors else "*.bin"]
    if weight.name == "diffusion":
        patterns = [p if "*" not in p else f"{sub}/{p}" for sub in ("unet", "vae", "scheduler") for p in patterns]
        patterns.append("model_index.json")
    snapshot_download(weight.source, revision=weight.revision, cache_dir=caches.hub, allow_patterns=patterns)


# ----------------------------------------------------------------------------------------------
# Load check (in a fresh, offline process: proves the printed environment is enough)
# ----------------------------------------------------------------------------------------------


def check_loads(preset: str) -> dict[str, str]:
    """Load every weight of ``preset`` through the stages' own loaders; {name: "ok" | error}. Meant
    to run in a process whose environment is `Caches.env()` (offline)."""
    results: dict[str, str] = {}
    for weight in weights(preset):
        try:
            _LOADERS[weight.kind if weight.kind != "tiny" else "tiny"](weight, preset)
            results[weight.name] = "ok"
        except Exception as exc:  # report every failure, not just the first
            results[weight.name] = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    return results


def _load_model(weight: Weight, preset: str) -> None:
    role = weight.source if weight.kind == "tiny" else weight.name
    ref = models.resolve_model(role, preset)  # type: ignore[arg-type]
    {"depth": models.load_depth_model, "clip": models.load_clip_model, "diffusion": models.load_diffusion_parts,
     "masks": models.load_segmentation_model}[role](ref)  # fmt: skip


def _load_checkpoint(weight: Weight, preset: str) -> None:
    import torch

    path = Caches.from_env().checkpoint(weight.source)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if weight.name == "lpips-alexnet":
        import torchvision

        torchvision.models.alexnet().load_state_dict(state)
    elif not state:
        raise ModelError(f"{path}: empty checkpoint")


_LOADERS: dict[str, Callable[[Weight, str], None]] = {
    "hf": _load_model, "open_clip": _load_model, "tiny": _load_model, "url": _load_checkpoint,
}  # fmt: skip


def check_in_subprocess(preset: str, caches: Caches) -> dict[str, str]:
    """`check_loads` in a fresh Python with the offline environment `caches.env()`."""
    env = {**os.environ, **caches.env()}
    code = f"import json; from stages.fetch import check_loads; print(json.dumps(check_loads({preset!r})))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = " ".join(done.stderr.strip().splitlines()[-1:]) or f"exit code {done.returncode}"
        raise ModelError(f"the offline load check could not run: {tail}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """What fetch did per weight (`status`: cached, fetched, built) and the offline environment."""

    statuses: dict[str, str]
    checks: dict[str, str]
    env: dict[str, str]


def run(preset: str = "paper", cache: Path | None = None, *, check: bool = True,
        progress: Callable[[int, int], None] | None = None) -> Result:  # fmt: skip
    """Fetch every weight of ``preset`` that the caches lack, then check each loads offline.

    Raises ModelError naming every weight that is missing and cannot be fetched (offline, host
    unreachable, download failed), and every weight that fails to load.
    """
    caches = Caches.from_env(cache)
    # this process's own tiny builds go to the chosen caches too, for the length of the call
    with _environ({k: v for k, v in caches.env().items() if not k.endswith("OFFLINE")} if cache is not None else {}):
        statuses = _fetch_all(weights(preset), caches, progress)
    checks = check_in_subprocess(preset, caches) if check else {}
    failed = {name: error for name, error in checks.items() if error != "ok"}
    if failed:
        raise ModelError("fetched but not loadable offline: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return Result(statuses, checks, caches.env())


def _fetch_all(todo: list[Weight], caches: Caches, progress: Callable[[int, int], None] | None) -> dict[str, str]:
    statuses: dict[str, str] = {}
    missing: list[str] = []
    if progress is not None:
        progress(0, len(todo))
    for number, weight in enumerate(todo, start=1):
        if present(weight, caches):
            statuses[weight.name] = "cached"
        else:
            why = reachable(weight)
            if why is not None:
                missing.append(f"{weight.name} ({weight.source}: {why})")
            else:
                log.info("fetch: %s <- %s", weight.name, weight.source)
                try:
                    download(weight, caches)
                    statuses[weight.name] = "built" if weight.kind == "tiny" else "fetched"
                except Exception as exc:  # the download itself failed: name it with the others
                    missing.append(f"{weight.name} ({weight.source}: {' '.join(str(exc).split())[:200]})")
        if progress is not None:
            progress(number, len(todo))
    if missing:
        raise ModelError(f"missing from the caches and not fetched: {'; '.join(missing)}. Run nvf fetch-models where "
                         f"the network is reachable (same --cache), or copy {caches.hub} and {caches.torch_home} "
                         "from a machine that has them")  # fmt: skip
    return statuses


@contextlib.contextmanager
def _environ(changes: dict[str, str]) -> Iterator[None]:
    """Set environment variables for a block, restoring the old values afterwards."""
    saved = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
