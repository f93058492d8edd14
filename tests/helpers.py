"""Small problem builders shared by the tests."""
from __future__ import annotations

import torch

from dsc_kernels.reference import code_size


def conv_problem(rank: int, *, batch=2, c_sig=2, c_code=3, size=(9, 8), kernel=(3, 4), stride=1, padding=1,
                 n_iter=4, dtype=torch.float64, lam_scale=1.5, z0=False, requires_grad=False, seed=0):
    """A random conv-ISTA problem with a step small enough to be stable. Returns a dict of tensors/options."""
    gen = torch.Generator().manual_seed(seed)
    size, kernel = tuple(size[:rank]) if rank == 2 else size[:1], tuple(kernel[:rank]) if rank == 2 else kernel[:1]
    stride_t, padding_t = (stride,) * rank, (padding,) * rank

    def rnd(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
        return t.requires_grad_(requires_grad)

    x = rnd(batch, c_sig, *size)
    weight = rnd(c_code, c_sig, *kernel, scale=0.5)
    problem = dict(x=x, weight=weight, encoder_weight=rnd(c_code, c_sig, *kernel, scale=0.5),
                   lam=(torch.rand(n_iter, c_code, generator=gen, dtype=torch.float64) * lam_scale + 0.05)
                   .to(dtype).requires_grad_(requires_grad),
                   step=(torch.rand(n_iter, generator=gen, dtype=torch.float64) * 0.05 + 0.1)
                   .to(dtype).requires_grad_(requires_grad),
                   stride=stride_t, padding=padding_t)
    zs = code_size(size, kernel, stride_t, padding_t)
    problem["z0"] = rnd(batch, c_code, *zs, scale=0.5) if z0 else None
    return problem
