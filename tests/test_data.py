"""Synthetic generators: exact supports, seeds, coherence of the named dictionaries."""

import math

import pytest
import torch

from dsc_kernels import data as D


@pytest.mark.parametrize("size,sep", [((50,), 1), ((50,), 5), ((9, 11), 1), ((12, 12), 3)])
def test_sparse_codes_exact_support_and_separation(size, sep):
    z = D.sparse_codes(6, 2, size, 4, amplitude=(0.5, 1.0), min_separation=sep, seed=3)
    assert z.shape == (6, 2, *size)
    nnz = (z != 0).flatten(1).sum(1)
    assert torch.equal(nnz, torch.full((6,), 4))
    vals = z[z != 0].abs()
    assert vals.min() >= 0.5 and vals.max() <= 1.0
    for b in range(6):
        pos = torch.nonzero(z[b] != 0)[:, 1:]
        d = (pos[:, None] - pos[None]).abs().amax(-1) + sep * torch.eye(len(pos), dtype=torch.long)
        assert d.min() >= sep


def test_seeds_reproduce_and_differ():
    a = D.sparse_codes(2, 1, (30,), 3, seed=1)
    assert torch.equal(a, D.sparse_codes(2, 1, (30,), 3, seed=1))
    assert not torch.equal(a, D.sparse_codes(2, 1, (30,), 3, seed=2))


def test_impossible_separation_raises():
    with pytest.raises(ValueError):
        D.sparse_codes(1, 1, (5,), 3, min_separation=4)


def test_named_dictionaries_coherence():
    assert D.conv_dictionary(D.barker_filter(13), 40).mu == pytest.approx(1 / 13)
    assert D.conv_dictionary(D.barker_filter(7, ndim=2), (12, 12)).mu == pytest.approx(1 / 7)
    assert D.conv_dictionary(D.golomb_filter([0, 1, 4, 9, 11]), 40).mu == pytest.approx(1 / 5)
    dct = D.dct_filters(6, 8)
    assert torch.allclose(dct.flatten(1) @ dct.flatten(1).T, torch.eye(6, dtype=dct.dtype))
    r = D.random_filters(5, 2, (3, 3), seed=0)
    assert torch.allclose(r.flatten(1).norm(dim=1), torch.ones(5, dtype=r.dtype))


@pytest.mark.parametrize("ndim", [1, 2])
def test_dsc_problem_layers_are_consistent(ndim):
    if ndim == 1:
        ds = D.dictionary_chain([D.barker_filter(13), D.golomb_filter([0, 1, 4])], 30)
    else:
        ds = D.dictionary_chain([D.barker_filter(5, ndim=2), D.random_filters(1, 1, (2, 2), seed=1)], (8, 9))
    p = D.dsc_problem(ds, 2, batch=4, noise_std=0.01, seed=5)
    assert torch.allclose(D.synthesize(p.codes[1], ds[1]), p.codes[0])
    assert torch.allclose(p.x - p.noise, D.synthesize(p.codes[0], ds[0]))
    assert p.sparsity[1] == 2
    # deeper atoms never overlap, so layer 1 has exactly marks-per-atom times as many entries
    expect = 2 * int((ds[1].weight != 0).sum())
    assert torch.equal((p.codes[0] != 0).flatten(1).sum(1), torch.full((4,), expect))
    assert p.x.shape == (4, 1, *ds[0].signal_size)


def test_noise_l2_is_exact():
    ds = [D.conv_dictionary(D.barker_filter(7), 20)]
    p = D.dsc_problem(ds, 2, batch=3, noise_l2=0.3, seed=0)
    assert torch.allclose(p.noise.flatten(1).norm(dim=1), torch.full((3,), 0.3, dtype=p.noise.dtype))
    with pytest.raises(ValueError):
        D.dsc_problem(ds, 2, noise_std=0.1, noise_l2=0.3)


