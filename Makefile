# cednet-pl: every target creates .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install -e ".[dev,slurm,fast,loggers,export]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the package with dev/slurm extras

train: $(STAMP) ## Train the embedded default (small CEDNet on scikit-learn digits, CPU)
	$(BIN)/cednet-train $(ARGS)

test: $(STAMP) ## Fast test suite (what CI runs)
	$(BIN)/pytest -m "not slow" $(ARGS)

test-full: $(STAMP) ## Every test, slow ones included
	$(BIN)/pytest $(ARGS)

lint: $(STAMP) ## ruff check + format check
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format: $(STAMP) ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix src tests scripts
	$(BIN)/ruff format src tests scripts

table: $(STAMP) ## Print the model table (params, GMACs at 224)
	$(BIN)/python scripts/model_table.py

bench: $(STAMP) ## Training-step benchmark CEDNet-NeXt-T vs ConvNeXt-T
	$(BIN)/python scripts/bench_models.py $(ARGS)

appendix-b: $(STAMP) ## Appendix B at demo scale: CEDNet-nano vs matched ConvNeXt, 3 seeds -> logs/appendix_b
	OMP_NUM_THREADS=1 $(BIN)/python scripts/appendix_b.py $(ARGS)

clean: ## Remove caches and run outputs (keeps .venv)
	rm -rf logs .pytest_cache .ruff_cache

.PHONY: help install train test test-full lint format table bench appendix-b clean
