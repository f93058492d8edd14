"""Theory functions against explicit-matrix computations on small dictionaries."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsc_kernels import theory


def explicit_dictionary(weight, signal_size, stride, padding):
    """Columns = atoms: conv_transpose of every unit code, cropped to the signal size (docs/design.md §2)."""
    nd = weight.dim() - 2
    size = (signal_size,) * nd if isinstance(signal_size, int) else tuple(signal_size)
    st = (stride,) * nd if isinstance(stride, int) else tuple(stride)
    pd = (padding,) * nd if isinstance(padding, int) else tuple(padding)
    zsize = tuple((n + 2 * p - k) // s + 1 for n, p, k, s in zip(size, pd, weight.shape[2:], st))
    op = tuple(n + 2 * p - k - (z - 1) * s for n, p, k, z, s in zip(size, pd, weight.shape[2:], zsize, st))
    n_code = weight.shape[0] * math.prod(zsize)
    eye = torch.eye(n_code, dtype=torch.float64).reshape(n_code, weight.shape[0], *zsize)
    conv_t = F.conv_transpose1d if nd == 1 else F.conv_transpose2d
    atoms = conv_t(eye, weight.double(), stride=st, padding=pd, output_padding=op)
    assert atoms.shape[2:] == size
    return atoms.reshape(n_code, -1).T


def explicit_coherence(weight, signal_size, stride=1, padding=0):
    D = explicit_dictionary(weight, signal_size, stride, padding)
    n = D.norm(dim=0)
    keep = n > 1e-9
    Dn = D[:, keep] / n[keep]
    G = (Dn.T @ Dn).abs()
    G.fill_diagonal_(0)
    return float(G.max())


CASES = [
    # (weight shape, signal size, stride, padding)
    ((3, 1, 5), 17, 1, 0),
    ((3, 2, 5), 17, 1, 2),
    ((4, 2, 6), 23, 2, 3),
    ((2, 1, 4), 15, 3, 1),
    ((3, 2, 3, 4), (9, 10), 1, 0),
    ((3, 1, 5, 5), (11, 12), 1, 2),
    ((4, 3, 6, 6), (14, 13), 2, 2),
    ((2, 2, 4, 3), (10, 11), (2, 3), (1, 2)),
]


@pytest.mark.parametrize("shape,size,stride,padding", CASES)
def test_mutual_coherence_matches_explicit_matrix(shape, size, stride, padding):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape) * 7 + shape[-1]))
    got = theory.mutual_coherence(w, size, stride=stride, padding=padding)
    want = explicit_coherence(w, size, stride, padding)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_mutual_coherence_barker_is_one_over_length():
    barker13 = torch.tensor([1, 1, 1, 1, 1, -1, -1, 1, 1, -1, 1, -1, 1], dtype=torch.float64)
    w = barker13.reshape(1, 1, 13)
    assert theory.mutual_coherence(w, 60) == pytest.approx(1 / 13)
    # padded border atoms are truncated Barker codes, more coherent than the full ones
    assert theory.mutual_coherence(w, 60, padding=6) == pytest.approx(explicit_coherence(w, 60, 1, 6))


def test_mutual_coherence_scales_to_real_sizes():
    w = torch.randn(64, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    mu = theory.mutual_coherence(w, (128, 128), stride=2, padding=2)  # 2.6e5 atoms: never formed
    assert 0 < mu <= 1


def test_uniqueness_and_rates():
    assert theory.uniqueness_bound(1 / 16) == pytest.approx(8.5)
    assert theory.lista_cp_rate(4, 1 / 16) == pytest.approx(0.4375)
    assert theory.lista_cp_noise_gain(2, 0.5) == pytest.approx(8.0)
    assert theory.lista_cp_noise_gain(2, 1.0) == math.inf
    b = theory.lista_cp_error_bound(np.arange(3), 2, 1.0, 0.5, 8.0, 0.1)
    np.testing.assert_allclose(b, [2.8, 1.8, 1.3])
    sched = theory.geometric_thresholds(1.0, 0.5, 3, floor=0.1)
    np.testing.assert_allclose(sched, [1.1, 0.6, 0.35])
    assert theory.oracle_threshold(2.0, 0.25, 0.1) == pytest.approx(0.6)


def test_stability_bound_is_a_product_over_layers():
    b = theory.stability_bound(0.1, [2, 1], [0.1, 0.25])
    assert b[0] == pytest.approx(math.sqrt(4 * 0.01 / 0.7))
    assert b[1] == pytest.approx(math.sqrt(16 * 0.01 / (0.7 * 0.75)))
    assert theory.stability_bound(0.1, [3], [0.25]) == [math.inf]
    # linear in the noise
    assert theory.stability_bound(0.2, [2, 1], [0.1, 0.25])[1] == pytest.approx(2 * b[1])


def test_stability_bound_at_the_exact_limit_is_inf():
    # (2 s - 1) mu == 1 exactly (s = 1, mu = 1; s = 3, mu = 0.2) leaves a zero gap: 1 / (1 - 1) has no finite bound,
    # so inf from that layer on, as for a violated condition (a gap of exactly 0 must not reach 2 / sqrt(gap))
    assert theory.stability_bound(0.1, [1], [1.0]) == [math.inf]
    assert theory.stability_bound(0.1, [2, 3, 1], [0.1, 0.2, 0.1])[1:] == [math.inf, math.inf]


def test_ista_fista_bounds():
    assert theory.ista_objective_bound(4, 2.0, 1.0) == pytest.approx(0.25)
    assert theory.fista_objective_bound(3, 2.0, 1.0) == pytest.approx(0.25)


@pytest.mark.parametrize("name", ["softplus", "silu", "gelu"])
@pytest.mark.parametrize("beta", [1.0, 7.0])
def test_activation_sup_distance_constants(name, beta):
    z = torch.linspace(-20 / beta, 20 / beta, 400001, dtype=torch.float64)
    measured = float((theory.smooth_relu(name, beta)(z) - torch.relu(z)).abs().max())
    assert theory.activation_sup_distance(name, beta) == pytest.approx(measured, rel=1e-6)


def test_activation_constants_match_theory_md():
    assert theory.activation_sup_distance("softplus", 1) == pytest.approx(math.log(2))
    assert theory.activation_sup_distance("silu", 1) == pytest.approx(0.2785, abs=1e-4)
    assert theory.activation_sup_distance("gelu", 1) == pytest.approx(0.170, abs=1e-3)
    with pytest.raises(ValueError):
        theory.activation_sup_distance("tanh", 1)


@pytest.mark.parametrize("shape,size,stride,padding", CASES)
def test_dictionary_matrix_matches_the_test_construction(shape, size, stride, padding):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        theory.dictionary_matrix(w, size, stride=stride, padding=padding), explicit_dictionary(w, size, stride, padding)
    )


def test_spark_of_hand_checkable_dictionaries():
    # [e1, e2, (e1 + e2)/sqrt2]: every pair independent, the three together dependent
    d = torch.tensor([[1.0, 0.0, 2**-0.5], [0.0, 1.0, 2**-0.5]], dtype=torch.float64)
    spark, v = theory.spark(d)
    assert spark == 3 and torch.allclose(d @ v, torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert theory.sparse_collision(d, 1) is None
    z1, z2 = theory.sparse_collision(d, 2)
    torch.testing.assert_close(d @ z1, d @ z2)
    assert not torch.equal(z1, z2) and (z1 != 0).sum() <= 2 and (z2 != 0).sum() <= 2
    # filters [1, 1] and [1, -1] on 3 samples: atoms (1,1,0), (0,1,1), (1,-1,0), (0,1,-1); every 3 of them have
    # determinant ±2, all 4 are dependent: f * g = g * f, i.e. coding g on channel f equals coding f on channel g
    w = torch.tensor([[[1.0, 1.0]], [[1.0, -1.0]]], dtype=torch.float64)
    d = theory.dictionary_matrix(w, 3)
    torch.testing.assert_close(d, torch.tensor([[1, 0, 1, 0], [1, 1, -1, 1], [0, 1, 0, -1]], dtype=torch.float64))
    assert theory.mutual_coherence(w, 3) == pytest.approx(0.5)
    assert theory.uniqueness_bound(0.5) == pytest.approx(1.5)
    spark, v = theory.spark(d)
    assert spark == 4
    assert theory.sparse_collision(d, 1) is None
    z1, z2 = theory.sparse_collision(d, 2)
    # z1 is g = (1, -1) on channel f, z2 is f = (1, 1) on channel g, up to one common scale
    scale = z1[0]
    torch.testing.assert_close(z1 / scale, torch.tensor([1.0, -1.0, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(z2 / scale, torch.tensor([0, 0, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(d @ z1 / scale, torch.tensor([1.0, 0, -1.0], dtype=torch.float64))


def test_spark_of_a_full_column_rank_dictionary_is_infinite_and_the_search_is_bounded():
    d = theory.dictionary_matrix(torch.tensor([[[1.0, 2.0, -1.0]]]), 9)  # one channel: lower-triangular, injective
    assert theory.spark(d) == (math.inf, None)
    assert theory.sparse_collision(d, 3) is None
    with pytest.raises(ValueError, match="too many"):
        theory.spark(torch.randn(30, 60, dtype=torch.float64), max_subsets=1000)


def test_stripe_sparsity_counts_overlapping_atoms():
    z = torch.zeros(2, 2, 40)
    z[0, 0, [0, 4, 30]] = 1.0  # k = 5: atoms at 0 and 4 overlap (|0 - 4| <= 4), 30 is alone
    z[0, 1, 5] = 1.0  # the other channel counts too: window around 4 holds 0, 4, 5
    z[1, 0, [10, 20]] = 1.0
    assert theory.stripe_sparsity(z, 5) == 3
    assert theory.stripe_sparsity(z, 5, stride=2) == 2  # windows of 2*floor(4/2)+1 = 5 positions: {4, 5}
    assert theory.stripe_sparsity(z, 2) == 2  # windows of 3: {4, 5}
    z2 = torch.zeros(1, 1, 9, 9)
    z2[0, 0, 1, 1] = z2[0, 0, 2, 4] = z2[0, 0, 7, 7] = 1.0  # every code position centres a stripe
    assert theory.stripe_sparsity(z2, (3, 3)) == 2 and theory.stripe_sparsity(z2, (2, 2)) == 1


def test_stripe_bound_is_the_recursion():
    q = theory.stripe_rate(2, 0.2)
    assert q == pytest.approx(0.6)
    m, eta = 1.0, 0.01
    for k in range(1, 6):
        m = q * m + 2 * eta
        assert theory.stripe_error_bound(k, 2, 1.0, 0.2, eta) == pytest.approx(m)
    assert theory.stripe_threshold(0.5, 2, 0.2, 0.01) == pytest.approx(0.21)


@pytest.mark.parametrize("name", ["softplus", "silu", "gelu"])
def test_activation_worst_input_is_where_the_gap_peaks(name):
    beta = 5.0
    z = torch.linspace(-4 / beta, 4 / beta, 800001, dtype=torch.float64)
    gap = (theory.smooth_relu(name, beta)(z) - torch.relu(z)).abs()
    # SiLU's and GELU's gaps are even (sigma(z) - ReLU(z) = -sigma(-z) for z > 0): the peak is at ±z_1
    assert abs(theory.activation_worst_input(name, beta)) == pytest.approx(abs(float(z[gap.argmax()])), abs=1e-4)
    at = torch.tensor([theory.activation_worst_input(name, beta)], dtype=torch.float64)
    assert float((theory.smooth_relu(name, beta)(at) - torch.relu(at)).abs()) == pytest.approx(
        theory.activation_sup_distance(name, beta), rel=1e-9
    )


@pytest.mark.parametrize(
    "shape,size,stride,padding",
    [
        ((3, 1, 3), 10, 1, 3),  # padding = k: the first and last atoms lie entirely in the padding
        ((3, 2, 3), 10, 1, 7),
        ((2, 1, 4), 9, 3, 6),
        ((4, 1, 2), 5, 2, 4),
        ((2, 2, 3, 2), (7, 6), (1, 2), (4, 3)),
        ((3, 1, 2, 3), (5, 6), 2, (1, 5)),
    ],
)
def test_mutual_coherence_with_padding_beyond_the_filter(shape, size, stride, padding):
    # Atoms entirely inside the padding are zero (skipped); the truncated border atoms are what counts.
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)
    got = theory.mutual_coherence(w, size, stride=stride, padding=padding)
    assert got == pytest.approx(explicit_coherence(w, size, stride, padding), rel=1e-10, abs=1e-12)


def test_mutual_coherence_padding_far_beyond_k_only_adds_zero_atoms():
    w = torch.randn(3, 2, 3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    # stride 1: every padding >= k - 1 gives the same atoms besides zeros; 10**9 would be 2e9 code positions
    assert theory.mutual_coherence(w, (9, 10), padding=10**9) == theory.mutual_coherence(w, (9, 10), padding=(2, 3))


def test_mutual_coherence_is_scale_invariant_and_propagates_nan():
    w = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mu = theory.mutual_coherence(w, 17, padding=2)
    for scale in (1e-200, 1e-30, 1e30, 1e300):
        assert theory.mutual_coherence(w * scale, 17, padding=2) == pytest.approx(mu, rel=1e-12)
    bad = w.clone()
    bad[1, 0, 2] = float("nan")
    assert math.isnan(theory.mutual_coherence(bad, 17, padding=2))
    assert math.isnan(theory.mutual_coherence(torch.full((2, 1, 3), float("nan")), 8))
    bad[1, 0, 2] = float("inf")
    assert math.isnan(theory.mutual_coherence(bad, 17))
    # a NaN tap that no atom keeps is not part of D: one code position keeping only tap 1 of each filter
    crop = torch.tensor([[[float("nan"), 1.0, 2.0]], [[3.0, -2.0, 1.0]]], dtype=torch.float64)
    assert theory.mutual_coherence(crop, 1, stride=5, padding=1) == 1.0


def test_mutual_coherence_without_a_pair_of_atoms_is_zero():
    assert theory.mutual_coherence(torch.randn(0, 1, 3), 10) == 0.0  # no atoms
    assert theory.mutual_coherence(torch.randn(3, 0, 3), 10) == 0.0  # empty atoms
    assert theory.mutual_coherence(torch.zeros(2, 1, 3, 3), (5, 5)) == 0.0
    assert theory.mutual_coherence(torch.randn(1, 1, 3), 3) == 0.0  # a single atom
    # no atom reaches the signal: code positions at -5 and 5 of a 2-sample signal, k = 1
    assert theory.mutual_coherence(torch.randn(2, 1, 1), 2, stride=10, padding=5) == 0.0


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"stride": 0}, ValueError, "stride must be >= 1"),
        ({"stride": (1, 2)}, ValueError, "stride must .* 1 entries"),
        ({"stride": 1.5}, TypeError, "stride"),
        ({"stride": 2.0}, TypeError, "stride"),
        ({"stride": True}, TypeError, "stride"),
        ({"padding": -1}, ValueError, "padding must be >= 0"),
        ({"padding": (0, 0)}, ValueError, "padding"),
        ({"padding": "1"}, TypeError, "padding"),
        ({"signal_size": 10.0}, TypeError, "signal_size"),
        ({"signal_size": 0}, ValueError, "signal_size must be >= 1"),
        ({"signal_size": 2}, ValueError, "smaller than the filter"),
        ({"weight": [[[1.0, 2.0, 3.0]]]}, TypeError, "weight must be a torch.Tensor"),
        ({"weight": torch.randn(3, 5)}, ValueError, "weight must be"),
        ({"weight": torch.randn(3, 1, 0)}, ValueError, "kernel size"),
    ],
)
def test_mutual_coherence_and_dictionary_matrix_check_their_arguments(kwargs, error, match):
    args = {"weight": torch.randn(3, 1, 3), "signal_size": 10, **kwargs}
    weight, size = args.pop("weight"), args.pop("signal_size")
    with pytest.raises(error, match=match):
        theory.mutual_coherence(weight, size, **args)
    with pytest.raises(error, match=match):
        theory.dictionary_matrix(weight, size, **args)


def test_mutual_coherence_accepts_numpy_and_tensor_integers():
    w = torch.randn(3, 2, 3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = theory.mutual_coherence(w, (9, 10), stride=(1, 2), padding=1)
    assert theory.mutual_coherence(w, (np.int64(9), 10), stride=[1, np.int32(2)], padding=torch.tensor(1)) == want


def test_stripe_sparsity_checks_kernel_size_and_stride():
    z = torch.zeros(1, 1, 10)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        theory.stripe_sparsity(z, 3, stride=0)
    with pytest.raises(TypeError, match="kernel_size"):
        theory.stripe_sparsity(z, 3.0)
    with pytest.raises(ValueError, match="kernel_size"):
        theory.stripe_sparsity(z, (3, 3))


def test_bounds_at_magnitudes_whose_intermediates_leave_float64():
    """The bounds are representable where their pieces are not: eps^2 in stability_bound (eps = 1e-200 gave 0,
    1e200 raised OverflowError), q^k in s B q^k (B = 1e300, q = 0.5, k = 1100 gave 0, the bound 7.4e-32), s B
    (inf for 10 * 1e308, the bound 9.8e305), theta0 q^k (1e300 * 1e-320: a subnormal q^k, 1e-5 off), (k + 1)^2 and
    L dist0_sq in the objective bounds (0 and inf where the bound is 2e-12 and 5e299)."""
    gap = math.sqrt(0.9)
    for eps in (1e-200, 1e200):
        assert theory.stability_bound(eps, [1, 1], [0.1, 0.1]) == pytest.approx(
            [2 * eps / gap, 4 * eps / 0.9], rel=1e-12
        )
    assert theory.stability_bound(1e308, [1], [0.1]) == [math.inf]  # the bound itself overflows
    assert theory.lista_cp_error_bound(1100, 1, 1e300, 0.5, 0.0, 0.0) == pytest.approx(
        math.ldexp(1e300, -1100), rel=1e-12
    )
    assert theory.lista_cp_error_bound(10, 10, 1e308, 0.5, 0.0, 0.0) == pytest.approx(1e308 / 1024 * 10, rel=1e-12)
    assert theory.stripe_error_bound(1100, 1, 1e300, 0.5, 0.0) == pytest.approx(math.ldexp(1e300, -1100), rel=1e-12)
    assert theory.deep_error_bound(1100, [1], [1e300], [0.5]) == pytest.approx(math.ldexp(1e300, -1100), rel=1e-12)
    assert theory.geometric_thresholds(1e300, 1e-10, 33)[-1] == pytest.approx(1e-20, rel=1e-12)
    assert theory.fista_objective_bound(1e160, 1e300, 1e8) == pytest.approx(2e-12, rel=1e-12)
    assert theory.ista_objective_bound(1e100, 1e200, 1e200) == pytest.approx(5e299, rel=1e-12)
    # ordinary values are the plain products, exactly
    assert theory.lista_cp_error_bound(3, 2, 1.5, 0.5, 2.0, 0.1) == 2 * 1.5 * 0.5**3 + 2.0 * 0.1
    assert theory.fista_objective_bound(2, 2.0, 3.0) == 2 * 2.0 * 3.0 / 9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["softplus", "silu", "gelu"])
def test_smooth_relu_with_a_beta_outside_float32s_range(name, dtype):
    # reduced-precision inputs are scaled by beta in float32: beta = 1e39 made softplus raise RuntimeError and
    # SiLU/GELU NaN at z = 0 (0 * inf); beta = 1e-300 (0 in float32) gave SiLU/GELU NaN at z = inf (inf * 0)
    z = torch.tensor([-1.0, 0.0, 1.0, math.inf], dtype=dtype)
    huge = {"softplus": [0.0, math.log(2) / 1e39, 1.0, math.inf], "silu": [0.0, 0.0, 1.0, math.inf]}
    huge["gelu"] = huge["silu"]
    want = torch.tensor(huge[name], dtype=torch.float64).to(dtype)
    torch.testing.assert_close(theory.smooth_relu(name, 1e39)(z), want, rtol=0, atol=0)
    tiny = {"softplus": [math.inf] * 4, "silu": [-0.5, 0.0, 0.5, math.inf]}
    tiny["gelu"] = tiny["silu"]
    want = torch.tensor(tiny[name], dtype=torch.float64).to(dtype)
    torch.testing.assert_close(theory.smooth_relu(name, 1e-300)(z), want, rtol=0, atol=0)


def test_real_arguments_take_0d_arrays_as_0d_tensors():
    # a 0-d float array was refused ("mu must be a real number, got array(0.1)") where a 0-d tensor, a numpy scalar
    # and a 0-d integer array for s were all taken
    assert theory.lista_cp_rate(np.array(2), np.array(0.1)) == theory.lista_cp_rate(2, 0.1)
    assert theory.uniqueness_bound(np.array(0.2)) == pytest.approx(3.0)
    assert theory.stability_bound(np.array(0.1), [1], np.array([0.1])) == theory.stability_bound(0.1, [1], [0.1])
    np.testing.assert_array_equal(theory.geometric_thresholds(np.array(1.0), np.array(0.5), 3), [1.0, 0.5, 0.25])
    for bad in (np.array(True), np.array(0.1 + 0j), np.array([0.1])):
        with pytest.raises(TypeError, match="mu must be a real number"):
            theory.uniqueness_bound(bad)
    with pytest.raises(ValueError, match="mu must be in"):
        theory.uniqueness_bound(np.array(np.nan))


def test_meta_tensor_iteration_counts_and_distances_are_refused_by_name():
    # .cpu() of a meta tensor raised NotImplementedError("Cannot copy out of meta tensor; no data!")
    meta = torch.empty(2, device="meta")
    with pytest.raises(ValueError, match="k is a meta tensor"):
        theory.lista_cp_error_bound(meta, 1, 1.0, 0.5, 1.0, 0.0)
    with pytest.raises(ValueError, match="dist0_sq is a meta tensor"):
        theory.ista_objective_bound(2, 1.0, meta)


def test_bounds_at_a_rate_of_exactly_one_are_inf_and_have_no_schedule():
    # q = 1 exactly (s = 1, mu = 1; s = 3, mu = 0.2: 5 * 0.2 == 1.0 in float64) is outside q < 1, which every
    # rate theorem needs: the documented answer is inf (no guarantee), not s B + C sigma (the q^k factor frozen at 1)
    # nor a ZeroDivisionError from 1 / (1 - q); and geometric_thresholds refuses it, as for any q >= 1
    ks = [0, 1, 5, math.inf]
    assert np.all(np.isposinf(theory.lista_cp_error_bound(ks, 2, 1.0, 1.0, 3.0, 0.1)))
    for s, mu in [(1, 1.0), (3, 0.2)]:
        assert theory.stripe_rate(s, mu) == 1.0
        assert np.all(np.isposinf(theory.stripe_error_bound(ks, s, 1.0, mu, 0.1)))
    with pytest.raises(ValueError, match="q must be < 1"):
        theory.geometric_thresholds(1.0, 1.0, 3)


def test_an_inf_argument_meeting_a_vanishing_factor_gives_inf_never_nan():
    # inf * 0 in float64 is NaN; the bounds promise the vacuous inf instead (an unbounded amplitude or noise level
    # bounds nothing, whatever the factor it meets)
    assert theory.lista_cp_error_bound(1, 1, math.inf, 0.0, 1.0, 0.0) == math.inf  # s B q^k: inf * 0^1
    assert theory.lista_cp_error_bound(0, 0, 1.0, 0.5, math.inf, 0.0) == math.inf  # C sigma: inf * 0
    assert theory.stripe_threshold(math.inf, 1, 0.0, 0.0) == math.inf  # mu s ||e||: 0 * inf
    assert theory.stripe_error_bound(3, 0, math.inf, 0.5, 0.0) == math.inf  # B q^k with q = 0


def test_mutual_coherence_of_parallel_atoms_is_one_and_never_above():
    # two code channels holding the same filter up to scale give parallel atoms: |cos| = 1, but <f, c f> /
    # (|f| |c f|) rounds to 1 + 2^-52 for about a third of random filters; a coherence above 1 is out of range
    # (uniqueness_bound refuses it with ValueError), so the result must be capped at 1
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        k = int(torch.randint(1, 9, (1,), generator=g))
        f = torch.randn(1, 2, k, generator=g, dtype=torch.float64)
        w = torch.cat([f, f * float(torch.rand(1, generator=g) * 10 + 0.1)])
        mu = theory.mutual_coherence(w, k + 3)
        assert 1.0 - 1e-15 <= mu <= 1.0
        assert theory.uniqueness_bound(mu) == pytest.approx(1.0, abs=1e-15)


def test_spark_tolerance_is_relative_to_the_matrix_norm():
    # columns a, b, a + b and an independent c: spark 3 by construction, at any scale. The documented test is
    # "smallest singular value below tol times D's largest"; an absolute tol would call every column of the 1e-12
    # copy dependent on its own (spark 1) and miss the rounding-level dependency of the 1e12 copy.
    g = torch.Generator().manual_seed(1)
    a, b, c = torch.randn(3, 4, generator=g, dtype=torch.float64)
    d = torch.stack([a, b, a + b, c], dim=1)
    for scale in (1e-12, 1.0, 1e12):
        spark, v = theory.spark(d * scale)
        assert spark == 3
        assert torch.count_nonzero(v) == 3 and torch.linalg.norm(d @ v) <= 1e-12 * torch.linalg.norm(d)


def test_stability_bound_refuses_lists_of_different_lengths():
    # one s and one mu per layer: zip would silently drop the extra layers and return fewer bounds than layers
    for sparsities, mus in [([1, 2], [0.1]), ([1], [0.1, 0.2]), ([], [0.1])]:
        with pytest.raises(ValueError, match="one entry per layer"):
            theory.stability_bound(0.1, sparsities, mus)
