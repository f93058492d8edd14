"""dsc_kernels.sparsity: metric and regulariser math on hand-made tensors, schedules, SparsityMonitor."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from dsc_kernels import sparsity, theory
from dsc_kernels.nn import ConvSparseCoding2d, SoftThreshold, SparseCodingTransformerBlock


def test_zero_fraction_and_channel_activity():
    t = torch.tensor([[[0.0, 1.0], [0.0, 0.0]], [[2.0, -3.0], [0.0, 4.0]]]).unsqueeze(0)  # (1, 2, 2, 2)
    assert sparsity.zero_fraction(t) == pytest.approx(4 / 8)
    torch.testing.assert_close(sparsity.channel_activity(t), torch.tensor([0.25, 0.75]))
    assert sparsity.zero_fraction(torch.tensor([float("nan"), 0.0])) == 0.5  # NaN is not a zero
    with pytest.raises(ValueError, match="t must be"):
        sparsity.channel_activity(torch.ones(3))


def test_hoyer_measure():
    assert float(sparsity.hoyer(torch.tensor([0.0, 0.0, 5.0, 0.0]))) == pytest.approx(1.0)
    assert float(sparsity.hoyer(torch.tensor([-2.0, 2.0, 2.0, -2.0]))) == pytest.approx(0.0, abs=1e-6)
    # [3, 4]: l1 = 7, l2 = 5, n = 2
    expected = (math.sqrt(2) - 1.4) / (math.sqrt(2) - 1)
    assert float(sparsity.hoyer(torch.tensor([3.0, 4.0], dtype=torch.float64))) == pytest.approx(expected, rel=1e-12)
    assert float(sparsity.hoyer(torch.tensor([3.0, 4.0]))) == pytest.approx(expected, abs=1e-7)  # float32's ulp at 1
    rows = sparsity.hoyer(torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), dim=1)
    torch.testing.assert_close(rows, torch.tensor([1.0, 0.0]))
    assert float(sparsity.hoyer(torch.zeros(5))) == 1.0
    # exactly 1 for one non-zero in every dtype (float32 rounding once gave 0.99999994)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool):
        single = torch.zeros(7, dtype=dtype)
        single[3] = 1
        assert sparsity.hoyer(single).item() == 1.0, dtype


def test_activation_l1_penalty_collects_chosen_outputs_only_with_grad():
    first, second, ignored = nn.Identity(), nn.Identity(), nn.Identity()
    with sparsity.ActivationL1({"a": first, "b": second}, weight=0.5) as reg:
        first(torch.tensor([1.0, -3.0]))  # mean |.| = 2
        second([torch.tensor([4.0]), torch.tensor([0.0, -2.0])])  # a list of outputs: 4 + 1
        ignored(torch.tensor([100.0]))
        assert float(reg.pop()) == pytest.approx(0.5 * (2 + 4 + 1))
        assert reg.pop() == 0.0  # popped
        with torch.no_grad():
            first(torch.tensor([1.0]))
        assert reg.pop() == 0.0  # eval forwards are not penalised
    first(torch.tensor([1.0]))
    assert reg.pop() == 0.0  # hooks removed on leaving the block
    with pytest.raises(ValueError, match="weight"):
        sparsity.ActivationL1([first], weight=-1.0)


def test_activation_l1_takes_a_numpy_weight():
    # np.float32(0.5) was refused as "weight must be a finite float >= 0" (it is no Python float subclass)
    relu = nn.ReLU()
    with sparsity.ActivationL1([relu], weight=np.float32(0.5)) as reg:
        relu(torch.tensor([-1.0, 2.0], requires_grad=True))
        assert float(reg.pop()) == 0.5 and isinstance(reg.weight, float)
    with pytest.raises(ValueError, match="weight"):
        sparsity.ActivationL1([relu], weight=np.float64("nan"))


@pytest.mark.parametrize("container", [nn.ModuleList, nn.ModuleDict])
def test_module_containers_stand_for_the_modules_they_hold(container):
    """A ModuleList/ModuleDict has no forward: hooked itself, ActivationL1 penalised nothing, silently."""
    first, second = nn.Identity(), nn.Identity()
    held = container([first, second]) if container is nn.ModuleList else container({"a": first, "b": second})
    with sparsity.ActivationL1(held, weight=1.0) as reg:
        first(torch.tensor([1.0, -3.0]))
        second(torch.tensor([4.0]))
        assert float(reg.pop()) == pytest.approx(2 + 4)
    if container is nn.ModuleDict:
        with sparsity.SparsityMonitor(nn.Sequential(first, second), held) as monitor:
            first(torch.tensor([0.0, 1.0]))
            second(torch.tensor([2.0]))
            assert monitor.summary("train") == {"a": 0.5, "b": 0.0}


def test_containers_inside_a_dict_or_list_stand_for_their_modules():
    """A ModuleList given as a value of the dict (or an item of the list) was hooked itself: 0.0 penalty, no counts."""
    first, second = nn.Identity(), nn.Identity()
    held = nn.ModuleList([first, nn.ModuleDict({"b": second})])
    for modules in ({"acts": held}, [held]):
        with sparsity.ActivationL1(modules, weight=1.0) as reg:
            first(torch.tensor([1.0, -3.0]))
            second(torch.tensor([4.0]))
            assert float(reg.pop()) == pytest.approx(2 + 4)
    with sparsity.SparsityMonitor(nn.Sequential(held), {"acts": held}) as monitor:
        first(torch.tensor([0.0, 1.0]))
        second(torch.tensor([2.0]))
        assert monitor.summary("train") == {"acts.0": 0.5, "acts.1.b": 0.0}


def test_activation_l1_is_differentiable():
    layer = nn.Linear(3, 4)
    reg = sparsity.ActivationL1([layer], weight=1.0)
    layer(torch.randn(2, 3))
    reg.pop().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_coherence_penalty_values():
    eye = torch.eye(4).reshape(4, 1, 2, 2)  # orthonormal atoms
    assert float(sparsity.coherence_penalty(eye)) == pytest.approx(0.0)
    twins = torch.ones(2, 1, 2, 2)  # two equal atoms: cosine 1, counted twice
    assert float(sparsity.coherence_penalty(twins)) == pytest.approx(2.0)
    assert float(sparsity.coherence_penalty(twins, normalize=False)) == pytest.approx(2 * 16 + 2 * 9)
    # Deltas at taps 0 and 1 are orthogonal in place but equal after a shift of one sample.
    deltas = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])
    assert float(sparsity.coherence_penalty(deltas)) == pytest.approx(0.0)
    assert float(sparsity.coherence_penalty(deltas, shifts=True)) == pytest.approx(2.0)
    assert float(sparsity.coherence_penalty(deltas, shifts=True, stride=2)) == pytest.approx(0.0)  # odd shift skipped
    weight = torch.randn(3, 2, 3, 3, requires_grad=True)
    sparsity.coherence_penalty(weight, shifts=True).backward()
    assert weight.grad.abs().sum() > 0


def test_max_coherence_is_the_theory_value():
    weight = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    mu = sparsity.max_coherence(weight, (24, 24), padding=2)
    assert mu == theory.mutual_coherence(weight, (24, 24), padding=2)
    assert 0 < mu <= 1


def test_warmup_factor_shapes():
    assert sparsity.warmup_factor(0, 10) == 0.0
    assert sparsity.warmup_factor(5, 10) == pytest.approx(0.5)
    assert sparsity.warmup_factor(5, 10, start=0.2) == pytest.approx(0.6)
    assert sparsity.warmup_factor(5, 10, shape="cosine") == pytest.approx(0.5)
    assert sparsity.warmup_factor(2, 10, shape="cosine") < sparsity.warmup_factor(2, 10)
    assert sparsity.warmup_factor(12, 10) == 1.0
    with pytest.raises(ValueError, match="shape"):
        sparsity.warmup_factor(1, 10, shape="step")


def test_threshold_warmup_ramps_fixed_thresholds_only():
    model = nn.Sequential(
        SoftThreshold(0.4),
        ConvSparseCoding2d(1, 2, 3, lam=0.2, learn_lam=False),
        ConvSparseCoding2d(2, 2, 3, learn_lam=True),
    )
    warmup = sparsity.ThresholdWarmup(model, 4, start=0.5)
    assert set(warmup.targets) == {"0.threshold", "1.lam"}
    assert float(model[0].threshold) == pytest.approx(0.2) and float(model[1].lam) == pytest.approx(0.1)
    for _ in range(2):
        warmup.step()
    assert float(model[1].lam) == pytest.approx(0.2 * 0.75)
    for _ in range(5):
        warmup.step()
    assert float(model[0].threshold) == pytest.approx(0.4) and float(model[1].lam) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="no fixed"):
        sparsity.ThresholdWarmup(nn.Linear(2, 2), 3)


def test_threshold_warmup_ramps_torch_shrink_modules_lambd():
    """nn.Softshrink / nn.Hardshrink keep their threshold as a float ``lambd``: the warm-up ramps it too (it had
    skipped them, leaving a torch-built model at its target sparsity from the first step), and resumes it."""
    model = nn.Sequential(nn.Softshrink(0.5), nn.Hardshrink(0.3), SoftThreshold(0.4))
    warmup = sparsity.ThresholdWarmup(model, 4, start=0.0)
    assert set(warmup.targets) == {"0.lambd", "1.lambd", "2.threshold"}
    x = torch.linspace(-1, 1, 41)
    for step in range(6):
        factor = min(step / 4, 1.0)
        want_soft = torch.sign(x) * torch.clamp(x.abs() - 0.5 * factor, min=0)
        want_hard = torch.where(x.abs() > 0.3 * factor, x, torch.zeros_like(x))
        torch.testing.assert_close(model[0](x), want_soft, rtol=0, atol=1e-7)
        torch.testing.assert_close(model[1](x), want_hard, rtol=0, atol=0)
        assert float(model[2].threshold) == pytest.approx(0.4 * factor)
        if step == 2:
            state = warmup.state_dict()
        warmup.step()
    fresh = nn.Sequential(nn.Softshrink(0.5), nn.Hardshrink(0.3), SoftThreshold(0.4))
    resumed = sparsity.ThresholdWarmup(fresh, 4)
    resumed.load_state_dict(state)
    assert fresh[0].lambd == pytest.approx(0.25) and fresh[1].lambd == pytest.approx(0.15)


def test_threshold_warmup_ramps_the_transformer_blocks_lam():
    """SparseCodingTransformerBlock keeps its fixed lam as a Python float, like lambd: the warm-up skipped it, so
    beside a SoftThreshold the block coded at its target lam from the first step (and alone it was refused as having
    nothing to ramp). The block's output is that of a block built with the ramped lam; a resume restores it."""
    torch.manual_seed(0)
    model = nn.Sequential(SoftThreshold(0.4), SparseCodingTransformerBlock(8, 2, lam=0.5))
    warmup = sparsity.ThresholdWarmup(model, 4, start=0.0)
    assert set(warmup.targets) == {"0.threshold", "1.lam"}
    x = torch.randn(2, 5, 8)
    for step in range(6):
        factor = min(step / 4, 1.0)
        assert model[1].lam == pytest.approx(0.5 * factor)
        twin = SparseCodingTransformerBlock(8, 2, lam=0.5 * factor)
        twin.load_state_dict(model[1].state_dict())
        torch.testing.assert_close(model[1](x), twin(x), rtol=0, atol=0)
        if step == 2:
            state = warmup.state_dict()
        warmup.step()
    assert sparsity.ThresholdWarmup(SparseCodingTransformerBlock(8, 2, lam=0.5), 4).targets.keys() == {"lam"}
    fresh = nn.Sequential(SoftThreshold(0.4), SparseCodingTransformerBlock(8, 2, lam=0.5))
    sparsity.ThresholdWarmup(fresh, 4).load_state_dict(state)
    assert fresh[1].lam == pytest.approx(0.25)


