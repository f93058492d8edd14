"""Adversarial inputs to the research tools (theory, sparsity, data, dictionary learning): every bad input is
rejected naming its argument, edge inputs give documented values, and answers match independent computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from dsc_kernels import data as D
from dsc_kernels import sparsity, theory
from dsc_kernels.dictionary_learning import atom_grid, learn_conv_dictionary, low_frequency_fraction
from dsc_kernels.nn import ConvSparseCoding2d, SoftThreshold


def _brute_stripe(code: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Non-zeros of one sample within (k - 1) // s positions of some code position, maximised by enumeration."""
    reach = [(k - 1) // s for k, s in zip(kernel, stride)]
    nz = (code != 0).sum(1)
    best = 0
    for b in range(code.shape[0]):
        for pos in itertools.product(*(range(n) for n in code.shape[2:])):
            box = tuple(slice(max(0, p - r), p + r + 1) for p, r in zip(pos, reach))
            best = max(best, int(nz[b][box].sum()))
    return best


# ------------------------------------------------------------------------------------------------------ theory
@pytest.mark.parametrize("mu", [-0.1, 1.5, math.nan, math.inf])
def test_coherence_outside_unit_interval_is_rejected(mu):
    # a negative mu used to give inf (uniqueness for every s), mu > 1 a bound below 1, NaN a NaN bound
    for call in (
        lambda: theory.uniqueness_bound(mu),
        lambda: theory.lista_cp_rate(2, mu),
        lambda: theory.stripe_rate(2, mu),
        lambda: theory.oracle_threshold(1.0, mu, 0.0),
    ):
        with pytest.raises(ValueError, match="mu must be in"):
            call()
    with pytest.raises(ValueError, match="mus"):
        theory.stability_bound(0.1, [1], [mu])
    with pytest.raises(TypeError, match="mu must be a real number"):
        theory.uniqueness_bound("0.1")


def test_negative_and_fractional_sparsity_is_rejected_and_zero_is_the_zero_code():
    with pytest.raises(ValueError, match="s must be >= 0"):
        theory.lista_cp_rate(-3, 0.1)  # used to return the negative rate -0.7
    with pytest.raises(TypeError, match="s must be an int"):
        theory.sparse_collision(torch.eye(3), 1.5)  # used to search 3-column subsets
    with pytest.raises(ValueError, match="sparsities"):
        theory.stability_bound(0.1, [-3], [0.5])
    # s = 0: nothing to decay (q = 0, not the negative (2*0 - 1) mu), and the l0 factor is 1
    assert theory.lista_cp_rate(0, 0.3) == 0.0 and theory.stripe_rate(0, 0.3) == 0.0
    assert theory.stability_bound(0.1, [0], [0.5]) == pytest.approx([0.2])
    assert theory.sparse_collision(torch.eye(3), 0) is None


def test_divergent_rate_gives_inf_never_a_finite_or_negative_bound():
    # q >= 1 used to give a finite (growing) error bound, and NaN in the deep bound
    assert theory.lista_cp_error_bound(5, 2, 1.0, 1.5, 4.0, 0.1) == math.inf
    assert theory.lista_cp_error_bound(5, 2, 1.0, 1.0, math.inf, 0.0) == math.inf  # C = inf, sigma = 0: not NaN
    np.testing.assert_array_equal(theory.deep_error_bound(np.arange(3), [2, 2], [1.0, 1.0], [0.5, 1.5]), np.inf)
    assert theory.deep_error_bound(0, [2, 0], [1.0, 1.0], [0.5, 1.5]) == math.inf
    assert theory.stripe_error_bound(3, 10, 1.0, 0.2, 0.1) == math.inf
    with pytest.raises(ValueError, match="q must be < 1"):
        theory.geometric_thresholds(1.0, 1.5, 3)  # used to return a growing schedule
    for bad_q in (-0.5, math.nan):  # a negative q made q^k alternate in sign: bound -1.0 at k = 1
        with pytest.raises(ValueError, match="q must be >= 0"):
            theory.lista_cp_error_bound(1, 2, 1.0, bad_q, 4.0, 0.0)
        with pytest.raises(ValueError, match="q must be >= 0"):
            theory.lista_cp_noise_gain(2, bad_q)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: theory.lista_cp_error_bound(1, 2, -1.0, 0.5, 4.0, 0.1), "B must be >= 0"),
        (lambda: theory.lista_cp_error_bound(1, 2, 1.0, 0.5, 4.0, -0.1), "sigma must be >= 0"),
        (lambda: theory.lista_cp_error_bound(-1, 2, 1.0, 0.5, 4.0, 0.1), "k must hold whole"),
        (lambda: theory.lista_cp_error_bound(1.5, 2, 1.0, 0.5, 4.0, 0.1), "k must hold whole"),
        (lambda: theory.deep_error_bound(3, [2], [1.0, 1.0], [0.5, 0.5]), "one entry per layer"),
        (lambda: theory.deep_error_bound(3, [], [], []), "at least one"),
        (lambda: theory.deep_error_bound(3, [2], [1.0], [0.5], [-1.0]), "etas must be >= 0"),
        (lambda: theory.stability_bound(-0.1, [2], [0.1]), "eps must be >= 0"),
        (lambda: theory.stripe_threshold(-1.0, 2, 0.1, 0.0), "err_linf must be >= 0"),
        (lambda: theory.oracle_threshold(1.0, 0.1, -0.5), "eta must be >= 0"),
        (lambda: theory.geometric_thresholds(-1.0, 0.5, 3), "theta0"),
        (lambda: theory.geometric_thresholds(1.0, 0.5, -1), "n_iter must be >= 0"),
        (lambda: theory.ista_objective_bound(-1, 1.0, 1.0), "k must hold whole"),
        (lambda: theory.ista_objective_bound(2, -1.0, 1.0), "L must be >= 0"),
        (lambda: theory.fista_objective_bound(2, 1.0, np.array([1.0, -1.0])), "dist0_sq"),
        (lambda: theory.spark(torch.eye(3), tol=-1.0), "tol must be"),
        (lambda: theory.spark(torch.eye(3), max_size=-1), "max_size must be >= 0"),
        (lambda: theory.spark(torch.tensor([[1.0, math.nan], [0.0, 1.0]])), "matrix must be finite"),
    ],
)
def test_bound_arguments_are_checked(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: theory.lista_cp_error_bound("a", 2, 1.0, 0.5, 4.0, 0.1), "k must be"),
        (lambda: theory.geometric_thresholds(1.0, 0.5, 2.5), "n_iter must be an int"),  # used to give 3 entries
        (lambda: theory.spark(np.eye(3)), "matrix must be a torch.Tensor"),
        (lambda: theory.spark(torch.eye(2, dtype=torch.complex64)), "matrix must be a real"),
        (lambda: theory.spark(torch.eye(3), max_size=1.5), "max_size must be an int"),
        (lambda: theory.mutual_coherence(torch.ones(2, 1, 3, dtype=torch.bool), 5), "weight must be a real"),
        (lambda: theory.activation_sup_distance("silu", "2"), "beta must be a real number"),
    ],
)
def test_argument_types_are_checked(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_bounds_match_their_formulas_and_accept_arrays():
    k = np.arange(4)
    np.testing.assert_allclose(theory.lista_cp_error_bound(k, 2, 1.0, 0.5, 8.0, 0.1), 2 * 0.5**k + 0.8)
    gains = [2 * 2 / (1 - 0.5), 2 * 1 / (1 - 0.25)]
    want = gains[1] * (2 * 1.0 * 0.5**k + gains[0] * 0.1) + (1 * 2.0 * 0.25**k + gains[1] * 0.2)
    np.testing.assert_allclose(theory.deep_error_bound(k, [2, 1], [1.0, 2.0], [0.5, 0.25], [0.1, 0.2]), want)
    q = 3 * 0.2
    np.testing.assert_allclose(theory.stripe_error_bound(k, 2, 1.0, 0.2, 0.1), q**k + 2 * 0.1 * (1 - q**k) / (1 - q))
    assert theory.stripe_error_bound(np.inf, 2, 1.0, 0.2, 0.1) == pytest.approx(0.2 / (1 - q))
    gap = [1 - 3 * 0.1, 1 - 1 * 0.2]
    want = [math.sqrt(4 * 0.01 / gap[0]), math.sqrt(16 * 0.01 / (gap[0] * gap[1]))]
    assert theory.stability_bound(0.1, (s for s in [2, 1]), iter([0.1, 0.2])) == pytest.approx(want)
    # k = 0 is the start z_0, which the theorems do not bound: inf without a divide-by-zero warning
    with np.errstate(all="raise"):
        np.testing.assert_array_equal(theory.ista_objective_bound(np.arange(3), 2.0, 1.0), [np.inf, 1.0, 0.5])
        np.testing.assert_array_equal(theory.fista_objective_bound(np.arange(3), 2.0, 1.0), [np.inf, 1.0, 4 / 9])
    torch_k = theory.lista_cp_error_bound(torch.arange(3), 2, 1.0, 0.5, 8.0, 0.1)
    np.testing.assert_allclose(torch_k, [2.8, 1.8, 1.3])


def test_smooth_relu_checks_beta_and_survives_tiny_beta():
    for beta in (0.0, -1.0, math.nan, math.inf):  # beta = 0 used to give softplus inf and GELU NaN everywhere
        for name in ("softplus", "silu", "gelu"):
            with pytest.raises(ValueError, match="beta must be finite and > 0"):
                theory.smooth_relu(name, beta)
    z = torch.tensor([-1.0, 0.0, 2.0])
    # gelu(b z) / b = z Phi(b z) -> z / 2 as b -> 0; the division form gave 0 / 0 = NaN in float32
    torch.testing.assert_close(theory.smooth_relu("gelu", 1e-320)(z), z / 2)
    z64 = torch.linspace(-3, 3, 61, dtype=torch.float64)
    torch.testing.assert_close(theory.smooth_relu("gelu", 2.5)(z64), torch.nn.functional.gelu(2.5 * z64) / 2.5)
    with pytest.raises(ValueError, match="beta must be finite and > 0"):
        theory.activation_worst_input("silu", math.nan)


def test_dictionary_matrix_of_empty_dictionaries_and_coherence_of_meta_weights():
    # torch's conv_transpose rejected these with an opaque RuntimeError
    assert theory.dictionary_matrix(torch.randn(0, 2, 3), 10).shape == (20, 0)
    assert theory.dictionary_matrix(torch.randn(2, 0, 3), 10).shape == (0, 16)
    with pytest.raises(ValueError, match="meta"):
        theory.mutual_coherence(torch.randn(2, 1, 3, device="meta"), 5)


@pytest.mark.parametrize("seed", range(3))
def test_mutual_coherence_matches_the_explicit_matrix_on_random_geometries(seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(25):
        nd = 1 + int(torch.randint(2, (1,), generator=g))
        draw = lambda lo, hi: [int(torch.randint(lo, hi, (1,), generator=g)) for _ in range(nd)]  # noqa: E731
        kernel, stride, padding, size = draw(1, 5), draw(1, 4), draw(0, 6), draw(1, 10)
        w = torch.randn(1 + seed, 1 + nd % 2, *kernel, generator=g, dtype=torch.float64).round()  # ties, zero taps
        try:
            mu = theory.mutual_coherence(w, size, stride=stride, padding=padding)
        except ValueError:  # signal smaller than the filter
            continue
        d = theory.dictionary_matrix(w, size, stride=stride, padding=padding)
        norms = d.norm(dim=0)
        d = d[:, norms > 1e-12] / norms[norms > 1e-12]
        gram = (d.T @ d).abs().fill_diagonal_(0)
        assert mu == pytest.approx(float(gram.max()) if d.shape[1] > 1 else 0.0, abs=1e-12)


def test_stripe_sparsity_matches_enumeration_empty_codes_and_wide_windows():
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        nd = 1 + int(torch.randint(2, (1,), generator=g))
        shape = (2, 2, *(int(torch.randint(1, 7, (1,), generator=g)) for _ in range(nd)))
        code = (torch.rand(shape, generator=g) < 0.3) * torch.randn(shape, generator=g)
        kernel = tuple(int(torch.randint(1, 12, (1,), generator=g)) for _ in range(nd))
        stride = tuple(int(torch.randint(1, 4, (1,), generator=g)) for _ in range(nd))
        assert theory.stripe_sparsity(code, kernel, stride) == _brute_stripe(code, kernel, stride)
    assert theory.stripe_sparsity(torch.zeros(2, 3, 0), 3) == 0  # used to raise from avg_pool
    assert theory.stripe_sparsity(torch.ones(1, 1, 0, 4), (3, 3)) == 0
    # a window far wider than the code counts the whole code, in linear time (avg_pool: seconds per call)
    assert theory.stripe_sparsity(torch.ones(1, 1, 300, 300), 301) == 90_000


# ---------------------------------------------------------------------------------------------------- sparsity
def test_hoyer_stays_in_unit_interval_and_matches_its_formula():
    assert float(sparsity.hoyer(torch.tensor([1.0, -1.0, 1.0]))) == 0.0  # rounding gave -1.6e-7
    x = torch.rand(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).T  # non-contiguous
    want = (math.sqrt(5) - x.abs().sum(1) / x.norm(dim=1)) / (math.sqrt(5) - 1)
    torch.testing.assert_close(sparsity.hoyer(x, dim=-1), want)
    assert float(sparsity.hoyer(torch.zeros(4))) == 1.0 and float(sparsity.hoyer(torch.zeros(0))) == 1.0
    flags = torch.tensor([True, False, True])  # abs() of a bool tensor is not implemented: this used to raise
    torch.testing.assert_close(sparsity.hoyer(flags), sparsity.hoyer(flags.float()))
    assert sparsity.hoyer(torch.tensor([1.0, math.nan])).isnan()


@pytest.mark.parametrize(
    "dim,error,match",
    [
        (2, ValueError, "dim must be in"),  # was an IndexError from the shape tuple
        ((1, -1), ValueError, "twice"),
        ((), ValueError, "at least one"),  # sum(dim=()) reduced over everything
        (1.0, TypeError, "dim must be an int"),
    ],
)
def test_hoyer_checks_dim(dim, error, match):
    with pytest.raises(error, match=match):
        sparsity.hoyer(torch.rand(2, 3), dim=dim)


def test_metrics_reject_non_tensors():
    for metric in (sparsity.zero_fraction, sparsity.hoyer, sparsity.channel_activity):
        with pytest.raises(TypeError, match="t must be a torch.Tensor"):
            metric([[0.0, 1.0]])


def test_activation_l1_skips_empty_outputs_and_checks_modules():
    relu = nn.ReLU()
    reg = sparsity.ActivationL1(relu, 1.0)
    relu(torch.zeros(0, 3, requires_grad=True))  # an empty batch: its mean was NaN, and so was the whole loss
    assert reg.pop() == 0.0
    relu(torch.tensor([-1.0, 2.0], requires_grad=True))
    assert float(reg.pop().detach()) == 1.0
    with pytest.raises(TypeError, match="modules"):
        sparsity.ActivationL1([1, 2], 1.0)
    with pytest.raises(ValueError, match="weight"):
        sparsity.ActivationL1(relu, True)


def test_coherence_penalty_is_scale_invariant_and_checks_types():
    w = torch.randn(3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for shifts in (False, True):
        want = sparsity.coherence_penalty(w, shifts=shifts)
        # the atoms' norms underflowed (1e-200: penalty inf) or overflowed (float32 1e30: every atom became 0)
        for scaled in (w * 1e-200, (w * 1e30).float(), (w * 1e-30).float()):
            got = sparsity.coherence_penalty(scaled, shifts=shifts)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    with pytest.raises(TypeError, match="floating-point"):
        sparsity.coherence_penalty(w.long())
    with pytest.raises(TypeError, match="normalize"):
        sparsity.coherence_penalty(w, normalize="no")
    with pytest.raises(TypeError, match="shifts"):
        sparsity.coherence_penalty(w, shifts=1)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((-1, 10), {}, ValueError, "step must be >= 0"),
        ((3, -5), {}, ValueError, "warmup_steps must be >= 0"),
        ((1.5, 10), {}, TypeError, "step must be an int"),
        ((3, math.inf), {}, TypeError, "warmup_steps must be an int"),  # gave 0.0 forever
        ((3, 10), {"start": 2.0}, ValueError, "start must be in"),  # gave factors above 1
        ((3, 10), {"start": math.nan}, ValueError, "start must be in"),  # gave NaN thresholds
    ],
)
def test_warmup_factor_checks_its_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        sparsity.warmup_factor(*args, **kwargs)


def test_threshold_warmup_follows_buffers_replaced_by_to():
    model = nn.Sequential(SoftThreshold(0.4), ConvSparseCoding2d(1, 2, 3, lam=0.2, learn_lam=False))
    warmup = sparsity.ThresholdWarmup(model, 2, start=0.5)
    model.double()  # replaces every buffer: the warm-up used to keep ramping the old float32 tensors
    for _ in range(2):
        warmup.step()
    assert float(model[0].threshold) == pytest.approx(0.4) and float(model[1].lam) == pytest.approx(0.2)
    assert model[0].threshold.dtype == torch.float64
    fresh = nn.Sequential(SoftThreshold(0.4))
    with pytest.raises(ValueError, match="start"):
        sparsity.ThresholdWarmup(fresh, 4, start=math.nan)
    assert float(fresh[0].threshold) == pytest.approx(0.4)  # untouched by the failed construction
    with pytest.raises(TypeError, match="model"):
        sparsity.ThresholdWarmup(None, 3)


def test_threshold_warmup_resumes_from_its_state_dict():
    """A checkpoint holds the warmed-down buffer; a new warm-up built on the loaded model took that as its target
    (0.15 instead of 0.5 at the end). load_state_dict restores the targets and the count."""
    model = nn.Sequential(SoftThreshold(0.5))
    warmup = sparsity.ThresholdWarmup(model, 10)
    for _ in range(3):
        warmup.step()
    checkpoint = {"model": model.state_dict(), "warmup": warmup.state_dict()}
    resumed_model = nn.Sequential(SoftThreshold(0.5))
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = sparsity.ThresholdWarmup(resumed_model, 10)
    resumed.load_state_dict(checkpoint["warmup"])
    assert float(resumed_model[0].threshold) == pytest.approx(0.15)  # where the checkpoint left it
    for _ in range(7):
        resumed.step(), warmup.step()
    assert float(resumed_model[0].threshold) == float(model[0].threshold) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="targets"):
        sparsity.ThresholdWarmup(nn.Sequential(SoftThreshold(0.5), SoftThreshold(0.2)), 3).load_state_dict(
            checkpoint["warmup"]
        )
    per_channel = sparsity.ThresholdWarmup(nn.Sequential(SoftThreshold(0.5, num_channels=3)), 3)
    with pytest.raises(ValueError, match=r"shape \(\), its buffer \(3,\)"):  # copy_ broadcast it
        per_channel.load_state_dict(checkpoint["warmup"])


