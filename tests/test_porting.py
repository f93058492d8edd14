"""docs/porting.md, executed: CSCNet (Simon & Elad, NeurIPS 2019) and the ML-ISTA family (Sulam, Aberdam, Beck &
Elad, TPAMI 2019) written in eager PyTorch as their papers and code describe them, then run on our ops with the
parameter mapping of docs/porting.md: outputs and every parameter gradient agree to 1e-12 in float64, on the
reference and the cpp backends (small sizes; the benchmark runs the published ones)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsc_kernels.functional as DF
from dsc_kernels.nn import MultiLayerSparseCoding2d

D = torch.float64
BACKENDS = [
    "reference",
    pytest.param(
        "cpp", marks=pytest.mark.skipif("cpp" not in DF.available_backends("cpu"), reason="C++ extension unavailable")
    ),
]


# ------------------------------------------------------------------------------------ the ML-ISTA family, eager
class PublishedMLNet(nn.Module):
    """ML_ISTA_NET, ML_FISTA_NET, ML_LISTA_NET, LBP_NET and All_Free of Sulam et al.'s code, at any size: filters
    W_j (m_j, m_{j-1}, k_j, k_j), biases b_j (1, m_j, 1, 1), steps c_j (1, 1, 1, 1), T unfoldings, every convolution
    padded by ``padding`` (CIFAR's: 1), then a linear classifier and log-softmax (CIFAR's models put a CNN head
    before it: the user's code on G_3, as the classifier is)."""

    def __init__(self, kind: str, m=(1, 4, 6, 8), k=(6, 6, 4), strides=(2, 2, 1), T=2, padding=0, code=1, dtype=D):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.kind, self.T, self.m, self.k, self.strides, self.padding = kind, T, m, k, strides, padding
        copies = T + 1 if kind == "all-free" else 1

        def rnd(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

        def filters(j):
            return nn.Parameter(0.1 / (m[j] * k[j] ** 2) ** 0.5 * rnd(copies, m[j + 1], m[j], k[j], k[j]).squeeze(0))

        self.W = nn.ParameterList(filters(j) for j in range(3))
        self.B = nn.ParameterList(filters(j) for j in range(3)) if kind == "ml-lista" else None
        self.b = nn.ParameterList(nn.Parameter(0.02 * rnd(copies, 1, m[j + 1], 1, 1).squeeze(0)) for j in range(3))
        self.c = nn.ParameterList(nn.Parameter(1 + 0.1 * rnd(1, 1, 1, 1)) for _ in range(3))
        self.Wclass = nn.Linear(m[3] * code**2, 10, dtype=dtype)  # code: the deepest code's spatial size

    def step(self, j, gamma, below, W_syn=None, W_ana=None, b=None, c=None):
        """sigma(gamma - c W^T (W gamma - below) + b)"""
        s, p = self.strides[j], self.padding
        W_syn = self.W[j] if W_syn is None else W_syn
        W_ana = W_syn if W_ana is None else W_ana
        b = self.b[j] if b is None else b
        c = 1.0 if c is None else c
        residual = F.conv_transpose2d(gamma, W_syn, stride=s, padding=p) - below
        return F.relu(gamma - c * F.conv2d(residual, W_ana, stride=s, padding=p) + b)

    def forward(self, x):
        s, W, b, c = self.strides, self.W, self.b, self.c
        # every convolution of the published networks pads alike (0 for MNIST, 1 for CIFAR)
        conv2d = functools.partial(F.conv2d, padding=self.padding)
        conv_transpose2d = functools.partial(F.conv_transpose2d, padding=self.padding)
        if self.kind == "all-free":
            g, below = [], x
            for j in range(3):
                below = F.relu(conv2d(below, W[j][0], stride=s[j]) + b[j][0])
                g.append(below)
            for t in range(1, self.T + 1):
                below = x
                for j in range(3):
                    g[j] = self.step(j, g[j], below, W[j][t - 1], W[j][t], b[j][t])
                    below = g[j]
        elif self.kind == "ml-lista":
            B = self.B
            g, below = [], x
            for j in range(3):
                below = F.relu(conv2d(below, B[j], stride=s[j]) + b[j])
                g.append(below)
            for _ in range(self.T):
                g[1] = conv_transpose2d(g[2], B[2], stride=s[2])
                g[0] = conv_transpose2d(g[1], B[1], stride=s[1])
                below = x
                for j in range(3):
                    g[j] = F.relu(
                        g[j]
                        - conv2d(conv_transpose2d(g[j], W[j], stride=s[j]), W[j], stride=s[j])
                        + conv2d(below, B[j], stride=s[j])
                        + b[j]
                    )
                    below = g[j]
        elif self.kind == "layered":
            g, below = [], x
            for j in range(3):
                gamma = F.relu(c[j] * conv2d(below, W[j], stride=s[j]) + b[j])
                for _ in range(self.T):
                    gamma = self.step(j, gamma, below, c=c[j])
                g.append(gamma)
                below = gamma
        else:  # ml-ista, ml-fista
            g1 = F.relu(c[0] * conv2d(x, W[0], stride=s[0]) + b[0])
            g2 = F.relu(c[1] * conv2d(g1, W[1], stride=s[1]) + b[1])
            g3 = F.relu(c[2] * conv2d(g2, W[2], stride=s[2]) + b[2])
            t, g3_prev = 1.0, g3
            for _ in range(self.T):
                t_prev, t = t, (1 + (1 + 4 * t**2) ** 0.5) / 2
                z = g3 + (t_prev - 1) / t * (g3 - g3_prev) if self.kind == "ml-fista" else g3
                g3_prev = g3
                g2 = conv_transpose2d(z, W[2], stride=s[2])
                g1 = conv_transpose2d(g2, W[1], stride=s[1])
                g1 = self.step(0, g1, x, c=c[0])
                g2 = self.step(1, g2, g1, c=c[1])
                g3 = self.step(2, z, g2, c=c[2])
            g = [g1, g2, g3]
        return F.log_softmax(self.Wclass(g[2].flatten(1)), dim=1)


def port(published: PublishedMLNet, backend: str, recompute: bool = False) -> MultiLayerSparseCoding2d:
    """docs/porting.md's mapping: W_j -> weights.j, b_j (1, m, 1, 1) -> biases.j (m,), c_j (1, 1, 1, 1) -> steps.j (),
    B_j -> input_encoders.j; All-Free's W_j_t / b_j_t stacked over t."""
    kind = published.kind
    mode = {"all-free": "interleaved", "ml-lista": "ml-ista"}.get(kind, kind)
    net = MultiLayerSparseCoding2d(
        list(published.m),
        list(published.k),
        strides=list(published.strides),
        paddings=published.padding,
        n_iter=published.T,
        mode=mode,
        untied_unfoldings=kind == "all-free",
        input_encoders=kind == "ml-lista",
        learn_steps=kind in ("ml-ista", "ml-fista", "layered"),
        recompute=recompute,
        backend=backend,
        dtype=published.W[0].dtype,
    )
    with torch.no_grad():
        for j in range(3):
            net.weights[j].copy_(published.W[j])
            net.biases[j].copy_(published.b[j].reshape(net.biases[j].shape))
            if net.steps is not None:
                net.steps[j].copy_(published.c[j].reshape(()))
            if net.input_encoders is not None:
                net.input_encoders[j].copy_(published.B[j])
    return net


def _check_same(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        scale = max(1.0, float(want[name].abs().max()))
        err = float((got[name] - want[name]).abs().max())
        assert err <= 1e-12 * scale, f"{name}: max error {err:.2e} (scale {scale:.2e})"


# MNIST's geometry (28 -> 12 -> 4 -> 1, no padding) and CIFAR's (3 channels, 4x4 filters, strides 2/2/2, every
# convolution and transposed convolution padded by 1: 32 -> 16 -> 8 -> 4), at small widths
GEOMETRIES = {
    "mnist": (dict(m=(1, 4, 6, 8)), (1, 28, 28)),
    "cifar": (dict(m=(3, 4, 6, 8), k=(4, 4, 4), strides=(2, 2, 2), padding=1, code=4), (3, 32, 32)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("kind", ["ml-ista", "ml-fista", "ml-lista", "layered", "all-free"])
def test_ml_ista_family_ports_exactly(kind, geometry, backend):
    sizes, signal = GEOMETRIES[geometry]
    published = PublishedMLNet(kind, **sizes)
    net = port(published, backend)
    x = torch.rand(3, *signal, generator=torch.Generator().manual_seed(1), dtype=D)
    labels = torch.tensor([3, 1, 4])
    want_out = published(x)
    F.nll_loss(want_out, labels).backward()
    got_out = F.log_softmax(published.Wclass(net(x)[-1].flatten(1)), dim=1)
    assert bool((want_out != want_out[:, :1]).any())  # the classifier sees a nontrivial code
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=1e-12)
    want = {
        name: p.grad.clone()
        for name, p in published.named_parameters()
        if not name.startswith("Wclass") and p.grad is not None
    }  # ML-LISTA and All-Free leave c unused
    published.zero_grad()
    F.nll_loss(got_out, labels).backward()
    got = {}
    for j in range(3):
        got[f"W.{j}"] = net.weights[j].grad
        got[f"b.{j}"] = net.biases[j].grad.reshape(published.b[j].shape)
        if net.steps is not None:
            got[f"c.{j}"] = net.steps[j].grad.reshape(1, 1, 1, 1)
        if net.input_encoders is not None:
            got[f"B.{j}"] = net.input_encoders[j].grad
    _check_same(got, want)


# ---------------------------------------------------------------------------------------------- CSCNet, eager
def calc_pad_sizes(I: torch.Tensor, kernel_size: int, stride: int):
    """CSCNet's padding: `stride` on the left/top, and enough on the right/bottom that the strided grid ends on
    the image, plus `stride`."""
    left_pad = stride
    right_pad = (
        0
        if (I.shape[3] + left_pad - kernel_size) % stride == 0
        else stride - ((I.shape[3] + left_pad - kernel_size) % stride)
    )
    top_pad = stride
    bot_pad = (
        0
        if (I.shape[2] + top_pad - kernel_size) % stride == 0
        else stride - ((I.shape[2] + top_pad - kernel_size) % stride)
    )
    return left_pad, right_pad + stride, top_pad, bot_pad + stride


def split_image(I: torch.Tensor, kernel_size: int, stride: int):
    """CSCNet's shifted copies: the image reflect-padded at every one of the stride^2 offsets, and where it lies."""
    left, right, top, bot = calc_pad_sizes(I, kernel_size, stride)
    padded, valids = [], []
    for row_shift in range(stride):
        for col_shift in range(stride):
            pad = (left - col_shift, right + col_shift, top - row_shift, bot + row_shift)
            padded.append(F.pad(I, pad=pad, mode="reflect"))
            valids.append(F.pad(torch.ones_like(I), pad=pad, mode="constant"))
    stack = torch.stack(padded, dim=1)
    return stack.reshape(-1, *stack.shape[2:]), torch.stack(valids, dim=1).reshape(-1, *stack.shape[2:])


class CSCNet(nn.Module):
    """ConvLista_T: gamma = S(B I); unfoldings - 1 times gamma = S(gamma - B(A gamma - I)); output C gamma, averaged
    over the shifted copies. S is their SoftThreshold (threshold (1, m, 1, 1))."""

    def __init__(self, num_filters=12, kernel_size=7, stride=4, unfoldings=3, threshold=1e-2, dtype=D):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        A = torch.randn(num_filters, 1, kernel_size, kernel_size, generator=g, dtype=torch.float64)
        A = A / A.flatten(1).norm(dim=1).max() / stride

        def near_a():
            return nn.Parameter((A + 0.01 * torch.randn(A.shape, generator=g, dtype=torch.float64)).to(dtype))

        self.A = nn.Parameter(A.to(dtype))
        self.B, self.C = near_a(), near_a()
        self.threshold = nn.Parameter(
            threshold * (1 + torch.rand(1, num_filters, 1, 1, generator=g, dtype=torch.float64)).to(dtype)
        )
        self.kernel_size, self.stride, self.unfoldings = kernel_size, stride, unfoldings

    def soft_threshold(self, x):
        mask1 = (x > self.threshold).to(x.dtype)
        mask2 = (x < -self.threshold).to(x.dtype)
        return mask1 * (x - self.threshold) + mask2 * (x + self.threshold)

    def forward(self, I):
        padded, valids = split_image(I, self.kernel_size, self.stride)
        gamma = self.soft_threshold(F.conv2d(padded, self.B, stride=self.stride))
        for _ in range(self.unfoldings - 1):
            x_k = F.conv_transpose2d(gamma, self.A, stride=self.stride)
            gamma = self.soft_threshold(gamma - F.conv2d(x_k - padded, self.B, stride=self.stride))
        out = F.conv_transpose2d(gamma, self.C, stride=self.stride)
        cropped = torch.masked_select(out, valids.bool()).reshape(I.shape[0], self.stride**2, *I.shape[1:])
        return cropped.mean(dim=1)


def cscnet_on_our_ops(net: CSCNet, I: torch.Tensor, backend: str, recompute: bool = False) -> torch.Tensor:
    """docs/porting.md: the unfoldings are one conv_ista call (A the dictionary, B the encoder, step 1, the threshold
    absolute and per channel), the decoder C a conv_synthesis; the shifted-copy averaging stays theirs."""
    padded, valids = split_image(I, net.kernel_size, net.stride)
    gamma = DF.conv_ista(
        padded,
        net.A,
        threshold=net.threshold.view(-1),
        n_iter=net.unfoldings,
        step=1.0,
        encoder_weight=net.B,
        stride=net.stride,
        backend=backend,
        recompute=recompute,
    )
    out = DF.conv_synthesis(gamma, net.C, stride=net.stride, signal_size=padded.shape[2:])
    cropped = torch.masked_select(out, valids.bool()).reshape(I.shape[0], net.stride**2, *I.shape[1:])
    return cropped.mean(dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cscnet_ports_exactly(backend):
    net = CSCNet()
    I = torch.rand(2, 1, 21, 18, generator=torch.Generator().manual_seed(3), dtype=D)
    target = torch.rand(I.shape, generator=torch.Generator().manual_seed(4), dtype=D)
    want_out = net(I)
    F.mse_loss(want_out, target).backward()
    want = {name: p.grad.clone() for name, p in net.named_parameters()}
    net.zero_grad()
    got_out = cscnet_on_our_ops(net, I, backend)
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=1e-12)
    F.mse_loss(got_out, target).backward()
    _check_same({name: p.grad for name, p in net.named_parameters()}, want)
    assert all(bool(g.abs().max() > 0) for g in want.values())


def test_cscnet_negative_thresholds_are_rejected_not_clamped():
    """CSCNet's SoftThreshold with t < 0 is relu(u - t) - relu(-u - t) = 2u on |u| < |t|, not a shrinkage: the
    signed soft threshold refuses it (docs/porting.md says what to do) instead of silently changing the output."""
    net = CSCNet()
    with torch.no_grad():
        net.threshold[0, 0] = -1e-3
    with pytest.raises(ValueError, match="threshold"):
        cscnet_on_our_ops(net, torch.rand(1, 1, 16, 16, dtype=D), "reference")


@pytest.mark.parametrize("option", ["--threads", "--rounds"])
def test_speed_networks_script_rejects_a_count_below_one(option):
    """bench/test_speed_networks.py took any int: --threads 0 was a RuntimeError traceback, --rounds 0 a
    StatisticsError after the timing (here: no workload, so it would have exited 0)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / "test_speed_networks.py"), option, "0", "--workloads"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 2 and f"argument {option}:" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------- the benchmark's check of the training step's gradients
def _speed_networks():
    """bench/test_speed_networks.py as a module (bench/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "test_speed_networks.py"
    spec = importlib.util.spec_from_file_location("bench_test_speed_networks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _ScaledBackward(torch.autograd.Function):
    """The identity with its gradient scaled: a network whose forward is right and whose backward is not."""

    @staticmethod
    def forward(ctx, t, scale):
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return ctx.scale * g, None


def _small_cscnet(bench, provider: str, dtype=torch.float32):
    """A small CSCNet as the benchmark builds its providers: "eager", "ours", "ours-scaled-backward" (every gradient
    x1.5) and "ours-detached-decoder" (C's gradient lost)."""
    net = CSCNet(dtype=torch.float32).to(dtype)
    x = torch.rand(2, 1, 21, 18, generator=torch.Generator().manual_seed(3)).to(dtype)
    target = torch.rand(x.shape, generator=torch.Generator().manual_seed(4)).to(dtype)

    def forward(x=x):
        if provider == "eager":
            return net(x)
        if provider == "ours-detached-decoder":
            padded, valids = split_image(x, net.kernel_size, net.stride)
            gamma = DF.conv_ista(
                padded, net.A, threshold=net.threshold.view(-1), n_iter=net.unfoldings, step=1.0,
                encoder_weight=net.B, stride=net.stride,
            )  # fmt: skip
            out = DF.conv_synthesis(gamma, net.C.detach(), stride=net.stride, signal_size=padded.shape[2:])
            return torch.masked_select(out, valids.bool()).reshape(x.shape[0], net.stride**2, *x.shape[1:]).mean(1)
        out = cscnet_on_our_ops(net, x, "auto")
        return _ScaledBackward.apply(out, 1.5) if provider == "ours-scaled-backward" else out

    def loss(x=x):
        return F.mse_loss(forward(x), target)

    def no_grad_forward():
        with torch.no_grad():
            return forward()

    def never_timed():
        raise AssertionError(f"{provider} was timed")

    return bench.Built(
        no_grad_forward,
        never_timed,
        (loss, {"x": x}),
        lambda: bench.training_gradients(loss, x, dict(net.named_parameters())),
    )


def test_speed_networks_check_compares_every_training_gradient():
    """bench/test_speed_networks.py checked only the providers' forward outputs before timing them: a network with
    the right forward and a wrong backward (here every gradient x1.5, or the decoder's gradient lost) was timed and
    its training step published. Its check now gates dL/dx and every parameter's gradient against float64 too."""
    bench = _speed_networks()
    built = {p: _small_cscnet(bench, p) for p in ("eager", "ours", "ours-scaled-backward", "ours-detached-decoder")}
    verdicts = bench.check("small-cscnet", built, _small_cscnet(bench, "eager", torch.float64))
    by_provider = {p: [v for v in verdicts if f" {p} " in v.message] for p in built}
    assert len(by_provider["ours"]) == 1 + 5  # the output, dL/dx and the 4 parameters' gradients
    assert all(v.ok for v in by_provider["ours"]), [v.message for v in by_provider["ours"]]
    scaled = by_provider["ours-scaled-backward"]
    assert scaled[0].ok and not any(v.ok for v in scaled[1:]), [v.message for v in scaled]
    detached = {v.message.split(":")[1].split()[-1]: v.ok for v in by_provider["ours-detached-decoder"]}
    assert detached == {"output": True, "x": True, "A": True, "B": True, "C": False, "threshold": True}, detached


def test_speed_networks_measure_refuses_a_wrong_backward_before_timing(monkeypatch):
    bench = _speed_networks()
    monkeypatch.setattr(
        bench, "build", lambda workload, provider, dtype=torch.float32: _small_cscnet(bench, provider, dtype)
    )
    with pytest.raises(AssertionError, match="ours-scaled-backward grad A: l2 error"):
        bench.measure("small-cscnet", rounds=1, providers=("eager", "ours", "ours-scaled-backward"))


def test_speed_networks_check_passes_the_published_ml_ista_network():
    """The check on the benchmark's own ML-ISTA network (about 2 s): ours' parameters carry other names and shapes
    (biases (m,), steps ()) than the eager ones, and a mapping that loses their graph reads as zero gradients."""
    bench = _speed_networks()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        built = {p: bench.build("ml-ista-mnist", p) for p in ("eager", "ours")}
        verdicts = bench.check("ml-ista-mnist", built, bench.build("ml-ista-mnist", "eager", torch.float64))
    finally:
        torch.set_num_threads(threads)
    assert len(verdicts) == 1 + 1 + 3 * 3 + 2  # output, x, W/b/c of 3 layers, the classifier's weight and bias
    assert all(v.ok for v in verdicts), [v.message for v in verdicts if not v.ok]
