# Two entry points for a fresh machine with nothing but Python:
#   make report   sets up .venv and runs the main job on built-in synthetic data
#   make test     sets up .venv and runs the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test report bench gpu-check clean

setup: $(STAMP)

# torch is installed first and pinned so that pip never resolves an unpinned (multi-GB CUDA) build.
$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

# Two processes, because Triton picks its interpreter when it is imported (tests/conftest.py): the interpreter tests
# (Triton kernels on CPU tensors), then everything else with the interpreter off (compiled GPU tests where a GPU is).
test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m interpreter tests; first=$$?; \
	TRITON_INTERPRET=0 $(BIN)/python -m pytest -q -m "not interpreter" tests; second=$$?; \
	test $$first = 0 && test $$second = 0

report: $(STAMP)
	$(BIN)/python -m dsc_kernels report --out report

bench: $(STAMP)
	$(BIN)/python -m pytest bench --benchmark-only

# The prepared GPU run (bench/gpu_check.py, under 8 minutes): no venv, no installs, the machine's own python3 and torch,
# from the source tree; everything lands in one folder (DSC_GPU_CHECK_OUT, else $OUT, else bench/results/gpu-check-*).
# Without a GPU (or with DSC_GPU_CHECK_DRY_RUN=1) it rehearses every step it can on the CPU.
gpu-check:
	PYTHONPATH=. $(PYTHON) bench/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info
