"""The layers' Lipschitz estimate (dsc_kernels/reference/spectrum.py) against the periodic operator written out as a
dense matrix in numpy, and the tracked step of a layer whose dictionary an optimiser moves fast."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dsc_kernels.dictionary_learning import _dictionary_lipschitz
from dsc_kernels.nn import ConvSparseCoding1d, ConvSparseCoding2d
from dsc_kernels.reference import spectrum


def _dense_periodic(weight: torch.Tensor, stride, grid) -> np.ndarray:
    """The synthesis on the periodic grid as a matrix: code (c, i) adds W[c, :, t] at signal (s i + t) mod (s M)."""
    w = weight.numpy()
    c_code, c_sig, kernel = w.shape[0], w.shape[1], w.shape[2:]
    periods = [s * m for s, m in zip(stride, grid)]
    columns = []
    for c in range(c_code):
        for i in itertools.product(*map(range, grid)):
            x = np.zeros((c_sig, *periods))
            for t in itertools.product(*map(range, kernel)):
                at = tuple((s * a + b) % n for s, a, b, n in zip(stride, i, t, periods))
                x[(slice(None), *at)] += w[(c, slice(None), *t)]
            columns.append(x.ravel())
    return np.stack(columns, 1)


GEOMETRIES = [  # (C_code, C_sig, kernel, stride, grid): multi-channel, strided, k < s, odd and even grids
    (4, 2, (3,), (1,), (5,)),
    (3, 3, (3,), (2,), (4,)),
    (2, 1, (1,), (3,), (3,)),
    (3, 1, (4,), (3,), (6,)),
    (3, 3, (2, 4), (3, 1), (3, 6)),
    (1, 3, (3, 3), (1, 2), (5, 3)),
    (2, 1, (2, 2), (3, 3), (2, 5)),
]


@pytest.mark.parametrize("c_code, c_sig, kernel, stride, grid", GEOMETRIES)
def test_norm_is_the_periodic_operators(c_code, c_sig, kernel, stride, grid):
    torch.manual_seed(0)
    weight = torch.randn(c_code, c_sig, *kernel, dtype=torch.float64)
    dense = _dense_periodic(weight, stride, grid)
    u = torch.randn(1, c_code, *grid, dtype=torch.float64)
    x = spectrum.periodic_synthesis(u, weight, stride)
    np.testing.assert_allclose(x.numpy().ravel(), dense @ u.numpy().ravel(), atol=1e-12)
    r = torch.randn_like(x)
    np.testing.assert_allclose(
        spectrum.periodic_analysis(r, weight, stride).numpy().ravel(), dense.T @ r.numpy().ravel(), atol=1e-12
    )
    lipschitz, _ = spectrum.dictionary_norm_sq(weight, stride, u, 300)
    assert float(lipschitz) == pytest.approx(np.linalg.norm(dense, 2) ** 2, rel=1e-9)


@pytest.mark.parametrize("weight_shape", [(5, 1, 4, 3), (1, 4, 3, 3), (6, 1, 7)])
def test_rank_one_frequencies_are_exact_after_one_step(weight_shape):
    """One signal channel at stride 1 (or one atom): each frequency's matrix is a single row, and the estimate
    |G u|^2 / <u, G u> is its squared norm from any start, which is what keeps a fast-learned CSC dictionary's
    step right with a single iteration per forward."""
    torch.manual_seed(1)
    weight = torch.randn(weight_shape, dtype=torch.float64)
    stride = (1,) * (weight.dim() - 2)
    grid = (6,) * (weight.dim() - 2)
    exact = np.linalg.norm(_dense_periodic(weight, stride, grid), 2) ** 2
    lipschitz, _ = spectrum.dictionary_norm_sq(weight, stride, torch.randn(1, weight.shape[0], *grid).double(), 1)
    assert float(lipschitz) == pytest.approx(exact, rel=1e-12)


def test_a_zero_or_nan_dictionary_does_not_break_the_iteration_for_later():
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    vector = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    zero, after_zero = spectrum.dictionary_norm_sq(torch.zeros_like(weight), (1, 1), vector, 5)
    nan, after_nan = spectrum.dictionary_norm_sq(torch.full_like(weight, float("nan")), (1, 1), vector, 5)
    assert float(zero) == 0 and torch.isnan(nan)
    expected, _ = spectrum.dictionary_norm_sq(weight, (1, 1), vector, 300)
    for resumed in (after_zero, after_nan, torch.zeros_like(vector)):
        assert torch.isfinite(resumed).all()
        lipschitz, _ = spectrum.dictionary_norm_sq(weight, (1, 1), resumed, 300)
        assert float(lipschitz) == pytest.approx(float(expected), rel=1e-9)


@pytest.mark.parametrize("kernel", [3, 7, 11])
def test_grid_is_within_one_percent_below_the_infinite_signal_norm(kernel):
    torch.manual_seed(2)
    weight = torch.randn(16, 3, kernel, kernel, dtype=torch.float64)
    grid = spectrum.periodic_grid((kernel, kernel), (1, 1))
    lipschitz, _ = spectrum.dictionary_norm_sq(weight, (1, 1), torch.randn(1, 16, *grid).double(), 300)
    infinite = _dictionary_lipschitz(weight, (24 * kernel, 24 * kernel))  # an FFT + SVD bound on a fine grid
    assert 0.99 * infinite <= float(lipschitz) <= infinite * (1 + 1e-9)


@pytest.mark.parametrize(
    "layer_args, worst",
    [
        ((ConvSparseCoding2d, 1, 16, 5), 1.01),
        ((ConvSparseCoding2d, 4, 8, 3), 1.2),
        ((ConvSparseCoding1d, 1, 8, 9), 1.01),
    ],
)
def test_tracked_step_keeps_up_with_adam_on_the_dictionary(layer_args, worst):
    """Adam at lr 0.1 grows and reshapes the atoms every step. Plain power iteration on the spatial operator (two
    warm steps per forward) let step * L reach 1.9 at lr 0.01 and 4.3 at lr 0.3, near or past ISTA's divergence
    at 2. The per-frequency iteration keeps a one-channel dictionary exact and a multi-channel one close."""
    torch.manual_seed(0)
    cls, c_sig, c_code, k = layer_args
    layer = cls(c_sig, c_code, k, n_iter=5, lam=0.05, backend="reference")
    optimiser = torch.optim.Adam([layer.weight], lr=0.1)
    size = (24,) * (layer.weight.dim() - 2)
    ratios = []
    for _ in range(12):
        x = torch.randn(4, c_sig, *size)
        z = layer(x)
        weight = layer.weight.detach()
        ratios.append(float(layer.step) * _dictionary_lipschitz(weight, [24 * k] * (weight.dim() - 2)))
        loss = (layer.decode(z, size) - x).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert max(ratios) <= worst and min(ratios) >= 0.99


@pytest.mark.parametrize("n_steps", [3, 8], ids=["unrolled", "loop"])
def test_compiled_dft_path_matches_the_fft(n_steps):
    """Under torch.compile the DFTs are real matmuls (inductor has no complex code generation), and more than three
    fixed iterations run as a torch.while_loop: same numbers."""
    torch._dynamo.reset()
    torch.manual_seed(3)
    weight = torch.randn(5, 3, 3, 2, dtype=torch.float64)
    vector = torch.randn(1, 5, 6, 9, dtype=torch.float64)
    eager = spectrum.dictionary_norm_sq(weight, (2, 1), vector, n_steps)
    compiled = torch.compile(spectrum.dictionary_norm_sq, fullgraph=True, backend="aot_eager")
    for a, b in zip(eager, compiled(weight, (2, 1), vector, n_steps)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c_sig", [1, 2], ids=["rank-one", "iterated"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_swapping_atoms_with_a_zero_one_keeps_the_step(c_sig, training):
    """With one atom zero, every frequency's vector had no component on it; swap the atoms and D^T D u was 0 at
    every frequency, so L read 0 and the step 1 (ISTA diverged), forward after forward."""
    torch.manual_seed(0)
    layer = ConvSparseCoding1d(c_sig, 2, 7, n_iter=30, lam=0.01).train(training)
    atom = torch.randn(c_sig, 7)
    atom = 2 * atom / atom.norm()
    x = torch.randn(4, c_sig, 64)
    for order in ([atom, torch.zeros_like(atom)], [torch.zeros_like(atom), atom]):
        with torch.no_grad():
            layer.weight.copy_(torch.stack(order))
        for _ in range(2 if training else 1):  # warm training forwards need a second one for several channels
            z = layer(x)
        exact = _dictionary_lipschitz(layer.weight.detach().double(), [1024])
        assert float(layer.step) * exact == pytest.approx(1.0, abs=0.02) and torch.isfinite(z).all()


def test_a_half_precision_layer_beyond_float16s_range_keeps_its_step():
    """L above 65504 overflowed to inf when cast to half before being inverted: step 0, all-zero codes."""
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=5, lam=0.0)
    with torch.no_grad():
        layer.weight.mul_(200.0)
    expected = float(layer.refresh_step_())
    layer.half()
    assert float(layer.refresh_step_()) == pytest.approx(expected, rel=2e-3)


@pytest.mark.parametrize(
    "dtype, scales",
    [(torch.float32, [1e-15, 1e-12, 1e9, 1e15]), (torch.float64, [1e-100, 1e-60, 1e77, 1e100])],
)
@pytest.mark.parametrize("c_sig", [1, 2])
def test_tracked_step_scales_with_the_dictionary_at_any_magnitude(dtype, scales, c_sig):
    """1/L is homogeneous of degree -2 in the dictionary. The per-frequency iteration squared images of size ~ L
    (tap^4): with two signal channels float32 taps of 1e-15 gave L = 0 and the zero dictionary's step 1 (codes
    silently wrong), taps of 1e9 gave L = inf and a step 0 that the forward refused, though L itself (1e-28, 1e19)
    is well inside float32's range; float64 the same from 1e-100 and 1e77."""
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(c_sig, 3, 3, n_iter=3, dtype=dtype).eval()
    reference = float(layer.refresh_step_())
    weight = layer.weight.detach().clone()
    x = torch.randn(1, c_sig, 8, 8, dtype=dtype)
    for scale in scales:
        with torch.no_grad():
            layer.weight.copy_(weight * scale)
        layer(x * scale)
        rel = 1e-3 if dtype == torch.float32 else 1e-9
        assert float(layer.step) * scale**2 == pytest.approx(reference, rel=rel), scale