def test_threshold_warmup_resumes_on_the_saved_schedule():
    """The state held only the count and targets: a resume built with another warmup_steps, start or shape jumped to
    another point of the ramp (0.3 of the target instead of 0.15 at step 3 of 10 rebuilt as 5 steps)."""
    model = nn.Sequential(SoftThreshold(0.5))
    warmup = sparsity.ThresholdWarmup(model, 10, start=0.1, shape="cosine")
    for _ in range(3):
        warmup.step()
    resumed_model = nn.Sequential(SoftThreshold(0.5))
    resumed_model.load_state_dict(model.state_dict())
    resumed = sparsity.ThresholdWarmup(resumed_model, 5)
    resumed.load_state_dict(warmup.state_dict())
    assert (resumed.warmup_steps, resumed.start, resumed.shape) == (10, 0.1, "cosine")
    for _ in range(4):
        assert resumed.step() == warmup.step()
        assert float(resumed_model[0].threshold) == float(model[0].threshold)
    bad = {**warmup.state_dict(), "warmup_steps": -1}
    with pytest.raises(ValueError, match="warmup_steps"):
        resumed.load_state_dict(bad)
    assert resumed.warmup_steps == 10  # a refused state changes nothing


def test_sparsity_monitor_checks_modules_at_construction():
    with pytest.raises(TypeError, match="modules\\['a'\\]"):
        sparsity.SparsityMonitor(nn.ReLU(), modules={"a": 3})  # failed only on entering the with block
    with pytest.raises(TypeError, match="modules must be a dict"):
        sparsity.SparsityMonitor(nn.ReLU(), modules=[nn.ReLU()])


