"""Inputs, outputs and saved tensors that share memory: no call may mutate its inputs, and in-place writes after a
forward either make the backward raise or leave its gradient that of the forward that ran."""

import pytest
import torch

import dsc_kernels.functional as DF
from dsc_kernels.nn import ConvSparseCoding1d, ConvSparseCoding2d


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("layer_class, size", [(ConvSparseCoding1d, (9,)), (ConvSparseCoding2d, (7, 8))])
@pytest.mark.parametrize("n_iter", [1, 2])
def test_a_tracked_step_layer_applied_twice_before_backward(backend, layer_class, size, n_iter):
    # Every training forward rewrites the tracked step in place (same value for an unchanged weight); with n_iter=1
    # the broadcast step was a view of that buffer, saved for the backward: "modified by an inplace operation"
    layer = layer_class(3, 4, 3, n_iter=n_iter, lam=0.05, backend=backend).train()
    x1, x2 = torch.randn(2, 3, *size), torch.randn(2, 3, *size)
    (layer(x1).sum() + layer(x2).sum()).backward()
    together = layer.weight.grad.clone()
    layer.weight.grad = None
    layer(x1).sum().backward()
    layer(x2).sum().backward()
    torch.testing.assert_close(together, layer.weight.grad)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("n_iter", [1, 3])
def test_a_broadcast_step_or_lam_is_a_copy_at_every_n_iter(backend, n_iter):
    # n_iter=1 kept views of a 0-d step and a (C_code,) lam where n_iter >= 2 copied them: an in-place write to
    # them between forward and backward raised for one and not the other
    x, weight = torch.randn(2, 3, 7, 8), (torch.randn(4, 3, 3, 3) * 0.3).requires_grad_()
    step, lam = torch.tensor(0.2), torch.full((4,), 0.05)
    z = DF.conv_ista(x, weight, lam, step=step, n_iter=n_iter, backend=backend)
    with torch.no_grad():
        step.fill_(0.1)
        lam.fill_(0.5)
    (grad,) = torch.autograd.grad(z.sum(), weight)
    fresh = DF.conv_ista(x, weight, torch.full((4,), 0.05), step=0.2, n_iter=n_iter, backend=backend)
    torch.testing.assert_close(grad, torch.autograd.grad(fresh.sum(), weight)[0])


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_ml_ista_broadcast_steps_and_thresholds_are_copies_with_one_step(backend):
    # n_iter=0 is one step per layer: expand((1,)).contiguous() kept views of a 0-d step and a (C,) threshold (more
    # steps copied them), so an in-place write to them after the forward raised for one step count and not another
    x = torch.randn(2, 3, 9, 9)
    weights = [(torch.randn(4, 3, 3, 3) * 0.3).requires_grad_(), (torch.randn(5, 4, 3, 3) * 0.3).requires_grad_()]
    step, threshold = torch.tensor(0.2), torch.full((4,), 0.05)

    def loss(steps, thresholds):
        codes = DF.ml_ista(x, weights, thresholds, steps=steps, n_iter=0, paddings=[1, 1], backend=backend)
        return sum(c.sum() for c in codes)

    after_write = loss([step, 0.3], [threshold, 0.02])
    with torch.no_grad():
        step.fill_(0.1)
        threshold.fill_(0.5)
    fresh = loss([0.2, 0.3], [torch.full((4,), 0.05), 0.02])
    for got, want in zip(torch.autograd.grad(after_write, weights), torch.autograd.grad(fresh, weights)):
        torch.testing.assert_close(got, want)
