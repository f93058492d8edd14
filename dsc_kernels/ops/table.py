"""The backend table: one literal row per (op family, backend). Every piece of backend knowledge lives here.

A row names the backend (one spelling everywhere: ``reference``, ``cpp``, ``triton``), its two ops (forward and
backward, by their full ``torch.library`` names, exactly as a profiler trace shows them), the devices and dtypes
it runs, what it needs to be available, how its ops are registered and where their code lives, and the memory
policy of its backward. ``functional`` asks this table (through ``ops.selection``) which row runs a call; the
family modules (``ops/conv_ista.py``, ``ops/sparse_attention.py``) register a row's ops on first use and run them.

Adding a backend is one row here, its kernel file, and the test that compares it with the reference
(CONTRIBUTING.md). ``tests/test_backend_table.py`` checks that the schemas of the C++ ops and the signatures of
the Triton launchers agree with the family's schema, argument by argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._attention_args import MAX_FUSED_HEAD_DIM

FAMILIES = ("conv_ista", "sparse_attention", "ml_ista")

# Registration kinds: "custom_op" (Python implementation, schema from the family module), "triton_op" (launchers
# that call torch.library.wrap_triton; schema from their annotations), "native" (schemas and CPU kernels defined
# in C++ with TORCH_LIBRARY_FRAGMENT; Python adds fakes and autograd).
REGISTRATIONS = ("custom_op", "triton_op", "native")

# What a backend needs before it can run: nothing, the C++ extension (built just in time), or an importable Triton.
REQUIREMENTS = ("nothing", "extension", "triton")

_HALF_AND_UP = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Variants of a family's computation that only some rows run; functional names the ones a call needs and
# ops.selection picks (auto) or checks (an explicit backend) a row whose ``features`` lists them all.
# conv-ISTA: "per_iteration_weight": weight / encoder_weight of shape (n_iter, C_code, C_sig, k...);
# "input_encoder": z <- S(z + step (B x - E D z)) with its own input encoder B. Both run as a one-layer ML-ISTA on
# the ml_ista row of the same backend (that recurrence from z0 = 0 is exactly this one).
CONV_ISTA_VARIANTS = ("per_iteration_weight", "input_encoder")
# sparse attention: "mask_grad": a float mask that requires grad (a learned score bias). Its gradient is dL/ds, N x M
# per head, which the fused backwards never form: only the reference (dense scores, eager autograd) gives it.
# "wide_head": a head dim d or d_v above _attention_args.MAX_FUSED_HEAD_DIM (512), whose tiles do not fit the Triton
# kernels' shared memory on an H100/H200. The other rows have no such limit.
SPARSE_ATTENTION_VARIANTS = ("mask_grad", "wide_head")
# What each variant means, for the error an explicit backend that cannot run one raises.
VARIANT_MEANING = {
    "per_iteration_weight": "a dictionary per iteration",
    "input_encoder": "an input encoder",
    "mask_grad": "a float mask that requires grad",
    "wide_head": f"a head dim d or d_v above {MAX_FUSED_HEAD_DIM}",
}


@dataclass(frozen=True)
class Backend:
    """One row of the table. ``forward_op``/``backward_op`` are full op names (``dsc_kernels::...``)."""

    family: str
    name: str
    forward_op: str
    backward_op: str
    devices: tuple[str, ...] | None  # device types it runs on; None: any (plain PyTorch)
    dtypes: tuple[torch.dtype, ...]
    requires: str
    registration: str
    # Where the implementation lives: "module:function" of the forward and backward for Python ops, the C++ source
    # file that defines the native ops.
    forward_impl: str
    backward_impl: str
    # A differentiable eager function that functional runs instead of the op pair (the reference backend: autograd
    # through plain PyTorch supports double backward and is the oracle); None for fused backends.
    eager: str | None = None
    # conv-ISTA save mode: the checkpoint interval of the forward for (ISTA, FISTA)
    # (reference.conv_ista.checkpoint_indices); recompute mode is always 0. None for other families.
    save_interval: tuple[int, int] | None = None
    # conv-ISTA save mode: "module:function" of a rule (x_size, weight_size, stride, padding) -> bool saying whether
    # the forward also keeps the residuals (reference.conv_ista.KEEP_RESIDUALS); None: never.
    residual_policy: str | None = None
    # conv-ISTA: "module:function" of a rule (x, weight, stride, padding, n_iter, fista, checkpoint) -> int giving the
    # most batch items one call of the ops takes (kernels with int32 offsets); larger batches run as several calls.
    # None: no limit.
    batch_limit: str | None = None
    # The family's variants this row runs (CONV_ISTA_VARIANTS and the like); a call needing others skips the row.
    features: tuple[str, ...] = ()

    @property
    def op_names(self) -> tuple[str, str]:
        return self.forward_op, self.backward_op


TABLE: tuple[Backend, ...] = (
    # ------------------------------------------------------------------------------------------------- conv-ISTA
    Backend(
        family="conv_ista",
        name="reference",
        forward_op="dsc_kernels::conv_ista_fwd_reference",
        backward_op="dsc_kernels::conv_ista_bwd_reference",
        devices=None,
        dtypes=_HALF_AND_UP,
        requires="nothing",
        registration="custom_op",
        forward_impl="dsc_kernels.reference.conv_ista:conv_ista_fwd_ref",
        backward_impl="dsc_kernels.reference.conv_ista:conv_ista_bwd_ref",
        eager="dsc_kernels.reference.conv_ista:conv_ista_ref",
        save_interval=(1, 1),
        features=CONV_ISTA_VARIANTS,
    ),
    Backend(
        family="conv_ista",
        name="cpp",
        forward_op="dsc_kernels::conv_ista_fwd_cpp",
        backward_op="dsc_kernels::conv_ista_bwd_cpp",
        devices=("cpu",),
        dtypes=(torch.float32, torch.float64),
        requires="extension",
        registration="native",
        forward_impl="csrc/cpu/conv_ista/ops.cpp",
        backward_impl="csrc/cpu/conv_ista/ops.cpp",
        # The backward replays each segment per batch item from its checkpoint and keeps the residuals it computes
        # on the way, so keeping every other iterate (FISTA: two of three, as a replay needs z_{k-1} too) costs
        # about one forward iteration per segment.
        save_interval=(2, 3),
        residual_policy="dsc_kernels.ops.cpu_cost:keep_residuals",
        features=CONV_ISTA_VARIANTS,
    ),
    Backend(
        family="conv_ista",
        name="triton",
        forward_op="dsc_kernels::conv_ista_fwd_triton",
        backward_op="dsc_kernels::conv_ista_bwd_triton",
        devices=("cuda",),
        dtypes=(torch.float32, torch.float16, torch.bfloat16),
        requires="triton",
        registration="triton_op",
        forward_impl="dsc_kernels.triton.conv_ista:conv_ista_fwd",
        backward_impl="dsc_kernels.triton.conv_ista:conv_ista_bwd",
        save_interval=(1, 1),
        batch_limit="dsc_kernels.triton.conv_ista:max_batch_items",
    ),
    # ------------------------------------------------------------------------------------------ sparse attention
    Backend(
        family="sparse_attention",
        name="reference",
        forward_op="dsc_kernels::sparse_attention_fwd_reference",
        backward_op="dsc_kernels::sparse_attention_bwd_reference",
        devices=None,
        dtypes=_HALF_AND_UP,
        requires="nothing",
        features=SPARSE_ATTENTION_VARIANTS,
        registration="custom_op",
        forward_impl="dsc_kernels.reference.attention:sparse_attention_fwd_ref",
        backward_impl="dsc_kernels.reference.attention:sparse_attention_bwd_ref",
        eager="dsc_kernels.reference.attention:sparse_attention_ref",
    ),
    Backend(
        family="sparse_attention",
        name="cpp",
        forward_op="dsc_kernels::sparse_attention_fwd_cpp",
        backward_op="dsc_kernels::sparse_attention_bwd_cpp",
        devices=("cpu",),
        dtypes=(torch.float32, torch.float64),
        requires="extension",
        features=("wide_head",),
        registration="native",
        forward_impl="csrc/cpu/sparse_attention.cpp",
        backward_impl="csrc/cpu/sparse_attention.cpp",
    ),
    Backend(
        family="sparse_attention",
        name="triton",
        forward_op="dsc_kernels::sparse_attention_fwd_triton",
        backward_op="dsc_kernels::sparse_attention_bwd_triton",
        devices=("cuda",),
        dtypes=(torch.float32, torch.float16, torch.bfloat16),
        requires="triton",
        registration="triton_op",
        forward_impl="dsc_kernels.triton.sparse_attention:sparse_attention_fwd",
        backward_impl="dsc_kernels.triton.sparse_attention:sparse_attention_bwd",
    ),
    # ------------------------------------------------------------------------------------ multi-layer pursuit
    # Both rows run every option of the family (ops/ml_ista.py): FISTA, interleaved, per-step and encoder weights.
    Backend(
        family="ml_ista",
        name="reference",
        forward_op="dsc_kernels::ml_ista_fwd_reference",
        backward_op="dsc_kernels::ml_ista_bwd_reference",
        devices=None,
        dtypes=_HALF_AND_UP,
        requires="nothing",
        registration="custom_op",
        forward_impl="dsc_kernels.reference.ml_ista:ml_ista_fwd_ref",
        backward_impl="dsc_kernels.reference.ml_ista:ml_ista_bwd_ref",
        eager="dsc_kernels.reference.ml_ista:ml_ista_ref",
    ),
    Backend(
        family="ml_ista",
        name="cpp",
        forward_op="dsc_kernels::ml_ista_fwd_cpp",
        backward_op="dsc_kernels::ml_ista_bwd_cpp",
        devices=("cpu",),
        dtypes=(torch.float32, torch.float64),
        requires="extension",
        registration="native",
        # Save mode keeps every layer's code iterates but those of first layers cheap to recompute
        # (ops/ml_ista.py, CHEAP_ANALYSIS); recompute mode only the deepest (the step state), replaying each step.
        forward_impl="csrc/cpu/ml_ista.cpp",
        backward_impl="csrc/cpu/ml_ista.cpp",
    ),
)

# Backend names users may ask for that have no row (yet), with the reason given when they do.
NOT_BUILT = {"cuda": "the CUDA C++ backend is not part of this release; use backend='triton' on GPUs"}

# What "auto" tries, in order of preference, on each device type (ops.selection makes the final choice, through
# auto_preference), and where a family's measurements say otherwise, for that family. On an H200 the fused Triton
# conv-ISTA ran at 0.13-0.28x the speed of eager cuDNN on every benchmark workload, forward and training step
# (bench/results/gpu-check-h200-2026-12-04): auto keeps cuDNN there, and takes the fused kernels only for a
# recompute-mode backward (0.33x eager's training-step peak on small-map), which eager autograd cannot give.
# Triton's sparse attention is 4-7x faster than the dense reference and needs a few MiB where the reference needs
# GiBs: auto takes it.
AUTO_PREFERENCE = {"cpu": ("cpp", "reference"), "cuda": ("triton", "reference")}
AUTO_PREFERENCE_BY_FAMILY = {("conv_ista", "cuda"): ("reference", "triton")}

BACKEND_NAMES = tuple(dict.fromkeys(row.name for row in TABLE))


# Indexed once: every functional call looks rows up several times (selection, availability), and scanning the
# table each time was a measurable part of a small call's Python overhead.
_ROWS = {family: tuple(r for r in TABLE if r.family == family) for family in FAMILIES}
_ROW = {(r.family, r.name): r for r in TABLE}


def auto_preference(family: str, device_type: str) -> tuple[str, ...]:
    """The backends "auto" tries for one family on one device type, in order."""
    by_device = AUTO_PREFERENCE.get(device_type, ("reference",))
    return AUTO_PREFERENCE_BY_FAMILY.get((family, device_type), by_device)


def rows(family: str) -> tuple[Backend, ...]:
    """The rows of one op family, in table order."""
    if family not in _ROWS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return _ROWS[family]


def row(family: str, name: str) -> Backend:
    """The row of backend ``name`` in ``family``; ValueError naming the known backends otherwise."""
    found = _ROW.get((family, name))
    if found is None:
        raise ValueError(f"no {family} backend named {name!r}; known: {[r.name for r in rows(family)]}")
    return found
