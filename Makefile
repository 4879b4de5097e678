# Two commands do everything on a fresh machine: `make run` and `make test`.
# Each creates .venv when it is missing and installs the project into it.
VENV      ?= .venv
PYTHON    ?= python3
# CPU build by default (on these machines it lies on disk). GPU users: see README, "GPU".
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
INSTALLER ?= uv
UV_SPEC   ?= uv==0.13.9
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export MLFLOW_ENABLE_TELEMETRY ?= false
export PYTHONUNBUFFERED ?= 1

.PHONY: run test install lint bench-data lock clean

# PyTorch goes in first with pip (it takes the build lying on disk, or TORCH_PIP_ARGS' index);
# the rest with uv, resolved against the same constraints (about 15x faster than pip here).
# INSTALLER=pip, or a uv that fails (no PyPI, a private index uv is not told of through
# UV_INDEX_URL), installs the rest with plain pip instead.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing $(TORCH_SPEC) into $(VENV) with pip, then the project with $(INSTALLER)"
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	@if [ "$(INSTALLER)" = uv ] && $(BIN)/python -m pip install -q "$(UV_SPEC)" \
	   && $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -c constraints.txt -e ".[dev]"; then :; \
	 else echo "installing the project with pip (INSTALLER=$(INSTALLER); uv is skipped or failed)"; \
	   $(BIN)/python -m pip install -q --upgrade pip \
	   && $(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"; fi
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/mlops run
	@echo
	@echo "Next (the commands are in .venv/bin: 'source .venv/bin/activate' puts them on PATH):"
	@echo "  .venv/bin/mlops status                 champion, challenger, the ledger, shadow, canary, live accuracy"
	@echo "  .venv/bin/mlops run --faulty-candidate a canary rolled back by its guard rails"
	@echo "  .venv/bin/mlops label-queue --budget 20  the predictions most worth labelling"
	@echo "  .venv/bin/mlops ui                     the MLflow UI on the runs and the registry"
	@echo "  .venv/bin/mlops serve                  the prediction server on the champion (:8000/docs)"
	@echo "  .venv/bin/mlops lineage PREDICTION_ID  a prediction (an id from a /predict answer) back to its data"
	@echo "  .venv/bin/dvc repro                    the dvc.yaml stages, reproducibly"

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

bench-data: $(STAMP)
	$(BIN)/python bench/data.py

# Re-record the exact versions the tests passed with (torch is installed separately).
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -e '^torch==' -e '^uv==' > constraints.txt

clean:
	rm -rf $(VENV) data/raw data/processed data/quarantine data/reports mlruns mlartifacts mlflow.db
