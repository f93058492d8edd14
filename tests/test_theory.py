"""Theory functions against explicit-matrix computations on small dictionaries."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsc_kernels import theory


def explicit_dictionary(weight, signal_size, stride, padding):
    """Columns = atoms: conv_transpose of every unit code, cropped to the signal size (DESIGN §2)."""
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
