"""The fused C++ CPU conv-ISTA backend ("cpp") against the autograd-through-eager reference.

The extension is built at import: on CI the compiler exists, so a failed build must fail this module loudly rather
than skip it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsc_kernels.functional as DF
from dsc_kernels import _ext
from dsc_kernels.ops import op_pair
from dsc_kernels.reference.conv_ista import KEEP_RESIDUALS, conv_ista_ref

ops = _ext.load()
op_pair("conv_ista", "cpp")  # registers the fakes and the autograd link of the C++ ops

# name, x shape, weight shape, stride, padding, n_iter, options
CASES = [
    ("2d-tied", (2, 1, 9, 11), (3, 1, 3, 3), 1, 1, 3, {}),
    ("2d-odd-untied-fista", (2, 2, 10, 13), (5, 2, 3, 4), 1, (0, 2), 3, dict(untied=True, fista=True)),
    (
        "2d-stride23-nonneg-fista",
        (3, 2, 11, 12),
        (9, 2, 4, 3),
        (2, 3),
        (1, 2),
        4,
        dict(untied=True, fista=True, nonneg=True),
    ),
    ("2d-stride3-fista", (2, 2, 13, 10), (6, 2, 3, 3), 3, (2, 1), 3, dict(fista=True)),
    ("2d-stride2-z0", (2, 3, 12, 12), (4, 3, 4, 4), 2, 1, 3, dict(z0=True, untied=True)),
    # wider than one vector tile and more code than signal channels (the 8-channel micro-kernel)
    ("2d-wide-nonneg", (1, 1, 7, 40), (10, 1, 5, 5), 1, 0, 4, dict(nonneg=True, z0=True)),
    # polyphase synthesis: a stride that does not divide the kernel, a stride larger than the kernel (phases no
    # tap reaches), and several column tiles per phase with more signal than code channels
    ("2d-stride2-k5x3-nonneg", (2, 3, 13, 12), (6, 3, 5, 3), 2, (2, 1), 3, dict(nonneg=True)),
    ("2d-stride-gt-kernel-fista", (2, 2, 11, 14), (5, 2, 2, 3), (3, 4), (1, 0), 3, dict(untied=True, fista=True)),
    ("2d-stride2-wide", (1, 9, 9, 70), (4, 9, 3, 5), 2, 1, 2, dict(z0=True)),
    ("1d-stride2-fista", (2, 2, 23), (5, 2, 5), 2, 2, 3, dict(fista=True, untied=True)),
    ("1d-stride3-nonneg", (2, 1, 30), (4, 1, 6), 3, 0, 3, dict(nonneg=True, z0=True)),
    # several checkpoint segments (save mode: every 2nd iterate, FISTA two of every 3), three items on two threads
    ("2d-long-fista", (3, 2, 9, 10), (5, 2, 3, 3), 1, 1, 8, dict(fista=True, untied=True, z0=True)),
    ("2d-long-stride2", (3, 1, 12, 11), (6, 1, 4, 3), 2, 1, 7, {}),
]


def _problem(xs, ws, stride, padding, n_iter, opts, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    rank = len(ws) - 2
    x = torch.randn(xs, generator=g, dtype=dtype)
    w = torch.randn(ws, generator=g, dtype=dtype)
    w = w / w.flatten(1).norm(dim=1).reshape(-1, *[1] * (rank + 1))
    we = (w + 0.3 * torch.randn(ws, generator=g, dtype=dtype)) if opts.get("untied") else None
    lam = 0.02 + 0.1 * torch.rand(n_iter, ws[0], generator=g, dtype=dtype)
    step = 0.15 + 0.2 * torch.rand(n_iter, generator=g, dtype=dtype)
    z0 = None
    if opts.get("z0"):
        st = (stride,) * rank if isinstance(stride, int) else stride
        pd = (padding,) * rank if isinstance(padding, int) else padding
        sz = [(s + 2 * p - k) // t + 1 for s, p, k, t in zip(xs[2:], pd, ws[2:], st)]
        z0 = 0.3 * torch.randn(xs[0], ws[0], *sz, generator=g, dtype=dtype)
    return dict(x=x, weight=w, encoder_weight=we, lam=lam, step=step, z0=z0)


def _run(fn, tensors, grad_seed=1):
    """z and the gradient of <z, g> with respect to every tensor input (None where an input is absent)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in tensors.items() if v is not None}
    z = fn(**leaves)
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=z.dtype)
    grads = torch.autograd.grad((z * g).sum(), list(leaves.values()))
    return z.detach(), dict(zip(leaves, grads))