# -------------------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: D.barker_filter(13, ndim=3), ValueError, "ndim must be 1 or 2"),  # silently 2-D
        (lambda: D.barker_filter(13, dtype=torch.int64), TypeError, "dtype"),
        (lambda: D.golomb_filter([0, 1.7, 3]), TypeError, "marks"),  # 1.7 was truncated to 1
        (lambda: D.golomb_filter("013"), TypeError, "marks"),
        (lambda: D.golomb_filter([0, 1, 3], dtype=torch.int64), TypeError, "dtype"),  # all taps rounded to 0
        (lambda: D.dct_filters(-1, 4), ValueError, "n_filters"),  # gave size - 1 filters
        (lambda: D.dct_filters(2, 0), ValueError, "size"),
        (lambda: D.dct_filters(2, 4, dtype=torch.int64), TypeError, "dtype"),  # returned float32
        (lambda: D.random_filters(-1, 1, 3), ValueError, "c_code"),
        (lambda: D.random_filters(2, 1, (3, 3, 3)), TypeError, "size"),
        (lambda: D.random_filters(2, 1, 3, seed=2**64), ValueError, "seed"),
        (lambda: D.conv_dictionary(D.barker_filter(5), (4, 4)), ValueError, "code_size"),  # zip dropped an entry
        (lambda: D.conv_dictionary(D.barker_filter(5), 4.7), TypeError, "code_size"),
        (lambda: D.conv_dictionary(torch.tensor([[[1, -1, 1]]]), 4), TypeError, "floating"),
        (lambda: D.dictionary_chain([D.barker_filter(13), torch.ones(2, 3, 3)], 10), ValueError, "C_sig"),
        (lambda: D.dictionary_chain([D.barker_filter(13)], 10, strides=[1, 2]), ValueError, "strides"),
        (lambda: D.dictionary_chain([D.barker_filter(5), D.barker_filter(5, ndim=2)], 4), ValueError, "rank"),
        (lambda: D.sparse_codes(1, 2, 10, 2, amplitude=(1e5, 1e6), dtype=torch.float16), ValueError, "amplitude"),
        (lambda: D.sparse_codes(1, 2, 10, 2, seed=2**64), ValueError, "seed"),
    ],
)
def test_generators_check_their_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_synthesize_checks_the_code():
    d = D.conv_dictionary(D.barker_filter(5), 10, padding=1, stride=2)
    for z in (torch.randn(2, 1, 9), torch.randn(2, 2, 10), torch.randn(1, 10), torch.randn(2, 1, 10, 3)):
        with pytest.raises(ValueError, match="z must be"):  # conv_transpose's output_padding errors before
            D.synthesize(z, d)
    with pytest.raises(TypeError, match="z must be"):
        D.synthesize(torch.ones(2, 1, 10, dtype=torch.int64), d)
    assert D.synthesize(torch.randn(2, 1, 10), d).shape == (2, 1, 21)