def test_sparsity_monitor_records_train_and_eval_separately():
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(-torch.eye(4))
        model[2].bias.zero_()
    x = torch.tensor([[1.0, 2.0]])  # layer 1: [1, 0, 2, 0]; layer 2: relu(-[1, 0, 2, 0]) = 0
    with sparsity.SparsityMonitor(model) as monitor:
        model(x)
        model.eval()
        model(x)
        model(-x)  # layer 1: [0, 1, 0, 2]
        assert monitor.summary("train") == {"1": 0.5, "3": 1.0}
        assert monitor.summary("eval") == {"1": 0.5, "3": 1.0}
        record = monitor.end_epoch()
        assert monitor.history == [record] and monitor.summary("eval") == {}
        assert monitor.mean(record["eval"]) == pytest.approx(0.75)
    model(x)
    assert monitor.summary("eval") == {}  # hooks removed
    with pytest.raises(ValueError, match="phase"):
        monitor.summary("test")


def test_sparsity_monitor_finds_sparse_coding_layers():
    model = nn.Sequential(
        ConvSparseCoding2d(1, 3, 3, n_iter=2, lam=0.5, nonneg=True, backend="reference"), nn.Conv2d(3, 2, 1)
    )
    with sparsity.SparsityMonitor(model) as monitor:
        z = model[0](torch.randn(2, 1, 6, 6))
    assert list(monitor.summary("train")) == ["0"]
    assert monitor.summary("train")["0"] == pytest.approx(sparsity.zero_fraction(z))


