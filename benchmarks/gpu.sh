#!/usr/bin/env bash
# Everything nvf measures on a GPU, in one command: bash benchmarks/gpu.sh OUT_FOLDER
#
# For a bare CUDA machine with python3, torch, transformers, numpy, safetensors, typer and rich but no
# network (a lent H100/H200): it installs the wheels in .whl/ (fetch them first, where pip works, with
# `bash scripts/device-wheels.sh`), prints the card and versions, runs the CUDA tests
# (tests/test_cuda.py: every stage's CUDA path against the CPU, on tiny models), then each benchmark in
# its own process under its own time limit (cloud, depth, embed, sample, train: their CUDA branches run
# the paper's model sizes). Writes OUT/gpu.log (everything printed), OUT/env.json (card, driver,
# versions), OUT/cuda-tests.xml (JUnit) and OUT/bench.json (every result, plus one entry per benchmark
# that failed or ran out of time). A failing part does not stop the others; the exit status is 1 when
# any part failed. About 6.5 minutes on an H200. NVF_GPU_BENCHMARKS="depth:140 train:90" runs only those.
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu.sh OUT_FOLDER}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
exec > >(tee -a "$out/gpu.log") 2>&1
failed=0
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }

site=/tmp/nvf-gpu-site
if compgen -G ".whl/*.whl" >/dev/null; then
  stamp "installing $(ls .whl | wc -l) wheel(s) from .whl/ into $site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "error: the wheels in .whl/ did not install"; exit 1; }
  export PYTHONPATH="$site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
export NVF_CACHE="${NVF_CACHE:-/tmp/nvf-gpu-cache}"

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || failed=1
python3 - "$out/env.json" <<'EOF' || failed=1
import importlib.metadata as md, json, platform, sys, torch
names = ["torch", "transformers", "numpy", "diffusers", "open_clip_torch", "safetensors", "huggingface_hub", "timm",
         "torchvision", "pillow", "typer", "rich"]
env = {"python": platform.python_version(), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
       "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None,
       "cpu_count": __import__("os").cpu_count(), "versions": {}}
for name in names:
    try:
        env["versions"][name] = md.version(name)
    except md.PackageNotFoundError:
        env["versions"][name] = None
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env))
EOF

stamp "CUDA tests (tests/test_cuda.py)"
timeout 60 python3 -m pytest tests/test_cuda.py -q -rA -p no:cacheprovider --junitxml="$out/cuda-tests.xml" || failed=1

parts=()
# name:seconds; with the tests the limits add up to 9.5 minutes (a lent machine runs a command 10);
# measured on an H200: tests 35 s, cloud 12, depth 102, sample 55, train 88
for spec in ${NVF_GPU_BENCHMARKS:-cloud:30 depth:130 embed:150 sample:80 train:120}; do
  name="${spec%%:*}" limit="${spec##*:}"
  stamp "benchmark $name (at most ${limit}s)"
  rm -f "$out/bench-$name.json"
  timeout "$limit" python3 -m benchmarks "$name" --json "$out/bench-$name.json"
  status=$?
  if [ "$status" -ne 0 ]; then
    failed=1
    echo "benchmark $name failed with status $status$([ "$status" -eq 124 ] && echo ' (time limit; results so far kept)')"
    if ! [ -s "$out/bench-$name.json" ]; then
      printf '[{"name": "%s", "error": "exit status %s"}]\n' "$name" "$status" >"$out/bench-$name.json"
    fi
  fi
  parts+=("$out/bench-$name.json")
done
python3 - "$out/bench.json" "${parts[@]}" <<'EOF'
import json, pathlib, sys
results = []
for part in map(pathlib.Path, sys.argv[2:]):
    results += json.loads(part.read_text())
    part.unlink()
pathlib.Path(sys.argv[1]).write_text(json.dumps(results, indent=2) + "\n")
print(f"{len(results)} result(s) in {sys.argv[1]}")
EOF
stamp "done (failed=$failed)"
exit "$failed"
