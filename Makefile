# Each target sets up what it needs: a fresh machine needs only Python 3.11+.
#   make train                       train the default model (cnn) on CIFAR-10, log and register it
#   make train DATA=~/data/cifar10   the same on an already-extracted copy (offline machines)
#   make tune / make app             tune lr and epochs with Optuna / open the desktop app
#   make test                        run the test suite
#   make server                      PostgreSQL + mlflow server for a team (ARGS="--host 0.0.0.0")
PYTHON ?= python3
VENV ?= .venv
# The CUDA build of PyTorch; it also runs on CPU-only machines.
TORCH ?= torch==2.14.1 torchvision==0.29.1
DATA ?= data
MODEL ?= cnn
ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train tune app test benchmark ui server clean-venv

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

app: $(STAMP)
	$(BIN)/python -m gui $(ARGS)

server: $(STAMP)
	$(BIN)/python -m training.servers $(ARGS)

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q -n 2 $(ARGS)

benchmark: $(STAMP)
	$(BIN)/python benchmarks/pipeline_speed.py --data-dir $(DATA) $(ARGS)

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db

clean-venv:
	rm -rf $(VENV)
