# I2VGen-XL recipe: curation (Ray) and training (DeepSpeed). `make demo` and `make test` are the two
# commands a new user needs; everything else is a building block.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out/curate-sample

# Every service binds loopback, no telemetry, extensions cached inside the repo (built once).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export PYTHONPATH := $(CURDIR)

.PHONY: setup curate demo test test-unit test-integration bench clean

setup: $(STAMP)  ## create .venv and install everything (idempotent)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PY) >/dev/null || { echo "need $(PY) (Python 3.11) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the pinned pair, so nothing later swaps it for another build
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -c constraints.txt -e '.[test,bench]'
	touch $@

curate: setup  ## curate the bundled sample inputs into $(OUT)
	$(BIN)/python -m pipeline.curate --input tests/assets/sample --output $(OUT)

demo: setup curate  ## set up and run the main job on the bundled default
	@echo "demo done: see $(OUT)/stats.json and $(OUT)/manifest/"

test: setup  ## the whole test suite (unit + integration), CPU only
	$(BIN)/python -m pytest -q tests

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit

test-integration: setup
	$(BIN)/python -m pytest -q tests/integration

bench: setup
	$(BIN)/python -m bench.curation

clean:
	rm -rf out runs .pytest_cache
