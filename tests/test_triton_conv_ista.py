"""The fused Triton conv-ISTA backend against the eager reference, interpreted on CPU and compiled on a GPU.

Most tests take the `device` fixture and run twice: `interpreter` (CPU tensors under TRITON_INTERPRET=1, in the
interpreter process of `make test`) and `gpu` (CUDA tensors, kernels compiled, interpreter off); tests/conftest.py
skips whichever mode the process cannot run. Shapes are small and odd so that the interpreter stays quick; the
TestGPU class of tests/test_triton_conv_ista_gpu.py adds the larger shapes only a GPU runs in seconds.

fp32 runs with IEEE dots (cuDNN's TF32 switch off, which the kernels follow) and fixed tight tolerances. Problems
are drawn so that no iterate sits within 1e-4 of its threshold kink: there fp32 kernels and the fp64 reference may
legitimately disagree on the support, and one flipped entry changes every gradient; the support is then compared
exactly and the values with a tolerance. fp16, bf16 and TF32 are judged by tests/tolerance.py's rule (at most 2x
PyTorch's own eager error in that dtype/precision, against fp64), on problems that are not kink-free: the forward
as is, the backward on the kernel's own iterates (hence the same supports).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton")

from helpers import assert_conv_ista_fakes_match, conv_problem, fista_through_an_infinite_code  # noqa: E402
from tolerance import assert_close_by_rule  # noqa: E402

import dsc_kernels.functional as DF  # noqa: E402
from dsc_kernels.reference.conv import conv_analysis_ref, lipschitz_constant_ref, value_dtype  # noqa: E402
from dsc_kernels.reference.conv_ista import conv_ista_bwd_ref, conv_ista_fwd_ref, conv_ista_ref  # noqa: E402

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.interpreter, id="interpreter"),
    pytest.param("cuda", marks=pytest.mark.gpu, id="gpu"),
]
GRAD_NAMES = ("x", "weight", "encoder_weight", "lam", "step", "z0")


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _ieee_fp32(monkeypatch):
    # fp32 kernels follow cuDNN's TF32 switch (on by default); IEEE dots make the fp32 comparisons meaningful.
    # test_tf32_by_rule turns it back on.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


# Forward strategy and reduction order per `launch` parameter: the three forwards with the default tap-major
# threshold (the small shapes here have fewer channels than it, so their reductions run flattened), and two with
# every reduction tap-major, forward and backward, whatever the channel count.
LAUNCHES = {
    "single-launch": ("single-launch", None),
    "tiles": ("tiles", None),
    "two-pass": ("two-pass", None),
    "tap-major-two-pass": ("two-pass", 1),
    "tap-major-single-launch": ("single-launch", 1),
}


@pytest.fixture(params=sorted(LAUNCHES))
def launch(request):
    """Each forward strategy and both reduction orders of the conv kernels (triton/conv_ista/kernels.py)."""
    from dsc_kernels.triton import conv_ista as tci

    forward, tap_major_min_channels = LAUNCHES[request.param]
    with tci.strategy(forward, tap_major_min_channels):
        yield request.param


def _problem(*, device="cpu", kink_free=True, **opts):
    """The shared builder with this file's defaults: tied 2-D, two iterations, fp64."""
    base = dict(size=(9, 11), kernel=(3, 3), n_iter=2, untied=False, step_range=(0.1, 0.2), weight_scale=0.4)
    return conv_problem(**{**base, **opts}, device=device, kink_free=kink_free)


def _stable_problem(device="cpu", **opts):
    """A problem at scale whose iterations stay bounded: each dictionary is scaled so that step * ||D||^2 <= 0.9.
    The shared builder's weight scale suits its small default shapes; with tens of channels and 5x5 or 7x7 kernels
    it gave step * ||D||^2 of 18-218, the iterates grew by about that factor per iteration (to 1e7 in fp16, past its
    range) and so did every rounding error, which no precision rule can judge."""
    p = _problem(device="cpu", kink_free=False, **opts)
    args, geo = _canonical(p)
    limit = 0.9 / p["step"].max().item()
    for name in ("weight", "encoder_weight"):
        if p[name] is not None:
            size = args[0].shape[2:]
            w = p[name] if p[name].dim() == 4 else p[name].unsqueeze(2)
            p[name] = p[name] * min(1.0, (limit / lipschitz_constant_ref(w, size, geo[0], geo[1])) ** 0.5)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in p.items()}


def _run(p, dtype, backend, recompute=False):
    """z and the gradients of <z, G> for every tensor input."""
    leaves = {k: p[k].detach().to(dtype).requires_grad_() for k in GRAD_NAMES if p[k] is not None}
    opts = dict(stride=p["stride"], padding=p["padding"], nonneg=p["nonneg"], fista=p["fista"])
    if backend == "reference":
        z = conv_ista_ref(
            leaves["x"],
            leaves["weight"],
            leaves["lam"],
            leaves["step"],
            encoder_weight=leaves.get("encoder_weight"),
            z0=leaves.get("z0"),
            **opts,
        )
    else:
        z = DF.conv_ista(
            leaves["x"],
            leaves["weight"],
            leaves["lam"],
            n_iter=p["step"].shape[0],
            step=leaves["step"],
            encoder_weight=leaves.get("encoder_weight"),
            z0=leaves.get("z0"),
            backend=backend,
            recompute=recompute,
            **opts,
        )
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


