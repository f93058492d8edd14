"""The op interface every fused backend plugs into, exercised with the pure-PyTorch "reference" ops."""

import pytest
import torch
from helpers import conv_problem

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
