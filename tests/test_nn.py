"""The drop-in layers: shapes, state dicts, options, training, devices/dtypes and torch.compile."""
import pytest
import torch

import dsc_kernels.functional as DF
from dsc_kernels.nn import ConvSparseCoding1d, ConvSparseCoding2d, DeepSparseCoding2d, SoftThreshold


def test_default_padding_keeps_the_size_and_decode_inverts_the_shape():
    layer = ConvSparseCoding2d(3, 8, 5, n_iter=3, backend="reference")
    x = torch.randn(2, 3, 13, 11)
    z = layer(x)
    assert z.shape == (2, 8, 13, 11)
    assert layer.decode(z).shape == x.shape
    layer1d = ConvSparseCoding1d(2, 6, 7, stride=2, n_iter=3, backend="reference")
    x1 = torch.randn(2, 2, 21)
    z1 = layer1d(x1)
    assert layer1d.decode(z1, signal_size=(21,)).shape == x1.shape


def test_dictionary_has_unit_norm_filters_and_the_step_is_one_over_L():
    layer = ConvSparseCoding2d(3, 8, 5, n_iter=3)
    norms = layer.weight.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(8))
    L = DF.lipschitz_constant(layer.weight.detach(), (64, 64), padding=2, n_iter=100)
    assert layer.step.item() == pytest.approx(1 / L, rel=0.05)


def test_layer_equals_functional_call():
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=4, lam=0.05, fista=True, nonneg=True, backend="reference").eval()
    x = torch.randn(2, 2, 9, 9)
    expected = DF.conv_ista(x, layer.weight, 0.05, n_iter=4, step=layer.step.item(), padding=1, fista=True,
                            nonneg=True, backend="reference")
    torch.testing.assert_close(layer(x), expected)


def test_state_dict_keys_and_learned_parameters():
    layer = ConvSparseCoding2d(1, 4, 3, n_iter=5, learn_lam=True, learn_step=True, untied=True)
    assert sorted(layer.state_dict()) == ["encoder_weight", "lam", "step", "weight"]
    assert layer.lam.shape == (5, 4) and layer.step.shape == (5,)
    assert {n for n, _ in layer.named_parameters()} == {"weight", "encoder_weight", "lam", "step"}
    plain = ConvSparseCoding2d(1, 4, 3, n_iter=5)
    assert sorted(plain.state_dict()) == ["lam", "step", "weight"]
    assert {n for n, _ in plain.named_parameters()} == {"weight"}
    assert "untied" in repr(layer) and "learn_lam" in repr(layer) and "n_iter=5" in repr(layer)


def test_training_lowers_reconstruction_error():
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(1, 8, 5, n_iter=5, lam=0.01, learn_lam=True, learn_step=True, untied=True,
                               backend="reference")
    x = torch.randn(4, 1, 12, 12)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for i in range(30):
        loss = (layer.decode(layer(x)) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if i == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_soft_threshold_module():
    module = SoftThreshold(0.5, num_channels=3, nonneg=False, learnable=True)
    x = torch.randn(2, 3, 4, 4) * 2
    torch.testing.assert_close(module(x), torch.nn.functional.softshrink(x, 0.5))
    assert isinstance(module.threshold, torch.nn.Parameter) and "num_channels=3" in repr(module)


def test_factory_kwargs():
    layer = ConvSparseCoding2d(1, 4, 3, n_iter=2, learn_lam=True, device="cpu", dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in layer.state_dict().values())
    assert layer(torch.randn(1, 1, 6, 6, dtype=torch.float64)).dtype == torch.float64
    deep = DeepSparseCoding2d([1, 4, 8], [3, 3], dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in deep.state_dict().values())


def test_deep_sparse_coding_layers_and_decode():
    deep = DeepSparseCoding2d([1, 4, 8], [5, 3], strides=[1, 2], lams=[0.05, 0.02], n_iter=3, backend="reference")
    x = torch.randn(2, 1, 16, 16)
    g1, g2 = deep(x)
    assert g1.shape == (2, 4, 16, 16) and g2.shape == (2, 8, 8, 8)
    assert (g1 >= 0).all() and (g2 >= 0).all()  # nonneg by default: the CNN (ReLU) view of layered pursuit
    assert deep.decode(g2).shape[:2] == (2, 1)
    with pytest.raises(ValueError, match="kernel_sizes must be one value or a list of 2"):
        DeepSparseCoding2d([1, 4, 8], [5, 3, 3])


@pytest.mark.parametrize("compiler,make", [
    ("inductor", lambda: ConvSparseCoding2d(1, 4, 3, n_iter=3, learn_lam=True, backend="reference")),
    # aot_eager captures the same full graph (forward and backward) without inductor's slow code generation.
    ("aot_eager", lambda: ConvSparseCoding1d(2, 4, 5, n_iter=3, fista=True, untied=True, backend="reference")),
    ("aot_eager", lambda: DeepSparseCoding2d([1, 4, 6], 3, n_iter=2, backend="reference")),
    ("aot_eager", lambda: SoftThreshold(0.1, num_channels=2)),
])
def test_modules_compile_with_fullgraph(compiler, make):
    module = make()
    x = torch.randn(2, 2 if isinstance(module, (ConvSparseCoding1d, SoftThreshold)) else 1,
                    *((17,) if isinstance(module, ConvSparseCoding1d) else (9, 9)), requires_grad=True)
    compiled_module = torch.compile(module, fullgraph=True, backend=compiler)
    # Training mode traces the step tracking (power iteration, in-place buffer update) into the same graph.
    out = compiled_module(x)
    sum(o.sum() for o in (out if isinstance(out, list) else [out])).backward()
    module.eval()  # a fixed step: eager and compiled must agree exactly
    eager, compiled = module(x), compiled_module(x)
    for a, b in zip(eager if isinstance(eager, list) else [eager], compiled if isinstance(compiled, list) else [compiled]):
        torch.testing.assert_close(a, b)