def _canonical(p):
    """The op interface's arguments in fp64: 2-D tensors (1-D as H = 1), z0 materialised, untied encoder."""
    we = p["weight"] if p["encoder_weight"] is None else p["encoder_weight"]
    z0 = conv_analysis_ref(p["x"], p["weight"], p["stride"], p["padding"]) * 0 if p["z0"] is None else p["z0"]
    args = [t.detach().double() for t in (p["x"], p["weight"], we, p["lam"], p["step"], z0)]
    stride, padding = list(p["stride"]), list(p["padding"])
    if p["weight"].dim() == 3:
        args = [a.unsqueeze(2) if i in (0, 1, 2, 5) else a for i, a in enumerate(args)]
        stride, padding = [1] + stride, [0] + padding
    return args, (stride, padding, p["nonneg"], p["fista"])


def _in_dtype(args, dtype):
    """The op's canonical arguments in ``dtype``, lam and step in the dtype they are carried in (float32 for half)."""
    return [a.to(value_dtype(dtype) if i in (3, 4) else dtype) for i, a in enumerate(args)]


def _check_at_scale(p, dtype, *, recompute=False, tf32=False, rtol=1e-4, atol=1e-5):
    """Problems of any size (entries near a threshold kink included), through the launchers. Inputs are rounded to
    `dtype` first, so every comparison starts from the same numbers. fp32 with IEEE dots: fixed tolerances, the
    forward compared where the supports agree (at least 99.9% of entries). fp16/bf16/TF32: tests/tolerance.py's
    rule against PyTorch's eager computation in that dtype/precision. The backward is always evaluated on the
    kernel's own iterates, so all three VJPs (kernel, fp64, eager) see the same supports."""
    from dsc_kernels.triton.conv_ista import conv_ista_bwd, conv_ista_fwd, saved_iterates

    args64, geo = _canonical(p)
    args = _in_dtype(args64, dtype)
    args64 = [a.double() for a in args]
    z, iterates = conv_ista_fwd(*args, *geo, 1)
    z_ref, _ = conv_ista_fwd_ref(*args64, *geo, 0)
    gz = torch.randn(z.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(z.device)
    grads = conv_ista_bwd(
        gz.to(dtype), *args, z, iterates.new_empty(0) if recompute else iterates, *geo, 0 if recompute else 1
    )
    # The triton row stores its saved iterates channels last; the reference reads them in the contract's order.
    iterates_ref = saved_iterates(iterates)
    grads_ref = conv_ista_bwd_ref(gz, *args64, z.double(), iterates_ref.double(), *geo, 1)
    assert z.dtype == dtype and all(g.dtype == a.dtype for g, a in zip(grads, args))
    if dtype == torch.float32 and not tf32:
        same = (z != 0) == (z_ref != 0)
        assert same.double().mean().item() > 0.999
        torch.testing.assert_close(
            torch.where(same, z.double(), z_ref), z_ref, rtol=rtol, atol=atol * z_ref.abs().max().item()
        )
        for name, a, b in zip(GRAD_NAMES, grads, grads_ref):
            torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol * b.abs().max().item(), msg=name)
        return
    with _tf32_convolutions() if tf32 else contextlib.nullcontext():
        z_eager, _ = conv_ista_fwd_ref(*args, *geo, 0)
        grads_eager = conv_ista_bwd_ref(gz.to(dtype), *args, z, iterates_ref, *geo, 1)
    assert_close_by_rule(z, z_ref, z_eager, name="z")
    for name, a, b, e in zip(GRAD_NAMES, grads, grads_ref, grads_eager):
        assert_close_by_rule(a, b, e, name=f"grad {name}")


@contextlib.contextmanager
def _tf32_convolutions():
    """The eager reference with TF32 convolutions: every convolution's two operands rounded to TF32, products
    summed in fp32, as cuDNN computes when it takes a TF32 kernel. cuDNN need not take one when TF32 is allowed:
    on an H200 it ran this test's NCHW convolutions in plain fp32 (6.5e-7 from fp64, where TF32 itself is 5e-4),
    and PyTorch's own error was then no yardstick for a TF32 kernel."""
    import dsc_kernels.reference.conv_ista as R
    from dsc_kernels.triton.conv_ista import round_to_tf32 as _tf32  # checked against numpy: test_triton_tf32.py

    analysis, synthesis, weight_grad = R.conv_analysis_ref, R.conv_synthesis_ref, R.conv_weight_grad
    R.conv_analysis_ref = lambda x, w, *a, **kw: analysis(_tf32(x), _tf32(w), *a, **kw)
    R.conv_synthesis_ref = lambda z, w, *a, **kw: synthesis(_tf32(z), _tf32(w), *a, **kw)
    R.conv_weight_grad = lambda inp, shape, out, **kw: weight_grad(_tf32(inp), shape, _tf32(out), **kw)
    try:
        yield
    finally:
        R.conv_analysis_ref, R.conv_synthesis_ref, R.conv_weight_grad = analysis, synthesis, weight_grad