def test_noise_std_is_the_standard_deviation_of_the_noise():
    """noise_std is a standard deviation, not a variance: x - clean has that spread."""
    ds = [D.conv_dictionary(D.barker_filter(7), 500)]
    p = D.dsc_problem(ds, 2, batch=8, noise_std=0.3, seed=0)
    e = (p.x - p.clean).double()
    assert abs(float(e.mean())) < 0.02
    assert math.isclose(float(e.std()), 0.3, rel_tol=0.03)


# Feasible (code_size, channels, sparsity, min_separation, distinct placements expected over 120 draws), many as
# tight as they can be: 3 entries 3 apart in 8 (greedy placement used to get stuck for 20 seeds in 50; 4 placements
# exist), the unique packings 0, 3, 6 and 0..4, every slot at min_separation 0, 4 entries 3 apart in a 5 x 5 code
# (one central entry blocks everything).
FEASIBLE = [
    ((8,), 1, 3, 3, 4),
    ((7,), 1, 3, 3, 1),
    ((10,), 2, 4, 3, 4),
    ((20,), 1, 5, 4, 10),
    ((5,), 1, 5, 1, 1),
    ((5,), 1, 4, 0, 4),
    ((3,), 2, 6, 0, 1),
    ((5, 5), 1, 4, 3, 4),
    ((6, 7), 2, 6, 3, 10),
    ((9, 9), 1, 9, 3, 10),
    ((4, 4), 3, 48, 0, 1),
]


@pytest.mark.parametrize("size,channels,sparsity,sep,distinct", FEASIBLE)
def test_sparse_codes_places_every_feasible_request(size, channels, sparsity, sep, distinct):
    placements = set()
    for seed in range(40):
        z = D.sparse_codes(3, channels, size, sparsity, amplitude=(0.5, 1.0), min_separation=sep, seed=seed)
        assert torch.equal((z != 0).flatten(1).sum(1), torch.full((3,), sparsity)), seed
        vals = z[z != 0].abs()
        assert vals.min() >= 0.5 and vals.max() <= 1.0
        for b in range(3):
            pos = torch.nonzero(z[b] != 0)[:, 1:]
            d = (pos[:, None] - pos[None]).abs().amax(-1) + max(sep, 1) * torch.eye(len(pos), dtype=torch.long)
            assert d.min() >= sep, (seed, pos.tolist())
            placements.add(tuple(torch.nonzero(z[b]).flatten().tolist()))
    assert torch.equal(z, D.sparse_codes(3, channels, size, sparsity, min_separation=sep, seed=39))
    assert len(placements) >= distinct  # random placements, not one packing


def test_sparse_codes_infeasible_and_invalid_arguments_raise():
    with pytest.raises(ValueError, match="sparsity=5.*min_separation=3.*at most 4"):
        D.sparse_codes(1, 1, (5, 5), 5, min_separation=3)
    with pytest.raises(ValueError, match="at most 6"):
        D.sparse_codes(1, 2, (3,), 7, min_separation=0)
    with pytest.raises(ValueError, match="min_separation"):
        D.sparse_codes(1, 1, (5,), 1, min_separation=-1)
    with pytest.raises(TypeError, match="sparsity"):
        D.sparse_codes(1, 1, (5,), 1.5)
    with pytest.raises(ValueError, match="code_size"):
        D.sparse_codes(1, 1, (0, 4), 1)
    with pytest.raises(ValueError, match="channels"):
        D.sparse_codes(1, 0, (5,), 1)
    with pytest.raises(ValueError, match="amplitude"):
        D.sparse_codes(1, 1, (5,), 1, amplitude=(0.5, math.inf))
    with pytest.raises(TypeError, match="dtype"):
        D.sparse_codes(1, 1, (5,), 1, dtype=torch.int64)


def test_sparse_codes_amplitudes_are_never_zero():
    # magnitudes below half the smallest float32 subnormal used to round to 0 and drop entries
    z = D.sparse_codes(8, 1, (20,), 5, amplitude=(0.0, 1e-45), seed=0, dtype=torch.float32)
    assert torch.equal((z != 0).flatten(1).sum(1), torch.full((8,), 5))
    with pytest.raises(ValueError, match="amplitude"):
        D.sparse_codes(1, 1, (20,), 5, amplitude=(0.0, 1e-50), dtype=torch.float32)


