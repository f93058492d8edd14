# Two entry points for a fresh machine with nothing but Python:
#   make report   sets up .venv and runs the main job on built-in synthetic data
#   make test     sets up .venv and runs the test suite
# and one for C++ changes:
#   make sanitize builds the C++ extension with AddressSanitizer + UBSan (-fsanitize=address,undefined, in its own
#                 cache folder, DSC_KERNELS_CACHE) and runs the C++ backend's tests under it: the sanitizer runtimes
#                 are preloaded into Python (LD_PRELOAD), leak checks are off (CPython and torch keep memory for the
#                 process's life), and any report fails the run; uninitialised torch buffers are filled with NaN
#                 (tests/conftest.py), so a read before a write fails too. A few minutes on two cores.
# and one for Triton changes:
#   make aot-check compiles every recorded Triton specialisation for sm_90 (make test compiles a cover of them).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test aot-check report bench sanitize gpu-check gpu-tune clean

setup: $(STAMP)

# torch is installed first and pinned so that pip never resolves an unpinned (multi-GB CUDA) build, with the triton
# CUDA torch 2.13.0 pins (pyproject.toml allows a range); the C++ backend is built last (a minute or two on 2 cores,
# cached in ~/.cache/dsc_kernels), so that the first run does not pay it.
$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "torch==2.13.0" "triton==3.7.1; sys_platform == 'linux'"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -c "from dsc_kernels import _ext; _ext.available() or print('C++ backend not built:', _ext.build_error())"
	touch $(STAMP)

# Lint and format check (ruff, pyproject.toml), then two pytest processes, because Triton picks its interpreter
# when it is imported (tests/conftest.py): the interpreter tests (Triton kernels on CPU tensors) and everything else
# with the interpreter off (compiled GPU tests where a GPU is). Each is mostly one thread, so they run side by side
# (17 minutes on 2 cores, 33 one after the other): the interpreter's on one thread (OMP_NUM_THREADS=1) at low priority,
# so that the other's two threads are not left spinning while it holds a core, and its output printed when both have
# ended; the tests whose work runs in a child process (ahead-of-time compiles, the GPU scripts' rehearsals) join it,
# so that the two take about as long. Compiling every recorded Triton specialisation (7 minutes with a cold Triton
# cache) is left to `make aot-check`.
test: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .; lint=$$?; \
	log=$$(mktemp); \
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 nice -n 19 $(BIN)/python -m pytest -q -p no:cacheprovider --durations=5 \
		-m "interpreter or child_process" tests > $$log 2>&1 & pid=$$!; \
	trap 'kill $$pid 2>/dev/null' INT TERM; \
	TRITON_INTERPRET=0 $(BIN)/python -m pytest -q --durations=15 \
		-m "not interpreter and not child_process and not exhaustive" tests; second=$$?; \
	wait $$pid; first=$$?; \
	echo "== interpreter process (TRITON_INTERPRET=1) =="; cat $$log; rm -f $$log; \
	test $$lint = 0 && test $$first = 0 && test $$second = 0

# Every Triton specialisation the workloads record, compiled ahead of time for sm_90 (no GPU needed): run it after
# changing a Triton kernel or its configuration table.
aot-check: $(STAMP)
	TRITON_INTERPRET=0 $(BIN)/python -m pytest -q -m exhaustive tests

report: $(STAMP)
	$(BIN)/python -m dsc_kernels report --out report

bench: $(STAMP)
	$(BIN)/python -m pytest bench --benchmark-only

CXX          ?= c++
SAN_FLAGS    := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1
SAN_CACHE    ?= $(HOME)/.cache/dsc_kernels-sanitize
SAN_TESTS    ?= tests/test_cpp_conv_ista.py tests/test_cpp_strategies.py tests/test_empty_inputs_cpp.py tests/test_attention_ops.py tests/test_attention_reliability.py \
               tests/test_ml_ista_cpp.py tests/test_reliability.py tests/test_fuzz_attention.py tests/test_one_channel_strides.py
sanitize: $(STAMP)
	DSC_KERNELS_EXTRA_CFLAGS="$(SAN_FLAGS)" DSC_KERNELS_CACHE="$(SAN_CACHE)" \
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	DSC_TEST_FILL_UNINITIALIZED=1 \
	$(BIN)/python -m pytest -q -x -p no:cacheprovider $(SAN_TESTS) -k "not build"

# The prepared GPU run (bench/gpu_check.py, under 8 minutes): no venv, no installs, the machine's own python3 and torch,
# from the source tree; everything lands in one folder (DSC_GPU_CHECK_OUT, else $OUT, else bench/results/gpu-check-*).
# Without a GPU (or with DSC_GPU_CHECK_DRY_RUN=1) it rehearses every step it can on the CPU.
gpu-check:
	PYTHONPATH=. $(PYTHON) bench/gpu_check.py

# After gpu-check, on the same lease if time is left: the Triton configuration sweep (bench/gpu_tune.py; each variant
# checked against the default configuration, then timed; DSC_GPU_TUNE_BUDGET_S, default 300 s).
gpu-tune:
	PYTHONPATH=. $(PYTHON) bench/gpu_tune.py

clean:
	rm -rf $(VENV) build *.egg-info