# Each case covers a different corner: geometry (odd sizes, strides, asymmetric padding, non-square kernels),
# options (untied, z0, nonneg, FISTA) and both save modes.
CASES_2D = {
    "ista-tied-s1": dict(),
    "fista-untied-s2-recompute": dict(
        kernel=(4, 3), stride=(2, 2), padding=(1, 2), untied=True, fista=True, z0=True, recompute=True
    ),
    "nonneg-fista-s21": dict(
        size=(10, 9), kernel=(3, 2), stride=(2, 1), padding=(0, 1), nonneg=True, fista=True, z0=True
    ),
    "nonneg-untied-p0-recompute": dict(
        size=(7, 8), kernel=(2, 3), padding=(0, 0), nonneg=True, untied=True, n_iter=3, recompute=True
    ),
}
CASES_1D = {
    "ista-s2": dict(size=(1, 17), kernel=(1, 5), stride=(1, 2), padding=(0, 2), recompute=True),
    "fista-nonneg-untied": dict(
        size=(1, 13), kernel=(1, 4), padding=(0, 0), nonneg=True, fista=True, untied=True, z0=True
    ),
}


@pytest.mark.parametrize("case", sorted(CASES_2D))
def test_matches_reference_2d(case, launch, device):
    opts = dict(CASES_2D[case])
    recompute = opts.pop("recompute", False)
    _compare(_problem(rank=2, device=device, **opts), recompute=recompute)


@pytest.mark.parametrize("case", sorted(CASES_1D))
def test_matches_reference_1d(case, launch, device):
    opts = dict(CASES_1D[case])
    recompute = opts.pop("recompute", False)
    _compare(_problem(rank=1, device=device, **opts), recompute=recompute)


def test_several_tiles_and_channel_blocks(launch, device):
    # Taller/wider than the interpreter's 8x16 code tile and more channels than one 16-wide block, so halos cross
    # tile borders and every GEMM has several N and K blocks.
    p = _problem(
        rank=2,
        batch=1,
        c_sig=17,
        c_code=17,
        size=(10, 18),
        kernel=(3, 3),
        stride=(1, 1),
        padding=(1, 1),
        n_iter=2,
        untied=True,
        fista=True,
        weight_scale=0.2,
        device=device,
    )
    _compare(p, rtol=5e-4)


def test_forward_strategy_rule_and_its_override():
    # auto: two-pass once both convolutions reduce over enough channels to run tap-major, else the fused tile
    # kernels, all iterations in one launch while an image's code is small; `strategy` pins either, and restores.
    from dsc_kernels.triton.conv_ista import strategies

    limit = strategies.SINGLE_LAUNCH_MAX_CODE_BYTES
    assert strategies.forward_strategy(16, 16, 10 * limit) == "two-pass"
    assert strategies.forward_strategy(15, 128, limit) == "single-launch"
    assert strategies.forward_strategy(128, 15, limit + 1) == "tiles"
    with strategies.strategy("tiles"):
        assert strategies.forward_strategy(64, 128, 0) == "tiles"
    with strategies.strategy(tap_major_min_channels=1):
        assert strategies.forward_strategy(1, 1, 0) == "two-pass"
    assert strategies.forward_strategy(1, 1, 0) == "single-launch"
    with pytest.raises(ValueError, match="forward strategy"):
        with strategies.strategy("fastest"):
            pass
    assert strategies.FORWARD_STRATEGY == "auto"


def test_save_and_recompute_agree_bitwise(launch, device):
    p = _problem(rank=2, size=(7, 9), fista=True, untied=True, n_iter=3, z0=True, device=device)
    z_save, g_save = _run(p, torch.float32, "triton", recompute=False)
    z_rec, g_rec = _run(p, torch.float32, "triton", recompute=True)
    assert torch.equal(z_save, z_rec)
    for name in g_save:
        assert torch.equal(g_save[name], g_rec[name]), name


@pytest.mark.parametrize(
    "case",
    [dict(rank=2, z0=True, untied=True), dict(rank=2, fista=True, recompute=True), dict(rank=1, size=(1, 13))],
    ids=["z0-untied", "fista-recompute", "1d"],
)
def test_batch_beyond_the_int32_limit_runs_in_chunks(case, device, monkeypatch):
    """The kernels' offsets are int32: a batch whose buffers would hold 2**31 elements or more (on a GPU: a big
    batch with many saved iterates) runs as several calls of at most max_batch_items items. Simulated with the
    limit lowered so that 2 of the 5 items fit."""
    from dsc_kernels.triton import conv_ista as tci
    from dsc_kernels.triton.conv_ista import backward, checks, forward

    def lower_the_limit(max_index: int) -> None:
        # Each module that bounds a buffer by _MAX_INDEX holds its own reference to it.
        for module in (checks, forward, backward):
            monkeypatch.setattr(module, "_MAX_INDEX", max_index)

    opts = dict(case)
    recompute = opts.pop("recompute", False)
    p = _problem(batch=5, kink_free=True, device=device, **opts)
    args, (stride, padding, _, fista) = _canonical(p)
    x, weight = args[0].float(), args[1].float()
    checkpoint = 0 if recompute else 1

    def items_per_call(max_index: int) -> int:
        lower_the_limit(max_index)
        return tci.max_batch_items(x, weight, stride, padding, 2, fista, checkpoint)

    limit = next(v for v in range(2, 1 << 20) if items_per_call(v) == 2)
    lower_the_limit(limit)
    with pytest.raises(ValueError, match="split the batch"):  # the whole batch in one call is beyond the limit
        tci.conv_ista_fwd(x, weight, *[a.float() for a in args[2:]], stride, padding, p["nonneg"], fista, checkpoint)
    _compare(p, recompute=recompute)

    # Not even one item fits: a clear error before any kernel runs.
    lower_the_limit(8)
    with pytest.raises(ValueError, match="a single item"):
        _run(p, torch.float32, "triton", recompute)