def test_sparsity_monitor_finds_the_multilayer_pursuit():
    from dsc_kernels.nn import MultiLayerSparseCoding2d

    model = nn.Sequential(MultiLayerSparseCoding2d([1, 3, 4], kernel_sizes=[3, 3], n_iter=2, backend="reference"))
    with sparsity.SparsityMonitor(model) as monitor:
        codes = model(torch.randn(2, 1, 8, 8))
    zeros = sum(int((c == 0).sum()) for c in codes) / sum(c.numel() for c in codes)
    assert monitor.summary("train") == {"0": pytest.approx(zeros)}


def test_sparsity_monitor_finds_the_transformer_block():
    """The block's output is its ISTA MLP's non-negative codes, as a sparse-coding layer's: the monitor skipped it
    (a model of blocks was refused with 'no modules to monitor')."""
    torch.manual_seed(0)
    model = nn.Sequential(SparseCodingTransformerBlock(8, 2, lam=0.5, backend="reference"))
    with sparsity.SparsityMonitor(model) as monitor:
        codes = model(torch.randn(2, 5, 8))
    assert 0 < sparsity.zero_fraction(codes) < 1
    assert monitor.summary("train") == {"0": pytest.approx(sparsity.zero_fraction(codes))}


def test_hoyer_is_scale_invariant_at_every_scale():
    x = torch.tensor([[3.0, 4.0, 0.0, -1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, -2.0, 0.0]], dtype=torch.float64)
    want = sparsity.hoyer(x, dim=1)
    for scale in (1e-300, 1e-30, 1e-8, 1e8, 1e300):
        torch.testing.assert_close(sparsity.hoyer(x * scale, dim=1), want, rtol=1e-12, atol=1e-12)
    # float32: below the old fixed eps and into the subnormals
    x32 = torch.tensor([3.0, 4.0, 0.0, -1.0])
    for scale in (1e-20, 1e-30, 1e-40):
        assert float(sparsity.hoyer(x32 * scale)) == pytest.approx(float(sparsity.hoyer(x32)), rel=1e-5)


