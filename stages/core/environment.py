"""What nvf runs on: library versions, devices and their free memory, caches, hub reachability.

Versions come from package metadata (no heavy imports); devices from torch.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from stages import __version__

LIBRARIES = (
    "torch", "torchvision", "numpy", "pycolmap", "open3d", "transformers", "diffusers", "open_clip_torch",
    "nerfstudio", "safetensors", "typer", "rich",
)  # fmt: skip


def library_versions() -> dict[str, str | None]:
    """Installed version of each library nvf uses (None when missing)."""
    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def devices() -> list[dict]:
    """CPU (available RAM) and every CUDA device with free and total memory in GiB."""
    import torch

    from stages.core.batching import free_memory_bytes

    gib = 1024**3
    with open("/proc/meminfo") if Path("/proc/meminfo").exists() else open(os.devnull) as handle:
        total_kib = next((int(line.split()[1]) for line in handle if line.startswith("MemTotal")), 0)
    found = [{"name": f"cpu ({os.cpu_count()} cores)", "free_gib": free_memory_bytes(torch.device("cpu")) / gib,
              "total_gib": total_kib * 1024 / gib}]  # fmt: skip
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        free, total = torch.cuda.mem_get_info(index)
        found.append({"name": f"cuda:{index} {torch.cuda.get_device_name(index)}", "free_gib": free / gib,
                      "total_gib": total / gib})  # fmt: skip
    return found


def cache_folders() -> dict[str, str]:
    """Where downloaded and built models live."""
    from stages.core.models import cache_dir

    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    return {
        "nvf cache": str(cache_dir()),
        "huggingface hub": os.environ.get("HF_HUB_CACHE", str(hf_home / "hub")),
        "torch hub": str(torch_home / "hub"),
    }


def report() -> dict:
    """Everything `nvf info` shows, as plain JSON-able data."""
    from stages.core.models import hub_offline, hub_reachable

    offline = hub_offline()
    return {
        "nvf": __version__,
        "python": platform.python_version(),
        "libraries": library_versions(),
        "devices": devices(),
        "caches": cache_folders(),
        "hub": {
            "endpoint": os.environ.get("HF_ENDPOINT", "https://huggingface.co"),
            "offline": offline,
            "reachable": False if offline else hub_reachable(),
        },
    }
