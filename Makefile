# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU machine takes the CPU build of torch; a GPU user sets TORCH_SPEC=torch (or installs torch first).
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

# pytest exits 5 when it collects nothing; that is not a failure of the suite.
test: $(STAMP)
	$(PY) -m pytest -q --benchmark-disable $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

bench: $(STAMP)
	$(PY) -m benchmarks.attention --device cpu --quick

clean:
	rm -rf $(VENV) demo-out .hypothesis *.egg-info
