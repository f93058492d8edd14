"""The multi-layer pursuit reference (dsc_kernels/reference/ml_ista.py): the eager oracle against independent loops
written as the published networks are, and the hand-written VJP against autograd through the oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ml_ista_problems import CASES, codes_and_grads, make_problem, op_arguments, run_functional, run_row

import dsc_kernels.functional as DF
from dsc_kernels.ops import ml_ista as ml_ista_ops
from dsc_kernels.reference.conv_ista import conv_ista_ref

D = torch.float64


def _mnist_like(seed=0, c=(4, 6, 8)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, 28, 28, generator=g, dtype=D)
    ws = [
        0.3 * torch.randn(c[0], 1, 6, 6, generator=g, dtype=D),
        0.1 * torch.randn(c[1], c[0], 6, 6, generator=g, dtype=D),
        0.1 * torch.randn(c[2], c[1], 4, 4, generator=g, dtype=D),
    ]
    bs = [0.05 * torch.randn(1, m, 1, 1, generator=g, dtype=D) for m in c]
    return x, ws, bs


def _published_ml_ista(x, ws, bs, cs, T, fista):
    """Sulam et al.'s ML_ISTA_NET / ML_FISTA_NET forward, as their code writes it (strides 2, 2, 1)."""
    (w1, w2, w3), (b1, b2, b3), (c1, c2, c3) = ws, bs, cs
    g1 = F.relu(c1 * F.conv2d(x, w1, stride=2) + b1)
    g2 = F.relu(c2 * F.conv2d(g1, w2, stride=2) + b2)
    g3 = F.relu(c3 * F.conv2d(g2, w3, stride=1) + b3)
    t, g3_prev = 1.0, g3
    for _ in range(T):
        t_prev, t = t, (1 + (1 + 4 * t**2) ** 0.5) / 2
        z = g3 + (t_prev - 1) / t * (g3 - g3_prev) if fista else g3
        g3_prev = g3
        g2 = F.conv_transpose2d(z, w3, stride=1)
        g1 = F.conv_transpose2d(g2, w2, stride=2)
        g1 = F.relu(g1 - c1 * F.conv2d(F.conv_transpose2d(g1, w1, stride=2) - x, w1, stride=2) + b1)
        g2 = F.relu(g2 - c2 * F.conv2d(F.conv_transpose2d(g2, w2, stride=2) - g1, w2, stride=2) + b2)
        g3 = F.relu(z - c3 * F.conv2d(F.conv_transpose2d(z, w3, stride=1) - g2, w3, stride=1) + b3)
    return [g1, g2, g3]


@pytest.mark.parametrize("fista", [False, True])
def test_matches_the_published_ml_ista_and_ml_fista(fista):
    x, ws, bs = _mnist_like()
    cs = [0.7, 0.9, 1.1]
    want = _published_ml_ista(x, ws, bs, cs, 4, fista)
    got = DF.ml_ista(
        x, ws, [-b.flatten() for b in bs], n_iter=4, steps=cs, strides=[2, 2, 1], fista=fista, backend="reference"
    )
    assert any(bool((g > 0).any()) and bool((g == 0).any()) for g in got)  # a nontrivial support
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_matches_the_published_ml_lista():
    """ML_LISTA_NET: projections and the input term use B, the Gram term W^T W."""
    x, ws, bs = _mnist_like(1)
    g = torch.Generator().manual_seed(5)
    bws = [w + 0.05 * torch.randn(w.shape, generator=g, dtype=D) for w in ws]
    strides = [2, 2, 1]
    gam = []
    below = x
    for w, b, s in zip(bws, bs, strides):
        below = F.relu(F.conv2d(below, w, stride=s) + b)
        gam.append(below)
    for _ in range(3):
        gam[1] = F.conv_transpose2d(gam[2], bws[2], stride=1)
        gam[0] = F.conv_transpose2d(gam[1], bws[1], stride=2)
        below = x
        for j in range(3):
            w, bw, s = ws[j], bws[j], strides[j]
            gam[j] = F.relu(
                gam[j]
                - F.conv2d(F.conv_transpose2d(gam[j], w, stride=s), w, stride=s)
                + F.conv2d(below, bw, stride=s)
                + bs[j]
            )
            below = gam[j]
    got = DF.ml_ista(
        x,
        ws,
        [-b.flatten() for b in bs],
        n_iter=3,
        steps=[1.0] * 3,
        strides=strides,
        input_encoder_weights=bws,
        backend="reference",
    )
    for a, b in zip(got, gam):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_matches_the_published_all_free_network():
    """All_Free: interleaved layer updates, step t synthesises with the filters of step t-1 and analyses with those
    of step t; biases per step."""
    x, ws, _ = _mnist_like(2)
    T, strides = 3, [2, 2, 1]
    g = torch.Generator().manual_seed(7)
    filters = [w.unsqueeze(0) * (1 + 0.1 * torch.randn((T + 1, *w.shape), generator=g, dtype=D)) for w in ws]
    biases = [0.05 * torch.randn(T + 1, w.shape[0], generator=g, dtype=D) for w in ws]
    gam, below = [], x
    for j in range(3):
        below = F.relu(F.conv2d(below, filters[j][0], stride=strides[j]) + biases[j][0].view(1, -1, 1, 1))
        gam.append(below)
    for t in range(1, T + 1):
        below = x
        for j in range(3):
            w_syn, w_ana, s = filters[j][t - 1], filters[j][t], strides[j]
            gam[j] = F.relu(
                gam[j]
                - F.conv2d(F.conv_transpose2d(gam[j], w_syn, stride=s) - below, w_ana, stride=s)
                + biases[j][t].view(1, -1, 1, 1)
            )
            below = gam[j]
    synthesis = [torch.cat([f[:1], f[:-1]]) for f in filters]  # step 0 starts from zero: its synthesis is unused
    got = DF.ml_ista(
        x,
        synthesis,
        [-b for b in biases],
        n_iter=T,
        steps=[1.0] * 3,
        strides=strides,
        encoder_weights=filters,
        interleaved=True,
        backend="reference",
    )
    for a, b in zip(got, gam):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("fista", [False, True])