def test_dsc_problem_checks_dictionaries_noise_and_seed():
    chain = D.dictionary_chain([D.barker_filter(13), D.golomb_filter([0, 1, 3])], 20)
    with pytest.raises(TypeError, match="dictionaries"):
        D.dsc_problem(chain[0], 2)
    with pytest.raises(TypeError, match="dictionaries"):
        D.dsc_problem([torch.ones(1, 1, 3)], 2)
    mixed = D.dictionary_chain([D.barker_filter(13, dtype=torch.float32), D.golomb_filter([0, 1, 3])], 20)
    with pytest.raises(TypeError, match="one dtype"):  # layer 1 was silently computed in float64
        D.dsc_problem(mixed, 2)
    with pytest.raises(TypeError, match="noise_std"):
        D.dsc_problem(chain, 2, noise_std="0.1")
    # the largest seed sparse_codes takes used to overflow in the noise generator's seed + 1
    p = D.dsc_problem(chain, 2, seed=2**64 - 1, noise_std=0.1)
    assert torch.allclose(D.synthesize(p.codes[1], chain[1]), p.codes[0])
    assert torch.equal(D.dsc_problem(iter(chain), 2, seed=3).x, D.dsc_problem(chain, 2, seed=3).x)


# ----------------------------------------------------------------------------------------- dictionary learning
def test_dictionary_learning_initial_crops_are_scale_invariant():
    x = torch.randn(2, 1, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # lam so large that every code stays 0: the atoms stay the initial crops. The norm of a 1e-160 crop underflowed
    # to 0, and the crop was replaced by noise.
    want = learn_conv_dictionary(x, 3, 3, 1e6, n_outer=1, backend="reference").weight
    got = learn_conv_dictionary(x * 1e-160, 3, 3, 1e-154, n_outer=1, backend="reference").weight
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"lam": "0.1"}, TypeError, "lam"),
        ({"lam": math.inf}, ValueError, "lam"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"x": torch.randn(2, 1, 12, 12).half()}, ValueError, "x must be float32 or float64"),  # FFT RuntimeError
    ],
)
def test_learn_conv_dictionary_checks_lam_seed_and_dtype(kwargs, error, match):
    args = {"x": torch.randn(2, 1, 12, 12), "n_atoms": 3, "kernel_size": 3, "lam": 0.1, "n_outer": 1, **kwargs}
    with pytest.raises(error, match=match):
        learn_conv_dictionary(**args)


def test_learn_conv_dictionary_takes_numpy_counts():
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    result = learn_conv_dictionary(x, np.int64(2), 3, 0.1, n_outer=1, backend="reference")
    assert result.weight.shape == (2, 1, 3, 3)


def test_atom_plots_check_their_weight():
    for weight in (torch.zeros(0, 1, 3, 3), torch.zeros(2, 1, 3), torch.zeros(2, 0, 3, 3)):
        with pytest.raises(ValueError, match="weight must be"):  # ZeroDivisionError / unpack / IndexError
            atom_grid(weight)
    with pytest.raises(ValueError, match="weight must be"):
        low_frequency_fraction(torch.randn(3, 1, 5))
    with pytest.raises(ValueError, match="cutoff"):
        low_frequency_fraction(torch.randn(3, 1, 5, 5), -1.0)  # gave negative fractions
