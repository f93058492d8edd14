"""Tolerances by rule, not by hand: a result computed in low precision is judged by the error PyTorch itself makes.

A fused kernel's output ``actual`` (fp16, bf16, or fp32 with TF32 dots) is compared with the float64 reference
``reference`` computed on the same (already rounded) inputs, and with ``eager``, PyTorch's own eager computation of
the same quantity in the same dtype and precision mode (cuDNN fp16 convolutions, TF32 when the kernel uses TF32,
...). It passes when

    max|actual - reference|  <=  factor * max|eager - reference|  +  floor * max|reference|

with ``factor = 2`` and a floor of one unit in the last place of ``actual``'s dtype (the rounding of the stored
result alone), but at least 16 fp32 ulps (1.9e-6: the kernels accumulate in fp32, and in plain fp32 the eager
error itself is a handful of ulps, too small a yardstick alone), as FlashAttention's tests judge their kernels.
NaN must sit where the reference has NaN; elsewhere every element counts. The rule can fail: a zero gradient
against a non-zero reference is off by max|reference|, far above twice a rounding error. It refuses to judge when
the eager error itself is not finite or is larger than the values (then the eager computation is no yardstick and
the test must pick another).

``mask`` restricts the comparison to chosen elements (e.g. where two supports agree); both errors use the same mask.
``norm="l2"`` measures both errors as ‖·‖₂ instead of the largest element (for results at scale where a few
entries legitimately move, e.g. gradients across a support flip, the same rule applied to the whole tensor).

One implementation for the tests (tests/tolerance.py re-exports it) and for the benchmarks, which check every
provider's output with it before timing it (experiments/speed.py, bench/).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["FACTOR", "Verdict", "assert_close_by_rule", "gate", "judge"]

FACTOR = 2.0
ACCUMULATION_ULPS = 16


class Verdict(NamedTuple):
    ok: bool
    error: float  # max |actual - reference|
    eager_error: float  # max |eager - reference|
    bound: float  # factor * eager_error + floor
    message: str


def _error(a: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None, norm: str) -> float:
    d = (a.detach().to(torch.float64) - ref).abs()
    d = torch.where(ref.isnan() & a.detach().isnan(), 0.0, d)  # NaN where the reference has NaN is right
    d = torch.where(d.isnan(), float("inf"), d)  # any other NaN is infinitely wrong
    if mask is not None:
        d = d[mask]
    if not d.numel():
        return 0.0
    return float(d.max()) if norm == "max" else float(d.norm())


def _size(ref: torch.Tensor, norm: str) -> float:
    return (float(ref.abs().max()) if norm == "max" else float(ref.norm())) if ref.numel() else 0.0


def judge(
    actual: torch.Tensor,
    reference: torch.Tensor,
    eager: torch.Tensor,
    *,
    name: str = "value",
    factor: float = FACTOR,
    floor_ulps: float = 1.0,
    mask: torch.Tensor | None = None,
    norm: str = "max",
    floor_rel: float = 0.0,
) -> Verdict:
    """The rule above as a verdict (no exception): for benchmarks that record a failure and go on."""
    if norm not in ("max", "l2"):
        raise ValueError(f"norm must be 'max' or 'l2', got {norm!r}")
    if actual.shape != reference.shape or eager.shape != reference.shape:
        return Verdict(
            False,
            float("inf"),
            float("nan"),
            float("nan"),
            f"{name}: shapes differ: actual {tuple(actual.shape)}, eager {tuple(eager.shape)}, "
            f"reference {tuple(reference.shape)}",
        )
    ref = reference.detach().to(torch.float64)
    finite = ref[ref.isfinite()] if mask is None else ref[mask & ref.isfinite()]
    scale = _size(finite, norm)
    error = _error(actual, ref, mask, norm)
    eager_error = _error(eager, ref, mask, norm)
    if not (eager_error < float("inf")) or eager_error > max(scale, 1e-30):
        return Verdict(
            False,
            error,
            eager_error,
            float("nan"),
            f"{name}: eager {eager.dtype} error {eager_error:.3g} against values of size {scale:.3g}: no yardstick",
        )
    floor = 0.0
    if actual.is_floating_point():
        floor_ulps_rel = floor_ulps * torch.finfo(actual.dtype).eps
        if torch.finfo(actual.dtype).bits <= 32:  # fp32 accumulation over many terms: a few fp32 ulps at least
            floor_ulps_rel = max(floor_ulps_rel, ACCUMULATION_ULPS * torch.finfo(torch.float32).eps)
        floor = max(floor_rel, floor_ulps_rel) * scale
    bound = factor * eager_error + floor
    ok = error <= bound
    message = (
        f"{name}: {norm} error {error:.3g} {'<=' if ok else '>'} {factor:g} x eager {eager.dtype} error "
        f"{eager_error:.3g} + floor {floor:.3g} ({norm} size of the reference {scale:.3g})"
    )
    return Verdict(ok, error, eager_error, bound, message)


GATE_FP32_FLOOR = 1e-4
GATE_GRADIENT_FLOOR = 1e-2


def gate(
    actual: torch.Tensor, reference: torch.Tensor, eager: torch.Tensor, *, name: str = "value", gradient: bool = False
) -> Verdict:
    """The benchmarks' check of a provider before it is timed: the rule with a floor fit for results at scale.
    - Outputs (largest error): the floor is raised to 1e-4 of the reference's size for fp32 results. fp32
      implementations that sum in another order differ from fp64 by up to ~1e-5 relative, far above twice eager's
      error, while a wrong kernel is off by far more than 1e-4.
    - Gradients (l2 error, floor 1e-2 of the reference's l2 size, any dtype): at benchmark sizes some code entry
      always sits at the threshold's kink, and where two correct implementations round it to opposite sides the
      gradient moves by O(1) along that entry's path: one flipped entry of 5e5 moved the l2 gradient by ~1e-3
      (csc-gray, deep-layer, fp32 on CPU), while a wrong backward is off by O(1).
    Accuracy itself is the tests' business (tests/tolerance.py's plain rule on kink-free or same-support problems)."""
    if gradient:
        return judge(actual, reference, eager, name=name, norm="l2", floor_rel=GATE_GRADIENT_FLOOR)
    floor_rel = GATE_FP32_FLOOR if actual.dtype == torch.float32 else 0.0
    return judge(actual, reference, eager, name=name, floor_rel=floor_rel)


def assert_close_by_rule(
    actual: torch.Tensor,
    reference: torch.Tensor,
    eager: torch.Tensor,
    *,
    name: str = "value",
    factor: float = FACTOR,
    floor_ulps: float = 1.0,
    mask: torch.Tensor | None = None,
    norm: str = "max",
) -> Verdict:
    """Raise AssertionError unless ``actual`` is within the rule; returns the verdict for printing."""
    verdict = judge(actual, reference, eager, name=name, factor=factor, floor_ulps=floor_ulps, mask=mask, norm=norm)
    assert verdict.ok, verdict.message
    return verdict
