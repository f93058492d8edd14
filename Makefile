# Two entry points for a fresh machine with nothing but Python:
#   make report   sets up .venv and runs the main job on built-in synthetic data
#   make test     sets up .venv and runs the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test report bench clean

setup: $(STAMP)

# torch is installed first and pinned so that pip never resolves an unpinned (multi-GB CUDA) build.
$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

report: $(STAMP)
	$(BIN)/python -m dsc_kernels report --out report

bench: $(STAMP)
	$(BIN)/python -m pytest bench --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info
