"""The pure-PyTorch reference: gradients, adjointness, thresholding semantics, LASSO optimality, FISTA's rate."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import conv_problem

import dsc_kernels.functional as DF
from dsc_kernels.reference import (
    conv_analysis_ref,
    conv_ista_bwd_ref,
    conv_ista_fwd_ref,
    conv_ista_ref,
    conv_synthesis_ref,
    fista_momentum,
    lasso_objective_ref,
    lipschitz_constant_ref,
    soft_threshold_ref,
)
from dsc_kernels.reference.conv_ista import (
    KEEP_RESIDUALS,
    checkpoint_indices,
    keeps_residuals,
    saved_iterates,
    saved_residuals,
    saved_shape,
)


@pytest.mark.parametrize(
    "rank,size,kernel,stride,padding",
    [
        (1, (13,), (4,), 3, 2),
        (1, (7,), (7,), 1, 0),
        (2, (9, 7), (3, 4), 2, 1),
        (2, (11, 10), (5, 5), 3, 2),
        (2, (6, 9), (2, 3), (2, 3), (0, 1)),
    ],
)
def test_analysis_and_synthesis_are_adjoint(rank, size, kernel, stride, padding):
    w = torch.randn(4, 3, *kernel, dtype=torch.float64)
    r = torch.randn(2, 3, *size, dtype=torch.float64)
    dtr = conv_analysis_ref(r, w, stride, padding)
    z = torch.randn_like(dtr)
    dz = conv_synthesis_ref(z, w, size, stride, padding)
    assert dz.shape == r.shape
    torch.testing.assert_close((dz * r).sum(), (z * dtr).sum())


def test_soft_threshold_matches_softshrink_at_the_kink_and_on_nan():
    x = torch.tensor([-1.0, -0.5, -0.2, 0.0, 0.2, 0.5, 1.0, float("nan")], requires_grad=True)
    y = soft_threshold_ref(x, 0.5)
    y_ref = F.softshrink(x, 0.5)
    torch.testing.assert_close(y, y_ref, equal_nan=True)
    (g,), (g_ref,) = torch.autograd.grad(y.nansum(), x), torch.autograd.grad(y_ref.nansum(), x)
    torch.testing.assert_close(g[:-1], g_ref[:-1])  # derivative 0 at |x| = t, like softshrink
    pos = soft_threshold_ref(x, 0.5, nonneg=True)
    torch.testing.assert_close(pos, torch.relu(x - 0.5), equal_nan=True)
    assert torch.isnan(DF.soft_threshold(x, 0.5)[-1])


@pytest.mark.parametrize("t0", [0.0, 0.3])
def test_soft_threshold_gradient_in_the_threshold_is_minus_sign_on_the_support(t0):
    """dS_t(x)/dt = -sign(x) where |x| > t, also at t = 0, where a single clamp(x, -t, t) has tied bounds and used
    to drop the negative entries' +1 (the fused backends' dL/dth = -sum gu sign(z) had it right)."""
    x = torch.tensor([[-2.0, -0.5, -0.1, 0.0], [0.1, 0.5, 2.0, -0.3]], dtype=torch.float64)
    t = torch.full((2, 1), t0, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(soft_threshold_ref(x, t).sum(), t)
    want = (-torch.sign(x) * (x.abs() > t0)).sum(1, keepdim=True)
    torch.testing.assert_close(grad, want)
    (dx,) = torch.autograd.grad(soft_threshold_ref(x.requires_grad_(), t.detach()).sum(), x)
    torch.testing.assert_close(dx, (x.abs() > t0).to(x.dtype))


def test_gradcheck_simple_operators():
    w = torch.randn(3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    t = torch.rand(3, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, 3, 4, 4, dtype=torch.float64) * 2
    u = u + 0.1 * torch.sign(u)  # keep away from the kink where the derivative jumps
    torch.autograd.gradcheck(lambda x, w: conv_analysis_ref(x, w, 2, 1), (x, w))
    torch.autograd.gradcheck(lambda z, w: conv_synthesis_ref(z, w, (7, 6), 2, 1), (z, w))
    torch.autograd.gradcheck(lambda u, t: soft_threshold_ref(u, t.reshape(1, 3, 1, 1) * 0.05), (u.requires_grad_(), t))
    torch.autograd.gradcheck(lambda x, z, w, t: lasso_objective_ref(x, z, w, t, 2, 1), (x, z, w, t))


@pytest.mark.parametrize(
    "rank,fista,nonneg,untied,stride",
    [
        (1, False, False, False, 1),
        (1, True, True, True, 3),
        (2, False, True, True, 2),
        (2, True, False, False, 1),
    ],
)
def test_gradcheck_conv_ista_ref(rank, fista, nonneg, untied, stride):
    p = conv_problem(rank, batch=1, size=(6, 5), kernel=(3, 2), stride=stride, n_iter=3, z0=True, requires_grad=True)

    def run(x, w, we, lam, step, z0):
        return conv_ista_ref(
            x,
            w,
            lam,
            step,
            encoder_weight=we if untied else None,
            stride=p["stride"],
            padding=p["padding"],
            z0=z0,
            nonneg=nonneg,
            fista=fista,
        )

    inputs = (p["x"], p["weight"], p["encoder_weight"], p["lam"], p["step"], p["z0"])
    assert run(*inputs).ne(0).any() and run(*inputs).eq(0).any()  # both active and inactive codes exercised
    torch.autograd.gradcheck(run, inputs, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize(
    "rank,fista,nonneg,stride,checkpoint",
    list(itertools.product((1, 2), (False, True), (False, True), (1, 2), (1, 2, 0, 2 | KEEP_RESIDUALS))),
)
def test_handwritten_vjp_equals_autograd(rank, fista, nonneg, stride, checkpoint):
    p = conv_problem(rank, stride=stride, z0=True, requires_grad=True)
    args = (p["x"], p["weight"], p["encoder_weight"], p["lam"], p["step"], p["z0"])
    z = conv_ista_ref(
        p["x"],
        p["weight"],
        p["lam"],
        p["step"],
        encoder_weight=p["encoder_weight"],
        stride=p["stride"],
        padding=p["padding"],
        z0=p["z0"],
        nonneg=nonneg,
        fista=fista,
    )
    assert z.eq(0).any() and z.ne(0).any()
    grad_z = torch.randn_like(z)
    expected = torch.autograd.grad(z, args, grad_z)
    z_fused, saved = conv_ista_fwd_ref(*args, p["stride"], p["padding"], nonneg, fista, checkpoint)
    torch.testing.assert_close(z_fused, z)
    n_iter = p["lam"].shape[0]
    assert saved.shape == saved_shape(p["x"].shape, z.shape, n_iter, checkpoint, fista)
    n_saved = len(checkpoint_indices(n_iter, checkpoint, fista))
    iterates_shape = saved_iterates(saved, z.shape, n_iter, checkpoint, fista).shape
    assert iterates_shape == ((n_saved, *z.shape) if checkpoint else (0,))
    if keeps_residuals(checkpoint):  # r_k = x - D y_k from the iterates, FISTA's momentum included
        _, every = conv_ista_fwd_ref(*args, p["stride"], p["padding"], nonneg, fista, 1)
        iterates = [p["z0"], *every.unbind(0), z]
        betas = fista_momentum(n_iter)
        for k, r in enumerate(saved_residuals(saved, p["x"].shape, n_iter).unbind(0)):
            y = iterates[k] + betas[k] * (iterates[k] - iterates[k - 1]) if fista and k else iterates[k]
            want = p["x"] - conv_synthesis_ref(y, p["weight"], p["x"].shape[2:], p["stride"], p["padding"])
            torch.testing.assert_close(r, want, msg=lambda m: f"residual {k}: {m}")
    got = conv_ista_bwd_ref(grad_z, *args, z_fused, saved, p["stride"], p["padding"], nonneg, fista, checkpoint)
    for name, g, e in zip(("x", "weight", "encoder_weight", "lam", "step", "z0"), got, expected):
        torch.testing.assert_close(g, e, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("nonneg", [False, True])
def test_handwritten_vjp_of_a_nan_dictionary_tap_equals_autograd(nonneg):
    """A NaN tap makes whole code channels NaN, and their gradients NaN. Autograd through softshrink gives the
    threshold 0 from a NaN code even where its gradient is NaN (sign 0, selected); the hand-written VJP multiplied,
    0 * NaN = NaN. relu(u - t) passes a NaN code's gradient on, so nonneg's threshold gradient is NaN either way."""
    p = conv_problem(2, z0=True)
    p["weight"][1, 0, 1, 1] = float("nan")
    p["encoder_weight"] = p["weight"].clone()  # the NaN in both convolutions, as when tied
    args = [p[k].requires_grad_() for k in ("x", "weight", "encoder_weight", "lam", "step", "z0")]
    z = conv_ista_ref(
        args[0], args[1], args[3], args[4], encoder_weight=args[2], padding=p["padding"], z0=args[5], nonneg=nonneg
    )
    grad_z = torch.randn_like(z)
    expected = torch.autograd.grad(z, args, grad_z)
    z_fused, saved = conv_ista_fwd_ref(*args, p["stride"], p["padding"], nonneg, False, 1)
    got = conv_ista_bwd_ref(grad_z, *args, z_fused, saved, p["stride"], p["padding"], nonneg, False, 1)
    assert expected[3].isnan().any() == nonneg  # softshrink: a finite dL/dlam, the case the select is for
    for name, g, e in zip(("x", "weight", "encoder_weight", "lam", "step", "z0"), got, expected):
        assert torch.equal(g.isnan(), e.isnan()), f"grad {name}: NaN at other positions"
        torch.testing.assert_close(g.nan_to_num(), e.nan_to_num(), msg=lambda m: f"grad {name}: {m}")


def _dense_dictionary(w, size, stride, padding):
    """The explicit matrix of D (columns = synthesised unit codes)."""
    z_shape = conv_analysis_ref(torch.zeros(1, w.shape[1], *size, dtype=w.dtype), w, stride, padding).shape
    eye = torch.eye(int(torch.tensor(z_shape).prod()), dtype=w.dtype).reshape(-1, *z_shape[1:])
    return conv_synthesis_ref(eye, w, size, stride, padding).reshape(eye.shape[0], -1).T


def test_lipschitz_constant_matches_the_matrix_norm():
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    for stride, padding in ((1, 1), (2, 0)):
        d = _dense_dictionary(w, (8, 7), stride, padding)
        exact = torch.linalg.matrix_norm(d, ord=2).item() ** 2
        assert lipschitz_constant_ref(w, (8, 7), stride, padding, n_iter=500) == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize("fista", [False, True])
def test_ista_reaches_the_lasso_optimum(fista):
    """KKT conditions: D^T(x - Dz) = lam sign(z) on the support and |D^T(x - Dz)| <= lam off it."""
    torch.manual_seed(1)
    w = torch.randn(4, 1, 5, dtype=torch.float64)
    w /= w.flatten(1).norm(dim=1)[:, None, None]
    x = torch.randn(2, 1, 24, dtype=torch.float64)
    lam = 0.3
    z = DF.conv_ista(x, w, lam, n_iter=2000 if not fista else 1000, padding=2, fista=fista, backend="reference")
    corr = DF.conv_analysis(x - DF.conv_synthesis(z, w, padding=2, signal_size=(24,)), w, padding=2)
    on = z != 0
    assert on.any() and (~on).any()
    torch.testing.assert_close(corr[on], lam * torch.sign(z[on]), atol=1e-5, rtol=0)
    assert corr[~on].abs().max() <= lam + 1e-5


def test_fista_objective_gap_falls_at_rate_one_over_k_squared():
    """Beck–Teboulle: F(z_k) - F* <= 2 L ||z_0 - z*||^2 / (k+1)^2 for FISTA, L ||z_0 - z*||^2 / (2k) for ISTA."""
    torch.manual_seed(2)
    w = torch.randn(6, 1, 7, dtype=torch.float64) * 0.5
    x = torch.randn(1, 1, 48, dtype=torch.float64)
    lam, L = 0.2, DF.lipschitz_constant(w, (48,), padding=3, n_iter=500)
    z_star = DF.conv_ista(x, w, lam, n_iter=1500, padding=3, fista=True, step=1 / L, backend="reference")
    f_star = lasso_objective_ref(x, z_star, w, lam, 1, 3).item()
    r2 = z_star.pow(2).sum().item()
    ks = [5, 10, 20, 40, 80]
    for fista, bound in ((True, lambda k: 2 * L * r2 / (k + 1) ** 2), (False, lambda k: L * r2 / (2 * k))):
        gaps = []
        for k in ks:
            z = DF.conv_ista(x, w, lam, n_iter=k, padding=3, fista=fista, step=1 / L, backend="reference")
            gaps.append(lasso_objective_ref(x, z, w, lam, 1, 3).item() - f_star)
            assert 0 <= gaps[-1] <= bound(k) + 1e-12
        assert gaps == sorted(gaps, reverse=True)


def test_fista_momentum_sequence():
    betas = fista_momentum(5)
    assert betas[0] == 0.0 and betas[1] == 0.0
    t1 = (1 + 5**0.5) / 2
    t2 = (1 + (1 + 4 * t1**2) ** 0.5) / 2
    assert betas[2] == pytest.approx((t1 - 1) / t2)
    assert all(0 <= b < 1 for b in betas) and betas == sorted(betas)


def test_deep_conv_ista_chains_layers():
    w1, w2 = torch.randn(4, 1, 3, 3, dtype=torch.float64), torch.randn(6, 4, 3, 3, dtype=torch.float64)
    x = torch.randn(2, 1, 10, 10, dtype=torch.float64)
    g1, g2 = DF.deep_conv_ista(
        x,
        [w1, w2],
        [0.1, 0.05],
        n_iter=[4, 3],
        strides=[1, 2],
        paddings=[1, 1],
        steps=[0.05, 0.02],
        backend="reference",
    )
    torch.testing.assert_close(g1, DF.conv_ista(x, w1, 0.1, n_iter=4, padding=1, step=0.05, backend="reference"))
    torch.testing.assert_close(
        g2, DF.conv_ista(g1, w2, 0.05, n_iter=3, stride=2, padding=1, step=0.02, backend="reference")
    )
    assert g2.shape == (2, 6, 5, 5)


def test_checkpoint_indices():
    assert checkpoint_indices(10, 0, False) == []
    assert checkpoint_indices(10, 1, False) == list(range(1, 10))
    assert checkpoint_indices(10, 2, False) == [2, 4, 6, 8]
    # FISTA replays need z_{s-1} beside each segment start s.
    assert checkpoint_indices(10, 3, True) == [2, 3, 5, 6, 8, 9]
    assert checkpoint_indices(1, 2, False) == []


def test_empty_z0_means_zeros():
    p = conv_problem(2, stride=2, z0=False, requires_grad=False)
    args = (p["x"], p["weight"], p["weight"], p["lam"], p["step"])
    geo = (p["stride"], p["padding"], False, True)
    z, saved = conv_ista_fwd_ref(*args, p["x"].new_empty(0), *geo, 2)
    z_zeros, _ = conv_ista_fwd_ref(*args, torch.zeros_like(z), *geo, 2)
    torch.testing.assert_close(z, z_zeros, rtol=0, atol=0)
    grads = conv_ista_bwd_ref(torch.ones_like(z), *args, p["x"].new_empty(0), z, saved, *geo, 2)
    assert grads[-1].shape == (0,)


def test_fista_first_momentum_is_no_term_at_all():
    """FISTA's beta_1 = 0: y_1 = z_1 exactly. The reference computed z_1 + 0 * (z_1 - z_0), NaN where an infinite
    input made a code infinite, at positions where the recurrence (and the cpp backend) gives a number."""
    import torch.nn.functional as F

    from dsc_kernels.reference.conv_ista import conv_ista_ref

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 1, 20, generator=g, dtype=torch.float64)
    x[0, 0, 0, 5] = float("inf")
    w = torch.randn(3, 2, 1, 3, generator=g, dtype=torch.float64)
    lam, step = torch.full((2, 3), 0.1, dtype=torch.float64), torch.full((2,), 0.1, dtype=torch.float64)
    z = conv_ista_ref(x, w, lam, step, padding=(0, 1), nonneg=True, fista=True)
    z1 = torch.relu(step[0] * F.conv2d(x, w, padding=(0, 1)) - step[0] * lam[0].view(1, -1, 1, 1))
    r = x - F.conv_transpose2d(z1, w, padding=(0, 1))
    want = torch.relu(z1 + step[1] * F.conv2d(r, w, padding=(0, 1)) - step[1] * lam[1].view(1, -1, 1, 1))
    assert torch.equal(z.isnan(), want.isnan()) and torch.equal(z.isinf(), want.isinf())


def test_zero_unread_zeros_exactly_the_entries_no_window_reads():
    """Entry i (of n, padding p) is read when some code j in [0, (n + 2p - k) // s + 1) has j s - p <= i < j s - p + k,
    counted here window by window. An all-inf signal (so the unread entries are not finite and zero_unread must
    select) must keep inf exactly there and hold 0 elsewhere, on each axis of a 2-D signal."""
    from dsc_kernels.reference.conv import zero_unread

    cases = 0
    for n, k, s, p in itertools.product(range(1, 9), range(1, 4), range(1, 5), range(3)):
        if n + 2 * p < k:
            continue
        read = torch.zeros(n, dtype=torch.bool)
        for j in range((n + 2 * p - k) // s + 1):
            read[max(j * s - p, 0) : max(j * s - p + k, 0)] = True
        for axis in (0, 1):
            geometry = [[3, n], [1, k], [1, s], [0, p]] if axis else [[n, 3], [k, 1], [s, 1], [p, 0]]
            size, kernel, stride, padding = geometry
            x = torch.full((1, 1, *size), float("inf"), dtype=torch.float64)
            got = zero_unread(x, kernel, stride, padding)
            expected = read.view(1, 1, -1) if axis else read.view(1, 1, -1, 1)
            assert torch.equal(got.isinf(), expected.expand_as(x)), (n, k, s, p, axis)
            assert bool((got[~expected.expand_as(x)] == 0).all()), (n, k, s, p, axis)
            cases += 1
    assert cases > 500


def test_absolute_threshold_is_applied_as_given_whatever_the_step():
    """threshold= is the absolute t of z <- S_t(z + step E(x - D z)), not step * t: checked against the recurrence
    written here with torch's own convolutions, for a step other than 1 (at step 1, t / step and t * step agree)."""
    torch.manual_seed(3)
    x = torch.randn(2, 2, 9, 7, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 2, dtype=torch.float64) * 0.3
    t = torch.tensor([0.05, 0.2, 0.0], dtype=torch.float64)
    for step in (0.3, 0.05):
        z = torch.zeros(2, 3, 5, 6, dtype=torch.float64)
        for _ in range(4):
            d = F.conv_transpose2d(z, w, stride=(2, 1), padding=(1, 0), output_padding=(0, 0))
            u = z + step * F.conv2d(x - d, w, stride=(2, 1), padding=(1, 0))
            z = torch.sign(u) * torch.clamp(u.abs() - t.view(1, -1, 1, 1), min=0)
        got = DF.conv_ista(x, w, threshold=t, n_iter=4, step=step, stride=(2, 1), padding=(1, 0), backend="reference")
        torch.testing.assert_close(got, z, rtol=1e-12, atol=1e-12)
