# The README's two commands: `make demo` and `make test`. Both work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA := data
DEMO_CASES ?= 8
DEMO_SHAPE ?= 96 96 64

.PHONY: install demo test lint clean

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
	$(PY) -m prep synth --out $(DATA)/raw --cases $(DEMO_CASES) --shape $(DEMO_SHAPE) --workers 2 --preview $(DATA)/preview.png

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(DATA) runs .pytest_cache .ruff_cache
