# fairseq-dat: the project's few commands. Everything runs inside .venv, created on first use.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED ?= $(abspath ../shared)
export FAIRSEQ_DAT_SHARED := $(SHARED)
DEMO_DIR ?= $(abspath ../runs/demo)

.PHONY: install demo test data clean-demo

# requirements.txt lines of one install step (its "# step N" comments)
step = $$(grep -E '\# step $(1)\b' requirements.txt | cut -d'\#' -f1)

# Order matters: the CPU torch wheel first, then fairseq-fixed's build tools, then everything in
# requirements.txt without build isolation (fairseq-fixed built against that torch).
$(BIN)/.installed: requirements.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(call step,1)
	$(BIN)/pip install -q $(call step,2)
	$(BIN)/pip install -q --no-build-isolation -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import fairseq_dat"
	touch $@

install: $(BIN)/.installed

data: install
	PATH=$(abspath $(BIN)):$$PATH bash examples/multi30k_de_en/prepare.sh $(SHARED)/data data-bin/multi30k_de_en

## README command 1: train a small adaptive model on Multi30k (bounded time), generate with --exit-threshold
demo: install
	PATH=$(abspath $(BIN)):$$PATH DEMO_DIR=$(DEMO_DIR) bash examples/multi30k_de_en/demo.sh

## remove the demo's run directory (its checkpoints and logs), so that `make demo` starts afresh
clean-demo:
	@if [ -d "$(DEMO_DIR)" ] && [ ! -e "$(DEMO_DIR)/stage1.log" ] && [ ! -d "$(DEMO_DIR)/stage1" ]; then \
	  echo "clean-demo: $(DEMO_DIR) holds no demo run (no stage1/ or stage1.log); not removed" >&2; exit 1; fi
	rm -rf "$(DEMO_DIR)"

## README command 2: the tests
test: install
	$(BIN)/python -m pytest -q tests