def test_one_layer_is_conv_ista(fista):
    p = make_problem("z0-fista")
    w, s = p["weights"][0], p["steps"][0]
    lam = torch.rand(4, 3, dtype=D) * 0.2
    z0 = torch.randn(2, 3, 10, 10, dtype=D) * 0.3
    want = conv_ista_ref(p["x"], w, lam, s, stride=1, padding=1, z0=z0, nonneg=False, fista=fista)
    got = DF.ml_ista(
        p["x"],
        [w],
        [lam * s[:, None]],
        n_iter=3,
        steps=[s],
        paddings=[1],
        z0=z0,
        nonneg=False,
        fista=fista,
        backend="reference",
    )
    torch.testing.assert_close(got[0], want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_hand_written_vjp_matches_autograd(case, recompute):
    problem = make_problem(case)
    want_codes, want = codes_and_grads(lambda p: run_functional(p, "reference"), problem)
    got_codes, got = codes_and_grads(lambda p: run_row(p, "reference", recompute=recompute), problem)
    for a, b in zip(got_codes, want_codes):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert got.keys() == want.keys()
    for name in want:
        w, g = want[name], got[name]
        if w is None:  # no path to the loss (e.g. an input encoder of a layer whose code has no gradient)
            assert g is None or not g.any(), name
            continue
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-11, msg=lambda m: f"{case}: {name}: {m}")


