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
# The venv's tools first (its ninja too): DeepSpeed's JIT extension build records the ninja it ran with, and
# a different ninja on a later run (Ray workers put the venv first) would rebuild it.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup curate demo train-base train-refine test test-unit test-integration bench clean

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

# Training (DeepSpeed; CPU here, the GPUs when CUDA is visible). The tiny recipes train on the shards of
# the bundled sample, curating it first when $(OUT)/shards is missing. NPROC=2 runs 2 processes under
# torchrun; CONFIG=configs/train/<recipe>.yaml picks another recipe, ARGS='key.sub=value ...' overrides.
NPROC ?= 1
ARGS ?=
TRAIN = $(if $(filter 1,$(NPROC)),$(BIN)/python -m training.train,$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m training.train)

# what `make curate` does, run only when its output is missing
$(OUT)/shards: | setup
	$(BIN)/python -m pipeline.curate --input tests/assets/sample --output $(OUT)

train-base: CONFIG ?= configs/train/tiny-base.yaml
train-base: setup | $(OUT)/shards  ## train the base stage (tiny recipe on CPU by default)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(TRAIN) --config $(CONFIG) $(ARGS)

train-refine: CONFIG ?= configs/train/tiny-refine.yaml
train-refine: setup | $(OUT)/shards  ## train the refinement stage (tiny recipe on CPU by default)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(TRAIN) --config $(CONFIG) $(ARGS)

demo: setup  ## the whole recipe on the bundled sample: curate, train base + refine, generate, evaluate (resumes)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m recipe.demo $(ARGS)

test: setup  ## the whole test suite (unit + integration), CPU only
	$(BIN)/python -m pytest -q --durations=15 tests

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit

test-integration: setup
	$(BIN)/python -m pytest -q tests/integration

bench: setup
	$(BIN)/python -m bench.curation

clean:
	rm -rf out runs .pytest_cache
