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
	HF_HUB_OFFLINE=1 $(NVF) run $(DEMO)/data $(DEMO)/work --config examples/demo.toml
	sed -n '/^## Poses/,/^Protocol/p' $(DEMO)/work/report/report.md
	@echo "report: $(DEMO)/work/report/report.md, figures in $(DEMO)/work/report/figures/"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) -m benchmarks

clean:
	rm -rf $(DEMO) .pytest_cache