def test_hoyer_propagates_nan_and_keeps_the_zero_convention():
    nan = float("nan")
    rows = sparsity.hoyer(torch.tensor([[1.0, nan, 0.0], [0.0, nan, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), dim=1)
    assert rows[:2].isnan().all() and float(rows[2]) == 1.0 and float(rows[3]) == pytest.approx(1.0)
    assert sparsity.hoyer(torch.tensor([2.0, float("inf")])).isnan()
    assert sparsity.hoyer(torch.tensor([nan])).isnan()  # n = 1 is 1 by convention, but not for NaN
    assert float(sparsity.hoyer(torch.tensor([5.0]))) == 1.0


def test_hoyer_gradients_are_exact_and_finite():
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sparsity.hoyer(t, dim=1), (x,))
    assert torch.autograd.gradcheck(lambda t: sparsity.hoyer(t * 1e-30), (x,))
    zero = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    sparsity.hoyer(zero, dim=1).sum().backward()
    assert torch.equal(zero.grad, torch.zeros_like(zero))  # finite (not NaN) at the all-zero convention
    tiny = (torch.tensor([3.0, 4.0, 0.5], dtype=torch.float64) * 1e-200).requires_grad_()
    sparsity.hoyer(tiny).backward()
    assert torch.isfinite(tiny.grad).all() and tiny.grad.abs().max() > 0


@pytest.mark.parametrize(
    "weight,stride,error,match",
    [
        (torch.randn(2, 1, 3), 0, ValueError, "stride must be >= 1"),
        (torch.randn(2, 1, 3), (1, 2), ValueError, "stride must .* 1 entries"),
        (torch.randn(2, 1, 3, 3), (2,), ValueError, "stride must .* 2 entries"),
        (torch.randn(2, 1, 3, 3), (2, 0), ValueError, "stride must be >= 1"),
        (torch.randn(2, 1, 3, 3), 1.5, TypeError, "stride"),
    ],
)
def test_coherence_penalty_checks_stride(weight, stride, error, match):
    for shifts in (True, False):
        with pytest.raises(error, match=match):
            sparsity.coherence_penalty(weight, shifts=shifts, stride=stride)


def test_coherence_penalty_edge_inputs():
    with pytest.raises(TypeError, match="weight"):
        sparsity.coherence_penalty([[[1.0, 0.0]]])
    with pytest.raises(ValueError, match="weight"):
        sparsity.coherence_penalty(torch.randn(2, 3))
    assert float(sparsity.coherence_penalty(torch.randn(0, 1, 3), shifts=True)) == 0.0  # no atoms, no pairs
    # empty atoms: every inner product is 0, so each atom misses its unit self-product
    assert float(sparsity.coherence_penalty(torch.randn(2, 0, 3), shifts=True)) == 2.0
    assert sparsity.coherence_penalty(torch.full((2, 1, 3), float("nan")), shifts=True).isnan()
    # a stride beyond the filter leaves only the unshifted Gram matrix
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(sparsity.coherence_penalty(w, shifts=True, stride=5), sparsity.coherence_penalty(w))


@pytest.mark.parametrize("shifts", [False, True])
def test_coherence_penalty_second_derivative_at_a_zero_atom_is_finite(shifts):
    """An all-zero atom is a constant of the penalty (zero gradient, documented): its Hessian-vector product was NaN
    in that atom's row (torch's norm has a NaN second derivative at 0), so a gradient penalty or an HVP of a loss
    holding the regulariser was NaN. Elsewhere the product is the finite difference of the gradient."""
    torch.manual_seed(0)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    w[1] = 0.0
    w.requires_grad_(True)
    (g,) = torch.autograd.grad(sparsity.coherence_penalty(w, shifts=shifts), w, create_graph=True)
    v = torch.randn_like(w)
    (hv,) = torch.autograd.grad((g * v).sum(), w, retain_graph=True)
    assert hv.isfinite().all() and not hv[1].any()

    def grad_at(x):
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(sparsity.coherence_penalty(x, shifts=shifts), x)[0]

    v[1] = 0.0
    (hv,) = torch.autograd.grad((g * v).sum(), w)
    fd = (grad_at(w + 1e-6 * v) - grad_at(w - 1e-6 * v)) / 2e-6
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-8)


