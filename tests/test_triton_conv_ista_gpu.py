"""The Triton conv-ISTA kernels compiled on a CUDA device at larger shapes: float32 strided, deep and 1-D, half
precision and TF32 by rule, and torch.compile through the op. Its own file so that the prepared GPU run
(bench/gpu_check.py) runs these first: they are the ones the first H200 runs failed or never reached."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_triton_conv_ista import _check_at_scale, _problem, _stable_problem  # noqa: E402

import dsc_kernels.functional as DF  # noqa: E402


@pytest.mark.gpu
class TestGPU:
    """Larger shapes on a CUDA device (compiled kernels only), TF32, and torch.compile through the op."""

    @pytest.mark.parametrize("fista", [False, True])
    @pytest.mark.parametrize("recompute", [False, True])
    def test_float32_strided(self, fista, recompute):
        p = _stable_problem(
            rank=2,
            batch=4,
            c_sig=3,
            c_code=40,
            size=(45, 37),
            kernel=(6, 6),
            stride=(2, 2),
            padding=(2, 2),
            n_iter=4,
            untied=True,
            fista=fista,
            z0=True,
            device="cuda",
        )
        _check_at_scale(p, torch.float32, recompute=recompute)

    def test_float32_deep_layer(self):
        p = _stable_problem(
            rank=2,
            batch=2,
            c_sig=64,
            c_code=96,
            size=(32, 32),
            kernel=(3, 3),
            padding=(1, 1),
            n_iter=3,
            nonneg=True,
            device="cuda",
        )
        _check_at_scale(p, torch.float32)

    def test_float32_1d(self):
        p = _stable_problem(
            rank=1,
            batch=8,
            c_sig=4,
            c_code=32,
            size=(1, 1000),
            kernel=(1, 9),
            padding=(0, 4),
            n_iter=4,
            fista=True,
            device="cuda",
        )
        _check_at_scale(p, torch.float32)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    def test_half(self, dtype):
        p = _stable_problem(
            rank=2,
            batch=4,
            c_sig=16,
            c_code=64,
            size=(32, 32),
            kernel=(7, 7),
            padding=(3, 3),
            n_iter=5,
            untied=True,
            device="cuda",
        )
        _check_at_scale(p, dtype)

    @pytest.mark.parametrize("fista", [False, True])
    def test_tf32_by_rule(self, fista, monkeypatch):
        # TF32 dots (cuDNN's default for fp32 convolutions) against eager cuDNN with TF32 on.
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
        p = _stable_problem(
            rank=2,
            batch=4,
            c_sig=8,
            c_code=48,
            size=(33, 29),
            kernel=(5, 5),
            padding=(2, 2),
            n_iter=4,
            untied=True,
            fista=fista,
            device="cuda",
        )
        _check_at_scale(p, torch.float32, tf32=True)

    def test_torch_compile_fullgraph(self):
        p = _problem(
            rank=2,
            batch=2,
            c_sig=3,
            c_code=32,
            size=(33, 30),
            kernel=(5, 5),
            padding=(2, 2),
            n_iter=3,
            device="cuda",
            kink_free=False,
        )
        x, w, lam, step = (p[k].float().requires_grad_() for k in ("x", "weight", "lam", "step"))

        def f(x, w, lam, step):
            return DF.conv_ista(x, w, lam, n_iter=3, step=step, padding=2, backend="triton").square().sum()

        compiled = torch.compile(f, fullgraph=True)
        eager_loss = f(x, w, lam, step)
        eager_grads = torch.autograd.grad(eager_loss, (x, w, lam, step))
        loss = compiled(x, w, lam, step)
        grads = torch.autograd.grad(loss, (x, w, lam, step))
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, eager_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
