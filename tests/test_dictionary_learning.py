"""Convolutional dictionary learning on patches of scikit-learn's photographs: monotone objective, valid atoms."""

import itertools
import math

import pytest
import torch

import dsc_kernels.functional as DF
from dsc_kernels.dictionary_learning import (
    _random_crops,
    atom_grid,
    highpass,
    learn_conv_dictionary,
    low_frequency_fraction,
    photo_dictionary,
    photo_patches,
    plot_atoms,
    plot_result,
)

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
    result = learn_conv_dictionary(
        x,
        8,
        6,
        0.3,
        n_outer=12,
        n_code_iter=5,
        n_dict_iter=1,
        callback=lambda i, value: seen.append(value),
        backend="reference",
    )
    objective = result.objective
    assert seen == objective and len(objective) == 12
    assert all(b <= a * (1 + 1e-5) for a, b in itertools.pairwise(objective))  # monotone (PALM with 1/L steps)
    assert objective[-1] < 0.8 * objective[0]
    assert float(result.weight.flatten(1).norm(dim=1).max()) <= 1 + 1e-5
    assert result.codes.shape == (len(x), 8, 25, 25) and result.padding == (5, 5)
    assert 0.2 < float((result.codes == 0).float().mean()) < 1.0
    plot_atoms(result.weight, tmp_path / "atoms.png")
    assert (tmp_path / "atoms.png").stat().st_size > 0


@pytest.mark.slow
def test_photo_dictionary_learns_smooth_structured_atoms(tmp_path):
    # The recipe of the module doc (high-passed, contrast-normalised patches, lam = 2) on a small problem: the
    # objective falls at every outer iteration, and the atoms end up smoother than the patches they started from
    # and far from white noise. With lam = 0.2 (about one code per pixel) the atoms fit texture and this fails
    # (mean low-frequency fraction about 0.45).
    result = photo_dictionary(16, 8, 2.0, n_per_photo=3, size=48, n_outer=25)
    objective = result.objective
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(objective))
    assert all(b < a for a, b in itertools.pairwise(objective[:11]))  # strictly falling at the start
    assert objective[-1] < 0.9 * objective[0]
    start = _random_crops(photo_patches(3, 48), 16, (8, 8), torch.Generator().manual_seed(0))
    noise = torch.randn(1000, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    learned, started, white = (float(low_frequency_fraction(w).mean()) for w in (result.weight, start, noise))
    assert white < 0.25 and learned > 0.6 and learned > started + 0.1, (learned, started, white)
    assert 0.9 < float((result.codes == 0).float().mean()) < 1.0  # sparse, yet every patch is coded
    plot_result(result, tmp_path / "cdl.png", title="test")
    assert (tmp_path / "cdl.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "channels, kernel, signal, padding",
    [(1, (4, 4), (9, 9), (3, 3)), (1, (4, 4), (9, 9), (0, 0)), (2, (3, 2), (7, 8), (1, 1)), (3, (5,), (16,), (4,))],
)
def test_the_code_step_bounds_the_dictionary_norm_from_above(channels, kernel, signal, padding):
    """The code step is 1/bound: a warm-started power iteration, which approaches ||D||^2 from below, ran up to 10%
    low after large dictionary updates. The bound must be at or above the norm of the explicit dense dictionary."""
    from dsc_kernels.dictionary_learning import _dictionary_lipschitz
    from dsc_kernels.reference.conv import code_size

    w = torch.randn(5, channels, *kernel, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    codes = code_size(signal, kernel, (1,) * len(kernel), padding)
    n = 5 * math.prod(codes)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 5, *codes)
    dense = DF.conv_synthesis(basis, w, padding=padding, signal_size=signal).reshape(n, -1)
    norm = float(torch.linalg.matrix_norm(dense, ord=2)) ** 2
    bound = _dictionary_lipschitz(w, codes)
    assert norm * (1 - 1e-12) <= bound <= 1.2 * norm


def test_low_frequency_fraction_tells_smooth_from_noise():
    ramp = torch.linspace(-1, 1, 8)
    edge = ramp[None, :].expand(8, 8).reshape(1, 1, 8, 8)
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None]) % 2 * 2 - 1).float().reshape(1, 1, 8, 8)
    assert float(low_frequency_fraction(edge)) > 0.8 and float(low_frequency_fraction(checker)) == 0.0


