"""Convolutional dictionary learning on patches of scikit-learn's photographs: monotone objective, valid atoms."""
import pytest
import torch

from dsc_kernels.dictionary_learning import highpass, learn_conv_dictionary, plot_atoms

pytest.importorskip("sklearn")


def _patches(n: int = 4, size: int = 20):
    from dsc_kernels.recipes import data
    generator = torch.Generator().manual_seed(0)
    x = torch.cat([data.random_patches(data.photo(p), n, size, generator) for p in data.PHOTOS])
    detail, _ = highpass(x)
    return detail / detail.std()


def test_objective_decreases_steadily_and_atoms_stay_in_the_unit_ball(tmp_path):
    x = _patches()
    seen = []
    result = learn_conv_dictionary(x, 8, 6, 0.3, n_outer=12, n_code_iter=5, n_dict_iter=3,
                                   callback=lambda i, value: seen.append(value), backend="reference")
    objective = result.objective
    assert seen == objective and len(objective) == 12
    assert all(b <= a * (1 + 1e-5) for a, b in zip(objective, objective[1:]))  # monotone (PALM with 1/L steps)
    assert objective[-1] < 0.8 * objective[0]
    assert float(result.weight.flatten(1).norm(dim=1).max()) <= 1 + 1e-5
    assert result.codes.shape == (len(x), 8, 25, 25) and result.padding == (5, 5)
    assert 0.2 < float((result.codes == 0).float().mean()) < 1.0
    plot_atoms(result.weight, tmp_path / "atoms.png")
    assert (tmp_path / "atoms.png").stat().st_size > 0


def test_bad_arguments():
    x = torch.randn(2, 1, 12, 12)
    with pytest.raises(ValueError, match="lam"):
        learn_conv_dictionary(x, 4, 3, 0.0)
    with pytest.raises(ValueError, match="n_outer"):
        learn_conv_dictionary(x, 4, 3, 0.1, n_outer=0)
    with pytest.raises(ValueError, match="init"):
        learn_conv_dictionary(x, 4, 3, 0.1, init=torch.randn(4, 1, 5, 5))