@pytest.mark.parametrize("case", ["two-layer-stride2-odd", "signed-step-thresholds"])
@pytest.mark.parametrize("where", ["x", "weights"])
def test_hand_written_vjp_matches_autograd_on_nan(case, where):
    """NaN codes: relu(u - t)'s threshold gradient counts them 1, softshrink's 0 even where their gradient is NaN.
    The VJP multiplied by sign(G): nonneg thresholds got wrong finite gradients (NaN codes skipped), signed ones NaN
    where autograd gives 0."""
    problem = make_problem(case)
    if where == "x":
        problem["x"][0, 0, 3, 3] = float("nan")
    else:
        problem["weights"][0][0, 0, 1, 1] = float("nan")
    want_codes, want = codes_and_grads(lambda p: run_functional(p, "reference"), problem)
    got_codes, got = codes_and_grads(lambda p: run_row(p, "reference"), problem)
    assert want_codes[-1].isnan().any()
    for name, w in [("codes", want_codes[-1]), *want.items()]:
        g = got_codes[-1] if name == "codes" else got[name]
        if w is None:
            continue
        assert torch.equal(g.isnan(), w.isnan()), f"{name}: NaN at other positions"
        torch.testing.assert_close(g.nan_to_num(), w.nan_to_num(), rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize(
    "case,fast",
    [
        ("two-layer-stride2-odd", True),
        ("ml-lista", True),
        ("all-free-interleaved", True),
        ("z0-fista", True),
        pytest.param("ml-lista", False, marks=pytest.mark.slow, id="ml-lista-full-jacobian"),
    ],
)
def test_reference_op_gradcheck(case, fast):
    """fp64 gradcheck of the hand-written VJP (fast mode: random directions; the full Jacobian is marked slow)."""
    problem = make_problem(case)
    problem["x"] = problem["x"][:1]
    if "z0" in problem:
        problem["z0"] = problem["z0"][:1]
    from ml_ista_problems import flat_leaves, leaves

    p = leaves(problem)
    named = flat_leaves(p)

    def fn(*tensors):
        q = dict(p)
        it = iter(tensors)
        for key in ("x", "weights", "thresholds", "steps", "encoder_weights", "input_encoder_weights", "z0"):
            value = p.get(key)
            if isinstance(value, list):
                q[key] = [None if t is None else next(it) for t in value]
            elif value is not None:
                q[key] = next(it)
        return tuple(run_row(q, "reference"))

    assert torch.autograd.gradcheck(fn, tuple(t for _, t in named), atol=1e-7, rtol=1e-6, fast_mode=fast)


def test_reference_ops_pass_opcheck():
    problem = make_problem("mixed-encoders")

    p = problem
    args = op_arguments(p, z0=None, interleaved=False)
    fwd = ml_ista_ops.op_pair("reference").forward
    for checkpoint in (1, 0):
        inputs = (
            p["x"].requires_grad_(),
            [w.requires_grad_() for w in args["weights"]],
            args["encoder_weights"],
            args["input_encoder_weights"],
            args["thresholds"],
            args["steps"],
            args["z0"],
            args["strides"],
            args["paddings"],
            p["nonneg"],
            False,
            True,
            checkpoint,
        )
        torch.library.opcheck(fwd, inputs)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_the_first_step_from_zero_codes_reads_no_dictionary(backend):
    """Step 0 from zero codes is the plain CNN forward, sigma(c E^T G_{j-1} - t): it never reads a dictionary D, so
    a NaN or inf in one stays out of codes it does not reach (the reference computed D 0 = NaN and made whole layers
    NaN; cpp never did)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64, generator=g)
    w1 = 0.3 * torch.randn(2, 1, 3, 3, dtype=torch.float64, generator=g)
    w2 = 0.3 * torch.randn(2, 2, 2, 2, dtype=torch.float64, generator=g)
    w2[0, 0, 0, 0] = float("nan")
    g1, _ = DF.ml_ista(x, [w1, w2], [0.0, 0.0], n_iter=0, steps=[1.0, 1.0], backend=backend)
    assert torch.equal(g1, F.relu(F.conv2d(x, w1)))
    d, e = w1.clone(), 0.3 * torch.randn(2, 1, 3, 3, dtype=torch.float64, generator=g)
    d[0, 0, 0, 0] = float("inf")
    (code,) = DF.ml_ista(x, [d], [0.0], n_iter=0, steps=[1.0], encoder_weights=[e], backend=backend)
    assert torch.equal(code, F.relu(F.conv2d(x, e)))
    b1, b2 = 0.3 * torch.randn_like(w1), 0.3 * torch.randn_like(w2)
    g1, _ = DF.ml_ista(
        x, [w1, w2], [0.0, 0.0], n_iter=1, steps=[1.0, 1.0], input_encoder_weights=[b1, b2], backend=backend
    )
    assert not g1.isnan().any()


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_an_infinite_gradient_at_a_zeroed_code_gives_what_softshrink_gives(backend):
    """F.softshrink's backward is 0 where it zeroed the input, whatever the incoming gradient; the reference's
    x - clamp(x) passed g - g = NaN there for an infinite g."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 5, 5, dtype=torch.float64, generator=g).requires_grad_()
    w = 0.3 * torch.randn(2, 1, 3, 3, dtype=torch.float64, generator=g)
    (code,) = DF.ml_ista(x, [w], [0.2], n_iter=0, steps=[1.0], nonneg=False, backend=backend)
    want_code = F.softshrink(F.conv2d(x, w), 0.2)
    cotangent = torch.zeros_like(code).masked_fill(code == 0, float("inf"))
    assert (code == 0).any()
    (got,) = torch.autograd.grad(code, x, cotangent)
    (want,) = torch.autograd.grad(want_code, x, cotangent)
    torch.testing.assert_close(got, want, equal_nan=True)
    assert not got.isnan().any()