def test_a_grid_axis_beyond_cudas_cap_is_a_clear_error(device, monkeypatch):
    """CUDA caps grid axes 1 and 2 at 65535; the weight gradient's column blocks sit on axis 1 and would exceed it
    only for C_sig * k^2 beyond ~2 million, so the cap is lowered here. The launch failed with an opaque error."""
    from dsc_kernels.triton.conv_ista import backward

    p = _problem(batch=2, device=device)
    _compare(p, recompute=False)  # runs at the real cap
    monkeypatch.setattr(backward, "MAX_GRID_YZ", 0)  # read by conv_ista_bwd
    with pytest.raises(ValueError, match="programs on a grid axis"):
        _run(p, torch.float32, "triton", False)


def test_the_weight_gradients_column_axis_alone_beyond_the_cap_is_a_clear_error(device, monkeypatch):
    # The cap of 0 above trips every axis-1 grid at once; here only the weight gradient's columns pass it: tap-major,
    # a 3x3 kernel has 9 column blocks of C_sig = 2 channels, while the synthesis and analysis grids have 1 on
    # axis 1.
    from dsc_kernels.triton import conv_ista as tci
    from dsc_kernels.triton.conv_ista import backward

    p = _problem(batch=2, device=device)
    monkeypatch.setattr(backward, "MAX_GRID_YZ", 1)
    with tci.strategy("two-pass", tap_major_min_channels=1):
        with pytest.raises(ValueError, match="programs on a grid axis"):
            _run(p, torch.float32, "triton", False)


def test_a_forward_grid_axis_beyond_cudas_cap_is_a_clear_error(device, monkeypatch):
    """The two-pass forward puts its channel blocks on grid axis 1 (cdiv(C, 128) > 65535 from ~8.4 million
    channels; the cap is lowered here). Only the backward checked those grids, so a forward without backward, and a
    training step's forward before its backward could check, reached the launch and its opaque CUDA error."""
    from dsc_kernels.triton import conv_ista as tci
    from dsc_kernels.triton.conv_ista import forward

    p = _problem(batch=2, c_sig=16, c_code=16, device=device)
    args, (stride, padding, nonneg, fista) = _canonical(p)
    args = [a.float() for a in args]
    monkeypatch.setattr(forward, "MAX_GRID_YZ", 0, raising=False)  # read by _Forward
    with tci.strategy("two-pass"), pytest.raises(ValueError, match="programs on a grid axis"):
        tci.conv_ista_fwd(*args, stride, padding, nonneg, fista, -1)


@pytest.mark.parametrize(
    "forward, fista",
    [("single-launch", True), ("tiles", True), ("two-pass", True), ("single-launch", False)],
    ids=["single-launch-fista", "tiles-fista", "two-pass-fista", "single-launch-ista"],
)
def test_recompute_training_step_peaks_below_save_mode(forward, device, fista):
    """Recompute mode exists to save memory: with five iterations (deep-layer's count) its training step must peak
    below save mode's. It did not on an H200 (1.09x eager against save's 0.84x): every replay allocated a fresh
    3-code ring while the previous one was still held. (The buffers depend on the forward strategy, not on the
    reduction order, so the slow tap-major interpretation is left out; FISTA's ring holds one code more than
    ISTA's, so it runs under every forward and ISTA under one.)"""
    import gc

    from dsc_kernels.experiments.measure import measure_memory
    from dsc_kernels.triton import conv_ista as tci

    x = torch.randn(2, 4, 6, 6, device=device, requires_grad=True)
    w = (0.1 * torch.randn(8, 4, 3, 3, device=device)).requires_grad_()

    def step(recompute):
        def run():
            x.grad = w.grad = None
            DF.conv_ista(
                x, w, 0.05, n_iter=5, step=0.1, padding=1, fista=fista, backend="triton", recompute=recompute
            ).sum().backward()

        run()  # first call: compilation and one-time buffers stay out of the count
        peaks = []
        for _ in range(2):  # the steady state: the first measured call still frees the warm-up's leftovers
            gc.collect()
            peaks.append(measure_memory(run, device).peak_bytes)
        return min(peaks)

    with tci.strategy(forward):
        save, recompute = step(False), step(True)
    assert recompute < save, (recompute, save)


