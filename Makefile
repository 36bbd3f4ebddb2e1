# Two front doors: `make demo` (set up, build data, train 2 processes, evaluate)
# and `make test` (set up, run the whole suite). Both work from a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DATA ?= data/tuxpaint
DEMO_RUN ?= runs/demo
DEMO_QUERY ?= a fish
# DeepSpeed compiles its CPU comm op once; keep the build with the checkout.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install system-deps demo test lint format data clean

# torch is pinned to the CPU build this machine ships (see README for GPUs);
# DS_BUILD_OPS=0 makes DeepSpeed a pure-Python install (ops JIT-compile on use).
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

# The built-in real data set: Debian's Tux Paint stamps (pictures, captions,
# sound effects and spoken descriptions, with natural gaps), fetched with
# apt-get download into ~/.cache/calmrl and checked against apt's SHA-256.
$(DEMO_DATA)/train/index.json: $(BIN)/.installed
	$(BIN)/calmrl data build --source tuxpaint --out $(DEMO_DATA) --shard-size 100

data: $(DEMO_DATA)/train/index.json

# Train over the pretrained towers (frozen, their outputs cached once), evaluate, export,
# embed the test stamps (completing what each lacks) and search them with one query.
demo: data
	rm -rf $(DEMO_RUN)
	$(BIN)/calmrl train configs/demo_cpu.yaml --nproc 2 --data.shards=$(DEMO_DATA)/train --train.out_dir=$(DEMO_RUN)
	$(BIN)/calmrl eval $(DEMO_RUN) --data $(DEMO_DATA)/test
	$(BIN)/calmrl export $(DEMO_RUN) --out $(DEMO_RUN)/export
	$(BIN)/calmrl embed $(DEMO_RUN)/export --input $(DEMO_DATA)/test --out $(DEMO_RUN)/test.parquet --complete
	$(BIN)/calmrl search $(DEMO_RUN)/export --index $(DEMO_RUN)/test.parquet --query "$(DEMO_QUERY)" \
		--modality image --k 5 --html $(DEMO_RUN)/search.html --png $(DEMO_RUN)/search.png

# Real servers the integration tests start on loopback (Prometheus, Slurm):
# Debian packages, installed when missing (needs root or sudo then).
system-deps:
	bash scripts/install_system_deps.sh

# Lint (ruff), formatting (ruff format) and types (mypy) over the whole tree.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: $(BIN)/.installed system-deps lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .cache runs data
