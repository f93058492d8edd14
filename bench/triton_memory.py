"""Training-step peak memory of the Triton conv-ISTA backend against eager PyTorch, counted without a GPU.

The Triton launchers allocate the same buffers whatever their kernels compute, so with every kernel launch stubbed
out and the launchers set to the GPU configurations (tile sizes, weight-gradient splits), torch.profiler's
allocation events on the CPU count what a training step allocates on a GPU: the peak above what existed before it,
forward and backward, z.square().sum() as the loss. Eager runs for real on the CPU (oneDNN); its peak can differ
a little from cuDNN's (small-map: 35 codes here, 33 on an H200). The counts are not a GPU measurement: the GPU
check (`make gpu-check`) measures the real thing.

    python bench/triton_memory.py [--batch-scale S] [--fista]

prints a markdown table: per GPU workload (docs/design.md §6), eager's peak and the save- and recompute-mode
ratios (the stubbed kernels leave garbage in every buffer, so the outputs are not checked; the interpreter tests
check them).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # the triton backend on CPU tensors; no kernel runs anyway
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import dsc_kernels.functional as DF  # noqa: E402
from dsc_kernels.experiments.measure import measure_memory  # noqa: E402
from dsc_kernels.experiments.speed import GPU_WORKLOADS  # noqa: E402
from dsc_kernels.triton.conv_ista import backward, config, forward  # noqa: E402


class _Stub:
    """launch(kernel)[grid](...) that runs nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _peak(x: torch.Tensor, weight: torch.Tensor, workload, backend: str, recompute: bool, fista: bool) -> int:
    def step():
        z = DF.conv_ista(
            x,
            weight,
            0.05,
            n_iter=workload.n_iter,
            stride=workload.stride,
            padding=workload.padding,
            fista=fista,
            backend=backend,
            recompute=recompute,
        )
        return torch.autograd.grad(z.square().sum(), (x, weight))

    step()  # first-call caches (the C++ extension, oneDNN primitives) stay out of the count
    return measure_memory(step, "cpu").peak_bytes


def _scale(text: str) -> float:
    """A --batch-scale: finite and > 0 (nan and inf raised in round() after the imports, a traceback; 0 and negative
    scales were silently batch 1)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--batch-scale", type=_scale, default=1.0, help="scale every workload's batch, > 0 (tests: small)"
    )
    parser.add_argument("--fista", action="store_true")
    args = parser.parse_args(argv)
    # Set where they are read: each of these modules holds its own reference.
    forward.launch = backward.launch = lambda kernel: _Stub()
    config.interpreting = lambda: False  # the GPU configurations
    torch.manual_seed(0)
    print("| workload | eager peak | triton save / eager | triton recompute / eager |")
    print("| --- | --- | --- | --- |")
    for name, workload in GPU_WORKLOADS.items():
        xs, ws = workload.x_gpu, workload.w_gpu
        xs = (max(1, round(xs[0] * args.batch_scale)), *xs[1:])
        x = torch.randn(xs).requires_grad_()
        weight = (torch.randn(ws) * 0.05).requires_grad_()
        eager = _peak(x, weight, workload, "reference", False, args.fista)
        save, recompute = (_peak(x, weight, workload, "triton", r, args.fista) for r in (False, True))
        print(f"| {name} | {eager / 2**20:.1f} MiB | {save / eager:.3f} | {recompute / eager:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
