"""The fused Triton conv-ISTA backend against the eager reference.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py sets it before anything
imports triton), so shapes are tiny and odd. Problems are drawn so that no iterate sits within 1e-4 of its
threshold kink: there fp32 kernels and the fp64 reference may legitimately disagree on the support, and one flipped
entry changes every gradient. The support is then compared exactly and the values with a tolerance.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import dsc_kernels.functional as DF  # noqa: E402
from dsc_kernels.reference.conv import conv_analysis_ref, conv_synthesis_ref  # noqa: E402
from dsc_kernels.reference.conv_ista import conv_ista_ref, fista_momentum  # noqa: E402

ON_GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a GPU or TRITON_INTERPRET=1")

KINK_MARGIN = 1e-4


def _kink_margin(p) -> float:
    """min over iterations and entries of | |u_k| - step_k lam_k | (u_k - step_k lam_k when nonneg), in fp64."""
    x, w = p["x"].detach().double(), p["weight"].detach().double()
    we = w if p["encoder_weight"] is None else p["encoder_weight"].detach().double()
    lam, step = p["lam"].detach().double(), p["step"].detach().double()
    rank = w.dim() - 2
    z = conv_analysis_ref(x, w, p["stride"], p["padding"]) * 0 if p["z0"] is None else p["z0"].detach().double()
    z_prev, margin = z, float("inf")
    for k, beta in enumerate(fista_momentum(step.shape[0])):
        y = z + beta * (z - z_prev) if p["fista"] else z
        r = x - conv_synthesis_ref(y, w, x.shape[2:], p["stride"], p["padding"])
        u = y + step[k] * conv_analysis_ref(r, we, p["stride"], p["padding"])
        th = (step[k] * lam[k]).reshape(1, -1, *([1] * rank))
        gap = (u - th) if p["nonneg"] else (u.abs() - th)
        margin = min(margin, gap.abs().min().item())
        z_prev, z = z, torch.where(gap > 0, u - th * (u.sign() if not p["nonneg"] else 1), torch.zeros_like(u))
    return margin


def _problem(*, rank, batch=2, c_sig=2, c_code=3, size=(9, 11), kernel=(3, 3), stride=(1, 1), padding=(1, 1),
             n_iter=2, untied=False, z0=False, nonneg=False, fista=False, seed=0, device="cpu", kink_free=True):
    """A random problem in fp64 whose iterates all stay KINK_MARGIN away from the threshold (if kink_free)."""
    sl = slice(0, 2) if rank == 2 else slice(1, 2)
    size, kernel, stride, padding = size[sl], kernel[sl], stride[sl], padding[sl]
    for attempt in range(50):
        gen = torch.Generator().manual_seed(seed + 1000 * attempt)

        def rnd(*shape, scale=1.0):
            return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

        x = rnd(batch, c_sig, *size)
        w = rnd(c_code, c_sig, *kernel, scale=0.4)
        zs = conv_analysis_ref(x, w, stride, padding).shape
        p = dict(x=x, weight=w, encoder_weight=rnd(c_code, c_sig, *kernel, scale=0.4) if untied else None,
                 lam=torch.rand(n_iter, c_code, generator=gen, dtype=torch.float64) * 1.5 + 0.05,
                 step=torch.rand(n_iter, generator=gen, dtype=torch.float64) * 0.1 + 0.1,
                 z0=rnd(*zs, scale=0.5) if z0 else None, stride=stride, padding=padding, nonneg=nonneg,
                 fista=fista)
        if not kink_free or _kink_margin(p) > KINK_MARGIN:
            return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in p.items()}
    raise AssertionError("could not draw a problem away from the threshold kink")


GRAD_NAMES = ("x", "weight", "encoder_weight", "lam", "step", "z0")


@pytest.fixture(params=["single-launch", "per-iteration"])
def launch(request, monkeypatch):
    """Both forward paths: tiny test codes take the single-launch kernel unless the size limit is lowered."""
    from dsc_kernels.triton import conv_ista as tci
    if request.param == "per-iteration":
        monkeypatch.setattr(tci, "SINGLE_LAUNCH_MAX_CODE_BYTES", 0)
    return request.param


def _run(p, dtype, backend, recompute=False):
    """z and the gradients of <z, G> for every tensor input."""
    leaves = {k: p[k].detach().to(dtype).requires_grad_() for k in GRAD_NAMES if p[k] is not None}
    opts = dict(stride=p["stride"], padding=p["padding"], nonneg=p["nonneg"], fista=p["fista"])
    if backend == "reference":
        z = conv_ista_ref(leaves["x"], leaves["weight"], leaves["lam"], leaves["step"],
                          encoder_weight=leaves.get("encoder_weight"), z0=leaves.get("z0"), **opts)
    else:
        z = DF.conv_ista(leaves["x"], leaves["weight"], leaves["lam"], n_iter=p["step"].shape[0],
                         step=leaves["step"], encoder_weight=leaves.get("encoder_weight"), z0=leaves.get("z0"),
                         backend=backend, recompute=recompute, **opts)
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(z)
    grads = torch.autograd.grad((z * g).sum(), list(leaves.values()))
    return z.detach(), dict(zip(leaves, grads))


def _compare(p, dtype=torch.float32, recompute=False, rtol=2e-4, atol=2e-5):
    z_ref, g_ref = _run(p, torch.float64, "reference")
    z, grads = _run(p, dtype, "triton", recompute)
    assert z.dtype == dtype and z.shape == z_ref.shape
    assert torch.equal(z != 0, z_ref != 0), "support differs"
    torch.testing.assert_close(z.double(), z_ref, rtol=rtol, atol=atol)
    assert grads.keys() == g_ref.keys()
    for name, ref in g_ref.items():
        assert grads[name].dtype == dtype and grads[name].shape == ref.shape, name
        scale = ref.abs().max().item() + 1e-12
        torch.testing.assert_close(grads[name].double(), ref, rtol=rtol, atol=atol * scale, msg=name)
    return z, grads


# Each case covers a different corner: geometry (odd sizes, strides, asymmetric padding, non-square kernels),
# options (untied, z0, nonneg, FISTA) and both save modes.
CASES_2D = {
    "ista-tied-s1": dict(),
    "fista-untied-s2-recompute": dict(kernel=(4, 3), stride=(2, 2), padding=(1, 2), untied=True, fista=True,
                                      z0=True, recompute=True),
    "nonneg-fista-s21": dict(size=(10, 9), kernel=(3, 2), stride=(2, 1), padding=(0, 1), nonneg=True, fista=True,
                             z0=True),
    "nonneg-untied-p0-recompute": dict(size=(7, 8), kernel=(2, 3), padding=(0, 0), nonneg=True, untied=True,
                                       n_iter=3, recompute=True),
}
CASES_1D = {
    "ista-s2": dict(size=(1, 17), kernel=(1, 5), stride=(1, 2), padding=(0, 2), recompute=True),
    "fista-nonneg-untied": dict(size=(1, 13), kernel=(1, 4), padding=(0, 0), nonneg=True, fista=True, untied=True,
                                z0=True),
}


@pytest.mark.parametrize("case", sorted(CASES_2D))
def test_matches_reference_2d(case, launch):
    opts = dict(CASES_2D[case])
    recompute = opts.pop("recompute", False)
    _compare(_problem(rank=2, **opts), recompute=recompute)


@pytest.mark.parametrize("case", sorted(CASES_1D))
def test_matches_reference_1d(case, launch):
    opts = dict(CASES_1D[case])
    recompute = opts.pop("recompute", False)
    _compare(_problem(rank=1, **opts), recompute=recompute)


def test_several_tiles_and_channel_blocks(launch):
    # Taller/wider than the interpreter's 8x16 code tile and more channels than one 16-wide block, so halos cross
    # tile borders and every GEMM has several N and K blocks.
    p = _problem(rank=2, batch=1, c_sig=17, c_code=17, size=(10, 18), kernel=(3, 3), stride=(1, 1),
                 padding=(1, 1), n_iter=2, untied=True, fista=True)
    _compare(p, rtol=5e-4)


def test_save_and_recompute_agree_bitwise(launch):
    p = _problem(rank=2, size=(7, 9), fista=True, untied=True, n_iter=3, z0=True)
    z_save, g_save = _run(p, torch.float32, "triton", recompute=False)
    z_rec, g_rec = _run(p, torch.float32, "triton", recompute=True)
    assert torch.equal(z_save, z_rec)
    for name in g_save:
        assert torch.equal(g_save[name], g_rec[name]), name


def test_launchers_canonical_contract():
    from dsc_kernels.triton.conv_ista import conv_ista_bwd, conv_ista_fwd
    p = _problem(rank=2, untied=True, z0=True, n_iter=2)
    args = [p[k].float() for k in ("x", "weight", "encoder_weight", "lam", "step", "z0")]
    geo = [list(p["stride"]), list(p["padding"]), False, False]
    z, iterates = conv_ista_fwd(*args, *geo, 1)
    assert iterates.shape == (1, *args[5].shape)  # z_1 (z_0 is the input, z_2 the output)
    _, empty = conv_ista_fwd(*args, *geo, 0)
    assert empty.shape == (0,)
    with pytest.raises(ValueError, match="checkpoint must be 0 or 1"):
        conv_ista_fwd(*args, *geo, 2)
    grads = conv_ista_bwd(torch.ones_like(z), *args, z, iterates, *geo, 1)
    assert [g.shape for g in grads] == [a.shape for a in args]
    # Deterministic: no atomics anywhere, so a second backward is bit-identical.
    again = conv_ista_bwd(torch.ones_like(z), *args, z, iterates, *geo, 1)
    assert all(torch.equal(a, b) for a, b in zip(grads, again))
    # An empty z0 is zeros and gets an empty gradient.
    z_empty, _ = conv_ista_fwd(*args[:5], args[0].new_empty(0), *geo, 0)
    z_zeros, _ = conv_ista_fwd(*args[:5], torch.zeros_like(args[5]), *geo, 0)
    assert torch.equal(z_empty, z_zeros)
    g_empty = conv_ista_bwd(torch.ones_like(z), *args[:5], args[0].new_empty(0), z.new_empty(0), empty, *geo, 0)
    assert g_empty[-1].shape == (0,)


# The interpreter cannot run on the FakeTensors that AOT tracing feeds a triton_op, so test_aot_dispatch_dynamic
# runs only on a GPU (TestGPU.test_opcheck).
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def _opcheck(save, fista, nonneg, utils):
    from dsc_kernels.ops import op_pair
    ops = op_pair("conv_ista", "triton")
    dev = "cuda" if ON_GPU else "cpu"
    p = _problem(rank=2, size=(6, 7), stride=(2, 1), untied=True, z0=True, fista=fista, nonneg=nonneg,
                 device=dev, kink_free=False)
    tensors = [p[k].float() for k in ("x", "weight", "encoder_weight", "lam", "step", "z0")]
    geo = [list(p["stride"]), list(p["padding"]), nonneg, fista]
    checkpoint = int(save)
    torch.library.opcheck(ops.forward, ([t.clone().requires_grad_() for t in tensors] + geo + [checkpoint]),
                          test_utils=utils)
    z, iterates = ops.forward(*tensors, *geo, checkpoint)
    # The backward op is not itself differentiable (no double backward).
    torch.library.opcheck(ops.backward, (torch.randn_like(z), *tensors, z, iterates, *geo, checkpoint),
                          test_utils=tuple(u for u in utils if u != "test_autograd_registration"))


@pytest.mark.parametrize("save,fista,nonneg", [(True, False, False), (False, True, True)])
def test_opcheck(save, fista, nonneg):
    _opcheck(save, fista, nonneg, OPCHECK_UTILS)


def test_dynamo_fullgraph_through_functional():
    # backend="eager" stops after Dynamo: it proves there is no graph break between functional.conv_ista and the
    # op without asking the interpreter to run on FakeTensors (TestGPU compiles for real).
    p = _problem(rank=2, n_iter=2, kink_free=False)
    x, w, lam, step = (p[k].float() for k in ("x", "weight", "lam", "step"))

    def f(x, w, lam, step):
        return DF.conv_ista(x, w, lam, n_iter=2, step=step, padding=1, backend="triton")

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x, w, lam, step),
                               f(x, w, lam, step), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_and_backward(dtype):
    # Inputs rounded to `dtype`, fp32 accumulation, iterates stored in `dtype`: compared with fp64 on the same
    # rounded inputs, the backward on the kernel's own iterates, with the dtype's tolerance.
    p = _problem(rank=2, n_iter=2, untied=True, fista=True, kink_free=False)
    p = {k: v.to(dtype).double() if isinstance(v, torch.Tensor) else v for k, v in p.items()}
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    _compare_at_scale(p, dtype, rtol=tol, atol=tol)


@pytest.mark.parametrize("rank", [1, 2])
def test_scalar_lam_and_step_through_functional(rank):
    # functional expands a float lam/step to (n_iter, C) / (n_iter,) before the op; tied weight used twice.
    p = _problem(rank=rank, size=(6, 13), kernel=(3, 3), stride=(2, 2), padding=(1, 1), n_iter=2, kink_free=False)
    x, w = p["x"].float(), p["weight"].float()
    opts = dict(n_iter=2, step=0.15, stride=p["stride"], padding=p["padding"])
    torch.testing.assert_close(DF.conv_ista(x, w, 0.05, backend="triton", **opts),
                               DF.conv_ista(x, w, 0.05, backend="reference", **opts), rtol=1e-5, atol=1e-5)


def test_nan_propagates_like_softshrink():
    p = _problem(rank=2, n_iter=1)
    x = p["x"].float().clone()
    x[0, 0, 4, 5] = float("nan")
    z = DF.conv_ista(x, p["weight"].float(), p["lam"].float(), n_iter=1, step=p["step"].float(),
                     stride=p["stride"], padding=p["padding"], backend="triton")
    ref = conv_ista_ref(x, p["weight"].float(), p["lam"].float(), p["step"].float(), stride=p["stride"],
                        padding=p["padding"])
    assert torch.equal(z.isnan(), ref.isnan()) and z.isnan().any()


def _compare_at_scale(p, dtype, rtol, atol, recompute=False):
    """Large problems always have entries near a threshold kink, so instead of insisting on equal supports: the
    forward may differ from the fp64 reference on a tiny fraction of the support, and the backward is checked
    against the hand-written fp64 VJP evaluated on the kernel's own iterates (hence on the same supports)."""
    from dsc_kernels.reference.conv_ista import conv_ista_bwd_ref, conv_ista_fwd_ref
    from dsc_kernels.triton.conv_ista import conv_ista_bwd, conv_ista_fwd
    we = p["weight"] if p["encoder_weight"] is None else p["encoder_weight"]
    z0 = conv_analysis_ref(p["x"], p["weight"], p["stride"], p["padding"]) * 0 if p["z0"] is None else p["z0"]
    args64 = [p["x"], p["weight"], we, p["lam"], p["step"], z0]
    stride, padding = list(p["stride"]), list(p["padding"])
    if p["weight"].dim() == 3:  # the canonical op tensors are 2-D: 1-D runs as H = 1
        args64 = [a.unsqueeze(2) if i in (0, 1, 2, 5) else a for i, a in enumerate(args64)]
        stride, padding = [1] + stride, [0] + padding
    geo = (stride, padding, p["nonneg"], p["fista"])
    args = [a.to(dtype) for a in args64]
    z, iterates = conv_ista_fwd(*args, *geo, 1)
    z_ref, _ = conv_ista_fwd_ref(*args64, *geo, 0)
    same = (z != 0) == (z_ref != 0)
    assert same.double().mean().item() > 0.999
    torch.testing.assert_close(torch.where(same, z.double(), z_ref), z_ref, rtol=rtol,
                               atol=atol * z_ref.abs().max().item())
    gz = torch.randn(z.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(z.device)
    grads = conv_ista_bwd(gz.to(dtype), *args, z, iterates.new_empty(0) if recompute else iterates, *geo,
                          0 if recompute else 1)
    ref = conv_ista_bwd_ref(gz, *args64, z.double(), iterates.double(), *geo, 1)
    for name, a, b in zip(GRAD_NAMES, grads, ref):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol * b.abs().max().item(), msg=name)


