"""The op interface every fused backend plugs into, exercised with the pure-PyTorch "reference" ops."""

import pytest
import torch
from helpers import assert_conv_ista_fakes_match, conv_problem

from dsc_kernels.ops import op_pair
from dsc_kernels.reference import conv_ista_ref


def canonical_args(p, nonneg, fista, checkpoint):
    z0 = (
        p["z0"]
        if p["z0"] is not None
        else torch.zeros_like(
            conv_ista_ref(p["x"], p["weight"], p["lam"], p["step"], stride=p["stride"], padding=p["padding"])
        )
    )
    return (
        p["x"],
        p["weight"],
        p["encoder_weight"],
        p["lam"],
        p["step"],
        z0,
        list(p["stride"]),
        list(p["padding"]),
        nonneg,
        fista,
        checkpoint,
    )


@pytest.mark.parametrize("checkpoint", [1, 2, 0])
@pytest.mark.parametrize("fista,nonneg", [(False, False), (True, True)])
def test_opcheck_ref_ops(checkpoint, fista, nonneg):
    p = conv_problem(2, stride=2, z0=True, requires_grad=True)
    ops = op_pair("conv_ista", "reference")
    args = canonical_args(p, nonneg, fista, checkpoint)
    torch.library.opcheck(ops.forward, args)
    # The backward op is not itself differentiable (no double backward): check it on plain tensors.
    tensors = [t.detach() for t in args[:6]]
    z, saved = ops.forward(*tensors, *args[6:])
    torch.library.opcheck(ops.backward, (torch.randn_like(z), *tensors, z, saved, *args[6:]))


def test_compiled_op_matches_eager_with_gradients():
    p = conv_problem(2, stride=1, z0=True, requires_grad=True)
    args = canonical_args(p, False, True, 2)

    forward = op_pair("conv_ista", "reference").forward

    def run(x, w, we, lam, step, z0):
        return forward(x, w, we, lam, step, z0, *args[6:])[0]

    tensors = args[:6]
    eager = run(*tensors)
    compiled = torch.compile(run, fullgraph=True)(*tensors)
    torch.testing.assert_close(compiled, eager)
    g = torch.randn_like(eager)
    for a, b in zip(torch.autograd.grad(compiled, tensors, g), torch.autograd.grad(eager, tensors, g)):
        torch.testing.assert_close(a, b)


def test_unknown_backend_is_reported():
    with pytest.raises(ValueError, match="no conv_ista backend named 'nope'"):
        op_pair("conv_ista", "nope")


@pytest.mark.parametrize("checkpoint", [-1, 0, 1])
def test_reference_ops_take_the_tied_empty_encoder(checkpoint):
    """The contract's tied encoder, an empty (0,) encoder_weight standing for weight: the reference ops ran it as a
    rank -1 dictionary and raised ("value must have -1 entries") where cpp and triton take it. Checked against plain
    ISTA through autograd: z, and weight's gradient as the sum of both uses with an empty encoder gradient."""
    torch.manual_seed(0)
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    weight = (0.3 * torch.randn(3, 2, 3, 3, dtype=torch.float64)).requires_grad_()
    lam, step = torch.full((3, 3), 0.1, dtype=torch.float64), torch.full((3,), 0.2, dtype=torch.float64)
    z = torch.zeros(2, 3, 4, 3, dtype=torch.float64)
    for k in range(3):
        u = z + step[k] * torch.nn.functional.conv2d(
            x - torch.nn.functional.conv_transpose2d(z, weight, stride=2, padding=1, output_padding=(0, 1)),
            weight,
            stride=2,
            padding=1,
        )
        z = torch.nn.functional.softshrink(u, 0.02)
    g = torch.randn_like(z)
    (grad_weight,) = torch.autograd.grad(z, weight, g)
    ops = op_pair("conv_ista", "reference")
    args = (x, weight.detach(), x.new_empty(0), lam, step, x.new_empty(0), [2, 2], [1, 1], False, False, checkpoint)
    z_op, saved = ops.forward(*args)
    torch.testing.assert_close(z_op, z.detach())
    if checkpoint >= 0:
        grads = ops.backward(g, *args[:6], z_op if checkpoint > 0 else z_op.new_empty(0), saved, *args[6:])
        torch.testing.assert_close(grads[1], grad_weight)
        assert grads[2].shape == (0,)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("batch,layout", [(2, "channels_last"), (0, "contiguous"), (1, "channels_last")])
def test_conv_ista_fakes_give_the_real_strides(backend, batch, layout):
    """The family's fakes describe every row's outputs exactly (torch.compile lays out what follows by them). The
    backward fake kept a channels-last input's layout where cpp returns contiguous gradients; the reference ops
    returned a channels-last z, saved and gradients, and a (0,) gradient for a given z0 of an empty batch where the
    fake and cpp give z0's shape."""
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(batch, 2, 7, 6, dtype=torch.float64).to(memory_format=fmt)
    weight = (0.3 * torch.randn(3, 2, 3, 3, dtype=torch.float64)).to(memory_format=fmt)
    z0 = torch.randn(batch, 3, 4, 3, dtype=torch.float64).to(memory_format=fmt)
    lam, step = torch.full((3, 3), 0.1, dtype=torch.float64), torch.full((3,), 0.2, dtype=torch.float64)
    args = (x, weight, torch.randn_like(weight), lam, step, z0, [2, 2], [1, 1], False, True, 1)
    assert_conv_ista_fakes_match(op_pair("conv_ista", backend), args)
