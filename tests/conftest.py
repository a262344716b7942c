"""Shared fixtures: offline hub, a private nvf cache, and small image trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network: the hub libraries must work from local folders only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def nvf_cache(tmp_path_factory) -> Path:
    """A per-session nvf cache, so tiny models are built once per run and never touch ~/.cache."""
    cache = tmp_path_factory.mktemp("nvf-cache")
    os.environ["NVF_CACHE"] = str(cache)
    return cache


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the checkout (real photos for checks); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-data check skipped: {SHARED_DATA} is absent (it ships beside the repo, not in it)")
    return SHARED_DATA
