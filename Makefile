# fairseq-dat: the project's few commands. Everything runs inside .venv, created on first use.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED ?= $(abspath ../shared)
export FAIRSEQ_DAT_SHARED := $(SHARED)

.PHONY: install demo test data clean-demo

# Order matters: the CPU torch wheel first, then fairseq-fixed built against it without build isolation.
$(BIN)/.installed: requirements.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q setuptools wheel cython numpy
	$(BIN)/pip install -q --no-build-isolation fairseq-fixed==0.12.3.1 sacrebleu==2.6.0 subword-nmt sacremoses matplotlib pytest hypothesis
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import fairseq_dat"
	touch $@

install: $(BIN)/.installed

data: install
	PATH=$(abspath $(BIN)):$$PATH bash examples/multi30k_de_en/prepare.sh $(SHARED)/data data-bin/multi30k_de_en

## README command 1: train a small adaptive model on Multi30k (bounded time), generate with --exit-threshold
demo: install
	PATH=$(abspath $(BIN)):$$PATH bash examples/multi30k_de_en/demo.sh

## README command 2: the tests
test: install
	$(BIN)/python -m pytest -q tests
