# One-command set-up: `make run` starts the demo service, `make test` runs lint, types and tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck pytest install bench docker-smoke clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/ood-serve --host $${OOD_HOST:-127.0.0.1} --port $${OOD_PORT:-8000}

lint: $(STAMP)
	$(BIN)/ruff check ood_core service tests bench
	$(BIN)/ruff format --check ood_core service tests bench
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

bench: $(STAMP)  # pytorch-ood 0.4.0 is the detectors' baseline: installed into build/, never a dependency
	$(BIN)/pip install --quiet --no-deps --target build/pood pytorch-ood==0.4.0
	$(BIN)/python bench/detectors.py --pood-path build/pood
	$(BIN)/python bench/serve.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info

docker-smoke: $(STAMP)  # the same venv as `make run` (the script uses its python for ports and checks)
	bash docker/smoke.sh