def test_max_coherence_edge_inputs():
    w = torch.randn(3, 1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    # padding >= k: the outermost atoms are zero, the rest are the truncated border atoms of padding k - 1
    assert sparsity.max_coherence(w, 10, padding=5) == sparsity.max_coherence(w, 10, padding=2)
    assert math.isnan(sparsity.max_coherence(w * float("nan"), 10))
    assert sparsity.max_coherence(torch.randn(0, 1, 3), 10) == 0.0
    with pytest.raises(ValueError, match="stride"):
        sparsity.max_coherence(w, 10, stride=0)
    with pytest.raises(ValueError, match="padding"):
        sparsity.max_coherence(w, 10, padding=-1)
    with pytest.raises(TypeError, match="weight"):
        sparsity.max_coherence(w.numpy(), 10)


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_sparsity_monitor_cannot_be_nested_and_always_removes_its_hooks():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    monitor = sparsity.SparsityMonitor(model)
    with monitor:
        with pytest.raises(RuntimeError, match="already active"):
            with monitor:
                pass
        assert _hook_count(model) == 1  # the nested entry added nothing
        model(torch.ones(1, 2))
    assert _hook_count(model) == 0
    assert monitor.summary("train")["1"] in {k / 3 for k in range(4)}  # one forward counted once: 3 entries
    assert sum(total for _, total in monitor._counts.values()) == 3
    with pytest.raises(ZeroDivisionError):
        with monitor:  # re-entered after its block ended: works, and the body's exception removes the hooks
            assert _hook_count(model) == 1
            raise ZeroDivisionError
    assert _hook_count(model) == 0
    with monitor:
        model(torch.ones(1, 2))
    assert _hook_count(model) == 0
    assert sum(total for _, total in monitor._counts.values()) == 6  # counts carry on across blocks


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recomputation_is_not_recorded_again(reentrant):
    """torch.utils.checkpoint reruns a block's forward inside the backward, and the hooks recorded that rerun: with
    use_reentrant=False ActivationL1's penalty was twice its value from the second step on (a stale term of the last
    step), and SparsityMonitor counted every checkpointed forward twice; with use_reentrant=True the stale term made
    the next backward fail ("Trying to backward through the graph a second time")."""
    from torch.utils.checkpoint import checkpoint

    relu = nn.ReLU()
    block = nn.Sequential(nn.Linear(3, 4), relu, nn.Linear(4, 2))  # the rerun goes past relu's hook
    x = torch.randn(5, 3)
    with torch.no_grad():
        expected = float(relu(block[0](x)).abs().mean())
    with sparsity.ActivationL1([relu], weight=1.0) as reg, sparsity.SparsityMonitor(block, {"relu": relu}) as monitor:
        for _ in range(3):
            y = checkpoint(block, x.clone().requires_grad_(reentrant), use_reentrant=reentrant)
            penalty = reg.pop()
            # the reentrant variant runs the first forward without grad: nothing to penalise there (documented)
            assert float(penalty) == pytest.approx(0.0 if reentrant else expected)
            (y.sum() + penalty).backward()
        assert reg.pop() == 0.0
        assert sum(total for _, total in monitor._counts.values()) == 3 * 5 * 4


def test_sparsity_monitor_compiles_once_over_many_forwards():
    """The monitor's hook added each output's size to a Python int, a constant that Dynamo guards on: every compiled
    forward recompiled, and with fullgraph=True the 9th raised FailOnRecompileLimitHit (without it the model ran
    eager from then on)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), SoftThreshold(0.1, 4))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with sparsity.SparsityMonitor(model) as monitor:
        zeros = 0
        for _ in range(12):
            out = compiled(torch.randn(3, 2, 16))
            zeros += int((out == 0).sum())
    # one graph before the layer's counts exist, one after
    assert counters["stats"]["unique_graphs"] <= 2
    assert monitor.summary("train") == {"1": pytest.approx(zeros / (12 * 3 * 4 * 16))}
    torch._dynamo.reset()


def test_sparsity_monitor_skips_index_outputs():
    """A module returning (values, indices), such as MaxPool2d(return_indices=True), had its indices counted as
    activations: a flat index 0 was an "exact zero" and the values' fraction was diluted (0.375 here, not 0.5);
    ActivationL1 already skipped such outputs."""
    pool = nn.MaxPool2d(2, return_indices=True)
    top = torch.tensor([[0.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, 0.0]])  # maxima 0 at flat indices 0 and 7
    x = torch.cat([top, top + 2]).reshape(1, 1, 4, 4)  # second row of windows: maxima 2, no zero
    with sparsity.SparsityMonitor(nn.Sequential(pool), {"pool": pool}) as monitor:
        pool(x)
    assert monitor.summary("train") == {"pool": 0.5}


def test_activation_l1_can_be_entered_again_after_its_block():
    """Leaving the with block removes the hooks, and entering it again did not add them back: an epoch loop around
    `with reg:` got a penalty of 0.0, silently, from the second epoch on (SparsityMonitor re-registers)."""
    relu = nn.ReLU()
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    reg = sparsity.ActivationL1([relu], weight=1.0)
    for _ in range(2):
        with reg:
            assert _hook_count(relu) == 1
            relu(x)
            assert float(reg.pop()) == pytest.approx(4 / 3)
        assert _hook_count(relu) == 0
    reg.remove()
    with reg:
        assert _hook_count(relu) == 1


def test_sparse_and_nested_tensors_are_refused_by_name():
    """Sparse tensors failed inside torch (NotImplementedError, RuntimeError "reshape is not implemented for sparse
    tensors") and a nested one in hoyer with "Internal error: ... Please file an issue"."""
    t = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    nested = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)])
    for bad in (t.to_sparse(), t.to_sparse_csr(), nested):
        for metric in (sparsity.zero_fraction, sparsity.hoyer, sparsity.channel_activity):
            with pytest.raises(TypeError, match="t must be a dense"):
                metric(bad)
    w = torch.randn(3, 2, 3).to_sparse()
    with pytest.raises(TypeError, match="weight must be a dense"):
        sparsity.coherence_penalty(w, shifts=True)
    with pytest.raises(TypeError, match="weight must be a dense"):
        sparsity.max_coherence(w, 6)


def test_threshold_warmup_step_that_fails_part_way_keeps_its_count():
    """step() counted the step before setting the thresholds: one that raised part-way (here a buffer that became an
    inference tensor) left the count ahead, and the retried step() skipped a step of the ramp (0.5 after one of 4)."""
    model = nn.Sequential(SoftThreshold(0.4), SoftThreshold(0.2))
    warmup = sparsity.ThresholdWarmup(model, 4)
    good = model[1]._buffers["threshold"]
    with torch.inference_mode():
        model[1]._buffers["threshold"] = good.clone()
    with pytest.raises(RuntimeError, match="inference tensor"):
        warmup.step()
    model[1]._buffers["threshold"] = good
    assert warmup.count == 0
    assert warmup.step() == pytest.approx(0.25)
    assert float(model[0].threshold) == pytest.approx(0.1) and float(model[1].threshold) == pytest.approx(0.05)
