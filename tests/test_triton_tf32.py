"""TF32 in the Triton conv-ISTA kernels: operands are rounded to nearest, not truncated.

With cuDNN's TF32 switch on (PyTorch's default) the kernels run fp32 dots on TF32 tensor cores. Triton hands them
the fp32 bits, and the hardware drops the low 13 mantissa bits; the kernels round each operand first (`_tf32`,
ties away from zero as cvt.rna.tf32.f32, cuBLAS and cuDNN do). On an H200, before the rounding, the csc-gray
forward's error against fp64 was 2.6x cuDNN's own TF32 error.

The interpreter's tl.dot multiplies exact fp32 whatever the precision, so there the rounding is all that makes a
TF32 run differ from an IEEE one: the fused forward must match a float64 emulation of the recurrence whose
convolution operands are rounded to TF32, and not the one whose operands are truncated. On a GPU the same checks
run compiled.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from helpers import conv_problem  # noqa: E402

from dsc_kernels.reference.conv import conv_analysis_ref, conv_synthesis_ref, soft_threshold_ref  # noqa: E402
from dsc_kernels.reference.conv_ista import fista_momentum  # noqa: E402
from dsc_kernels.triton.conv_ista import conv_ista_fwd  # noqa: E402
from dsc_kernels.triton.conv_ista.config import _dot_weights  # noqa: E402
from dsc_kernels.triton.conv_ista.tiles import _tf32  # noqa: E402

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.interpreter, id="interpreter"),
    pytest.param("cuda", marks=pytest.mark.gpu, id="gpu"),
]


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, IN_PREC: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n, other=0.0)
    tl.store(out_ptr + i, _tf32(x, IN_PREC), mask=i < n)


def _rna_numpy(x: np.ndarray) -> np.ndarray:
    """Round fp32 to TF32 (10 mantissa bits), to nearest with ties away from zero, by exact rational arithmetic
    in float64: an independent statement of cvt.rna.tf32.f32."""
    x64 = x.astype(np.float64)
    out = x64.copy()
    finite = np.isfinite(x64) & (x64 != 0)
    m, e = np.frexp(np.abs(x64[finite]))  # |x| = m 2^e, m in [0.5, 1): TF32 keeps 11 significant bits
    e = np.maximum(e, -125)  # fp32 subnormals share the smallest normal's quantum
    q = np.ldexp(1.0, e - 11)
    out[finite] = np.sign(x64[finite]) * np.floor(np.abs(x64[finite]) / q + 0.5) * q
    with np.errstate(over="ignore"):  # past the largest TF32 value: inf, as in hardware
        return out.astype(np.float32)


def _truncate(t: torch.Tensor) -> torch.Tensor:
    return (t.float().view(torch.int32) & -8192).view(torch.float32).to(t.dtype)


def _round(t: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(_rna_numpy(t.float().cpu().numpy())).to(t)


# The rounding the kernels run: bit arithmetic under the interpreter, the PTX conversion when compiled.
PRECISIONS = [
    pytest.param("cpu", "tf32", marks=pytest.mark.interpreter, id="interpreter"),
    pytest.param("cuda", "tf32", marks=pytest.mark.gpu, id="gpu-bits"),
    pytest.param("cuda", "tf32-rna", marks=pytest.mark.gpu, id="gpu-cvt"),
]


@pytest.mark.parametrize("device,in_prec", PRECISIONS)
def test_tf32_rounding_is_round_to_nearest_ties_away(device, in_prec):
    specials = [0.0, -0.0, 1.0, 1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11), 1 + 2**-11 - 2**-23, 3.4028235e38]
    specials += [-3.4028235e38, 2**-149, 2**-126, 1.5 * 2**-136, float("inf"), -float("inf"), 6.5e4, 1e-30]
    rng = np.random.default_rng(3)
    draws = rng.standard_normal(4000) * np.exp(rng.uniform(-60, 60, 4000))
    x = torch.tensor(np.concatenate([specials, draws]), dtype=torch.float32)
    x = torch.cat([x, torch.tensor([float("nan")])]).to(device)
    out = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), IN_PREC=in_prec, BLOCK=1024)
    expected = torch.from_numpy(_rna_numpy(x.cpu().numpy())).to(device)
    assert torch.equal(out[:-1], expected[:-1])
    assert out[-1].isnan()
    assert torch.equal(out[3:5].cpu(), torch.tensor([1 + 2**-10, 1 + 2**-9])), "ties go away from zero"
    assert out[7] == float("inf") and out[8] == -float("inf"), "past the largest TF32 value rounds to inf"
    ieee = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, ieee, x.numel(), IN_PREC="ieee", BLOCK=1024)
    assert torch.equal(ieee[:-1], x[:-1]), "IEEE dots leave the operands alone"


@pytest.mark.parametrize("device,in_prec", PRECISIONS)
def test_launchers_round_the_dictionaries_as_the_kernels_round_operands(device, in_prec, monkeypatch):
    # the weight tiles are rounded once on the host (_dot_weights); the bits must be the kernel's
    x = torch.tensor([1 + 2**-11, -(1 + 3 * 2**-11), 3.4028235e38, 2**-140, float("nan"), -float("inf"), 0.3])
    x = torch.cat([x, torch.randn(500) * 10]).to(device)
    in_kernel = torch.empty_like(x)
    _round_kernel[(1,)](x, in_kernel, x.numel(), IN_PREC=in_prec, BLOCK=512)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    w, we = _dot_weights(x, x)
    assert we is w and torch.equal(w[4:5].isnan(), torch.tensor([True], device=device))
    assert torch.equal(torch.cat([w[:4], w[5:]]), torch.cat([in_kernel[:4], in_kernel[5:]]))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # IEEE dots, and half inputs: left alone
    assert _dot_weights(x, x)[0] is x and _dot_weights(x.half(), x.half())[0].dtype == torch.float16


def _emulated(p, operand) -> torch.Tensor:
    """The conv-ISTA forward in float64, each convolution's two operands passed through `operand` first."""
    x, w = p["x"], p["weight"]
    we = w if p["encoder_weight"] is None else p["encoder_weight"]
    stride, padding = p["stride"], p["padding"]
    betas = fista_momentum(p["step"].shape[0]) if p["fista"] else [0.0] * p["step"].shape[0]
    z = prev = conv_analysis_ref(x, w, stride, padding) * 0
    for k, beta in enumerate(betas):
        y = z + beta * (z - prev)
        r = x - conv_synthesis_ref(operand(y), operand(w), x.shape[2:], stride, padding)
        u = y + p["step"][k] * conv_analysis_ref(operand(r), operand(we), stride, padding)
        prev, z = z, soft_threshold_ref(u, (p["step"][k] * p["lam"][k]).view(1, -1, 1, 1), p["nonneg"])
    return z


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fista", [False, True], ids=["ista", "fista"])
def test_fused_forward_rounds_operands_to_tf32(device, fista, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    p = conv_problem(
        batch=2, c_sig=3, c_code=5, size=(10, 9), kernel=(3, 3), stride=1, padding=1, n_iter=6, fista=fista
    )
    p = dict(
        p, **{k: p[k].float().double() for k in ("x", "weight", "encoder_weight", "lam", "step") if p[k] is not None}
    )
    we = p["weight"] if p["encoder_weight"] is None else p["encoder_weight"]
    args = [t.float().to(device) for t in (p["x"], p["weight"], we, p["lam"], p["step"])]
    z0 = torch.zeros(2, 5, 10, 9, device=device)
    z, _ = conv_ista_fwd(*args, z0, [1, 1], [1, 1], False, fista, 0)
    z = z.double().cpu()

    def err(ref):
        return ((z - ref).abs().max() / ref.abs().max()).item()

    rounded, truncated, exact = err(_emulated(p, _round)), err(_emulated(p, _truncate)), err(_emulated(p, lambda t: t))
    # Not equal even to the right emulation: the kernel's fp32 iterates differ from the emulation's by ~1e-7, and
    # an operand that close to a TF32 rounding boundary rounds to the other side (a whole TF32 ulp). Still the
    # kernel sits an order of magnitude closer to rounded operands than to exact or truncated ones.
    assert rounded < 0.2 * min(truncated, exact), (rounded, truncated, exact)


@pytest.mark.parametrize("device", DEVICES)
def test_recompute_backward_replays_at_the_forward_precision(device, monkeypatch):
    """Recompute mode replays the forward in the backward. With cuDNN's TF32 switch flipped in between, the replay
    read the new setting and differentiated another trajectory than the forward took (gradients off by TF32's
    ~1e-3); the backward now runs at the forward's setting, pinned for its own thread: it used to set the
    process-wide switch, which a second backward on another thread could leave flipped."""
    import dsc_kernels.functional as DF
    from dsc_kernels.triton import conv_ista as tci

    switch_seen = []
    in_prec = tci.config._in_prec
    # Every module that calls _in_prec holds its own reference to it (the forward, whose replays the backward runs,
    # the backward itself and the dictionaries' rounding): spy on each.
    for module in (tci.config, tci.forward, tci.backward):
        monkeypatch.setattr(
            module, "_in_prec", lambda dtype: (switch_seen.append(torch.backends.cudnn.allow_tf32), in_prec(dtype))[1]
        )
    p = conv_problem(batch=2, c_sig=3, c_code=5, size=(10, 9), kernel=(3, 3), n_iter=3, dtype=torch.float32)
    inputs = [p[k].to(device).requires_grad_() for k in ("x", "weight", "lam")]

    def grads(tf32_forward: bool, tf32_backward: bool):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32_forward)
        z = DF.conv_ista(*inputs, n_iter=3, step=0.1, padding=1, backend="triton", recompute=True)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32_backward)
        switch_seen.clear()
        out = torch.autograd.grad((z * torch.linspace(-1, 1, z.numel(), device=device).view_as(z)).sum(), inputs)
        assert switch_seen and set(switch_seen) == {tf32_backward}  # the caller's switch is never touched
        return out

    unflipped = {forward: grads(forward, forward) for forward in (False, True)}
    # the two settings give visibly different gradients, so a replay at the wrong one would show
    assert not all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(unflipped[True], unflipped[False]))
    for forward in (False, True):
        for name, got, ref in zip(("x", "weight", "lam"), grads(forward, not forward), unflipped[forward]):
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6, msg=name)