def test_a_nonzero_dictionary_whose_l_underflows_has_no_step():
    """L below float32's range (taps ~1e-23) has no 1/L there: the forward refuses it, as functional's default step
    does, instead of running with the zero dictionary's step 1; the zero dictionary keeps step 1."""
    layer = ConvSparseCoding2d(2, 3, 3, n_iter=3).eval()
    with torch.no_grad():
        layer.weight.mul_(1e-23 / layer.weight.abs().max())
    with pytest.raises(ValueError, match="tracked step 1/L of weight is inf: .* nearly zero dictionary"):
        layer(torch.randn(1, 2, 8, 8))
    with torch.no_grad():
        layer.weight.zero_()
    assert float(layer(torch.randn(1, 2, 8, 8)).detach().abs().sum()) == 0 and float(layer.step) == 1.0


def test_a_module_pickled_with_a_code_sized_vector_moves_to_the_grid():
    """Modules saved whole before the per-frequency estimate carry a code-sized vector (the old probe's), whose
    shape set the grid: their estimates read up to 2% low for good."""
    import pickle

    torch.manual_seed(0)
    layer = ConvSparseCoding2d(3, 8, 7, n_iter=5)
    step = layer.step.clone()
    state = layer.__getstate__()
    state["_buffers"] = {**state["_buffers"], "_power_vector": torch.zeros(1, 8, 32, 32)}  # what 85783e6 pickled
    old = ConvSparseCoding2d.__new__(ConvSparseCoding2d)
    old.__setstate__(state)
    loaded = pickle.loads(pickle.dumps(old))
    assert loaded._power_vector.shape == layer._power_vector.shape and torch.equal(loaded.step, step)
    assert float(loaded.refresh_step_()) == pytest.approx(float(layer.refresh_step_()), rel=1e-4)