def _ref_fn(stride, padding, n_iter, opts):
    def fn(x, weight, lam, step, encoder_weight=None, z0=None):
        return conv_ista_ref(
            x,
            weight,
            lam,
            step,
            encoder_weight=encoder_weight,
            stride=stride,
            padding=padding,
            z0=z0,
            nonneg=opts.get("nonneg", False),
            fista=opts.get("fista", False),
        )

    return fn


def _cpp_fn(stride, padding, n_iter, opts, recompute):
    def fn(x, weight, lam, step, encoder_weight=None, z0=None):
        return DF.conv_ista(
            x,
            weight,
            lam,
            n_iter=n_iter,
            step=step,
            encoder_weight=encoder_weight,
            stride=stride,
            padding=padding,
            z0=z0,
            nonneg=opts.get("nonneg", False),
            fista=opts.get("fista", False),
            backend="cpp",
            recompute=recompute,
        )

    return fn


def _support_report(z, z_ref, thresh_scale):
    """Support disagreement (z != 0) separately from the value error where the supports agree."""
    flips = (z != 0) != (z_ref != 0)
    same = ~flips
    value_err = (z - z_ref)[same].abs().max().item() if same.any() else 0.0
    # A flip is only legitimate on the kink: both values must then be tiny.
    flip_size = torch.maximum(z.abs(), z_ref.abs())[flips].max().item() if flips.any() else 0.0
    return flips.float().mean().item(), value_err, flip_size / thresh_scale


@pytest.mark.parametrize("recompute", [False, True], ids=["save", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name,xs,ws,stride,padding,n_iter,opts", CASES, ids=[c[0] for c in CASES])
def test_forward_and_gradients_match_reference(name, xs, ws, stride, padding, n_iter, opts, dtype, recompute):
    tensors = _problem(xs, ws, stride, padding, n_iter, opts, dtype)
    z_ref, g_ref = _run(_ref_fn(stride, padding, n_iter, opts), tensors)
    z, g = _run(_cpp_fn(stride, padding, n_iter, opts, recompute), tensors)
    assert z.shape == z_ref.shape and z.dtype == dtype

    flip_rate, value_err, flip_size = _support_report(z, z_ref, z_ref.abs().max().item())
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert flip_rate <= (0.0 if dtype == torch.float64 else 0.01), f"support disagreement {flip_rate:.2%}"
    assert flip_size <= tol, f"support flips away from the threshold (|z| up to {flip_size:.2e})"
    assert value_err <= tol * max(1.0, z_ref.abs().max().item()), f"value error {value_err:.2e}"

    assert g.keys() == g_ref.keys()
    for key in g_ref:
        scale = max(1.0, g_ref[key].abs().max().item())
        err = (g[key] - g_ref[key]).abs().max().item() / scale
        gtol = 1e-9 if dtype == torch.float64 else 2e-3 * (1 + 100 * flip_rate)
        assert err <= gtol, f"grad {key}: relative error {err:.2e}"


@pytest.mark.parametrize("checkpoint", [1, 2, 0], ids=["all", "every-2nd", "recompute"])
@pytest.mark.parametrize("z0_given", [True, False], ids=["z0", "zeros"])
def test_gradcheck_fp64(checkpoint, z0_given):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, generator=g)
    w = 0.5 * torch.randn(3, 2, 3, 2, dtype=torch.float64, generator=g)
    we = 0.5 * torch.randn(3, 2, 3, 2, dtype=torch.float64, generator=g)
    lam = 0.05 + 0.05 * torch.rand(3, 3, dtype=torch.float64, generator=g)
    step = torch.tensor([0.3, 0.25, 0.2], dtype=torch.float64)
    z0 = 0.2 * torch.randn(1, 3, 3, 5, dtype=torch.float64, generator=g)
    inputs = [t.requires_grad_() for t in (x, w, we, lam, step, z0)]

    def f(x, w, we, lam, step, z0):
        z0 = z0 if z0_given else x.new_empty(0)
        return ops.conv_ista_fwd_cpp(x, w, we, lam, step, z0, [2, 1], [1, 0], False, True, checkpoint)[0]

    assert torch.autograd.gradcheck(f, inputs if z0_given else inputs[:5] + [inputs[5].detach()], eps=1e-6, atol=1e-7)


def _op_args(requires_grad):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2, 7, 6, generator=g)
    w = 0.5 * torch.randn(4, 2, 3, 3, generator=g)
    lam = torch.full((2, 4), 0.05)
    step = torch.tensor([0.3, 0.2])
    z0 = torch.zeros(2, 4, 4, 3)
    if requires_grad:
        x, w, lam, step = (t.requires_grad_() for t in (x, w, lam, step))
    return x, w, lam, step, z0


