# Each target sets up what it needs: a fresh machine needs only Python 3.11+.
#   make train                       train the default model (cnn) on CIFAR-10, log and register it
#   make train DATA=~/data/cifar10   the same on an already-extracted copy (offline machines)
#   make tune / make app             tune lr and epochs with Optuna / open the desktop app
#   make test                        lint, import contracts, docs build, then the test suite
#   make servers                     PostgreSQL + mlflow server for a team (ARGS="--host 0.0.0.0")
#   make evaluate / compare / benchmark / classify   the commands of the same names (ARGS=...)
#   make docs                        serve the documentation site at http://127.0.0.1:8000
PYTHON ?= python3
VENV ?= .venv
# The CUDA build of PyTorch; it also runs on CPU-only machines.
TORCH ?= torch==2.14.1 torchvision==0.29.1
DATA ?= data
MODEL ?= cnn
ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train tune evaluate compare benchmark servers server app classify test lint \
	docs docs-build pipeline-speed ui clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

train: $(STAMP)
	$(BIN)/python -m training.train --model $(MODEL) --data-dir $(DATA) $(ARGS)

tune: $(STAMP)
	$(BIN)/python -m training.tune --model $(MODEL) --data-dir $(DATA) $(ARGS)

evaluate: $(STAMP)
	$(BIN)/python -m training.evaluate --model $(or $(NAME),cifar10-$(MODEL)@champion) --data-dir $(DATA) $(ARGS)

compare: $(STAMP)
	$(BIN)/python -m training.compare $(ARGS)

benchmark: $(STAMP)
	$(BIN)/python -m training.benchmark --data-dir $(DATA) $(ARGS)

servers: $(STAMP)
	$(BIN)/python -m training.servers $(ARGS)

server: servers

app: $(STAMP)
	$(BIN)/python -m gui $(ARGS)

classify: $(STAMP)
	$(BIN)/python -m gui.classify $(or $(FOLDER),inputs) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

docs-build: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

test: lint docs-build
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q -n 2 $(ARGS)

pipeline-speed: $(STAMP)
	$(BIN)/python benchmarks/pipeline_speed.py --data-dir $(DATA) $(ARGS)

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db

clean-venv:
	rm -rf $(VENV)
