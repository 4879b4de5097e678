# Two commands do everything on a fresh machine: `make run` and `make test`.
# Each creates .venv when it is missing and installs the project into it.
VENV      ?= .venv
PYTHON    ?= python3
# CPU build by default (on these machines it lies on disk). GPU users: see README, "GPU".
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export MLFLOW_ENABLE_TELEMETRY ?= false
export PYTHONUNBUFFERED ?= 1

.PHONY: run test install lint bench-data lock clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/mlops run
	@echo
	@echo "Next (the commands are in .venv/bin: 'source .venv/bin/activate' puts them on PATH):"
	@echo "  .venv/bin/mlops status                 champion, challenger and the promotion ledger"
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
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^torch==' > constraints.txt

clean:
	rm -rf $(VENV) data/raw data/processed data/quarantine data/reports mlruns mlartifacts mlflow.db
