"""Layers whose parameters are pruned (torch.nn.utils.prune) or parametrized (torch.nn.utils.parametrize)."""

import pytest
import torch
from torch.nn.utils import prune

from dsc_kernels.nn import ConvSparseCoding1d, ConvSparseCoding2d, MultiLayerSparseCoding2d, SoftThreshold, project_


def _push_below_zero(module, x):
    """An SGD step that moves every stored (pruned: name_orig) value far below 0, whatever the gradient's sign."""
    optimizer = torch.optim.SGD(module.parameters(), lr=100.0)
    module(x).sum().backward()
    for p in module.parameters():
        if p.grad is not None:
            p.grad = torch.ones_like(p)
    optimizer.step()


@pytest.mark.parametrize("name", ["lam", "threshold"])
def test_a_pruned_learned_threshold_is_projected_through_its_original(name):
    # prune makes `lam` the plain tensor lam_orig * lam_mask; the optimiser updates lam_orig, which projection
    # never reached: lam went below 0 and the next forward refused it (ValueError)
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=2, backend="reference", **{name: 0.05, f"learn_{name}": True})
    prune.random_unstructured(layer, name, amount=0.5)
    x = torch.randn(1, 2, 6, 6)
    _push_below_zero(layer, x)
    original = getattr(layer, f"{name}_orig")
    assert float(original.detach().min()) == 0.0  # projected onto lam >= 0, not left at 0.05 - 100
    layer(x)  # runs (the product of the projected original and the mask is >= 0)


def test_a_pruned_learned_step_is_projected_onto_its_floor():
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=2, learn_step=True, backend="reference")
    prune.identity(layer, "step")
    _push_below_zero(layer, torch.randn(1, 2, 6, 6))
    assert torch.equal(layer.step_orig.detach(), layer.step_floor.expand(2))


def test_a_pruned_learnable_soft_threshold_is_projected_through_its_original():
    module = SoftThreshold(0.1, num_channels=4, learnable=True)
    prune.l1_unstructured(module, "threshold", amount=0.5)
    x = torch.randn(2, 4, 5)
    _push_below_zero(module, x)
    assert float(module.threshold_orig.detach().min()) == 0.0
    module(x)
    # project_ reaches it too
    with torch.no_grad():
        module.threshold_orig.fill_(-1.0)
    project_(module)
    assert float(module.threshold_orig.detach().min()) == 0.0


def _inverse_lipschitz(weight):
    """1/L of ``weight`` from a fresh float64 layer, to convergence."""
    truth = ConvSparseCoding2d(*weight.shape[1::-1], weight.shape[-1], backend="reference", dtype=torch.float64)
    with torch.no_grad():
        truth.weight.copy_(weight.double())
    return float(truth.refresh_step_(100))


def test_a_pruned_dictionary_stepped_since_the_last_forward_is_seen_outside_the_forward():
    # prune's `weight` is weight_orig * weight_mask as of the last forward: after an optimiser step state_dict()
    # took the step as up to date and saved the old dictionary's 1/L (27x the new one's here), and decode used the
    # old dictionary
    torch.manual_seed(2)
    layer = ConvSparseCoding2d(4, 8, 3, n_iter=3, backend="reference")
    prune.l1_unstructured(layer, "weight", amount=0.3)
    x = torch.randn(2, 4, 8, 8)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).square().sum().backward()
    optimizer.step()
    effective = (layer.weight_orig * layer.weight_mask).detach()
    saved = float(layer.state_dict()["step"])
    assert saved == pytest.approx(_inverse_lipschitz(effective), rel=1e-3)
    z = torch.randn(1, 8, 6, 6)
    expected = torch.nn.functional.conv_transpose2d(z, effective, padding=1)
    torch.testing.assert_close(layer.decode(z), expected)
    layer.eval()
    layer(x)
    assert float(layer.step) == pytest.approx(_inverse_lipschitz(effective), rel=1e-4)


def test_normalize_dictionary_normalises_a_pruned_dictionarys_effective_atoms():
    # it divided prune's `weight` (the product as of the last forward), which the next forward's pre-hook formed
    # again from weight_orig: the atoms kept their norms (3 here), silently
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(3, 6, 3, n_iter=2, backend="reference")
    prune.l1_unstructured(layer, "weight", amount=0.3)
    with torch.no_grad():
        layer.weight_orig.mul_(3.0)
    layer.normalize_dictionary_()
    layer(torch.randn(1, 3, 6, 6))
    norms = layer.weight.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(6))
    assert float(layer.step) == pytest.approx(_inverse_lipschitz(layer.weight.detach()), rel=1e-3)