def test_dsc_problem_with_tight_default_separation():
    # Golomb layer 2 (extent 5) sets min_separation 5: 6 deepest entries in a 30-long code is the most that fit
    ds = D.dictionary_chain([D.barker_filter(13), D.golomb_filter([0, 1, 4])], 30)
    for seed in range(20):
        p = D.dsc_problem(ds, 6, batch=2, seed=seed)
        assert p.sparsity == [18, 6]
        assert torch.equal((p.codes[0] != 0).flatten(1).sum(1), torch.full((2,), 18))
    with pytest.raises(ValueError, match="sparsity=7"):
        D.dsc_problem(ds, 7)
    with pytest.raises(ValueError, match="batch"):
        D.dsc_problem(ds, 2, batch=0)
    with pytest.raises(ValueError, match="dictionaries"):
        D.dsc_problem([], 2)


def test_edge_sizes_and_argument_forms():
    """Zero 2-D DCT filters are an empty dictionary (torch.stack of none raised); a numpy or 0-d tensor int is a
    code size as a Python int is (iterating it raised a bare TypeError); a bare int for the per-layer strides is
    refused naming the argument."""
    import numpy as np

    assert D.dct_filters(0, 3, ndim=2).shape == (0, 1, 3, 3)
    assert D.dct_filters(0, 3, ndim=1).shape == (0, 1, 3)
    for size in (5, np.int64(5), torch.tensor(5)):
        codes = D.sparse_codes(2, 1, size, 1, seed=0)
        assert codes.shape == (2, 1, 5) and (codes != 0).sum(dim=(1, 2)).tolist() == [1, 1]
    with pytest.raises(TypeError, match="strides must be a list"):
        D.dictionary_chain([torch.randn(2, 1, 3, dtype=torch.float64)], 6, strides=2)


def test_real_data_loaders_are_in_the_data_module():
    # docs/design.md §3 promises dsc_kernels.data loaders of the real data that ships inside installed packages;
    # they lived in recipes.data only, so D.digits raised AttributeError
    pytest.importorskip("sklearn")
    assert {"digits", "photo", "PHOTOS"} <= set(D.__all__)
    x_train, y_train, x_test, y_test = D.digits(0)
    assert x_train.shape[1:] == (1, 8, 8) and x_train.dtype == torch.float32 and y_test.dtype == torch.int64
    assert len(x_train) + len(x_test) == 1797 and 0.0 <= float(x_train.min()) <= float(x_train.max()) <= 1.0
    assert D.photo(D.PHOTOS[0]).shape == (427, 640)
    with pytest.raises(AttributeError, match="no attribute 'load'"):
        _ = D.load


def test_dictionary_chain_refuses_a_bare_weight_and_no_layers():
    # a 2-D weight (3, 3, 3, 3) iterated as its rows: three (3, 3, 3) 1-D layers that passed every chain check
    w = D.random_filters(3, 3, (3, 3), seed=0)
    with pytest.raises(TypeError, match="weights must be a sequence"):
        D.dictionary_chain(w, 5)
    with pytest.raises(TypeError, match="weights"):
        D.dictionary_chain(5, 5)
    with pytest.raises(ValueError, match="weights must hold at least one layer"):
        D.dictionary_chain([], 5)
    assert [d.weight.shape for d in D.dictionary_chain((w,), 5)] == [w.shape]


def test_synthesize_and_barker_filter_argument_types():
    import numpy as np

    w = D.barker_filter(5)
    with pytest.raises(TypeError, match="d must be a ConvDictionary"):
        D.synthesize(torch.zeros(1, 1, 6, dtype=torch.float64), w)  # was AttributeError: no attribute 'weight'
    for length in (13.0, True):  # 13.0 was taken as 13; True was "not a Barker length"
        with pytest.raises(TypeError, match="length must be an int"):
            D.barker_filter(length)
    for length in (np.int64(13), torch.tensor(13)):  # the tensor was refused as "not a Barker length"
        assert torch.equal(D.barker_filter(length), D.barker_filter(13))
    with pytest.raises(ValueError, match="Barker codes exist"):
        D.barker_filter(6)


