# Two commands on a fresh machine: `make repro` (venv + install + dvc repro on the bundled corpora) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(CURDIR)/$(BIN):$(PATH)
# No telemetry, no hub lookups: everything here is local.
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: install repro test serve bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU wheel of torch first (a looser pin pulls the multi-GB CUDA build). GPU hosts: see README "GPU hosts".
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

repro: install
	$(BIN)/dvc repro
	$(BIN)/textmill models ls .bucket

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

serve: install
	$(BIN)/textmill serve --root .bucket

# Each prints JSON with the baseline side by side; figures are recorded in bench/RESULTS.md.
bench: install
	$(BIN)/python bench/clean_bench.py
	$(BIN)/python bench/prepare_bench.py
	$(BIN)/python bench/train_bench.py
	$(BIN)/python bench/convert_bench.py
	$(BIN)/python bench/registry_bench.py
	$(BIN)/python bench/serve_bench.py

clean-venv:
	rm -rf $(VENV)
