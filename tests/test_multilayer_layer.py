"""MultiLayerSparseCoding2d as a user builds and trains it: arguments checked at construction, and learned values kept
valid by projection after optimiser steps (eager and compiled)."""

import pytest
import torch

from dsc_kernels.nn import MultiLayerSparseCoding2d, SparseAttention, SparseCodingTransformerBlock


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(channels=[1, 0, 4]), ValueError, "channels"),
        (dict(channels="14"), TypeError, "channels"),
        (dict(kernel_sizes=2.5), TypeError, "kernel_sizes"),
        (dict(kernel_sizes=[3, 0]), ValueError, "kernel_sizes"),
        (dict(strides=0), ValueError, "strides"),
        (dict(paddings=-1), ValueError, "padding"),
        (dict(paddings="same", strides=2), ValueError, "same"),
        (dict(bias=float("nan")), ValueError, "bias"),
        (dict(bias=0.1, nonneg=False), ValueError, "bias must be <= 0"),
        (dict(step=0.0), ValueError, "step"),
        (dict(step="1"), TypeError, "step"),
        (dict(backend="bogus"), ValueError, "backend"),
        (dict(nonneg=1), TypeError, "nonneg"),
    ],
)
def test_bad_arguments_raise_at_construction(options, error, match):
    args = dict(channels=[1, 4, 8], kernel_sizes=3) | options
    with pytest.raises(error, match=match):
        MultiLayerSparseCoding2d(args.pop("channels"), args.pop("kernel_sizes"), **args)


def test_same_padding_keeps_sizes_and_decodes_back():
    net = MultiLayerSparseCoding2d([1, 4, 6], [3, 5], paddings="same", n_iter=1, backend="reference")
    codes = net(torch.randn(2, 1, 11, 9))
    assert [tuple(c.shape) for c in codes] == [(2, 4, 11, 9), (2, 6, 11, 9)]
    assert net.decode(codes[-1], (11, 9)).shape == (2, 1, 11, 9)