def test_launchers_canonical_contract(device):
    from dsc_kernels.triton.conv_ista import conv_ista_bwd, conv_ista_fwd

    p = _problem(rank=2, untied=True, z0=True, n_iter=2, device=device)
    args = [p[k].float() for k in ("x", "weight", "encoder_weight", "lam", "step", "z0")]
    geo = [list(p["stride"]), list(p["padding"]), False, False]
    z, iterates = conv_ista_fwd(*args, *geo, 1)
    assert iterates.shape == (1, *args[5].shape)  # z_1 (z_0 is the input, z_2 the output)
    _, empty = conv_ista_fwd(*args, *geo, 0)
    assert empty.shape == (0,)
    z_inference, nothing = conv_ista_fwd(*args, *geo, -1)  # NO_BACKWARD: a forward without backward
    assert nothing.shape == (0,) and torch.equal(z_inference, z)
    with pytest.raises(ValueError, match="checkpoint must be 0 or 1"):
        conv_ista_fwd(*args, *geo, 2)
    with pytest.raises(ValueError, match="checkpoint must be 0 or 1"):
        conv_ista_bwd(torch.ones_like(z), *args, z, iterates, *geo, -1)
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
    # An empty encoder_weight is the dictionary itself (tied): one weight gradient summing both uses, an empty one.
    w = args[1]
    twice_args = [args[0], w, w, *args[3:]]
    tied_args = [args[0], w, w.new_empty(0), *args[3:]]
    for checkpoint in (1, 0):
        z_twice, saved_twice = conv_ista_fwd(*twice_args, *geo, checkpoint)
        z_tied, saved_tied = conv_ista_fwd(*tied_args, *geo, checkpoint)
        assert torch.equal(z_tied, z_twice) and torch.equal(saved_tied, saved_twice)
        keep = z_twice if checkpoint else z_twice.new_empty(0)
        twice = conv_ista_bwd(torch.ones_like(z), *twice_args, keep, saved_twice, *geo, checkpoint)
        tied = conv_ista_bwd(torch.ones_like(z), *tied_args, keep, saved_tied, *geo, checkpoint)
        assert tied[2].shape == (0,)
        torch.testing.assert_close(tied[1], twice[1] + twice[2], rtol=1e-5, atol=1e-6)
        for i in (0, 3, 4, 5):
            torch.testing.assert_close(tied[i], twice[i], rtol=1e-5, atol=1e-6)


# The interpreter cannot run on the FakeTensors that AOT tracing feeds a triton_op, so test_aot_dispatch_dynamic
# runs only compiled.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("save,fista,nonneg", [(True, False, False), (False, True, True)])
def test_opcheck(save, fista, nonneg, device):
    from dsc_kernels.ops import op_pair

    ops = op_pair("conv_ista", "triton")
    utils = OPCHECK_UTILS + (("test_aot_dispatch_dynamic",) if device == "cuda" else ())
    p = _problem(
        rank=2,
        size=(6, 7),
        stride=(2, 1),
        untied=True,
        z0=True,
        fista=fista,
        nonneg=nonneg,
        device=device,
        kink_free=False,
    )
    tensors = [p[k].float() for k in ("x", "weight", "encoder_weight", "lam", "step", "z0")]
    geo = [list(p["stride"]), list(p["padding"]), nonneg, fista]
    checkpoint = int(save)
    torch.library.opcheck(
        ops.forward, ([t.clone().requires_grad_() for t in tensors] + geo + [checkpoint]), test_utils=utils
    )
    z, iterates = ops.forward(*tensors, *geo, checkpoint)
    # The backward op is not itself differentiable (no double backward).
    torch.library.opcheck(
        ops.backward,
        (torch.randn_like(z), *tensors, z, iterates, *geo, checkpoint),
        test_utils=tuple(u for u in utils if u != "test_autograd_registration"),
    )


@pytest.mark.interpreter
def test_dynamo_fullgraph_through_functional():
    # backend="eager" stops after Dynamo: it proves there is no graph break between functional.conv_ista and the
    # op without asking the interpreter to run on FakeTensors (test_triton_conv_ista_gpu.py compiles for real).
    p = _problem(rank=2, n_iter=2, kink_free=False)
    x, w, lam, step = (p[k].float() for k in ("x", "weight", "lam", "step"))

    def f(x, w, lam, step):
        return DF.conv_ista(x, w, lam, n_iter=2, step=step, padding=1, backend="triton")

    torch._dynamo.reset()
    torch.testing.assert_close(
        torch.compile(f, fullgraph=True, backend="eager")(x, w, lam, step), f(x, w, lam, step), rtol=0, atol=0
    )