@pytest.mark.parametrize("rank", [1, 2])
def test_kink_tolerant_comparison(rank):
    # The GPU tests' comparison, exercised here on a problem that is not kink-free.
    p = _problem(rank=rank, size=(1, 15) if rank == 1 else (9, 11), kernel=(1, 3) if rank == 1 else (3, 3),
                 padding=(0, 1) if rank == 1 else (1, 1), untied=True, fista=True, z0=True, n_iter=2,
                 kink_free=False)
    _compare_at_scale(p, torch.float32, rtol=1e-4, atol=1e-5, recompute=rank == 1)


@pytest.mark.gpu
class TestGPU:
    """Larger shapes on a CUDA device, half precision, and torch.compile through the op."""

    @pytest.fixture(autouse=True)
    def _ieee_fp32(self, monkeypatch):
        # fp32 kernels follow cuDNN's TF32 switch; IEEE dots make the fp32 comparison meaningful.
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

    @pytest.mark.parametrize("fista", [False, True])
    @pytest.mark.parametrize("recompute", [False, True])
    def test_float32_strided(self, fista, recompute):
        p = _problem(rank=2, batch=4, c_sig=3, c_code=40, size=(45, 37), kernel=(6, 6), stride=(2, 2),
                     padding=(2, 2), n_iter=4, untied=True, fista=fista, z0=True, device="cuda", kink_free=False)
        _compare_at_scale(p, torch.float32, rtol=1e-4, atol=1e-5, recompute=recompute)

    def test_float32_deep_layer(self):
        p = _problem(rank=2, batch=2, c_sig=64, c_code=96, size=(32, 32), kernel=(3, 3), n_iter=3, nonneg=True,
                     device="cuda", kink_free=False)
        _compare_at_scale(p, torch.float32, rtol=1e-4, atol=1e-5)

    def test_float32_1d(self):
        p = _problem(rank=1, batch=8, c_sig=4, c_code=32, size=(1, 1000), kernel=(1, 9), padding=(0, 4),
                     n_iter=4, fista=True, device="cuda", kink_free=False)
        _compare_at_scale(p, torch.float32, rtol=1e-4, atol=1e-5)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half(self, dtype):
        p = _problem(rank=2, batch=4, c_sig=16, c_code=64, size=(32, 32), kernel=(7, 7), padding=(3, 3), n_iter=5,
                     device="cuda", kink_free=False)
        p = {k: v.to(dtype).double() if isinstance(v, torch.Tensor) else v for k, v in p.items()}
        tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
        _compare_at_scale(p, dtype, rtol=tol, atol=tol)

    @pytest.mark.parametrize("save", [True, False])
    def test_opcheck(self, save):
        _opcheck(save, True, False, OPCHECK_UTILS + ("test_aot_dispatch_dynamic",))

    def test_torch_compile_fullgraph(self):
        p = _problem(rank=2, batch=2, c_sig=3, c_code=32, size=(33, 30), kernel=(5, 5), padding=(2, 2), n_iter=3,
                     device="cuda", kink_free=False)
        x, w, lam, step = (p[k].float().requires_grad_() for k in ("x", "weight", "lam", "step"))

        def f(x, w, lam, step):
            return DF.conv_ista(x, w, lam, n_iter=3, step=step, padding=2, backend="triton").square().sum()

        compiled = torch.compile(f, fullgraph=True)
        eager_loss = f(x, w, lam, step)
        eager_grads = torch.autograd.grad(eager_loss, (x, w, lam, step))
        loss = compiled(x, w, lam, step)
        grads = torch.autograd.grad(loss, (x, w, lam, step))
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, eager_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
