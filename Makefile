# The README's two commands: `make demo` and `make test`. Both work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA := data
RUN := runs/demo
# The demo cohort: 16 cases on a 96 x 96 x 62 grid (2.5 mm voxels over the BraTS field of view), stored at
# 2.5 mm, so the whole job runs in about 5 minutes on 2 CPU cores. Full size: DEMO_SHAPE="240 240 155" DEMO_SPACING=1.
# The recipe that learns in that budget: all four modalities (T1ce shows the core), 400 steps of 48^3 patches,
# learning rate 3e-3, a four-level UNet (README: "The demo").
DEMO_CASES ?= 16
DEMO_SHAPE ?= 96 96 62
DEMO_SPACING ?= 2.5
DEMO_EPOCHS ?= 40
DEMO_STEPS ?= 10

.PHONY: install browser demo test lint clean

install: $(VENV)/.installed

# torch first: the CPU build where there is no NVIDIA GPU, so pip never pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install --quiet torch; \
	else \
		$(PY) -m pip install --quiet torch==2.13.0; \
	fi
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(PY) -m prep synth --out $(DATA)/raw --cases $(DEMO_CASES) --shape $(DEMO_SHAPE) --workers 2 \
		--preview $(DATA)/preview.png
	$(PY) -m prep build-store --source $(DATA)/raw --store $(DATA)/brats.zarr --workers 2 --spacing $(DEMO_SPACING)
	$(PY) -m train --store $(DATA)/brats.zarr --modalities t1 t1ce t2 flair --amp --epochs $(DEMO_EPOCHS) \
		--steps-per-epoch $(DEMO_STEPS) --patch-size 48 48 48 --batch-size 2 --lr 3e-3 --channels 16 32 64 128 \
		--val-every 20 --workers 2 --run-dir $(RUN) --overwrite
	$(PY) -m evaluate tune-postprocessing --run-dir $(RUN) --or-skip
	$(PY) -m evaluate --run-dir $(RUN) --split test --save-predictions
	$(PY) -m evaluate --run-dir $(RUN) --split test --tta --metrics legacy
	$(PY) -m benchmarks demo --run-dir $(RUN) --out $(RUN)/benchmarks
	$(PY) -m benchmarks all --quick --out $(RUN)/benchmarks
	$(PY) -m evaluate report --run-dir $(RUN)

# Debian's Chromium, for the report's browser test (tests/test_report.py), where it is missing
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }

test: install browser
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(DATA) runs .pytest_cache .ruff_cache
