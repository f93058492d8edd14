"""Test-session setup shared by every test file: which Triton tests this process can run.

Two markers select the tests that need a particular Triton mode:
    interpreter  Triton kernels on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1)
    gpu          a CUDA device, kernels compiled (the interpreter off)
Triton reads TRITON_INTERPRET when a kernel module is imported, so one process runs in one mode: with the
interpreter on, `gpu` tests are skipped; with it off, `interpreter` tests are skipped, each with the command that
runs them. `make test` runs both processes side by side (`TRITON_INTERPRET=1 pytest -m interpreter` and
`TRITON_INTERPRET=0 pytest -m "not interpreter"`; the Makefile says which tests besides go to which), so on a GPU
host the interpreted and the compiled kernels are both tested. A plain `pytest tests` on a machine without CUDA
turns the interpreter on (unless TRITON_INTERPRET is set), so that one command runs everything that can run there.
"""

import os

import pytest
import torch
import torch.utils.deterministic

CUDA = torch.cuda.is_available()
if "TRITON_INTERPRET" not in os.environ and not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# Two threads, as the timed runs use, unless OMP_NUM_THREADS says otherwise: make test runs the interpreter process
# on one thread beside the main one.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(min(2, os.cpu_count() or 1))

# DSC_TEST_FILL_UNINITIALIZED=1 (make sanitize sets it): every torch.empty, the C++ kernels' at::empty buffers
# included, comes filled with NaN, so a kernel that reads a buffer before writing it fails its test instead of
# passing on whatever the allocator's fresh pages held (AddressSanitizer does not see such reads).
if os.environ.get("DSC_TEST_FILL_UNINITIALIZED") == "1":
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True


def pytest_collection_modifyitems(config, items):
    if INTERPRETING:
        skip_gpu = pytest.mark.skip(
            reason="the Triton interpreter is on in this process; GPU tests run compiled: "
            "TRITON_INTERPRET=0 pytest -m gpu"
        )
    elif not CUDA:
        skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    else:
        skip_gpu = None
    skip_interpreter = (
        None
        if INTERPRETING
        else pytest.mark.skip(
            reason="needs TRITON_INTERPRET=1 from the start of the process: TRITON_INTERPRET=1 pytest -m interpreter"
        )
    )
    for item in items:
        if "gpu" in item.keywords and "interpreter" in item.keywords:
            raise pytest.UsageError(f"{item.nodeid} is marked both gpu and interpreter")
        if skip_gpu is not None and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        if skip_interpreter is not None and "interpreter" in item.keywords:
            item.add_marker(skip_interpreter)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
