# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU build on these machines' local package index; from PyPI it is the CUDA build.
# A GPU user may set TORCH_SPEC (e.g. torch) or install torch into .venv first: setup keeps a torch it finds.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,model]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/topopack demo

# A suite that collects nothing is broken: pytest's exit 5 fails like any other.
test: $(STAMP)
	$(PY) -m pytest -q --benchmark-disable $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.attention --device cpu --quick

clean:
	rm -rf $(VENV) demo-out .hypothesis *.egg-info