def test_named_filters_match_their_formulas():
    # the coherence test above is blind to the scale: a Barker or Golomb filter normalised to unit l1 norm (taps
    # 1/length, 1/marks) instead of unit l2 norm has the same mu, and the theory needs unit atoms
    for length, code in D.BARKER.items():
        b = torch.tensor(code, dtype=torch.float64)
        assert torch.allclose(D.barker_filter(length).flatten(), b / math.sqrt(length))
        assert torch.allclose(D.barker_filter(length, ndim=2)[0, 0], torch.outer(b, b) / length)
    for marks in ([0], [0, 1, 3], [0, 1, 4, 9, 11], [2, 5]):
        want = torch.zeros(max(marks) + 1, dtype=torch.float64)
        want[marks] = 1 / math.sqrt(len(marks))
        assert torch.allclose(D.golomb_filter(marks).flatten(), want)
    for size in (1, 2, 5):  # orthonormal DCT-II: sqrt((1 or 2) / N) cos(pi (n + 1/2) f / N)
        basis = torch.tensor(
            [
                [math.cos(math.pi * (n + 0.5) * f / size) * math.sqrt((1 if f == 0 else 2) / size) for n in range(size)]
                for f in range(size)
            ],
            dtype=torch.float64,
        )
        assert torch.allclose(D.dct_filters(size, size)[:, 0], basis)


def test_random_filters_follow_the_seed_and_have_unit_code_channels():
    w = D.random_filters(4, 3, (2, 5), seed=7)
    assert w.shape == (4, 3, 2, 5)
    # each code channel's whole (C_sig, *k) block is one unit atom, not each row or tap
    assert torch.allclose(w.flatten(1).norm(dim=1), torch.ones(4, dtype=torch.float64))
    assert not torch.allclose(w.norm(dim=-1), torch.ones(4, 3, 2, dtype=torch.float64))
    assert torch.equal(w, D.random_filters(4, 3, (2, 5), seed=7))
    assert not torch.equal(w, D.random_filters(4, 3, (2, 5), seed=8))
    assert not torch.equal(D.random_filters(2, 1, 6, seed=1), D.random_filters(2, 1, 6, seed=2))


def test_dictionary_chain_gives_each_layer_its_own_stride():
    # layer j's code is layer j+1's signal, with layer j's stride: (z - 1) * s + k
    ws = [torch.randn(3, 1, 4, dtype=torch.float64), torch.randn(5, 3, 3, dtype=torch.float64)]
    layer1, layer2 = D.dictionary_chain(ws, 6, strides=[2, 1])
    assert (layer2.stride, layer2.code_size, layer2.signal_size) == ((1,), (6,), (8,))
    assert (layer1.stride, layer1.code_size, layer1.signal_size) == ((2,), (8,), (18,))


@pytest.mark.parametrize("sep", [0, 1, 3])
def test_sparse_codes_signs_are_random(sep):
    # "random signs": a fair coin per entry, in the sequential sampler and in the tight-request fallback
    for sparsity in (4, 10):
        z = D.sparse_codes(40, 2, 30, sparsity, min_separation=sep, seed=5)
        values = z[z != 0]
        assert len(values) == 40 * sparsity
        assert 0.3 < float((values > 0).double().mean()) < 0.7


def test_dsc_problem_sparsity_and_amplitude_are_maxima_over_the_batch():
    # overlapping deeper atoms (min_separation 1) give Gamma_1 a support that varies from sample to sample
    chain = D.dictionary_chain([D.random_filters(3, 1, 3, seed=1), D.random_filters(4, 3, 3, seed=2)], 10)
    p = D.dsc_problem(chain, 4, batch=6, min_separation=1, seed=0)
    for j, code in enumerate(p.codes):
        counts = [sum(1 for v in code[b].flatten().tolist() if v != 0) for b in range(len(code))]
        assert p.sparsity[j] == max(counts)
        assert p.amplitude[j] == max(abs(v) for v in code.flatten().tolist())
    assert len({int((p.codes[0][b] != 0).sum()) for b in range(6)}) > 1  # else max and min would agree