def _sgd(net, x, *, sign, lr, steps=1, compiled=False):
    """SGD steps on sign * sum |codes|: sign -1 rewards larger codes (biases up, thresholds -b down), +1 smaller
    codes (steps down)."""
    forward = torch.compile(net, backend="eager") if compiled else net
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(steps):
        loss = sign * sum(code.abs().sum() for code in forward(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return forward


@pytest.mark.parametrize("compiled", [False, True])
def test_signed_thresholds_stay_valid_while_training(compiled):
    torch.manual_seed(0)
    net = MultiLayerSparseCoding2d([1, 4, 6], 3, n_iter=2, nonneg=False, bias=-0.01, learn_steps=False)
    x = torch.randn(2, 1, 10, 10)
    forward = _sgd(net, x, sign=-1, lr=0.1, steps=2, compiled=compiled)
    assert all(float(b.detach().max()) == 0.0 for b in net.biases)  # pushed up, projected back onto b <= 0
    forward(x)  # the stored values are valid: the next forward runs


@pytest.mark.parametrize("compiled", [False, True])
def test_learned_steps_stay_positive_while_training(compiled):
    torch.manual_seed(0)
    net = MultiLayerSparseCoding2d([1, 4, 6], 3, n_iter=2, step=0.5, backend="reference")
    x = torch.randn(2, 1, 10, 10)
    forward = _sgd(net, x, sign=1, lr=10.0, compiled=compiled)
    assert [float(c.detach()) for c in net.steps] == pytest.approx([5e-4, 5e-4])  # 1e-3 of the initial step
    forward(x)


def test_learned_steps_stay_positive_in_float16():
    """The floor 1e-3 * step of a learned float16 step of 1e-5 is 1e-8, which float16 rounds to 0: the projection
    stored step 0 and the next forward raised "steps[0] must be > 0"."""
    torch.manual_seed(0)
    net = MultiLayerSparseCoding2d([1, 4], 3, n_iter=1, step=1e-5, dtype=torch.float16, backend="reference")
    x = torch.randn(2, 1, 8, 8, dtype=torch.float16)
    optimizer = torch.optim.SGD(net.steps.parameters(), lr=1.0)
    net.steps[0].grad = torch.ones_like(net.steps[0])
    optimizer.step()
    assert float(net.steps[0].detach()) == torch.finfo(torch.float16).smallest_normal * 2.0**-10  # float16's least
    net(x)


def test_relu_biases_are_free_and_the_projection_follows_copies():
    import copy

    torch.manual_seed(0)
    relu = MultiLayerSparseCoding2d([1, 4], 3, n_iter=1, nonneg=True, learn_steps=False)
    _sgd(relu, torch.randn(2, 1, 8, 8), sign=-1, lr=0.1)
    assert float(relu.biases[0].detach().max()) > 0  # a ReLU's bias may be positive: nothing is projected

    signed = copy.deepcopy(MultiLayerSparseCoding2d([1, 4], 3, n_iter=1, nonneg=False, learn_steps=False))
    _sgd(signed, torch.randn(2, 1, 8, 8), sign=-1, lr=0.1)
    assert float(signed.biases[0].detach().max()) == 0.0


def test_attention_layers_check_arguments_at_construction():
    with pytest.raises(ValueError, match="backend"):
        SparseAttention(8, 2, backend="bogus")
    for options, error, match in [
        (dict(n_iter=1.5), TypeError, "n_iter"),
        (dict(lam=float("nan")), ValueError, "lam"),
        (dict(lam="a"), TypeError, "lam"),
        (dict(step=0.0), ValueError, "step"),
        (dict(backend="bogus"), ValueError, "backend"),
    ]:
        with pytest.raises(error, match=match):
            SparseCodingTransformerBlock(8, 2, **options)
    with pytest.raises(ValueError, match=r"\(B, N, dim=8\) or \(N, dim=8\)"):
        SparseCodingTransformerBlock(8, 2, backend="reference")(torch.randn(5, 7))


def test_a_backend_without_multilayer_kernels_is_refused_at_construction():
    # triton has conv-ISTA kernels only: every mode that runs ML-ISTA used to be accepted and fail at forward.
    with pytest.raises(ValueError, match="backend 'triton' has no ml_ista kernels"):
        MultiLayerSparseCoding2d([1, 2, 3], 3, mode="ml-fista", backend="triton")
    with pytest.raises(ValueError, match="backend 'triton' has no ml_ista kernels"):
        MultiLayerSparseCoding2d([1, 2], 3, mode="layered", untied_unfoldings=True, backend="triton")
    assert MultiLayerSparseCoding2d([1, 2], 3, mode="layered", backend="triton").backend == "triton"


def test_untied_decode_uses_the_last_unfoldings_dictionaries():
    """decode is D_1 ... D_L G_L with the last unfolding's filters W_j[-1], written out with conv_transpose2d."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    net = MultiLayerSparseCoding2d(
        [2, 3, 4], [3, 2], strides=[2, 1], paddings=[1, 0], n_iter=2, untied_unfoldings=True, dtype=torch.float64
    )
    w1, w2 = (w.detach() for w in net.weights)
    code = torch.randn(2, 4, 4, 3, dtype=torch.float64)  # 9 x 8 -> 5 x 4 -> 4 x 3
    middle = F.conv_transpose2d(code, w2[-1])
    want = F.conv_transpose2d(middle, w1[-1], stride=2, padding=1, output_padding=(0, 1))
    assert want.shape == (2, 2, 9, 8)
    torch.testing.assert_close(net.decode(code, (9, 8)), want, rtol=0, atol=1e-12)


def test_initial_filters_scale_with_their_input_channels():
    """W_j ~ 0.1 N(0, 1) / sqrt(C_j k^2), C_j the input channels of weights.j (C_{j+1}, C_j, k, k); B_j alike."""
    torch.manual_seed(0)
    net = MultiLayerSparseCoding2d([3, 40, 5], 4, input_encoders=True, dtype=torch.float64)
    for filters in (net.weights, net.input_encoders):
        for w, c_in in zip(filters, [3, 40]):
            assert w.shape[1] == c_in
            want = 0.1 / (c_in * 16) ** 0.5
            assert abs(float(w.detach().std()) / want - 1) < 0.1, (c_in, float(w.detach().std()), want)


def test_layered_mode_with_signed_codes_is_conv_ista_per_layer():
    """mode="layered", nonneg=False: n_iter + 1 ISTA steps z <- S_t(z + c W^T (s - W z)) from zero on each layer,
    t = -b, each layer's code the next one's signal, written out with F.softshrink."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    net = MultiLayerSparseCoding2d(
        [1, 3, 4], 3, paddings=1, n_iter=3, mode="layered", nonneg=False, bias=-0.01, step=0.5, dtype=torch.float64
    )
    x = torch.randn(2, 1, 7, 6, dtype=torch.float64)
    signal, want = x, []
    for w in (w.detach() for w in net.weights):
        z = torch.zeros(2, w.shape[0], 7, 6, dtype=torch.float64)
        for _ in range(net.n_iter + 1):
            residual = signal - F.conv_transpose2d(z, w, padding=1)
            z = F.softshrink(z + 0.5 * F.conv2d(residual, w, padding=1), 0.01)
        want.append(z)
        signal = z
    got = net(x)
    assert all(bool((z < 0).any()) for z in want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
