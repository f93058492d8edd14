"""The registration pattern every fused op family shares: for a backend ``<b>``, a forward op and a backward op

    dsc_kernels::<family>_fwd_<b>(inputs...) -> (output, saved)
    dsc_kernels::<family>_bwd_<b>(grad_output, ..., saved, ...) -> (grads...)

with fakes (so torch.compile and FakeTensor tracing see shapes) and an autograd formula on the forward that calls
the backward op (so the backward is itself traceable). Python backends are defined here from a schema string;
"native" backends come with schemas and CPU kernels from the C++ extension (csrc/, TORCH_LIBRARY_FRAGMENT) and get
only their fakes and autograd here.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

KINDS = ("custom_op", "triton_op", "native")


@dataclass(frozen=True)
class OpPair:
    forward: Callable
    backward: Callable


@dataclass
class Family:
    """One op family: its schemas (without the op name), fakes, autograd, and the op pairs registered so far.

    Backend ``b``'s implementation is the C++ extension (cpp) or the launchers ``<name>_fwd``/``<name>_bwd`` of
    ``dsc_kernels.triton.<name>`` (triton); Python backends such as the reference are registered explicitly.
    """

    name: str
    fwd_schema: str  # schemas of the Python (custom_op) backends; C++ and triton_op ops carry their own
    bwd_schema: str
    fake_fwd: Callable
    fake_bwd: Callable
    # make_autograd(backward_op) -> (setup_context, backward) for torch.library.register_autograd
    make_autograd: Callable[[Callable], tuple[Callable, Callable]]
    pairs: dict[str, OpPair] = field(default_factory=dict)

    def register(self, backend: str, kind: str, fwd: Callable | None = None, bwd: Callable | None = None) -> OpPair:
        """Define (or complete, for kind "native") the two ops of ``backend`` and link them for autograd."""
        if backend in self.pairs:
            return self.pairs[backend]
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        fwd_name, bwd_name = f"{self.name}_fwd_{backend}", f"{self.name}_bwd_{backend}"
        if kind == "native":
            torch.library.register_fake(f"dsc_kernels::{fwd_name}")(self.fake_fwd)
            torch.library.register_fake(f"dsc_kernels::{bwd_name}")(self.fake_bwd)
        else:
            for name, fn, schema, fake in ((fwd_name, fwd, self.fwd_schema, self.fake_fwd),
                                           (bwd_name, bwd, self.bwd_schema, self.fake_bwd)):
                if kind == "custom_op":
                    op = torch.library.custom_op(f"dsc_kernels::{name}", fn, mutates_args=(), schema=schema)
                else:  # triton_op takes its schema from the launcher's annotations
                    op = torch.library.triton_op(f"dsc_kernels::{name}", fn, mutates_args=())
                op.register_fake(fake)
        pair = OpPair(getattr(torch.ops.dsc_kernels, fwd_name).default,
                      getattr(torch.ops.dsc_kernels, bwd_name).default)
        setup_context, backward = self.make_autograd(pair.backward)
        torch.library.register_autograd(f"dsc_kernels::{fwd_name}", backward, setup_context=setup_context)
        self.pairs[backend] = pair
        return pair

    def get(self, backend: str) -> OpPair:
        """The ops of ``backend``, registered on first use: building the C++ extension is slow, and Triton reads
        TRITON_INTERPRET when it is first imported, so neither happens at import time."""
        if backend in self.pairs:
            return self.pairs[backend]
        if backend == "cpp":
            from .. import _ext
            _ext.load()  # its TORCH_LIBRARY_FRAGMENTs define the schemas and the CPU kernels
            return self.register("cpp", "native")
        if backend == "triton":
            launchers = importlib.import_module(f"dsc_kernels.triton.{self.name}")
            return self.register("triton", "triton_op", getattr(launchers, f"{self.name}_fwd"),
                                 getattr(launchers, f"{self.name}_bwd"))
        raise ValueError(f"no {self.name} op is registered for backend {backend!r}")