@pytest.mark.parametrize("checkpoint", [2, 0, 2 | KEEP_RESIDUALS], ids=["save", "recompute", "save-residuals"])
def test_opcheck_forward(checkpoint):
    x, w, lam, step, z0 = _op_args(requires_grad=True)
    torch.library.opcheck(
        ops.conv_ista_fwd_cpp.default, (x, w, w, lam, step, z0, [2, 2], [1, 1], False, True, checkpoint)
    )
    torch.library.opcheck(
        ops.conv_ista_fwd_cpp.default, (x, w, w, lam, step, x.new_empty(0), [2, 2], [1, 1], False, True, checkpoint)
    )


def test_opcheck_backward():
    x, w, lam, step, z0 = _op_args(requires_grad=False)
    z, saved = ops.conv_ista_fwd_cpp(x, w, w, lam, step, z0, [2, 2], [1, 1], True, False, 1)
    torch.library.opcheck(
        ops.conv_ista_bwd_cpp.default,
        (torch.randn_like(z), x, w, w, lam, step, z0, z, saved, [2, 2], [1, 1], True, False, 1),
    )


@pytest.mark.parametrize("fista", [False, True], ids=["ista", "fista"])
@pytest.mark.parametrize("checkpoint", [1, 2, 3, 4, 0, 1 | KEEP_RESIDUALS, 3 | KEEP_RESIDUALS])
@pytest.mark.parametrize("batch", [1, 3], ids=["batch-path", "item-path"])
def test_checkpoints_match_the_reference_op(checkpoint, fista, batch):
    """The saved checkpoints (and kept residuals) are the reference's in the layout, and every segment replay of the
    backward gives the reference VJP (fp64, z0 given and as zeros, grad_z an expanded scalar). The direct forward
    keeps residuals from its band buffers on the batch path (one item on two threads) and from the item's buffer on
    the item path."""
    from dsc_kernels.reference.conv_ista import conv_ista_bwd_ref, conv_ista_fwd_ref

    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 2, 8, 9, dtype=torch.float64, generator=g)
    w = 0.4 * torch.randn(5, 2, 3, 3, dtype=torch.float64, generator=g)
    lam = torch.full((7, 5), 0.05, dtype=torch.float64)
    step = torch.full((7,), 0.2, dtype=torch.float64)
    geo = ([1, 2], [1, 0], False, fista)
    for z0 in (x.new_empty(0), 0.2 * torch.randn(batch, 5, 8, 4, dtype=torch.float64, generator=g)):
        z, saved = ops.conv_ista_fwd_cpp(x, w, w, lam, step, z0, *geo, checkpoint)
        z_ref, saved_ref = conv_ista_fwd_ref(x, w, w, lam, step, z0, *geo, checkpoint)
        assert saved.shape == saved_ref.shape
        torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(saved, saved_ref, rtol=1e-12, atol=1e-12)
        grad_z = torch.ones((), dtype=torch.float64).expand_as(z)
        z_arg = z if checkpoint else z.new_empty(0)
        got = ops.conv_ista_bwd_cpp(grad_z, x, w, w, lam, step, z0, z_arg, saved, *geo, checkpoint)
        want = conv_ista_bwd_ref(grad_z, x, w, w, lam, step, z0, z_ref, saved_ref, *geo, checkpoint)
        for name, a, b in zip(("x", "weight", "encoder_weight", "lam", "step", "z0"), got, want):
            assert a.shape == b.shape, name
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("strategy", ["direct", "gemm"])
@pytest.mark.parametrize("fista", [False, True], ids=["ista", "fista"])
def test_an_interval_past_the_iterations_is_one_segment(strategy, fista, monkeypatch):
    """Every checkpoint interval m >= n_iter + 1 saves nothing and replays all n_iter iterations. The backwards sized
    their replay buffers by m as an int: m = 2**31 + 1 wrapped negative (gemm: segfault; direct: "Dimension size must
    be non-negative"), and m = 2**32 + 1 asked for terabytes. The raw op must give m = n_iter + 1's gradients."""
    monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", strategy)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, generator=g)
    w = 0.4 * torch.randn(3, 2, 3, 2, dtype=torch.float64, generator=g)
    lam, step = torch.full((4, 3), 0.05, dtype=torch.float64), torch.full((4,), 0.2, dtype=torch.float64)
    geo = ([1, 1], [1, 0], False, fista)
    grads = []
    for checkpoint in (5, 2**31 + 1, 2**32 + 1, 5 | KEEP_RESIDUALS, (2**31 + 1) | KEEP_RESIDUALS):
        z, saved = ops.conv_ista_fwd_cpp(x, w, w, lam, step, x.new_empty(0), *geo, checkpoint)
        grad_z = torch.randn(z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        grads.append(ops.conv_ista_bwd_cpp(grad_z, x, w, w, lam, step, x.new_empty(0), z, saved, *geo, checkpoint))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", ["direct", "gemm"])
@pytest.mark.parametrize("fista", [False, True], ids=["ista", "fista"])
@pytest.mark.parametrize("checkpoint", [2, 0, 2 | KEEP_RESIDUALS], ids=["save", "recompute", "save-residuals"])
def test_an_empty_encoder_is_the_tied_dictionary(checkpoint, fista, strategy, monkeypatch):
    """An empty encoder_weight runs E = D: the same z and saved tensors as the dictionary passed twice, one weight
    gradient that sums both uses, and an empty encoder gradient, on both strategies (stride 2 by 1, fp64). The gemm
    strategy's weight-gradient sums are channels-last copies for a weight smaller than a chunk's code (here) and the
    op's own gradient beyond: the second case is test_tied_weight_larger_than_a_chunk."""
    monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", strategy)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 3, 9, 8, dtype=torch.float64, generator=g)
    w = 0.3 * torch.randn(6, 3, 3, 3, dtype=torch.float64, generator=g)
    lam = torch.full((5, 6), 0.05, dtype=torch.float64)
    step = torch.full((5,), 0.25, dtype=torch.float64)
    geo = ([2, 1], [1, 1], False, fista)
    _tied_matches_twice(x, w, lam, step, geo, checkpoint)


def test_tied_weight_larger_than_a_chunk():
    """256 -> 256 channels on 4 x 4 maps: the weight is larger than a chunk's code, so the gemm strategy sums weight
    gradients straight into the op's gradient, which tied uses share."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 256, 4, 4, generator=g)
    w = torch.randn(256, 256, 3, 3, generator=g) / 48
    lam = torch.full((3, 256), 0.01)
    step = torch.full((3,), 0.2)
    assert ops.conv_ista_strategy_cpp(x, w, [1, 1], [1, 1]) == 1
    _tied_matches_twice(x, w, lam, step, ([1, 1], [1, 1], False, False), 2, tol=1e-5)


def _tied_matches_twice(x, w, lam, step, geo, checkpoint, tol=1e-12):
    z0 = x.new_empty(0)
    z, saved = ops.conv_ista_fwd_cpp(x, w, w, lam, step, z0, *geo, checkpoint)
    z_tied, saved_tied = ops.conv_ista_fwd_cpp(x, w, w.new_empty(0), lam, step, z0, *geo, checkpoint)
    assert torch.equal(z_tied, z) and torch.equal(saved_tied, saved)
    assert (z != 0).any() and (z == 0).any()  # a support to differentiate through
    grad_z = torch.randn_like(z)
    keep = z if checkpoint else z.new_empty(0)
    twice = ops.conv_ista_bwd_cpp(grad_z, x, w, w, lam, step, z0, keep, saved, *geo, checkpoint)
    tied = ops.conv_ista_bwd_cpp(grad_z, x, w, w.new_empty(0), lam, step, z0, keep, saved, *geo, checkpoint)
    assert tied[2].shape == (0,)
    torch.testing.assert_close(tied[1], twice[1] + twice[2], rtol=tol, atol=tol)
    for i in (0, 3, 4):
        torch.testing.assert_close(tied[i], twice[i], rtol=tol, atol=tol)


def test_keep_residuals_needs_an_interval():
    x, w, lam, step, _ = _op_args(requires_grad=False)
    with pytest.raises(RuntimeError, match="KEEP_RESIDUALS needs a checkpoint interval"):
        ops.conv_ista_fwd_cpp(x, w, w, lam, step, x.new_empty(0), [1, 1], [1, 1], False, False, KEEP_RESIDUALS)


def test_nan_propagates():
    x, w, lam, step, z0 = _op_args(requires_grad=False)
    x[0, 0, 3, 3] = float("nan")
    z0 = torch.zeros(2, 4, 7, 6)
    z, _ = ops.conv_ista_fwd_cpp(x, w, w, lam, step, z0, [1, 1], [1, 1], False, False, 0)
    assert z[0].isnan().any() and not z[1].isnan().any()


def test_compile_fullgraph_module():
    from dsc_kernels.nn import ConvSparseCoding2d

    torch.manual_seed(0)
    model = ConvSparseCoding2d(
        2, 4, 3, n_iter=3, learn_lam=True, learn_step=True, fista=True, recompute=True, backend="cpp"
    )
    x = torch.randn(2, 2, 9, 8)
    compiled = torch.compile(model, fullgraph=True)
    z_eager = model(x)
    z = compiled(x)
    torch.testing.assert_close(z, z_eager)
    grads = torch.autograd.grad(z.square().sum(), list(model.parameters()))
    grads_eager = torch.autograd.grad(z_eager.square().sum(), list(model.parameters()))
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b)


def test_build_cache_is_reused_by_another_process():
    libs = list(Path(_ext._build_dir(_ext._sources(), _ext._cflags())).glob("*.so"))
    assert len(libs) == 1
    before = libs[0].stat().st_mtime_ns
    _load_in_another_process(timeout=300)
    assert libs[0].stat().st_mtime_ns == before


def _load_in_another_process(timeout: float) -> str:
    """Loads the extension in a fresh interpreter; returns its stderr."""
    code = "import dsc_kernels._ext as e; e.load(); print(e.available())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("True"), out.stderr[-2000:]
    return out.stderr


def test_interrupted_build_leaves_no_marker_that_hangs_later_loads():
    """A build killed half-way leaves torch's `lock` marker in the cache folder; torch alone would wait on it forever
    in every later process. Loading removes it (under the advisory lock, so it is never a live build's) and loads."""
    build_dir = Path(_ext._build_dir(_ext._sources(), _ext._cflags()))
    marker = build_dir / "lock"
    marker.touch()
    try:
        stderr = _load_in_another_process(timeout=120)
    finally:
        stale = marker.exists()
        marker.unlink(missing_ok=True)
    assert not stale and "interrupted" in stderr


def test_build_failure_names_the_compiler_error(tmp_path, monkeypatch):
    """The uncached load (load.__wrapped__) on broken sources: the cached namespace of the real build stays, so
    later loads in this process never call the JIT builder again (a second cpp_extension.load of the same name
    would build a renamed copy and register every op twice, which aborts the process)."""
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "broken.cpp").write_text("int f() { return undeclared_name; }\n")
    monkeypatch.setattr(_ext, "_CSRC", tmp_path)
    monkeypatch.setattr(_ext, "_error", None)
    monkeypatch.setenv("DSC_KERNELS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="undeclared_name.*install"):
        _ext.load.__wrapped__()
    assert "undeclared_name" in _ext.build_error()


@pytest.mark.parametrize("encoder", ["none", "the-dictionary", "a-copy"])
def test_functional_runs_the_tied_op_for_a_dictionary_that_is_its_own_encoder(encoder, monkeypatch):
    """No encoder, or the dictionary tensor itself, runs the tied op (an empty encoder, one gradient); a copy of it
    is an untied encoder with its own gradient. All three give the reference's values and gradients."""
    from dsc_kernels.ops import conv_ista as conv_ista_ops
    from dsc_kernels.ops.registry import OpPair

    seen = []
    real = conv_ista_ops.traced_op_pair

    def spy(row, spec):
        pair = real(row, spec)

        def forward(*args):
            seen.append(tuple(args[2].shape))
            return pair.forward(*args)

        return OpPair(forward, pair.backward)

    monkeypatch.setattr(conv_ista_ops, "traced_op_pair", spy)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=g)
    w0 = 0.3 * torch.randn(5, 3, 3, 3, dtype=torch.float64, generator=g)
    grads = {}
    for backend in ("cpp", "reference"):
        w = w0.clone().requires_grad_()
        e = {"none": None, "the-dictionary": w, "a-copy": w0.clone().requires_grad_()}[encoder]
        z = DF.conv_ista(x, w, 0.05, n_iter=4, step=0.2, padding=1, encoder_weight=e, backend=backend)
        z.square().sum().backward()
        grads[backend] = (z, w.grad, None if e is None or e is w else e.grad)
    assert seen == [(0,) if encoder != "a-copy" else tuple(w0.shape)]
    for got, want in zip(grads["cpp"], grads["reference"]):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mark_static", [False, True])
def test_compile_dynamic_1d(mark_static):
    """torch.compile(dynamic=True) of a 1-D problem, the dictionary's shape dynamic or marked static. Inductor failed
    the dynamic one until the op's fake specialised the kernel size; a second kernel size recompiles."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    f = torch.compile(
        lambda x, w, p: DF.conv_ista(x, w, 0.1, n_iter=3, step=0.3, padding=p, backend="cpp"),
        fullgraph=True,
        dynamic=True,
    )
    for length, c_sig, k, p in ((11, 3, 3, 0), (20, 2, 5, 2)):
        x = torch.randn(2, c_sig, length, dtype=torch.float64, generator=g).requires_grad_()
        w = (0.3 * torch.randn(4, c_sig, k, dtype=torch.float64, generator=g)).requires_grad_()
        if mark_static:
            torch._dynamo.mark_static(w)
        z = f(x, w, p)
        z.square().sum().backward()
        x_ref, w_ref = (t.detach().clone().requires_grad_() for t in (x, w))
        want = DF.conv_ista(x_ref, w_ref, 0.1, n_iter=3, step=0.3, padding=p, backend="reference")
        want.square().sum().backward()
        for got, expected in ((z, want), (x.grad, x_ref.grad), (w.grad, w_ref.grad)):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
