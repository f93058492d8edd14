"""dsc_kernels.theory and dsc_kernels.sparsity against independent implementations.

Every reference here is written from the definition (docs/theory.md, the docstrings and the literature they cite),
not from the package's code: dictionaries are built by placing filter taps one by one (numpy) and checked against a
synthesis of unit impulses (torch.nn.functional.conv_transpose), coherences come from scikit-learn's cosine
similarity of those columns, the spark from enumerating column subsets with numpy's matrix_rank, the activation
constants from scipy's root finder, and the bounds from their formulas written out. Inputs are random (hypothesis)
and edge cases: 1-D/2-D, strides above the kernel, even and non-square kernels, padding, single, duplicated, zero
and wildly scaled atoms, integer dtypes, non-contiguous views, NaN/inf.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, special
from sklearn.metrics.pairwise import cosine_similarity

from dsc_kernels import sparsity, theory

FAST = settings(deadline=None, max_examples=40, derandomize=True)


# -------------------------------------------------------------------------------------------- references
def _per_axis(value, nd):
    return (value,) * nd if isinstance(value, int) else tuple(value)


def ref_atoms(weight, signal_size, stride=1, padding=0) -> np.ndarray:
    """(C_sig * prod(size), n_atoms) by placing taps: code position i puts tap j at signal index i*s - p + j
    (docs/design.md §2); columns channel-major then row-major positions, rows (C_sig, *size) flattened."""
    w = np.asarray(weight.detach().cpu().to(torch.float64) if isinstance(weight, torch.Tensor) else weight)
    c_code, c_sig, *ks = w.shape
    nd = len(ks)
    size, s, p = _per_axis(signal_size, nd), _per_axis(stride, nd), _per_axis(padding, nd)
    code = [(n + 2 * pp - k) // ss + 1 for n, pp, k, ss in zip(size, p, ks, s)]
    cols = []
    for c in range(c_code):
        for pos in itertools.product(*(range(m) for m in code)):
            atom = np.zeros((c_sig, *size))
            sig, tap = [], []
            for i, ss, pp, k, n in zip(pos, s, p, ks, size):
                start = i * ss - pp  # signal index of tap 0
                lo, hi = max(0, -start), min(k, n - start)
                sig.append(slice(start + lo, start + max(hi, lo)))
                tap.append(slice(lo, max(hi, lo)))
            atom[(slice(None), *sig)] = w[(c, slice(None), *tap)]
            cols.append(atom.ravel())
    return np.stack(cols, 1) if cols else np.zeros((c_sig * math.prod(size), 0))


def conv_atoms(weight, signal_size, stride=1, padding=0) -> np.ndarray:
    """The same matrix as the synthesis conv_transpose(unit code) of every code entry (finite weights only)."""
    w = weight.detach().to(torch.float64)
    nd = w.dim() - 2
    size, s, p = _per_axis(signal_size, nd), _per_axis(stride, nd), _per_axis(padding, nd)
    code = [(n + 2 * pp - k) // ss + 1 for n, pp, k, ss in zip(size, p, w.shape[2:], s)]
    extra = [n - ((m - 1) * ss - 2 * pp + k) for n, m, ss, pp, k in zip(size, code, s, p, w.shape[2:])]
    cols = []
    for c in range(w.shape[0]):
        for pos in itertools.product(*(range(m) for m in code)):
            z = torch.zeros(1, w.shape[0], *code, dtype=torch.float64)
            z[(0, c, *pos)] = 1.0
            conv_t = F.conv_transpose1d if nd == 1 else F.conv_transpose2d
            # output_padding may exceed the stride-1 limit when the signal is longer than the code covers: pad zeros
            out = conv_t(z, w, stride=s, padding=p, output_padding=[min(e, ss - 1) for e, ss in zip(extra, s)])
            out = F.pad(out, [q for e, ss in zip(reversed(extra), reversed(s)) for q in (0, e - min(e, ss - 1))])
            cols.append(out[0].reshape(-1).numpy())
    return np.stack(cols, 1)


def ref_coherence(d: np.ndarray) -> float:
    """max |cos| over distinct non-zero columns (Donoho–Elad), by scikit-learn; columns first scaled by their largest
    entry so that tiny or huge atoms neither underflow nor overflow in the norms."""
    if np.isnan(d).any() or np.isinf(d).any():
        return math.nan
    top = np.abs(d).max(0) if d.size else np.zeros(d.shape[1])
    cols = d[:, top > 0] / top[top > 0]
    if cols.shape[1] < 2:
        return 0.0
    g = np.abs(cosine_similarity(cols.T))
    np.fill_diagonal(g, 0.0)
    return float(g.max())


def ref_spark(d: np.ndarray, tol: float = 1e-9) -> float:
    """Smallest number of dependent columns; dependent = rank below the count at tolerance tol * ||D||_2."""
    n, a = d.shape
    floor = tol * (np.linalg.norm(d, 2) if d.size else 0.0)
    for r in range(1, a + 1):
        for cols in itertools.combinations(range(a), r):
            sub = d[:, cols]
            if r > n or np.linalg.svd(sub, compute_uv=False).min() <= floor:
                return float(r)
    return math.inf


# --------------------------------------------------------------------------------------- random geometries
@st.composite
def geometries(draw, max_kernel=5):
    nd = draw(st.sampled_from([1, 2]))
    kernel = [draw(st.integers(1, max_kernel)) for _ in range(nd)]
    stride = [draw(st.integers(1, 7)) for _ in range(nd)]  # up to above the kernel
    padding = [draw(st.integers(0, 7)) for _ in range(nd)]  # up to beyond the kernel
    size = [draw(st.integers(max(1, k - 2 * p), 9 if nd == 2 else 14)) for k, p in zip(kernel, padding)]
    c_code, c_sig = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**31 - 1))
    style = draw(
        st.sampled_from(["normal", "integers", "scaled", "tap_scaled", "duplicate", "zero_channel", "sparse_taps"])
    )
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c_code, c_sig, *kernel, generator=g, dtype=torch.float64)
    if style == "integers":  # ties, zero taps, exact collinearity
        w = (w * 1.5).round()
    elif style == "scaled":  # atoms of wildly different norms: 1e-150 ... 1e150 per code channel
        w = w * 10.0 ** torch.randint(-150, 151, (c_code, 1, *[1] * nd), generator=g).double()
    elif style == "tap_scaled":  # every tap its own magnitude, 1e-300 ... 1e300: truncated atoms of any norm
        w = w * 10.0 ** torch.randint(-300, 301, w.shape, generator=g).double()
    elif style == "duplicate":
        w = torch.cat([w, -3.0 * w[:1]])  # a copy (up to scale and sign) of the first filter: mu = 1
    elif style == "zero_channel":
        w = torch.cat([w, torch.zeros_like(w[:1])])
    elif style == "sparse_taps":  # small taps at the borders that the truncated atoms keep
        w = w * torch.where(torch.rand(w.shape, generator=g) < 0.5, 1e-6, 1.0).double()
    return w, size, stride, padding


# ------------------------------------------------------------------------------- dictionary and coherence
def test_the_placement_reference_is_the_synthesis_of_unit_codes():
    # the reference itself against torch's conv_transpose (docs/design.md §2), on awkward geometries
    g = torch.Generator().manual_seed(0)
    for shape, size, s, p in [
        ((2, 2, 4), 11, 3, 2),
        ((2, 1, 3), 9, 5, 1),  # stride above the kernel
        ((1, 2, 2, 3), (6, 7), (2, 1), (1, 2)),
        ((2, 1, 3, 1), (5, 4), (4, 3), (0, 1)),
    ]:
        w = torch.randn(*shape, generator=g, dtype=torch.float64)
        np.testing.assert_array_equal(ref_atoms(w, size, s, p), conv_atoms(w, size, s, p))


@FAST
@given(geometries())
def test_dictionary_matrix_is_the_placed_filter_taps(geometry):
    w, size, stride, padding = geometry
    got = theory.dictionary_matrix(w, size, stride=stride, padding=padding)
    assert got.dtype == torch.float64
    np.testing.assert_array_equal(got.numpy(), ref_atoms(w, size, stride, padding))


@FAST
@given(geometries())
def test_mutual_coherence_matches_scikit_learn_on_the_explicit_matrix(geometry):
    w, size, stride, padding = geometry
    want = ref_coherence(ref_atoms(w, size, stride, padding))
    got = theory.mutual_coherence(w, size, stride=stride, padding=padding)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert sparsity.max_coherence(w, size, stride=stride, padding=padding) == got


def _w(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


COHERENCE_EDGES = {
    # a filter 1e7 times smaller than the other: its shifted atoms (cosine 0.8) were judged against the large
    # filter's scale and skipped as zero
    "small_filter_of_two": (_w([[[1e-7] * 5], [[0.3, -1.0, 0.2, 0.9, -0.4]]]), 12, 1, 0),
    "filters_1e300_apart": (_w([[[1e-150, 1e-150, 2e-150]], [[3e150, -1e150, 2e150]]]), 9, 1, 0),
    # border atoms keeping only a 1e-6 tap (padding 2): two parallel atoms, cosine 1, which prefix sums of the
    # whole filter rounded to 0.95
    "tiny_border_taps": (_w([[[1.0, 0.3, 1e-6]], [[1.0, 0.7, 1e-6]]]), 3, 3, 2),
    # the same with 1e-200 taps: their squares underflow unless each atom is scaled to its own largest tap
    "border_taps_1e-200": (_w([[[1.0, 0.3, 1e-200]], [[1.0, 0.7, 2e-200]]]), 3, 3, 2),
    "tiny_border_taps_2d": (_w([[[[1.0, 0.5], [0.3, 1e-7]]], [[[2.0, -1.0], [0.7, 3e-7]]]]), (3, 3), 3, 1),
    "single_atom": (_w([[[1.0, -2.0, 3.0]]]), 3, 1, 0),
    "duplicated_atoms": (_w([[[1.0, -2.0, 3.0]], [[-2.0, 4.0, -6.0]]]), 3, 1, 0),
    "zero_atoms_in_padding": (_w([[[1.0, 2.0]], [[0.5, -1.0]]]), 4, 1, 6),
    "stride_above_kernel": (_w([[[1.0, 2.0]], [[2.0, 1.0]]]), 11, 4, 1),
    "even_non_square_2d": (
        _w([[[[1.0, 0.0, -1.0], [2.0, 1.0, 0.5]]], [[[0.0, 1.0, 1.0], [1.0, -1.0, 2.0]]]]),
        (5, 6),
        (1, 2),
        (1, 0),
    ),
    "integer_dtype": (torch.tensor([[[1, 2, -1]], [[3, 0, 1]]]), 8, 2, 1),
    "non_contiguous": (torch.arange(24.0).reshape(3, 2, 4).transpose(0, 2)[:, :, ::2] - 10.0, 7, 1, 1),
    "all_zero": (torch.zeros(2, 2, 3), 6, 1, 0),
}


@pytest.mark.parametrize("name", COHERENCE_EDGES)
def test_mutual_coherence_on_edge_dictionaries(name):
    w, size, stride, padding = COHERENCE_EDGES[name]
    want = ref_coherence(ref_atoms(w, size, stride, padding))
    got = theory.mutual_coherence(w, size, stride=stride, padding=padding)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("shape,size", [((0, 2, 3), 7), ((2, 0, 3), 7), ((0, 1, 2, 2), (4, 3)), ((2, 0, 1, 3), (2, 5))])
def test_empty_dictionaries(shape, size):
    w = torch.zeros(shape)
    np.testing.assert_array_equal(theory.dictionary_matrix(w, size, padding=1).numpy(), ref_atoms(w, size, 1, 1))
    assert theory.mutual_coherence(w, size, padding=1) == 0.0  # no atom, or only empty ones: no pair


def test_mutual_coherence_of_float32_is_that_of_its_float64_values_and_nan_propagates():
    w = torch.randn(3, 2, 4, 3, generator=torch.Generator().manual_seed(3))
    assert theory.mutual_coherence(w, (8, 7), padding=1) == theory.mutual_coherence(w.double(), (8, 7), padding=1)
    for bad in (math.nan, math.inf, -math.inf):
        v = w.clone()
        v[1, 1, 2, 0] = bad
        assert math.isnan(theory.mutual_coherence(v, (8, 7), padding=1))


def test_dictionary_matrix_keeps_nan_and_inf_in_the_atoms_that_hold_them():
    # synthesising unit codes multiplied the NaN tap by every zero code entry: NaN in every column
    w = torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    w[0, 1, 1], w[1, 0, 2] = math.nan, math.inf
    got = theory.dictionary_matrix(w, 7, stride=2, padding=1)
    np.testing.assert_array_equal(got.numpy(), ref_atoms(w, 7, 2, 1))
    assert np.isfinite(got.numpy()).any(axis=0).all() and not np.isfinite(got.numpy()).all()
    # a NaN tap no atom keeps (stride 5 > k, padding 1 keeps only the middle taps) is not part of D
    w = _w([[[math.nan, 1.0, 2.0]], [[3.0, -2.0, 1.0]]])
    assert torch.isfinite(theory.dictionary_matrix(w, 1, stride=5, padding=1)).all()


# ---------------------------------------------------------------------------------------- spark, collisions
SMALL_MATRICES = st.builds(
    lambda n, a, seed, values: np.random.default_rng(seed).choice(values, size=(n, a)).astype(np.float64),
    st.integers(0, 4),
    st.integers(0, 6),
    st.integers(0, 2**31 - 1),
    st.sampled_from([(-1.0, 0.0, 1.0), (0.0, 1.0), (-2.0, -1.0, 1.0, 3.0), tuple(np.linspace(-1, 1, 9))]),
)


@FAST
@given(SMALL_MATRICES)
def test_spark_matches_enumeration_and_its_null_vector_is_one(d):
    value, v = theory.spark(torch.from_numpy(d))
    assert value == ref_spark(d)
    if value == math.inf:
        assert v is None
        return
    v = v.numpy()
    assert v.shape == (d.shape[1],) and np.count_nonzero(v) == value
    # ||d||_2 of an empty matrix is 0 (np.linalg.norm(d, 2) raises on one before numpy 2.4)
    size = np.linalg.norm(d, 2) if d.size else 0.0
    assert np.linalg.norm(d @ v) <= 1e-9 * max(size, 1.0) * np.linalg.norm(v)


@FAST
@given(SMALL_MATRICES, st.integers(0, 4))
def test_sparse_collision_exists_exactly_when_spark_is_at_most_2s(d, s):
    pair = theory.sparse_collision(torch.from_numpy(d), s)
    assert (pair is not None) == (ref_spark(d) <= 2 * s)
    if pair is not None:
        z1, z2 = (z.numpy() for z in pair)
        assert np.count_nonzero(z1) <= s and np.count_nonzero(z2) <= s and not np.array_equal(z1, z2)
        np.testing.assert_allclose(d @ z1, d @ z2, atol=1e-9 * max(np.abs(d).max(initial=0.0), 1.0))


def test_spark_of_convolutional_dictionaries_and_of_integer_and_strided_matrices():
    # two channels commute: g on channel f and f on channel g synthesise the same f * g (docs/theory.md §2.1)
    w = _w([[[1.0, 2.0]], [[1.0, -1.0]]])
    d = theory.dictionary_matrix(w, 5)
    assert theory.spark(d)[0] == ref_spark(d.numpy()) == 4.0
    assert theory.spark(torch.tensor([[1, 0, 1], [0, 1, 1]]))[0] == 3.0  # integers
    dup = torch.tensor([[1.0, 2.0, 1.0], [0.0, 3.0, 0.0], [4.0, 5.0, 4.0]])  # columns 0 and 2 equal
    assert not dup.T.contiguous().T.is_contiguous()
    assert theory.spark(dup.T.contiguous().T)[0] == theory.spark(dup)[0] == 2.0
    assert theory.spark(torch.zeros(3, 2))[0] == 1.0 and theory.spark(torch.zeros(0, 2))[0] == 1.0
    assert theory.spark(torch.zeros(3, 0)) == (math.inf, None)
    assert theory.spark(torch.eye(4), max_size=2) == (math.inf, None)  # spark > 2


@FAST
@given(geometries(max_kernel=3))
def test_spark_of_a_convolutional_dictionary_is_at_least_one_plus_one_over_mu(geometry):
    # docs/theory.md §1.3: spark(D) >= 1 + 1/mu(D) (Gershgorin on the Gram matrix of 1/mu atoms), so the uniqueness
    # bound never promises more than the spark delivers: a collision needs > 2 * floor-below-bound non-zeros
    w, size, stride, padding = geometry
    d = theory.dictionary_matrix(w, size, stride=stride, padding=padding)
    if d.shape[1] > 9 or not torch.isfinite(d).all():
        return
    # the coherence skips zero atoms (a zero column alone is dependent: spark 1); a 1e-150-scaled filter's atoms are
    # small, not dependent: scale every column to max |entry| = 1 (neither changes mu)
    d = d[:, d.abs().amax(0) > 0] if d.shape[0] else d[:, :0]
    d = d / d.abs().amax(0)
    mu = theory.mutual_coherence(w, size, stride=stride, padding=padding)
    value = theory.spark(d)[0]
    assert value == ref_spark(d.numpy())
    if mu > 0:
        assert value >= 1 + 1 / mu - 1e-9
        bound = theory.uniqueness_bound(mu)  # inf for a mu below 1/max float
        s = min(math.ceil(bound) - 1, d.shape[1]) if bound < math.inf else d.shape[1]  # the largest s below it
        assert theory.sparse_collision(d, s) is None


def test_spark_refuses_bad_matrices_and_huge_searches_up_front():
    with pytest.raises(ValueError, match="matrix must be finite"):
        theory.spark(torch.tensor([[1.0, math.inf], [0.0, 1.0]]))
    with pytest.raises(TypeError, match="matrix must be a real"):
        theory.spark(torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="matrix must be"):
        theory.spark(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="meta"):  # used to fail inside numpy's conversion
        theory.spark(torch.eye(3, device="meta"))
    # the work is refused from the shape alone, before the matrix is copied (this one would be 20 GB as float64)
    # and without summing every binomial of its 50000 sizes
    with pytest.raises(ValueError, match="too many"):
        theory.spark(torch.zeros(1, 1).expand(50_000, 50_000))


# --------------------------------------------------------------------------------------- bounds and rates
MUS = st.floats(0.0, 1.0)
SPARSITY = st.integers(0, 40)
NONNEG = st.floats(0.0, 1e6)
KS = st.lists(st.integers(0, 60), min_size=1, max_size=5)


@FAST
@given(MUS)
def test_uniqueness_bound_is_half_of_one_plus_one_over_mu(mu):
    # Donoho–Elad: spark(D) >= 1 + 1/mu, so s < spark/2 >= (1 + 1/mu)/2 is unique
    want = math.inf if mu == 0 else (1 + 1 / mu) / 2
    assert theory.uniqueness_bound(mu) == pytest.approx(want, rel=1e-15)


@FAST
@given(st.floats(0.0, 1e3), st.lists(st.tuples(SPARSITY, MUS), max_size=4))
def test_stability_bound_is_the_layer_product(eps, layers):
    # docs/theory.md §2.2 (*): ||G_j - G^_j||^2 <= 4^j eps^2 prod_{i<=j} 1/(1 - (2 s_i - 1) mu_i); s = 0: factor 1
    sparsities, mus = [s for s, _ in layers], [m for _, m in layers]
    want, prod = [], 1.0
    for j, (s, mu) in enumerate(layers, start=1):
        gap = 1 - (2 * s - 1) * mu if s > 0 else 1.0
        prod = prod / gap if gap > 0 else math.inf  # a layer with (2s - 1) mu >= 1: inf from there on (docstring)
        want.append(math.sqrt(4**j * eps**2 * prod) if prod < math.inf else math.inf)
    got = theory.stability_bound(eps, sparsities, mus)
    assert got == pytest.approx(want, rel=1e-12)


@FAST
@given(SPARSITY, MUS, st.floats(0.0, 3.0))
def test_lista_cp_and_stripe_rates_and_gains(s, mu, q):
    want_q = (2 * s - 1) * mu if s > 0 else 0.0  # Chen et al. 2018 Thm 2; s = 0, the zero code, has q = 0
    assert theory.lista_cp_rate(s, mu) == pytest.approx(want_q, rel=1e-15, abs=0)
    assert theory.stripe_rate(s, mu) == theory.lista_cp_rate(s, mu)  # the same form with the stripe count
    assert theory.lista_cp_noise_gain(s, q) == (math.inf if q >= 1 else pytest.approx(2 * s / (1 - q), rel=1e-15))


@FAST
@given(KS, SPARSITY, NONNEG, st.floats(0.0, 0.999), NONNEG, NONNEG)
def test_lista_cp_error_bound_is_s_b_q_to_the_k_plus_c_sigma(ks, s, b, q, c, sigma):
    k = np.array(ks)
    np.testing.assert_allclose(theory.lista_cp_error_bound(k, s, b, q, c, sigma), s * b * q**k + c * sigma, rtol=1e-13)
    assert theory.lista_cp_error_bound(ks[0], s, b, q, c, sigma) == pytest.approx(s * b * q ** ks[0] + c * sigma)


@FAST
@given(KS, st.lists(st.tuples(SPARSITY, NONNEG, st.floats(0.0, 0.99), NONNEG), min_size=1, max_size=4))
def test_deep_error_bound_is_the_dagger_sum(ks, layers):
    # docs/theory.md §4.2 (dagger): sum_j (prod_{i>j} Cbar_i)(s_j B_j q_j^k + Cbar_j eta_j), Cbar = 2s/(1 - q)
    k = np.array(ks, dtype=np.float64)
    cbar = [2 * s / (1 - q) for s, _, q, _ in layers]
    want = np.zeros_like(k)
    for j, (s, b, q, eta) in enumerate(layers):
        want += math.prod(cbar[j + 1 :]) * (s * b * q**k + cbar[j] * eta)
    s, b, q, eta = (list(x) for x in zip(*layers))
    np.testing.assert_allclose(theory.deep_error_bound(k, s, b, q, eta), want, rtol=1e-12)
    no_eta = [sum(math.prod(cbar[j + 1 :]) * s[j] * b[j] * q[j] ** kk for j in range(len(s))) for kk in ks]
    np.testing.assert_allclose(theory.deep_error_bound(k, s, b, q), no_eta, rtol=1e-12)


@FAST
@given(KS, SPARSITY, NONNEG, MUS, st.floats(0.0, 10.0))
def test_stripe_error_bound_is_the_recursion_and_its_threshold(ks, s, b, mu, eta):
    # docs/theory.md §4.3: M_{k+1} <= q M_k + 2 eta, M_0 = B, under theta_k = mu s ||e^k||_inf + eta
    q = (2 * s - 1) * mu if s > 0 else 0.0
    got = theory.stripe_error_bound(np.array(ks), s, b, mu, eta)
    if q >= 1:
        assert np.all(got == np.inf)
    else:
        for kk, value in zip(ks, got):
            m = b
            for _ in range(kk):
                m = q * m + 2 * eta
            assert value == pytest.approx(m, rel=1e-9, abs=1e-12)
            assert value <= b * q**kk + 2 * eta / (1 - q) * (1 + 1e-12) + 1e-300  # the looser form of the docs
    err = b / 7
    assert theory.stripe_threshold(err, s, mu, eta) == pytest.approx(mu * s * err + eta, rel=1e-15)


@FAST
@given(NONNEG, MUS, NONNEG, st.floats(0.0, 1e3), st.floats(0.0, 0.999), st.integers(0, 30), st.floats(0.0, 1e3))
def test_thresholds(err, mu, eta, theta0, q, n_iter, floor):
    assert theory.oracle_threshold(err, mu, eta) == pytest.approx(mu * err + eta, rel=1e-15)
    got = theory.geometric_thresholds(theta0, q, n_iter, floor)
    assert got.shape == (n_iter,)
    np.testing.assert_allclose(got, [theta0 * q**k + floor for k in range(n_iter)], rtol=1e-13)


@FAST
@given(KS, st.floats(0.0, 1e6), st.floats(0.0, 1e6))
def test_ista_and_fista_objective_bounds(ks, lip, dist0_sq):
    # Beck–Teboulle 2009, Thm 3.1 and 4.4: L||z0 - z*||^2/(2k) and 2L||z0 - z*||^2/(k + 1)^2 for k >= 1
    for fn, rate in (
        (theory.ista_objective_bound, lambda k: 1 / (2 * k)),
        (theory.fista_objective_bound, lambda k: 2 / (k + 1) ** 2),
    ):
        got = fn(np.array(ks), lip, dist0_sq)
        want = [lip * dist0_sq * rate(k) if k >= 1 else math.inf for k in ks]
        np.testing.assert_allclose(got, want, rtol=1e-13)
    assert theory.ista_objective_bound(math.inf, lip, dist0_sq) == 0.0  # the limit


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: theory.uniqueness_bound(math.nan), ValueError, "mu"),
        (lambda: theory.uniqueness_bound(torch.tensor([0.1])), TypeError, "mu"),
        (lambda: theory.stability_bound(math.nan, [1], [0.1]), ValueError, "eps"),
        (lambda: theory.stability_bound(0.1, [True], [0.1]), TypeError, "sparsities"),
        (lambda: theory.lista_cp_noise_gain(2, math.nan), ValueError, "q"),
        (lambda: theory.lista_cp_error_bound(1, 2, math.nan, 0.5, 1.0, 0.0), ValueError, "B"),
        (lambda: theory.lista_cp_error_bound([1, math.nan], 2, 1.0, 0.5, 1.0, 0.0), ValueError, "k"),
        (lambda: theory.lista_cp_error_bound(np.array([True]), 2, 1.0, 0.5, 1.0, 0.0), TypeError, "k"),
        (lambda: theory.deep_error_bound(1, [2], [1.0], [math.nan]), ValueError, "qs"),
        (lambda: theory.deep_error_bound(1, [2], [math.nan], [0.5]), ValueError, "amplitudes"),
        (lambda: theory.stripe_error_bound(1, 2, 1.0, 0.1, math.nan), ValueError, "eta"),
        (lambda: theory.stripe_threshold(math.nan, 2, 0.1, 0.0), ValueError, "err_linf"),
        (lambda: theory.oracle_threshold(math.nan, 0.1, 0.0), ValueError, "err_l1"),
        (lambda: theory.geometric_thresholds(1.0, 0.5, 3, math.inf), ValueError, "floor"),
        (lambda: theory.geometric_thresholds(1.0, math.nan, 3), ValueError, "q"),
        (lambda: theory.ista_objective_bound(1, math.nan, 1.0), ValueError, "L"),
        (lambda: theory.fista_objective_bound(1, 1.0, math.nan), ValueError, "dist0_sq"),
        (lambda: theory.fista_objective_bound(1, 1.0, "1"), TypeError, "dist0_sq"),
        # these used to fail with numpy's or Python's own words ("'int' object is not iterable", "operands could not
        # be broadcast"), naming no argument
        (lambda: theory.ista_objective_bound([1, 2, 3], 1.0, [1.0, 2.0]), ValueError, "k and dist0_sq"),
        (lambda: theory.stability_bound(0.1, 2, [0.1]), TypeError, "sparsities must be a sequence"),
        (lambda: theory.stability_bound(0.1, [2], "0.1"), TypeError, "mus must be a sequence"),
        (lambda: theory.deep_error_bound(1, [2], 1.0, [0.5]), TypeError, "amplitudes must be a sequence"),
        (lambda: theory.deep_error_bound(1, [2], [1.0], [0.5], 0.1), TypeError, "etas must be a sequence"),
        (lambda: theory.deep_error_bound(1, [2], [1.0], torch.tensor(0.5)), TypeError, "qs must be a sequence"),
    ],
)
def test_nan_and_wrong_types_are_refused_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------------------- activations
def _silu_dip():  # stationary point of z sigmoid(z): sigmoid(z) (1 + z (1 - sigmoid(z))) = 0
    return optimize.brentq(lambda z: 1 + z * (1 - special.expit(z)), -3.0, -0.5, xtol=1e-15, rtol=1e-15)


def _gelu_dip():  # stationary point of z Phi(z): Phi(z) + z phi(z) = 0
    return optimize.brentq(
        lambda z: special.ndtr(z) + z * np.exp(-z * z / 2) / math.sqrt(2 * math.pi), -3.0, -0.1, xtol=1e-15, rtol=1e-15
    )


REFERENCE_ACTIVATIONS = {
    "softplus": (lambda z, b: np.logaddexp(0.0, b * z) / b, 0.0, math.log(2.0)),
    "silu": (lambda z, b: z * special.expit(b * z), _silu_dip(), -_silu_dip() * special.expit(_silu_dip())),
    "gelu": (lambda z, b: z * special.ndtr(b * z), _gelu_dip(), -_gelu_dip() * special.ndtr(_gelu_dip())),
}


@pytest.mark.parametrize("name", REFERENCE_ACTIVATIONS)
@pytest.mark.parametrize("beta", [1e-3, 0.37, 1.0, 8.0, 250.0])
def test_activation_constants_from_scipy(name, beta):
    _, at, gap = REFERENCE_ACTIVATIONS[name]
    assert theory.activation_sup_distance(name, beta) == pytest.approx(gap / beta, rel=1e-13)
    assert theory.activation_worst_input(name, beta) == pytest.approx(at / beta, rel=1e-13, abs=1e-300)
    # |sigma_beta - ReLU| on a fine grid never exceeds the constant, and reaches it at the worst input
    fn, _, _ = REFERENCE_ACTIVATIONS[name]
    z = np.linspace(-30, 30, 20001) / beta
    assert np.abs(fn(z, beta) - np.maximum(z, 0)).max() <= gap / beta * (1 + 1e-12)


@pytest.mark.parametrize("name", REFERENCE_ACTIVATIONS)
@pytest.mark.parametrize("beta", [1e-3, 0.37, 1.0, 8.0])
def test_smooth_relu_is_the_activation_to_rounding_in_the_tails_too(name, beta):
    # the tails matter: sigma_beta - ReLU there is the floor the report measures (docs/theory.md §5.1)
    fn, _, _ = REFERENCE_ACTIVATIONS[name]
    bz = np.concatenate([np.linspace(-60, 60, 2401), [-700.0, -38.0, -20.5, 20.5, 25.0, 30.0, 36.0, 700.0]])
    bz = np.concatenate([bz, [math.nan, math.inf, -math.inf]])  # NaN stays NaN; -inf is NaN in scipy's forms too
    z = bz / beta
    # the rounding of beta z, times the condition number: |beta z| for e^{beta z}, (beta z)^2 for Phi's tail
    x = np.nan_to_num(np.abs(bz), posinf=0)
    cond = 8 + x + (x * x if name == "gelu" else 0)
    for dtype, eps, tiny in ((torch.float64, 2.2e-16, 1e-300), (torch.float32, 1.2e-7, 1e-35)):
        zt = torch.from_numpy(z).to(dtype)
        got = theory.smooth_relu(name, beta)(zt)
        assert got.dtype == dtype
        got = got.double().numpy()
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf where both are inf; NaN in, NaN out
            want = fn(zt.double().numpy(), beta)
            ok = (np.abs(got - want) <= 2 * eps * cond * np.abs(want) + tiny) | (got == want)
        ok |= np.isnan(got) & np.isnan(want)
        assert ok.all(), (dtype, z[~ok][:5], got[~ok][:5], want[~ok][:5])


@pytest.mark.parametrize("name", REFERENCE_ACTIVATIONS)
def test_smooth_relu_derivatives(name):
    # softplus' = sigmoid(b z); SiLU' = s + b z s (1 - s), s = sigmoid(b z); GELU' = Phi(b z) + b z phi(b z)
    beta = 2.5
    z = torch.tensor([-30.0, -3.0, -0.4, 0.0, 0.7, 5.0, 30.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(theory.smooth_relu(name, beta)(z).sum(), z)
    bz = beta * z.detach().numpy()
    sig = special.expit(bz)
    want = {
        "softplus": sig,
        "silu": sig + bz * sig * (1 - sig),
        "gelu": special.ndtr(bz) + bz * np.exp(-bz * bz / 2) / math.sqrt(2 * math.pi),
    }[name]
    np.testing.assert_allclose(grad.numpy(), want, rtol=1e-12, atol=1e-300)


# ------------------------------------------------------------------------------------------ stripe sparsity
def ref_stripe(code: np.ndarray, kernel, stride) -> int:
    """max over samples and code positions i of the non-zeros (all channels) at positions j with |i - j| <= (k-1)//s
    on every axis: the entries whose atoms can overlap atom i (docs/theory.md §1.3)."""
    nz = (code != 0).sum(1)
    reach = [(k - 1) // s for k, s in zip(kernel, stride)]
    best = 0
    for b in range(code.shape[0]):
        for i in itertools.product(*(range(n) for n in code.shape[2:])):
            count = 0
            for j in itertools.product(*(range(n) for n in code.shape[2:])):
                if all(abs(a - c) <= r for a, c, r in zip(i, j, reach)):
                    count += int(nz[b][j])
            best = max(best, count)
    return best


@FAST
@given(
    st.sampled_from([1, 2]),
    st.integers(0, 2),
    st.integers(0, 3),
    st.integers(0, 2**31 - 1),
    st.lists(st.integers(1, 9), min_size=2, max_size=2),
    st.lists(st.integers(1, 10), min_size=2, max_size=2),
)
def test_stripe_sparsity_matches_enumeration(nd, batch, channels, seed, kernel, stride):
    rng = np.random.default_rng(seed)
    shape = (batch, channels, *rng.integers(0, 8, nd))
    code = np.where(rng.random(shape) < rng.random(), rng.standard_normal(shape), 0.0)
    code[rng.random(shape) < 0.05] = math.nan  # NaN is not a zero
    got = theory.stripe_sparsity(torch.from_numpy(code), kernel[:nd], stride[:nd])
    assert got == ref_stripe(code, kernel[:nd], stride[:nd])
    assert got <= max([int((code[b] != 0).sum()) for b in range(batch)], default=0)  # never above ||Gamma||_0


def test_stripe_sparsity_of_integer_bool_and_non_contiguous_codes_and_of_meta_ones():
    code = torch.zeros(2, 3, 9, 7, dtype=torch.int64)
    code[0, 0, 1, 1] = code[0, 2, 2, 3] = code[1, 1, 8, 6] = 5
    for c in (code, code.bool(), code.double().transpose(2, 3).contiguous().transpose(2, 3)):
        assert theory.stripe_sparsity(c, (3, 5), (1, 2)) == ref_stripe(code.numpy(), (3, 5), (1, 2)) == 2
    with pytest.raises(ValueError, match="code"):  # no values to count: used to fail converting the count
        theory.stripe_sparsity(torch.zeros(1, 1, 5, device="meta"), 3)
    with pytest.raises(ValueError, match="code"):
        theory.stripe_sparsity(np.zeros((1, 1, 5)), 3)


# ------------------------------------------------------------------------------------------------ sparsity
def ref_hoyer(x: np.ndarray, axes) -> np.ndarray:
    """(sqrt(n) - ||x||_1/||x||_2)/(sqrt(n) - 1) over `axes` (Hoyer 2004); 1 for n <= 1 and all-zero slices, NaN
    for a slice holding NaN or inf."""
    axes = tuple(range(x.ndim)) if axes is None else tuple(a % max(x.ndim, 1) for a in np.atleast_1d(axes))
    rest = [a for a in range(x.ndim) if a not in axes]
    n = math.prod(x.shape[a] for a in axes)
    flat = np.moveaxis(x, axes, range(len(axes))).reshape(n, *[x.shape[a] for a in rest]) if x.ndim else x.reshape(1)
    out = np.ones(flat.shape[1:])
    for idx in np.ndindex(*flat.shape[1:]):
        v = np.abs(flat[(slice(None), *idx)].astype(np.float64))
        if not np.isfinite(v).all():
            out[idx] = math.nan
        elif n > 1 and v.any():
            v = v / v.max()
            out[idx] = (math.sqrt(n) - v.sum() / math.sqrt((v * v).sum())) / (math.sqrt(n) - 1)
    return out


@FAST
@given(
    st.lists(st.integers(0, 4), min_size=0, max_size=3),
    st.integers(0, 2**31 - 1),
    st.sampled_from([None, 0, -1, (0, -1), 1]),
    st.sampled_from(["normal", "sparse", "equal", "tiny", "huge", "nan", "inf", "int", "bool", "float32"]),
)
def test_hoyer_matches_the_formula(shape, seed, dim, style):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * (rng.random(shape) < 0.4 if style == "sparse" else 1)
    if dim is not None and (
        not shape or max(np.atleast_1d(dim)) >= len(shape) or min(np.atleast_1d(dim)) < -len(shape)
    ):
        dim = None
    if dim == (0, -1) and len(shape) < 2:
        dim = None
    x = {
        "equal": np.sign(x) * 3.0,
        "tiny": x * 1e-300,
        "huge": x * 1e300,
        "nan": np.where(rng.random(shape) < 0.2, math.nan, x),
        "inf": np.where(rng.random(shape) < 0.2, -math.inf, x),
        "int": np.round(x * 3),
        "bool": x > 0,
    }.get(style, x)
    t = torch.from_numpy(np.asarray(x))
    if style == "int":
        t = t.to(torch.int32)
    elif style == "float32":
        t = t.float()
    got = sparsity.hoyer(t, dim) if dim is not None else sparsity.hoyer(t)
    want = ref_hoyer(t.double().numpy() if style != "bool" else np.asarray(x, dtype=np.float64), dim)
    tol = 1e-12 if t.dtype == torch.float64 else 2e-6
    np.testing.assert_allclose(got.double().numpy(), want, rtol=tol, atol=tol)
    assert ((got >= 0) & (got <= 1) | got.isnan()).all()


def test_hoyer_of_non_contiguous_slices_and_gradients():
    x = torch.randn(5, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).transpose(0, 2)
    np.testing.assert_allclose(sparsity.hoyer(x, (0, 2)).numpy(), ref_hoyer(x.numpy(), (0, 2)), rtol=1e-13)
    x = x.contiguous().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: sparsity.hoyer(t, 1), (x,))


@FAST
@given(st.lists(st.integers(0, 4), min_size=0, max_size=4), st.integers(0, 2**31 - 1), st.sampled_from(["f", "i", "b"]))
def test_zero_fraction_and_channel_activity_count_exact_zeros(shape, seed, kind):
    rng = np.random.default_rng(seed)
    x = np.where(rng.random(shape) < 0.5, 0.0, rng.standard_normal(shape))
    x[rng.random(shape) < 0.1] = math.nan
    t = torch.from_numpy(x)
    if kind == "i":
        t = torch.from_numpy(np.asarray(np.nan_to_num(x, nan=7.0).round())).to(torch.int16)
    elif kind == "b":
        t = t != 0
    v = t.double().numpy()
    assert sparsity.zero_fraction(t) == (np.count_nonzero(v == 0) / v.size if v.size else 0.0)
    if t.dim() >= 2:
        per_channel = np.moveaxis(v, 1, 0).reshape(v.shape[1], v.size // v.shape[1] if v.shape[1] else 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            want = np.count_nonzero(per_channel != 0, axis=1) / per_channel.shape[1]
        np.testing.assert_allclose(sparsity.channel_activity(t).double().numpy(), want, rtol=1e-7)


def ref_coherence_penalty(w: np.ndarray, normalize: bool, shifts: bool, stride) -> float:
    """sum over ordered atom pairs (a, b) and shifts t (multiples of the stride on every axis, |t| < k, only t = 0
    without `shifts`) of (<d_a, shift_t d_b> - [a == b, t == 0])^2, the filters unfolded (normalised: unit norm)."""
    c, _, *ks = w.shape
    w = w.astype(np.float64)
    if normalize:  # by the largest entry first, so that a 1e300 or 1e-300 atom's norm neither overflows nor underflows
        top = np.abs(w.reshape(c, -1)).max(1, initial=0.0)
        w = w / np.where(top > 0, top, 1.0).reshape(c, *[1] * (w.ndim - 1))
        norms = np.sqrt((w.reshape(c, -1) ** 2).sum(1))
        w = w / np.where(norms > 0, norms, 1.0).reshape(c, *[1] * (w.ndim - 1))
    stride = _per_axis(stride, len(ks))
    ranges = [range(-((k - 1) // s) * s, k, s) if shifts else [0] for k, s in zip(ks, stride)]
    total = 0.0
    for t in itertools.product(*ranges):
        padded = np.pad(w, [(0, 0), (0, 0)] + [(k, k) for k in ks])
        shifted = np.roll(padded, t, axis=tuple(range(2, 2 + len(ks))))
        for a in range(c):
            for b in range(c):
                inner = float((padded[a] * shifted[b]).sum())
                total += (inner - (a == b and not any(t))) ** 2
    return total


@FAST
@given(geometries(max_kernel=4), st.booleans(), st.booleans())
def test_coherence_penalty_matches_the_shifted_gram(geometry, normalize, shifts):
    w, _, stride, _ = geometry
    if not normalize:  # raw filters of norm 1e150 overflow the squared Gram entries: keep their shape, not their scale
        w = w / w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp_min(1e-300)
    got = sparsity.coherence_penalty(w, normalize=normalize, shifts=shifts, stride=stride)
    assert float(got) == pytest.approx(
        ref_coherence_penalty(w.numpy(), normalize, shifts, stride), rel=1e-10, abs=1e-12
    )


def test_coherence_penalty_of_nan_and_zero_filters():
    w = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    w[2] = 0.0  # a zero atom: orthogonal to everything, and 1 for its missing unit self-product
    for shifts in (False, True):
        want = ref_coherence_penalty(w.numpy(), True, shifts, 2)
        assert float(sparsity.coherence_penalty(w, shifts=shifts, stride=2)) == pytest.approx(want, rel=1e-12)
        bad = w.clone()
        bad[0, 1, 3] = math.nan
        assert math.isnan(sparsity.coherence_penalty(bad, shifts=shifts))


@pytest.mark.parametrize("shape", ["linear", "cosine"])
@given(step=st.integers(0, 50), warmup=st.integers(0, 40), start=st.floats(0.0, 1.0))
@FAST
def test_warmup_factor_is_the_ramp(shape, step, warmup, start):
    progress = 1.0 if step >= warmup else step / warmup
    if shape == "cosine":
        progress = (1 - math.cos(math.pi * progress)) / 2
    assert sparsity.warmup_factor(step, warmup, start=start, shape=shape) == pytest.approx(
        start + (1 - start) * progress, rel=1e-14, abs=1e-15
    )


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: sparsity.zero_fraction([0.0, 1.0]), TypeError, "t must be a torch.Tensor"),
        (lambda: sparsity.hoyer(torch.ones(3), 1), ValueError, "dim"),
        (lambda: sparsity.hoyer(torch.ones(3, 2), (0, 0)), ValueError, "dim"),
        (lambda: sparsity.hoyer(torch.ones(3), 0.5), TypeError, "dim"),
        (lambda: sparsity.channel_activity(torch.ones(4)), ValueError, "t must be"),
        (lambda: sparsity.coherence_penalty(torch.ones(2, 1, 3, dtype=torch.int64)), TypeError, "weight"),
        (lambda: sparsity.coherence_penalty(torch.ones(2, 1, 3), stride=0), ValueError, "stride"),
        (lambda: sparsity.max_coherence(torch.ones(2, 1, 3), 2), ValueError, "smaller than the filter"),
        (lambda: sparsity.warmup_factor(3, 10, start=math.nan), ValueError, "start"),
        (lambda: sparsity.warmup_factor(3, 10, start=1.5), ValueError, "start"),
        (lambda: sparsity.warmup_factor(-1, 10), ValueError, "step"),
        (lambda: sparsity.warmup_factor(1.0, 10), TypeError, "step"),
        (lambda: sparsity.warmup_factor(1, 10, shape="exp"), ValueError, "shape"),
    ],
)
def test_sparsity_arguments_are_checked(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hoyer_of_half_precision_tensors_is_the_rounded_float64_value(dtype):
    # sqrt(n) - |t|_1/|t|_2 cancels: computed in half precision, [1, 0] gave 0.9995 and [1, 2, 3] 3% off
    rows = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.5, -0.25, 4.0], [0.0, 0.0, 0.0]])
    got = sparsity.hoyer(rows.to(dtype), 1)
    assert got.dtype == dtype
    want = torch.from_numpy(ref_hoyer(rows.to(dtype).double().numpy(), 1)).to(dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert float(sparsity.hoyer(torch.tensor([1.0, 0.0], dtype=dtype))) == 1.0


def test_zero_fraction_of_a_meta_tensor_is_refused_naming_it():
    with pytest.raises(ValueError, match="t is a meta tensor"):  # used to fail in Tensor.item()
        sparsity.zero_fraction(torch.zeros(2, 3, device="meta"))


@pytest.mark.parametrize("name", REFERENCE_ACTIVATIONS)
def test_smooth_relu_of_integer_bool_and_non_tensor_inputs(name):
    # softplus had no integer kernel (NotImplementedError) while SiLU and GELU promoted: now all three promote
    fn, _, _ = REFERENCE_ACTIVATIONS[name]
    sigma = theory.smooth_relu(name, 2.0)
    for z in (torch.tensor([-3, 0, 2]), torch.tensor([True, False])):
        got = sigma(z)
        assert got.dtype == torch.get_default_dtype()
        np.testing.assert_allclose(got.double().numpy(), fn(z.double().numpy(), 2.0), rtol=1e-5)  # float32
    strided = torch.linspace(-4, 4, 18, dtype=torch.float64).reshape(6, 3).T  # non-contiguous
    np.testing.assert_allclose(sigma(strided).numpy(), fn(strided.numpy(), 2.0), rtol=1e-14)
    for bad in ([1.0, 2.0], torch.tensor([1j])):
        with pytest.raises(TypeError, match="z must be a real torch.Tensor"):
            sigma(bad)
