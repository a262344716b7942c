"""nvf fetch-models: offline it fails at once naming what is missing; the tiny preset builds and loads."""

from __future__ import annotations

import time

import pytest

from stages import fetch
from stages.core.errors import ModelError

PAPER = ("Intel/dpt-large", "jonathandinu/face-parsing", "ViT-B-32-quickgelu@openai", "kxic/zero123-xl", "alexnet-owt-7be5be79.pth",
         "weights-inception-2015-12-05")  # fmt: skip


def test_the_paper_preset_lists_every_weight_a_stage_loads():
    listed = {w.name: w.source for w in fetch.weights("paper")}
    assert list(listed) == ["depth", "masks", "clip", "diffusion", "lpips-alexnet", "fid-inception"]
    assert all(any(name in source for source in listed.values()) for name in PAPER)


def test_offline_it_fails_fast_naming_every_missing_weight(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clock = time.perf_counter()
    with pytest.raises(ModelError) as failure:
        fetch.run("paper", tmp_path / "cache")
    assert time.perf_counter() - clock < 10
    message = str(failure.value)
    assert "\n" not in message and "offline" in message
    assert all(name in message for name in PAPER)
    assert str(tmp_path / "cache" / "huggingface" / "hub") in message  # where it looked


def test_an_unreachable_network_fails_fast_too(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):  # torch and GitHub downloads too
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    clock = time.perf_counter()
    with pytest.raises(ModelError, match=r"depth \(Intel/dpt-large: 127.0.0.1:9 unreachable") as failure:
        fetch.run("paper", tmp_path / "cache")
    assert time.perf_counter() - clock < 20
    assert "lpips-alexnet" in str(failure.value) and "download.pytorch.org unreachable" in str(failure.value)


def test_tiny_preset_builds_checks_offline_and_prints_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NVF_CACHE", str(tmp_path / "elsewhere"))  # restored after the test
    result = fetch.run("tiny", tmp_path / "cache")
    tiny = ("depth-tiny", "clip-tiny", "diffusion-tiny", "masks-tiny")
    assert result.statuses == dict.fromkeys(tiny, "built")
    assert result.checks == dict.fromkeys(tiny, "ok")  # a fresh offline process
    assert result.env["NVF_CACHE"] == str(tmp_path / "cache" / "nvf") and result.env["HF_HUB_OFFLINE"] == "1"
    assert (tmp_path / "cache" / "nvf" / "tiny").is_dir()
    again = fetch.run("tiny", tmp_path / "cache", check=False)
    assert set(again.statuses.values()) == {"cached"}