def test_bad_arguments():
    x = torch.randn(2, 1, 12, 12)
    with pytest.raises(ValueError, match="lam"):
        learn_conv_dictionary(x, 4, 3, 0.0)
    with pytest.raises(ValueError, match="n_outer"):
        learn_conv_dictionary(x, 4, 3, 0.1, n_outer=0)
    with pytest.raises(TypeError, match="callback"):  # was raised by the call after a whole outer iteration
        learn_conv_dictionary(x, 4, 3, 0.1, callback="print")
    with pytest.raises(ValueError, match="init"):
        learn_conv_dictionary(x, 4, 3, 0.1, init=torch.randn(4, 1, 5, 5))


def test_degenerate_inputs_raise_naming_the_argument():
    x = torch.randn(2, 1, 12, 12)
    for init in (torch.zeros(4, 1, 3, 3), torch.cat([torch.randn(3, 1, 3, 3), torch.zeros(1, 1, 3, 3)])):
        with pytest.raises(ValueError, match="init"):  # used to be ZeroDivisionError (all zero) or a dead atom
            learn_conv_dictionary(x, 4, 3, 0.1, n_outer=1, init=init)
    # non-zero atoms whose float32 squared norms underflow are not called zero: the error says to rescale
    with pytest.raises(ValueError, match="rescale init"):
        learn_conv_dictionary(x, 4, 3, 0.1, n_outer=1, init=1e-25 * torch.randn(4, 1, 3, 3))
    with pytest.raises(ValueError, match="kernel_size"):
        learn_conv_dictionary(x, 4, 13, 0.1, n_outer=1)
    with pytest.raises(ValueError, match="kernel_size"):
        learn_conv_dictionary(torch.randn(2, 1, 5), 4, (6,), 0.1, n_outer=1)
    with pytest.raises(ValueError, match="x must"):
        learn_conv_dictionary(x[:0], 4, 3, 0.1, n_outer=1)
    with pytest.raises(ValueError, match="padding"):
        learn_conv_dictionary(x, 4, 3, 0.1, n_outer=1, padding=-1)
    result = learn_conv_dictionary(x, 4, (12, 3), 0.1, n_outer=1, backend="reference")  # k = S is fine
    assert result.codes.shape == (2, 4, 23, 14)


def test_meta_signals_and_init_raise_naming_them():
    # both raised RuntimeError("Tensor.item() cannot be called on meta tensors") from the finiteness checks
    with pytest.raises(ValueError, match="x is a meta tensor"):
        learn_conv_dictionary(torch.randn(2, 1, 8, device="meta"), 2, 3, 0.1, n_outer=1)
    with pytest.raises(ValueError, match="init is a meta tensor"):
        learn_conv_dictionary(torch.randn(2, 1, 8), 2, 3, 0.1, n_outer=1, init=torch.randn(2, 1, 3, device="meta"))


def test_atom_helpers_on_degenerate_shapes():
    # no atoms: an MKL "Inconsistent configuration parameters" RuntimeError; no channels or an empty kernel: IndexError
    assert low_frequency_fraction(torch.randn(0, 1, 3, 3)).shape == (0,)
    assert low_frequency_fraction(torch.randn(2, 0, 3, 3)).tolist() == [0.0, 0.0]  # no non-DC energy
    for shape in ((2, 1, 3, 0), (2, 1, 0, 3)):
        with pytest.raises(ValueError, match="kh, kw >= 1"):
            low_frequency_fraction(torch.randn(shape))
        with pytest.raises(ValueError, match="kh, kw >= 1"):  # was a RuntimeError from max() of an empty atom
            atom_grid(torch.randn(shape))
    with pytest.raises(ValueError, match="meta"):
        low_frequency_fraction(torch.randn(2, 1, 3, 3, device="meta"))


