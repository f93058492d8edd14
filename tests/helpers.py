"""The one conv-ISTA test-problem builder, shared by every test file."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from dsc_kernels.functional import conv_ista
from dsc_kernels.reference.conv import conv_analysis_ref, conv_synthesis_ref
from dsc_kernels.reference.conv_ista import fista_momentum

KINK_MARGIN = 1e-4


def _last(value: int | Sequence[int], rank: int) -> tuple[int, ...]:
    return (value,) * rank if isinstance(value, int) else tuple(value)[-rank:]


def kink_margin(p: dict) -> float:
    """min over iterations and entries of | |u_k| - step_k lam_k[c] | (u_k - step_k lam_k when nonneg), in fp64:
    how close the reference's iterates come to the threshold's kink, where the support can flip between two
    correct implementations."""
    x, w = p["x"].detach().double(), p["weight"].detach().double()
    we = w if p["encoder_weight"] is None else p["encoder_weight"].detach().double()
    lam, step = p["lam"].detach().double(), p["step"].detach().double()
    rank = w.dim() - 2
    z = conv_analysis_ref(x, w, p["stride"], p["padding"]) * 0 if p["z0"] is None else p["z0"].detach().double()
    z_prev, margin = z, float("inf")
    for k, beta in enumerate(fista_momentum(step.shape[0])):
        y = z + beta * (z - z_prev) if p["fista"] else z
        r = x - conv_synthesis_ref(y, w, x.shape[2:], p["stride"], p["padding"])
        u = y + step[k] * conv_analysis_ref(r, we, p["stride"], p["padding"])
        th = (step[k] * lam[k]).reshape(1, -1, *([1] * rank))
        gap = (u - th) if p["nonneg"] else (u.abs() - th)
        margin = min(margin, gap.abs().min().item())
        z_prev, z = z, torch.where(gap > 0, u - th * (u.sign() if not p["nonneg"] else 1), torch.zeros_like(u))
    return margin


def conv_problem(
    rank: int = 2,
    *,
    batch: int = 2,
    c_sig: int = 2,
    c_code: int = 3,
    size: Sequence[int] = (9, 8),
    kernel: Sequence[int] = (3, 4),
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 1,
    n_iter: int = 4,
    untied: bool = True,
    z0: bool = False,
    nonneg: bool = False,
    fista: bool = False,
    lam_range: tuple[float, float] = (0.05, 1.55),
    step_range: tuple[float, float] = (0.1, 0.15),
    weight_scale: float = 0.5,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    requires_grad: bool = False,
    kink_free: bool = False,
    seed: int = 0,
) -> dict:
    """A random conv-ISTA problem. Its step is small enough to keep the iterations bounded at the default small
    shapes (a few channels, 3x3 to 3x4 kernels); with tens of channels and larger kernels ||D||^2 grows past
    1/step and the iterates diverge (tests/test_triton_conv_ista.py's _stable_problem rescales the dictionaries).

    `size`, `kernel`, `stride` and `padding` give their last `rank` entries (so (1, 17) is a 1-D length 17).
    Drawn in fp64 on the CPU, then cast to `dtype` and moved to `device`. Returns a dict with
    x: (batch, c_sig, *size); weight and encoder_weight (None when tied): (c_code, c_sig, *kernel);
    lam: (n_iter, c_code) uniform in lam_range; step: (n_iter,) uniform in step_range; z0: (batch, c_code, *code)
    or None; stride, padding: rank-tuples; nonneg, fista. With `kink_free`, redraws (new seeds) until every
    reference iterate stays KINK_MARGIN away from the threshold, so that supports must agree exactly."""
    size, kernel = _last(size, rank), _last(kernel, rank)
    stride, padding = _last(stride, rank), _last(padding, rank)
    for attempt in range(50):
        gen = torch.Generator().manual_seed(seed + 1000 * attempt)

        def rnd(*shape, scale=1.0):
            return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

        def uniform(*shape, bounds):
            return torch.rand(*shape, generator=gen, dtype=torch.float64) * (bounds[1] - bounds[0]) + bounds[0]

        x = rnd(batch, c_sig, *size)
        weight = rnd(c_code, c_sig, *kernel, scale=weight_scale)
        p = dict(
            x=x,
            weight=weight,
            encoder_weight=rnd(c_code, c_sig, *kernel, scale=weight_scale) if untied else None,
            lam=uniform(n_iter, c_code, bounds=lam_range),
            step=uniform(n_iter, bounds=step_range),
            stride=stride,
            padding=padding,
            nonneg=nonneg,
            fista=fista,
        )
        p["z0"] = rnd(*conv_analysis_ref(x, weight, stride, padding).shape, scale=0.5) if z0 else None
        if not kink_free or kink_margin(p) > KINK_MARGIN:
            return {
                k: v.to(device, dtype).requires_grad_(requires_grad) if isinstance(v, torch.Tensor) else v
                for k, v in p.items()
            }
    raise AssertionError("could not draw a problem away from the threshold kink")


def fista_through_an_infinite_code(
    backend: str, *, recompute: bool, signal_channels: int = 1, dtype=torch.float64, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, dL/dx, dL/dz0) of two FISTA iterations through a code that is -inf from z0 on, under an upstream
    gradient with an inf entry. FISTA's beta_0 and beta_1 are exactly 0, where the reference takes y_k = z_k itself:
    z_k + 0 (z_k - z_{k-1}) would be NaN there, and so would a carried -0 dL/dy_1. 1-D, x (1, signal_channels, 1, 6),
    one 1x1 atom whose encoder has the other sign (u = y + step (-1)(x - y) keeps y = -inf at -inf; the same sign
    would make -inf + inf = NaN), lam = 0 (every finite entry stays active)."""
    x = torch.randn(1, signal_channels, 1, 6, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    w = torch.ones(1, signal_channels, 1, 1, dtype=dtype, device=device)
    z0 = torch.full((1, 1, 1, 6), 0.5, dtype=dtype, device=device)
    z0[0, 0, 0, 2] = float("-inf")
    grad_z = torch.ones(1, 1, 1, 6, dtype=dtype, device=device)
    grad_z[0, 0, 0, 4] = float("inf")
    x, z0 = x.requires_grad_(), z0.requires_grad_()
    z = conv_ista(
        x, w, 0.0, n_iter=2, step=0.1, encoder_weight=-w, z0=z0, fista=True, backend=backend, recompute=recompute
    )
    return (z, *torch.autograd.grad(z, (x, z0), grad_z))


def flat_tensors(out) -> list:
    """The tensors of a nested tuple/list of op results, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in flat_tensors(o)]


def with_changes(args: dict, **changes) -> dict:
    """A copy of an op's keyword arguments with some replaced."""
    return {**args, **changes}


def strided_view(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view with every stride doubled (not contiguous)."""
    big = torch.zeros(*[2 * s for s in t.shape], dtype=t.dtype)
    view = big[tuple(slice(None, None, 2) for _ in t.shape)]
    view.copy_(t)
    return view


def raw_conv_ista_args(
    B=2, Cs=2, H=6, W=5, Cc=3, K=(3, 3), n=3, stride=(1, 1), padding=(1, 1), z0=False, dtype=torch.float64, **kw
) -> dict:
    """Keyword arguments of a raw conv-ISTA forward op (torch.ops.dsc_kernels.conv_ista_fwd_*), FISTA, checkpoint 1;
    ``kw`` replaces any of them."""
    g = torch.Generator().manual_seed(0)
    hz = (H + 2 * padding[0] - K[0]) // stride[0] + 1
    wz = (W + 2 * padding[1] - K[1]) // stride[1] + 1
    args = dict(
        x=torch.randn(B, Cs, H, W, generator=g, dtype=dtype),
        weight=0.3 * torch.randn(Cc, Cs, *K, generator=g, dtype=dtype),
        encoder_weight=0.3 * torch.randn(Cc, Cs, *K, generator=g, dtype=dtype),
        lam=0.1 * torch.rand(n, Cc, generator=g, dtype=dtype),
        step=torch.linspace(0.4, 0.3, n, dtype=dtype),  # distinct: an expanded step differs from its storage
        z0=torch.randn(B, Cc, hz, wz, generator=g, dtype=dtype) if z0 else torch.empty(0, dtype=dtype),
        stride=list(stride),
        padding=list(padding),
        nonneg=False,
        fista=True,
        checkpoint=1,
    )
    args.update(kw)
    return args


def rehearse_gpu_script(script: str, out: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """bench/<script> run as a CPU rehearsal of a GPU lease (DSC_GPU_CHECK_DRY_RUN=1, files into `out`), in a
    process of its own: each script picks Triton's mode for its process. Asserts that it exits 0."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), DSC_GPU_CHECK_DRY_RUN="1", DSC_GPU_CHECK_OUT=str(out), **env)
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / script)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_conv_ista_fakes_match(ops, args: tuple) -> None:
    """A conv-ISTA op pair's real forward and backward on `args` (the forward op's arguments) against its fakes: the
    same shape, strides and dtype for z, saved and every gradient (torch.compile lays out what follows by the fakes)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    z, saved = ops.forward(*args)
    grads = ops.backward(torch.randn_like(z), *args[:6], z, saved, *args[6:])
    mode = FakeTensorMode()
    with mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fz, fsaved = ops.forward(*fake_args)
        fgrads = ops.backward(torch.empty_like(fz), *fake_args[:6], fz, fsaved, *fake_args[6:])
    for real, fake in zip((z, saved, *grads), (fz, fsaved, *fgrads)):
        assert (real.shape, real.stride(), real.dtype) == (fake.shape, fake.stride(), fake.dtype)


def child_exit_code_forked_under_held_locks(locks: Sequence, child, timeout: float = 30.0) -> int:
    """Fork while another thread holds every lock in ``locks`` (entered in order) and run ``child()`` in the child,
    which exits 0 if it returns truthy, 2 if falsy, 3 on an exception. Returns the child's exit code; a child still
    running after ``timeout`` seconds (it waited on a lock it inherited held) is killed and reported as -1."""
    import contextlib
    import threading
    import time

    held, release = threading.Event(), threading.Event()

    def hold():
        with contextlib.ExitStack() as stack:
            for lock in locks:
                stack.enter_context(lock)
            held.set()
            release.wait(timeout)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(5)
        pid = os.fork()
        if pid == 0:
            try:
                os._exit(0 if child() else 2)
            except BaseException:
                os._exit(3)
    finally:
        release.set()
        thread.join(10)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return -1


def count_calls(monkeypatch, module, name: str) -> list[int]:
    """Replace ``module.name`` by a wrapper that counts its calls (the count in a one-element list, for the test to
    read and reset)."""
    calls = [0]
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls
