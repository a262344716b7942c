# nvf: `make demo` runs the pipeline on synthetic data, `make test` runs the test suite.
# Both install first when needed (a .venv in this folder with the project and its dev tools).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NVF := $(VENV)/bin/nvf
STAMP := $(VENV)/.nvf-installed
DEMO ?= demo-out
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install test demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install-system-deps.sh
	bash scripts/install-system-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,face]"
	$(PY) -c "import torch, pycolmap, open3d, transformers, diffusers, open_clip, nerfstudio" 2>/dev/null
	touch $@

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

demo: install
	rm -rf $(DEMO)
	$(NVF) synth $(DEMO)/data --subjects 2 --resolution 192
	$(NVF) scan $(DEMO)/data --protocol P --list
	@if HF_HUB_OFFLINE=1 $(NVF) fetch-models --preset paper --no-check >/dev/null 2>&1; then preset=paper; else preset=tiny; \
	  echo "warning: the paper's models are not in the cache (run 'nvf fetch-models' where the model hub is reachable)," \
	       "so this demo uses the tiny random-weight models: every stage runs end to end, but depth maps, embeddings" \
	       "and clouds carry no meaning. Poses come from real SfM either way." >&2; fi; \
	set -x; $(NVF) run $(DEMO)/data $(DEMO)/work --preset $$preset
	$(NVF) evaluate --out $(DEMO)/report --poses $(DEMO)/work/001_01_01_00/poses.safetensors \
	  --poses-ref $(DEMO)/data/groundtruth/001_01_01_00/poses.safetensors
	sed -n '/^## Poses/,/^Protocol/p' $(DEMO)/report/report.md

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) -m benchmarks

clean:
	rm -rf $(DEMO) .pytest_cache
