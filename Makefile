# Each target creates .venv if it is missing.
# TORCH: the PyTorch requirement installed *before* the project, so that pip does not pick a
# multi-GB CUDA build on its own. Sites with GPUs can pass e.g. TORCH='torch==2.13.0' with
# their CUDA index (PIP_EXTRA_INDEX_URL) or keep a CUDA build already in the venv.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedpriv-installed

.PHONY: install demo test test-deployment lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## demo: 5 simulated hospitals on an embedded dataset, live progress and a summary table
## (DP at epsilon 4 per hospital), then every attack on a small budget, report.html
DEMO_RUN := demo-$(shell date +%Y%m%d-%H%M%S)
demo: $(STAMP)
	$(BIN)/fedpriv simulate --dataset breast-cancer --hospitals 5 --rounds 10 --out runs --name $(DEMO_RUN)
	$(BIN)/fedpriv audit runs/$(DEMO_RUN) --reference-models 2 --inversion-records 2 --inversion-steps 300

# pytest's "no tests" (exit 5) fails
PYTEST = $(BIN)/python -m pytest
CHECK_COLLECTED = rc=$$?; if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

## test: unit and integration tests (real Flower simulations, real Opacus, TenSEAL, SQLite)
test: $(STAMP)
	$(PYTEST) tests/unit tests/integration; $(CHECK_COLLECTED)

## test-deployment: real SuperLink / SuperNode processes with TLS (slow: Flower's heartbeats)
test-deployment: $(STAMP)
	$(PYTEST) tests/deployment; $(CHECK_COLLECTED)

lint: $(STAMP)
	$(BIN)/ruff check fedpriv tests benchmarks
	$(BIN)/ruff format --check fedpriv tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
