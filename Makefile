# Everything goes through the project's own virtualenv, made by `make setup`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rlhb-installed
RUN_DIR ?= runs/demo
# CPU build on this machine; on a GPU machine: make setup TORCH_SPEC="torch==<version>" (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

# The main job on the embedded default: simulate the platform, prepare its logs, train the starting
# policy, the judges and the aligners, evaluate them on held-out queries, show the run.
demo: setup
	$(BIN)/rlhb simulate-logs --run-dir $(RUN_DIR)
	$(BIN)/rlhb prepare-behaviors --run-dir $(RUN_DIR)
	$(BIN)/rlhb train-sft --run-dir $(RUN_DIR) --epochs 2
	$(BIN)/rlhb warmup-discriminator --run-dir $(RUN_DIR) --epochs 2
	$(BIN)/rlhb train-classifier --run-dir $(RUN_DIR) --epochs 2
	$(BIN)/rlhb train-reward --run-dir $(RUN_DIR) --epochs 3
	$(BIN)/rlhb train-rlhf --run-dir $(RUN_DIR)
	$(BIN)/rlhb train-rlhbc --run-dir $(RUN_DIR)
	$(BIN)/rlhb train-rlhb --run-dir $(RUN_DIR)
	$(BIN)/rlhb evaluate --run-dir $(RUN_DIR)
	$(BIN)/rlhb status --run-dir $(RUN_DIR)
	$(BIN)/rlhb report --run-dir $(RUN_DIR)

bench: setup
	$(BIN)/python benchmarks/bench_prepare.py
	$(BIN)/python benchmarks/bench_rl.py

clean:
	rm -rf $(VENV) runs
