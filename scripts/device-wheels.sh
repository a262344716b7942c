#!/usr/bin/env bash
# Wheels a bare GPU machine needs for the depth, embed, sample and train benchmarks, at this venv's
# versions, into .whl/ (in .gitignore). Such a machine has python3 with torch, transformers, numpy,
# safetensors, typer and rich; it lacks diffusers and open_clip (+ ftfy, wcwidth). pycolmap, open3d
# and nerfstudio are not carried: the poses and cloud benchmarks compare against CPU tools anyway.
# Usage: bash scripts/device-wheels.sh [PYTHON_VERSION (default 3.12)]; see benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
py_version="${1:-3.12}"
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
.venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py_version" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  "diffusers==$(version diffusers)" "open_clip_torch==$(version open_clip_torch)" \
  "ftfy==$(version ftfy)" "wcwidth==$(version wcwidth)"
ls -l .whl