def test_highpass_needs_an_odd_box_that_fits():
    images = torch.randn(2, 1, 10, 10)
    detail, smooth = highpass(images, 5)
    assert detail.shape == smooth.shape == images.shape and torch.allclose(detail + smooth, images)
    for size in (4, 0, 21):  # even: shape mismatch before; 21: reflect padding wider than the image
        with pytest.raises(ValueError, match="size"):
            highpass(images, size)
    with pytest.raises(ValueError, match="highpass_size"):
        photo_patches(1, 16, highpass_size=8)
    with pytest.raises(ValueError, match="highpass_size 9 needs crops larger than 4 pixels, got size 4"):
        photo_patches(1, 4)  # named the blur's 9 as the size
    with pytest.raises(ValueError, match="size must be >= 2"):
        photo_patches(2, 1, highpass_size=1)  # a 1 x 1 crop has no variance: NaN patches
    with pytest.raises(ValueError, match="downsample"):
        photo_patches(1, 8, downsample=1000)  # avg_pool2d's own error about a 0 x 0 output


def test_low_frequency_fraction_does_not_depend_on_the_atoms_scale():
    """It was computed in float32 with a 1e-30 floor: ~1e-7 for atoms at 1e-20, NaN at 1e20 (the power overflowed)."""
    w = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = low_frequency_fraction(w)
    for scale in (1e-20, 1e20, 1e-300, 1e300):
        torch.testing.assert_close(low_frequency_fraction(w * scale), want, rtol=1e-5, atol=0)
    spectrum = torch.fft.fft2(w - w.mean(dim=(2, 3), keepdim=True)).abs().pow(2).sum(dim=1)
    fy, fx = (torch.fft.fftfreq(8, dtype=torch.float64) for _ in range(2))
    low = (fy[:, None] ** 2 + fx[None] ** 2).sqrt() <= 0.25
    torch.testing.assert_close(want, ((spectrum * low).sum((1, 2)) / spectrum.sum((1, 2))).float())
    w[1, 0, 2, 3], w[2, 0, 0, 0] = math.nan, math.inf  # a diverged atom is NaN, not the 0 of an atom without detail
    assert low_frequency_fraction(w)[1:].isnan().all() and low_frequency_fraction(w)[0] == want[0]


@pytest.mark.parametrize(
    "dtype, scales", [(torch.float32, [1e-25, 1e-10, 1e15]), (torch.float64, [1e-200, 1e-165, 1e150])]
)
def test_learning_is_homogeneous_at_any_magnitude(dtype, scales):
    """learn(c x, c lam) = (D, c Z): the atoms' steps squared the codes in their dtype (|FFT(z)|^2), so float32
    signals of 1e-25 (float64 1e-165) gave bounds of 0 and no atom ever moved (atoms 0.11 off), silently."""
    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = learn_conv_dictionary(x, 4, 3, 0.1, n_outer=3)
    for scale in scales:
        result = learn_conv_dictionary((x * scale).to(dtype), 4, 3, 0.1 * scale, n_outer=3)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(result.weight.double(), base.weight, rtol=0, atol=tol, msg=str(scale))
        torch.testing.assert_close(result.codes.double() / scale, base.codes, rtol=0, atol=tol, msg=str(scale))


@pytest.mark.parametrize("scale", [1e-25, 1e25])
def test_reported_objective_is_homogeneous_for_float32_signals(scale):
    """objective(c x, c lam) = c^2 objective(x, lam) wherever a Python float holds it: it was formed in x's dtype,
    and float32 signals of 1e-25 (1e25) reported 0.0 (inf) at every iteration, with atoms and codes right."""
    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = learn_conv_dictionary(x, 4, 3, 0.1, n_outer=2)
    result = learn_conv_dictionary((x * scale).float(), 4, 3, 0.1 * scale, n_outer=2)
    torch.testing.assert_close(
        torch.tensor(result.objective, dtype=torch.float64) / scale**2,
        torch.tensor(base.objective, dtype=torch.float64),
        rtol=1e-5,
        atol=0,
    )


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e20), (torch.float32, 3e37), (torch.float64, 1e200)])
def test_huge_init_atoms_are_projected_onto_the_unit_sphere(dtype, scale):
    """The projection's norm overflowed (squares of the taps): huge init atoms became 0 and learning raised that
    ||D||^2 = 0, though their unit-norm projections are ordinary atoms."""
    init = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=dtype)
    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(1), dtype=dtype)
    want = learn_conv_dictionary(x, 4, 3, 0.1, n_outer=2, init=init / init.flatten(1).norm(dim=1)[:, None, None, None])
    result = learn_conv_dictionary(x, 4, 3, 0.1, n_outer=2, init=init * scale)
    torch.testing.assert_close(result.weight, want.weight)


