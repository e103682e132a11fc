# One place for set-up and common jobs. Override the torch pin with e.g. `make TORCH=torch==2.6.0`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv install test demo app clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned in the same step so pip never resolves a multi-GB CUDA build.
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[dev,app]"
	touch $(STAMP)

venv install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) outputs .pytest_cache
