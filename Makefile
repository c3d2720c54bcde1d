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

.PHONY: setup demo test test-slow lint tiny-models clean bench-train bench-ppo

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

# The main job on the embedded default: shipped QA-Feedback sample + tiny offline models.
demo: setup
	$(BIN)/rlhfkit init-model --out models/tiny
	$(BIN)/rlhfkit annotate-import --format qa-feedback data/qa_feedback/feedback.json --out $(RUN)/demo/import
	@echo "demo artifacts are in $(RUN)/demo/"

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check rlhfkit tests

tiny-models: setup
	$(BIN)/rlhfkit init-model --out models/tiny

clean:
	rm -rf $(RUN) models results .pytest_cache

bench-train: setup
	$(BIN)/python -m pip install --quiet -e ".[bench]" && $(BIN)/python bench/bench_train.py