@pytest.mark.parametrize("scale", [1e40, 1e300])
def test_huge_float64_init_is_projected_before_the_cast_to_float32(scale):
    """A float64 init atom beyond float32's range was cast to x's float32 first (inf), projected to NaN, and
    learning raised '||D||^2 = nan gives no ISTA step'."""
    init = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    want = learn_conv_dictionary(x, 4, 3, 0.1, n_outer=2, init=init / init.flatten(1).norm(dim=1)[:, None, None, None])
    result = learn_conv_dictionary(x, 4, 3, 0.1, n_outer=2, init=init * scale)
    assert result.weight.dtype == torch.float32
    torch.testing.assert_close(result.weight, want.weight)


def _synthesis_norm2(weight, code_size, padding):
    """||D||^2 of z -> conv_transpose(z, weight) by power iteration with its adjoint (a lower bound)."""
    w = weight.double()
    z = torch.randn(1, w.shape[0], *code_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for _ in range(200):
        z = torch.nn.functional.conv2d(torch.nn.functional.conv_transpose2d(z, w, padding=padding), w, padding=padding)
        z = z / z.norm()
    return float(torch.nn.functional.conv_transpose2d(z, w, padding=padding).norm() ** 2)


def test_every_code_step_is_at_most_one_over_the_current_dictionary_norm(monkeypatch):
    """ISTA on the codes needs step <= 1/||D||^2 of the dictionary it codes with. Atoms inside the ball grow by
    orders of magnitude in the first dictionary sweep (here ||D||^2 from 0.03 to about 5), so a step kept from an
    earlier dictionary is far too long."""
    g = torch.Generator().manual_seed(0)
    x, _ = highpass(torch.randn(3, 1, 16, 16, generator=g, dtype=torch.float64), 3)
    init = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    init = 0.05 * init / init.flatten(1).norm(dim=1)[:, None, None, None]
    calls, conv_ista = [], DF.conv_ista

    def spy(signal, weight, lam, **kwargs):
        calls.append((kwargs["step"], _synthesis_norm2(weight, kwargs["z0"].shape[2:], kwargs["padding"])))
        return conv_ista(signal, weight, lam, **kwargs)

    monkeypatch.setattr(DF, "conv_ista", spy)
    result = learn_conv_dictionary(x, 6, 4, 0.1, n_outer=4, init=init)
    assert len(calls) == 4
    for step, norm2 in calls:
        assert step * norm2 <= 1 + 1e-9
    assert all(b <= a for a, b in zip(result.objective, result.objective[1:]))


def test_atoms_spanning_several_signal_channels_stay_in_the_unit_ball():
    """An atom's norm is over all its signal channels: one whose first channel alone is inside the ball but whose
    whole (C_sig, k, k) block is not must be projected."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 12, 12, generator=g, dtype=torch.float64)
    init = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    init[:, 0] *= 0.01
    init[:, 1] *= 5
    result = learn_conv_dictionary(x, 4, 3, 0.1, n_outer=2, init=init)
    norms = result.weight.reshape(4, -1).pow(2).sum(dim=1).sqrt()
    assert (norms <= 1 + 1e-9).all(), norms


def test_reported_objective_is_the_lasso_value_per_signal():
    """objective[-1] is sum_i 0.5 ||x_i - D z_i||^2 + lam ||z_i||_1 over B, for the returned atoms and codes."""
    x = torch.randn(3, 1, 10, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lam = 0.2
    result = learn_conv_dictionary(x, 4, 3, lam, n_outer=2, padding=1)
    recon = torch.nn.functional.conv_transpose2d(result.codes, result.weight, padding=1)
    value = (0.5 * (x - recon).pow(2).sum() + lam * result.codes.abs().sum()) / len(x)
    assert math.isclose(result.objective[-1], float(value), rel_tol=1e-9)


def test_seed_picks_the_initial_atoms():
    """Without init the atoms start from random crops drawn with ``seed``: the same seed learns the same atoms,
    another seed other ones."""
    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    runs = [learn_conv_dictionary(x, 4, 3, 0.1, n_outer=1, seed=seed).weight for seed in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def test_photo_patches_have_unit_pixel_variance_each():
    """Contrast normalisation is per crop: every patch, not the batch as a whole, has unit pixel variance."""
    x = photo_patches(3, 16, seed=0)
    assert x.shape == (6, 1, 16, 16)
    std = x.double().flatten(1).var(dim=1).sqrt()
    torch.testing.assert_close(std, torch.ones_like(std), rtol=1e-4, atol=0)


def test_init_atoms_that_underflow_in_the_signals_dtype_raise():
    """A float64 init atom of 1e-50 is not zero, so it passed the zero-atom check, then became 0 in float32 x: a
    dead atom that never moved (zero codes, zero gradient), with no error."""
    init = torch.randn(2, 1, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    init[1] *= 1e-50
    x = torch.randn(2, 1, 10, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"init atoms \[1\] underflow"):
        learn_conv_dictionary(x, 2, 3, 0.1, n_outer=1, init=init)
    learn_conv_dictionary(x.double(), 2, 3, 0.1, n_outer=1, init=init)  # fits float64: a tiny atom, accepted


@pytest.fixture
def no_training(monkeypatch):
    """The command line with photo_dictionary replaced: a tiny result at once, or an AssertionError for a run that
    should have been refused before training."""
    from dsc_kernels import dictionary_learning as DL

    def tiny(n_outer, seed, backend, callback):
        callback(0, 1.0)
        return DL.CDLResult(torch.randn(4, 1, 3, 3), torch.zeros(1, 4, 6, 6), (1, 1), [1.0])

    monkeypatch.setattr(DL, "photo_dictionary", tiny)
    for name in ("TRITON_INTERPRET", "DSC_KERNELS_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    return DL


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--outer", "0"], "--outer"),
        (["--threads", "0"], "--threads"),
        (["--seed", "-5"], "--seed"),  # train's range
        (["--backend", "bogus"], "--backend"),
        (["--backend", "triton"], "--backend"),  # CPU tensors without the interpreter
        (["--out", "missing/dir/a.png"], "--out"),
        (["--out", "x.txt"], "--out"),
        (["--out", "folder"], "--out"),  # an existing folder: it wrote folder.png
        (["--out", "/proc/cdl.png"], "--out"),  # no file can be written there, even as root
        (["--out", "."], "--out"),  # a traceback: Path('.') has no name to add .png to
        (["--out", ""], "--out"),
        (["--out", "a.png/"], "--out"),  # wrote a.png.png: Path drops the trailing slash
        (["--out", "newdir/."], "--out"),  # wrote newdir.png
    ],
)
def test_cli_rejects_bad_arguments_before_training(argv, option, no_training, tmp_path, monkeypatch, capsys):
    (tmp_path / "folder").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(no_training, "photo_dictionary", lambda **kwargs: pytest.fail("trained"))
    with pytest.raises(SystemExit) as excinfo:
        no_training.main(argv)
    err = capsys.readouterr().err
    assert excinfo.value.code == 2 and f"argument {option}:" in err and "usage:" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_cli_help_describes_every_option(capsys):
    from dsc_kernels import dictionary_learning as DL

    with pytest.raises(SystemExit):
        DL.main(["--help"])
    out = capsys.readouterr().out
    assert "seed of the patches" in out and "conv-ISTA backend" in out and "torch CPU threads" in out


def test_cli_says_where_the_figure_went_and_adds_png_to_a_bare_name(no_training, tmp_path, capsys):
    for out, written in (("atoms", "atoms.png"), ("atoms.pdf", "atoms.pdf")):
        no_training.main(["--out", str(tmp_path / out), "--outer", "1"])
        assert (tmp_path / written).stat().st_size > 0
        assert f"wrote {tmp_path / written}" in capsys.readouterr().out
