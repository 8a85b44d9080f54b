# Every target that runs something builds .venv first, so a fresh clone needs only
# Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lepton-mesh demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check lepton_mesh tests bench
	$(BIN)/ruff format --check lepton_mesh tests bench

format: $(STAMP)
	$(BIN)/ruff format lepton_mesh tests bench
	$(BIN)/ruff check --fix lepton_mesh tests bench

clean:
	rm -rf $(VENV) build *.egg-info