# Two odd cases that between them reach every kernel (both forward paths through `launch`, both save modes).
HALF_CASES = {
    "2d-fista-untied-s2-z0": dict(
        rank=2, kernel=(4, 3), stride=(2, 2), padding=(1, 2), untied=True, fista=True, z0=True, n_iter=3
    ),
    "1d-nonneg-recompute": dict(
        rank=1, size=(1, 19), kernel=(1, 5), padding=(0, 2), nonneg=True, untied=True, n_iter=3, recompute=True
    ),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", sorted(HALF_CASES))
def test_half_precision_by_rule(case, dtype, launch, device):
    opts = dict(HALF_CASES[case])
    recompute = opts.pop("recompute", False)
    _check_at_scale(_problem(device=device, kink_free=False, **opts), dtype, recompute=recompute)


# What HALF_CASES leaves out: 2-D recompute (tied and signed; FISTA with its replayed momentum), 1-D FISTA, a 1-D
# stride, a 1-D z0. Under the strategy the launchers choose, to keep the interpreter's time down (each passed under
# single-launch, tiles, two-pass and tap-major two-pass too).
HALF_GEOMETRIES = {
    "2d-ista-tied-recompute": dict(rank=2, kernel=(3, 4), padding=(1, 1), n_iter=3, recompute=True),
    "2d-fista-nonneg-s2-recompute": dict(
        rank=2,
        kernel=(3, 3),
        stride=(2, 2),
        padding=(1, 1),
        untied=True,
        fista=True,
        nonneg=True,
        n_iter=3,
        recompute=True,
    ),
    "1d-fista-s2": dict(rank=1, size=(1, 19), kernel=(1, 4), stride=(2,), padding=(1,), fista=True, n_iter=3),
    "1d-fista-z0-recompute": dict(
        rank=1, size=(1, 17), kernel=(1, 3), padding=(1,), fista=True, z0=True, untied=True, n_iter=3, recompute=True
    ),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", sorted(HALF_GEOMETRIES))
def test_half_precision_other_geometries_by_rule(case, dtype, device):
    opts = dict(HALF_GEOMETRIES[case])
    recompute = opts.pop("recompute", False)
    _check_at_scale(_problem(device=device, kink_free=False, **opts), dtype, recompute=recompute)


@pytest.mark.parametrize("rank", [1, 2])
def test_scalar_lam_and_step_through_functional(rank, device):
    # functional expands a float lam/step to (n_iter, C) / (n_iter,) before the op; tied weight used twice.
    p = _problem(
        rank=rank, size=(6, 13), kernel=(3, 3), stride=(2, 2), padding=(1, 1), n_iter=2, kink_free=False, device=device
    )
    x, w = p["x"].float(), p["weight"].float()
    opts = dict(n_iter=2, step=0.15, stride=p["stride"], padding=p["padding"])
    torch.testing.assert_close(
        DF.conv_ista(x, w, 0.05, backend="triton", **opts),
        DF.conv_ista(x, w, 0.05, backend="reference", **opts),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("empty", ["batch", "code_channels", "signal_channels"])
@pytest.mark.parametrize("recompute", [False, True])
def test_empty_sizes_match_the_reference(empty, recompute, device):
    """An empty batch used to raise IndexError in the launcher and no signal channels ZeroDivisionError in the
    backward; every gradient, z0's included, must have its input's shape."""
    b, cs, cc = {"batch": (0, 2, 3), "code_channels": (2, 2, 0), "signal_channels": (2, 0, 3)}[empty]
    gen = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(*shape, generator=gen).abs().to(device).requires_grad_()  # abs: lam >= 0
        for shape in ((b, cs, 6, 5), (cc, cs, 3, 3), (cc,), (b, cc, 4, 3))
    ]
    results = {}
    for backend in ("reference", "triton"):
        x, w, lam, z0 = inputs
        z = DF.conv_ista(x, w, lam, n_iter=2, step=0.1, z0=z0, backend=backend, recompute=recompute)
        results[backend] = (z, *torch.autograd.grad(z.sum(), inputs, allow_unused=True, materialize_grads=True))
    for got, want in zip(results["triton"], results["reference"]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_nan_propagates_like_softshrink(device):
    p = _problem(rank=2, n_iter=1, device=device)
    x = p["x"].float().clone()
    x[0, 0, 4, 5] = float("nan")
    z = DF.conv_ista(
        x,
        p["weight"].float(),
        p["lam"].float(),
        n_iter=1,
        step=p["step"].float(),
        stride=p["stride"],
        padding=p["padding"],
        backend="triton",
    )
    ref = conv_ista_ref(
        x, p["weight"].float(), p["lam"].float(), p["step"].float(), stride=p["stride"], padding=p["padding"]
    )
    assert torch.equal(z.isnan(), ref.isnan()) and z.isnan().any()


@pytest.mark.parametrize("fista", [False, True])
@pytest.mark.parametrize("n_iter", [1, 3])
@pytest.mark.parametrize("nonneg", [False, True])
def test_nan_codes_get_the_threshold_gradient_autograd_gives(nonneg, n_iter, fista, device):
    """A NaN code is active and counts sign 0 in a signed threshold's gradient (relu(u - t): 1), as autograd
    through softshrink/relu has it (the cpp backend counted sign -1). n_iter = 3: the iterations before the last
    take their mask and threshold gradient from the analysis kernel's vjp epilogue."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, 7, 6, generator=g).to(device)
    w = (0.3 * torch.randn(2, 1, 3, 3, generator=g)).to(device)
    z0 = (0.3 * torch.randn(1, 2, 7, 6, generator=g)).to(device)
    z0[0, 1, 3, 2] = float("nan")
    out = {}
    for backend in ("reference", "triton"):
        lam = torch.full((2,), 0.1, device=device, requires_grad=True)
        step = torch.tensor(0.2, device=device, requires_grad=True)
        start = z0.clone().requires_grad_()
        z = DF.conv_ista(
            x, w, lam, n_iter=n_iter, step=step, padding=1, z0=start, nonneg=nonneg, fista=fista, backend=backend
        )
        out[backend] = (z, *torch.autograd.grad(z.sum(), (lam, step, start)))
    assert not out["reference"][1].isnan().any()  # the case this test is about: a NaN code, a finite dL/dlam
    for got, want in zip(out["triton"], out["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("nonneg", [False, True])
@pytest.mark.parametrize("fista", [False, True])
def test_a_nan_dictionary_tap_spreads_as_the_reference_spreads_it(recompute, nonneg, fista, device):
    """A NaN tap makes code channels, and their gradients, NaN. softshrink's threshold gradient takes 0 from a NaN
    code even where its gradient is NaN; the kernels multiplied by sign(z) = 0 and gave dL/dlam = NaN."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 7, 6, generator=g).to(device)
    w = (0.3 * torch.randn(3, 2, 3, 3, generator=g)).to(device)
    w[1, 0, 1, 1] = float("nan")
    out = {}
    for backend in ("reference", "triton"):
        inputs = tuple(t.clone().requires_grad_() for t in (x, w, torch.full((3,), 0.1, device=device)))
        step = torch.tensor(0.2, device=device, requires_grad=True)
        z = DF.conv_ista(
            *inputs, n_iter=3, step=step, padding=1, nonneg=nonneg, fista=fista, backend=backend, recompute=recompute
        )
        out[backend] = (z, *torch.autograd.grad(z.sum(), (*inputs, step)))
    assert out["reference"][0].isnan().any()
    assert out["reference"][3].isnan().any() == nonneg  # softshrink: a finite dL/dlam from NaN codes
    for what, got, want in zip(("z", "x", "weight", "lam", "step"), out["triton"], out["reference"]):
        assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN at other positions"
        torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=1e-5, atol=1e-5, msg=what)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_entry_no_atom_reads_leaves_dstep_finite(value, device):
    """Kernel 3 at stride 2 never reads the last of 8 samples. The fused backward forms dL/dstep as <E* gu, r_k>,
    0 * NaN there, where autograd's <gu, E r_k> never reads the entry: dL/dstep was NaN."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 8, generator=g).to(device)
    x[0, 1, 7] = value
    w = (0.4 * torch.randn(3, 2, 3, generator=g)).to(device)
    out = {}
    for backend in ("reference", "triton"):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        step = torch.tensor(0.3, device=device, requires_grad=True)
        z = DF.conv_ista(xx, ww, 0.1, n_iter=3, step=step, stride=2, backend=backend)
        out[backend] = (z, *torch.autograd.grad(z.sum(), (xx, ww, step)))
    for what, got, want in zip(("z", "x", "weight", "step"), out["triton"], out["reference"]):
        assert got.isfinite().all(), what
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=what)


@pytest.mark.parametrize("recompute", [False, True])
def test_fista_takes_no_momentum_where_beta_is_zero(recompute, launch, device):
    """FISTA's beta_0 and beta_1 are exactly 0, and the reference then takes y_k = z_k itself. The kernels formed
    z_k + 0 (z_k - z_{k-1}), NaN where a code is infinite in both iterates (an infinite z0 entry that stays -inf
    on the reference), and the backward carried -0 dL/dy_1 to dL/dz_0, NaN where dL/dy_1 is infinite."""
    out = {
        backend: fista_through_an_infinite_code(backend, recompute=recompute, dtype=torch.float32, device=device)
        for backend in ("reference", "triton")
    }
    assert out["reference"][0][0, 0, 0, 2] == float("-inf") and out["reference"][2][0, 0, 0, 4] == float("inf")
    for got, want in zip(out["triton"], out["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=False)


@pytest.mark.parametrize("rank", [1, 2])
def test_kink_tolerant_comparison(rank, device):
    # The at-scale comparison of TestGPU, exercised on a small problem that is not kink-free.
    p = _problem(
        rank=rank,
        size=(1, 15) if rank == 1 else (9, 11),
        kernel=(1, 3) if rank == 1 else (3, 3),
        padding=(0, 1) if rank == 1 else (1, 1),
        untied=True,
        fista=True,
        z0=True,
        n_iter=2,
        kink_free=False,
        device=device,
    )
    _check_at_scale(p, torch.float32, recompute=rank == 1)


def test_autocast_runs_the_triton_ops_in_float32(device):
    """Inside autocast a bfloat16 activation meets float32 parameters; the fused ops' autocast rule computes them in
    float32 (ops/registry.py). The rule was registered for CUDA only, so under the interpreter (CPU tensors, CPU
    autocast) the triton op received the mixed dtypes and raised 'all tensors must ... have x's dtype'."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 7, generator=g).to(device=device, dtype=torch.bfloat16)
    w = (0.3 * torch.randn(4, 3, 3, 3, generator=g)).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        z = DF.conv_ista(x, w, 0.1, n_iter=2, padding=1, backend="triton")
    want = DF.conv_ista(x.float(), w, 0.1, n_iter=2, padding=1, backend="triton")
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, want, rtol=0, atol=0)


def test_empty_batch_gives_the_fakes_strides(device):
    """An empty batch returned z as a clone of the expanded zeros standing for z0, strides (0, 0, 0, 0), and its
    gradients in a channels-last x's layout, where the fakes (and torch.compile after them) say contiguous."""
    from dsc_kernels.ops import op_pair

    weight = torch.randn(3, 2, 3, 3, device=device)
    z0 = torch.randn(0, 3, 4, 3, device=device)
    x = torch.randn(0, 2, 6, 5, device=device).to(memory_format=torch.channels_last)
    args = (x, weight, torch.randn_like(weight))
    args += (torch.full((2, 3), 0.1, device=device), torch.full((2,), 0.2, device=device), z0, [1, 1], [0, 0])
    args += (False, False, 1)
    assert_conv_ista_fakes_match(op_pair("conv_ista", "triton"), args)


def _fista_by_hand(x, w, we, lam, step, z0, stride, padding):
    """forward.py's header written out in fp64 autograd, independent of the package's reference:
    y_k = z_k + beta_k (z_k - z_{k-1}), u_k = y_k + step_k E(x - D y_k), z_{k+1} = S_{step_k lam_k}(u_k)."""
    import torch.nn.functional as F

    t, z_prev, z = [1.0], z0, z0
    for _ in range(step.shape[0]):
        t.append((1.0 + (1.0 + 4.0 * t[-1] ** 2) ** 0.5) / 2.0)
    out_pad = [x.shape[2 + i] - ((z0.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + w.shape[2 + i]) for i in range(2)]
    for k in range(step.shape[0]):
        beta = 0.0 if k == 0 else (t[k - 1] - 1.0) / t[k]
        y = z + beta * (z - z_prev)
        r = x - F.conv_transpose2d(y, w, stride=stride, padding=padding, output_padding=out_pad)
        u = y + step[k] * F.conv2d(r, we, stride=stride, padding=padding)
        th = (step[k] * lam[k]).view(1, -1, 1, 1)
        z_prev, z = z, torch.sign(u) * torch.clamp(u.abs() - th, min=0.0)
    return z


@pytest.mark.parametrize("recompute", [False, True], ids=["save", "recompute"])
def test_fista_momentum_against_the_math(recompute, launch, device):
    # FISTA's beta_k is 0 for k = 0 and 1, so the n_iter = 2 cases above never form a momentum: with 4 iterations
    # (beta_2, beta_3 > 0) a momentum read from the wrong iterate, forward (the single-launch ring) or backward (the
    # saved z_{k-1}), changes z and every gradient.
    p = _problem(
        rank=2, size=(5, 7), kernel=(3, 2), stride=(2, 1), padding=(1, 0), untied=True, fista=True, z0=True, n_iter=4
    )
    leaves = {k: p[k].detach().requires_grad_() for k in GRAD_NAMES}
    z_ref = _fista_by_hand(
        *(leaves[k] for k in ("x", "weight", "encoder_weight", "lam", "step", "z0")), p["stride"], p["padding"]
    )
    g = torch.randn(z_ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    g_ref = dict(zip(leaves, torch.autograd.grad((z_ref * g).sum(), list(leaves.values()))))
    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in p.items()}
    z, grads = _run(on_device, torch.float32, "triton", recompute)
    assert torch.equal(z.cpu() != 0, z_ref != 0), "support differs"
    torch.testing.assert_close(z.cpu().double(), z_ref.detach(), rtol=2e-4, atol=2e-5)
    for name, ref in g_ref.items():
        scale = ref.abs().max().item() + 1e-12
        torch.testing.assert_close(grads[name].cpu().double(), ref, rtol=2e-4, atol=2e-5 * scale, msg=name)


def test_half_fista_recompute_forms_the_momentum_in_float32(device):
    # Recompute mode replays bit-identical half iterates, and the backward forms FISTA's y_k from them in fp32 in
    # both modes; only fp32 codes may put y_k in the replay ring's free slot, a half slot would round it. So save
    # and recompute agree bitwise, and both match the momentum written out in fp64 autograd on the same half
    # inputs (n_iter = 4: beta_2, beta_3 > 0). A half y_k passed the HALF_CASES comparisons (none is FISTA in
    # recompute mode). fp16 only: bf16's rounding moves the supports away from fp64's.
    from dsc_kernels.triton.conv_ista import conv_ista_bwd, conv_ista_fwd

    dtype = torch.float16
    p = _problem(rank=2, size=(5, 7), kernel=(3, 2), padding=(1, 0), untied=True, fista=True, z0=True, n_iter=4)
    args64, geo = _canonical(p)
    args = [a.to(device) for a in _in_dtype(args64, dtype)]
    z, saved = conv_ista_fwd(*args, *geo, 1)
    gz = torch.randn(z.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(z)
    g_save = conv_ista_bwd(gz, *args, z, saved, *geo, 1)
    g_rec = conv_ista_bwd(gz, *args, z.new_empty(0), saved.new_empty(0), *geo, 0)
    for name, a, b in zip(GRAD_NAMES, g_save, g_rec):
        assert torch.equal(a, b), name
    leaves = [a.cpu().double().requires_grad_() for a in args]
    z_ref = _fista_by_hand(*leaves, geo[0], geo[1])
    g_ref = torch.autograd.grad((z_ref * gz.cpu().double()).sum(), leaves)
    for name, a, ref in zip(GRAD_NAMES, g_rec, g_ref):
        scale = ref.abs().max().item() + 1e-12
        torch.testing.assert_close(a.cpu().double(), ref, rtol=0.05, atol=0.05 * scale, msg=name)


@pytest.mark.parametrize("fista,n_iter,recompute", [(False, 2, False), (True, 3, True)], ids=["ista", "fista"])
def test_grad_of_a_sparse_z0_is_not_masked_by_its_support(fista, n_iter, recompute, device):
    # dL/dz_0 flows through y_0 = z_0 whole: only later iterates pass their gradient on their support. The
    # problems above draw a dense z0, where a mask by z_0 != 0 changes nothing; a warm start from an earlier code is
    # sparse. Checked against forward.py's header in fp64 autograd (ISTA: n_iter = 2, where FISTA's betas are 0).
    p = _problem(rank=2, size=(5, 7), kernel=(3, 2), padding=(1, 0), untied=True, fista=fista, z0=True, n_iter=n_iter)
    p["z0"] = p["z0"] * (torch.arange(p["z0"].numel()).view(p["z0"].shape) % 3 != 0)
    leaves = {k: p[k].detach().requires_grad_() for k in GRAD_NAMES}
    z_ref = _fista_by_hand(
        *(leaves[k] for k in ("x", "weight", "encoder_weight", "lam", "step", "z0")), p["stride"], p["padding"]
    )
    g = torch.randn(z_ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    g_ref = torch.autograd.grad((z_ref * g).sum(), leaves["z0"])[0]
    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in p.items()}
    _, grads = _run(on_device, torch.float32, "triton", recompute)
    assert (g_ref[p["z0"] == 0] != 0).any()
    scale = g_ref.abs().max().item()
    torch.testing.assert_close(grads["z0"].cpu().double(), g_ref, rtol=2e-4, atol=2e-5 * scale)