def _changed_layer():
    """A layer whose dictionary just moved far from the one its power vector was estimated on, and an input."""
    torch.manual_seed(5)
    layer = ConvSparseCoding2d(16, 32, 3, n_iter=2, lam=0.05, backend="reference")
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight))  # the old vector is far from the new top eigenvectors
    return layer, torch.randn(2, 16, 12, 12), _dictionary_lipschitz(layer.weight.detach(), (72, 72))


def test_more_warm_iterations_per_forward_track_a_changed_dictionary_closer(monkeypatch):
    """POWER_STEPS_PER_FORWARD, the documented knob (docs/training.md), with the CPU's adaptive continuation capped
    at it: one training forward after a large change of the dictionary leaves step * L closer to 1 with more
    iterations (from above: L is approached from below), and none leaves it below 0.99 (the grid never
    overestimates L)."""
    import copy

    import dsc_kernels.nn.sparse_coding as sparse_coding

    layer, x, lipschitz = _changed_layer()
    ratios = {}
    for n in (1, 3, 10):
        monkeypatch.setattr(sparse_coding, "POWER_STEPS_PER_FORWARD", n)
        monkeypatch.setattr(sparse_coding, "POWER_STEPS_MAX_PER_FORWARD", n)
        trained = copy.deepcopy(layer).train()
        trained(x)
        ratios[n] = float(trained.step) * lipschitz
    assert ratios[1] > ratios[3] > ratios[10] >= 0.99, ratios