def test_the_documented_unit_norm_parametrization_trains_with_unit_atoms_and_a_current_step():
    # docs/training.md, "Keeping atoms at unit norm": the parametrization's code as printed there
    import re
    from pathlib import Path

    from torch.nn.utils import parametrize

    import dsc_kernels

    text = Path(__file__).parents[1].joinpath("docs", "training.md").read_text()
    block = re.search(r"## Keeping atoms at unit norm.*?```python\n(.*?)```", text, re.S).group(1)
    scope = {"dsc_kernels": dsc_kernels}
    torch.manual_seed(0)
    exec(block, scope)
    layer = scope["layer"]
    layer.backend = "reference"
    assert parametrize.is_parametrized(layer, "weight")
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    x = torch.randn(2, 1, 12, 12)
    before = layer.weight.detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        (x - layer.decode(layer(x))).square().sum().backward()
        optimizer.step()
    weight = layer.weight.detach()
    torch.testing.assert_close(weight.flatten(1).norm(dim=1), torch.ones(16))
    assert (weight - before).abs().max() > 0.01  # trained: the optimiser moved the free tensor
    layer.eval()
    layer(x)  # an eval forward re-estimates the step for the weight as it is now
    assert float(layer.step) == pytest.approx(_inverse_lipschitz(weight), rel=1e-3)


def test_compiled_training_of_a_pruned_layer_follows_the_eager_trajectory():
    # A compiled training forward re-estimated 1/L with three power iterations where the eager CPU one went on
    # while the estimate still rose (up to 20): the tracked steps parted after one Adam step, and compiled training
    # drifted off eager training (float64: codes 1e-3 apart by the second step here). Not specific to
    # pruning, which only made the dictionary's spectrum move enough for it to show.
    torch._dynamo.reset()

    def make():
        torch.manual_seed(0)
        layer = ConvSparseCoding1d(4, 8, 5, n_iter=5, backend="reference", dtype=torch.float64)
        prune.l1_unstructured(layer, "weight", amount=0.3)
        return layer

    eager, compiled_layer = make(), make()
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 24, dtype=torch.float64)
    optimizers = [torch.optim.Adam(layer.parameters(), lr=0.3) for layer in (compiled_layer, eager)]
    for _ in range(3):
        codes = []
        for module, forward, optimizer in zip((compiled_layer, eager), (compiled, eager), optimizers):
            optimizer.zero_grad()
            z = forward(x)
            ((x - module.decode(z)).square().sum() + 0.1 * z.abs().sum()).backward()
            optimizer.step()
            codes.append(z.detach())
        torch.testing.assert_close(codes[0], codes[1], rtol=0, atol=1e-12)
        torch.testing.assert_close(compiled_layer.step, eager.step, rtol=0, atol=1e-12)
        torch.testing.assert_close(compiled_layer.weight_orig, eager.weight_orig, rtol=0, atol=1e-12)


def _multilayer(**options):
    torch.manual_seed(0)
    return MultiLayerSparseCoding2d([2, 4, 6], [3, 3], paddings=1, n_iter=2, backend="reference", **options)


@pytest.mark.parametrize("mode", ["ml-ista", "layered"])
def test_a_multilayer_network_trains_with_a_pruned_dictionary(mode):
    # A ParameterList is never called, so prune's pre-hook never recomputed weights.0 = weights.0_orig * mask: every
    # forward used the product formed at pruning time, and the second backward through it failed.
    net = _multilayer(mode=mode)
    prune.l1_unstructured(net.weights, "0", amount=0.5)
    mask = net.weights[0] != 0
    twin = _multilayer(mode=mode)  # unpruned, its dictionary masked by hand: the trajectory the pruned one must follow
    x = torch.randn(2, 2, 6, 6)
    optimizers = [torch.optim.SGD(n.parameters(), lr=0.05) for n in (net, twin)]
    for _ in range(3):
        with torch.no_grad():
            twin.weights[0].mul_(mask)
        for n, optimizer in zip((net, twin), optimizers):
            optimizer.zero_grad()
            n(x)[-1].square().sum().backward()
            optimizer.step()
    with torch.no_grad():
        twin.weights[0].mul_(mask)
    assert not torch.equal(twin.weights[0], mask * _multilayer(mode=mode).weights[0])  # the steps moved it
    for a, b in zip(net(x), twin(x)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert torch.equal(net.weights[0], net.weights.get_parameter("0_orig") * mask)  # as of this forward


def test_a_multilayer_networks_pruned_signed_bias_is_projected_through_its_original():
    # constraints() listed the list's entries, for a pruned one the product formed at the last forward, so the
    # optimiser's update of biases.1_orig went unprojected and the next forward refused the threshold
    net = _multilayer(nonneg=False, bias=-0.05)
    prune.random_unstructured(net.biases, "1", amount=0.5)
    x = torch.randn(1, 2, 6, 6)
    optimizer = torch.optim.SGD(net.parameters(), lr=100.0)
    net(x)[-1].sum().backward()
    for p in net.parameters():
        p.grad = None
    for p in net.biases.parameters():
        p.grad = -torch.ones_like(p)  # every bias up by 100, far above the signed bias's bound of 0
    optimizer.step()
    assert float(net.biases.get_parameter("1_orig").detach().max()) == 0.0
    net(x)  # runs: thresholds -b >= 0
