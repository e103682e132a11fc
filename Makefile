# One place for set-up and the common jobs. Every target installs what it needs first.
# Override the torch pin with e.g. `make test TORCH=torch==2.6.0`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= data/synthloco
RUN ?= outputs/synthloco
LADMIM_MODEL ?= $(RUN)/model

.PHONY: venv install test demo app browser-deps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned in the same step, so pip never resolves a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[dev,app,export]"
	touch $(STAMP)

venv install: $(STAMP)

# Debian's Chromium for the browser test (playwright drives it; never `playwright install`).
browser-deps:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	fi

test: $(STAMP) browser-deps
	GRADIO_ANALYTICS_ENABLED=False $(BIN)/python -m pytest -q

# The main job: generate synthloco, train with configs/synthloco-cpu.yaml, evaluate, print the table.
demo: $(STAMP)
	@# readme.txt is the generator's last write: present only when every category is complete
	test -f $(DATA)/readme.txt || $(BIN)/python -m ladmim_hf.data.synthetic --out $(DATA) --seed 0
	$(BIN)/python scripts/train.py --config configs/synthloco-cpu.yaml --data_root $(DATA) --output_dir $(RUN) --resume
	$(BIN)/python scripts/evaluate.py --model $(RUN)/model --data_root $(DATA) --categories all \
		--output_dir $(RUN)/eval --feature_cache $(RUN)/cache/features.pt
	@echo "model: $(RUN)/model   report: $(RUN)/eval/report.md   app: make app"

app: $(STAMP)
	GRADIO_ANALYTICS_ENABLED=False GRADIO_SERVER_NAME=127.0.0.1 LADMIM_MODEL=$(LADMIM_MODEL) $(BIN)/python spaces_app/app.py

clean:
	rm -rf $(VENV) outputs .pytest_cache test-artifacts
