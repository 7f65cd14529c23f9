# The two commands of the README: `make demo` and `make test`. Each creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: here that is a CPU wheel on disk; anything looser pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cascade demo --out $(OUT)

# Every tier (what CI runs). The gpu tier skips itself without CUDA.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fast tier only, for the edit-test loop.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python benchmarks/unet_throughput.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache

# Local services on 127.0.0.1, state in .services/ (infra/local/services.py, docs/deploy.md):
# MLflow, a Prefect server and a worker of the `cascade-process` pool. SERVICES_ARGS="--auth"
# turns on auth, "--ray" adds a Ray head. Then: eval "$(.venv/bin/python infra/local/services.py env)"
.PHONY: services-up services-down
SERVICES_ARGS ?=

services-up: $(STAMP)
	$(BIN)/python infra/local/services.py up $(SERVICES_ARGS)

services-down:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY)) infra/local/services.py down