def test_cpu_training_forwards_iterate_until_the_estimate_settles(monkeypatch):
    """On the CPU a training forward goes past the three warm iterations while the estimate still rises by more
    than POWER_TOLERANCE: after a large change it ends within 1% of L (three alone: 1.08), and once the vector has
    settled, a small change costs just the three."""
    import dsc_kernels.nn.sparse_coding as sparse_coding

    calls = []
    synthesis = spectrum.periodic_synthesis
    monkeypatch.setattr(spectrum, "periodic_synthesis", lambda *a: calls.append(1) or synthesis(*a))
    layer, x, lipschitz = _changed_layer()
    calls.clear()  # the construction's cold estimate
    layer.train()(x)
    assert 1 <= float(layer.step) * lipschitz <= 1.01
    assert sparse_coding.POWER_STEPS_PER_FORWARD < len(calls) <= sparse_coding.POWER_STEPS_MAX_PER_FORWARD
    for _ in range(3):  # a few small optimiser-like steps, each followed by a training forward
        with torch.no_grad():
            layer.weight.mul_(1 + 1e-6)
        calls.clear()
        layer(x)
    assert len(calls) == sparse_coding.POWER_STEPS_PER_FORWARD


def test_step_tracking_script_answers_help_without_measuring(monkeypatch, capsys):
    # `python bench/step_tracking.py --help` used to ignore its arguments and start minutes of training
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "step_tracking.py"
    spec = importlib.util.spec_from_file_location("step_tracking", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def measured(*args, **kwargs):
        raise AssertionError("--help started the measurement")

    monkeypatch.setattr(script, "worst_step_times_lipschitz", measured)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--bogus"])
    assert exit_info.value.code == 2
