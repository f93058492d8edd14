"""What a user of the drop-in layers hit while fuzzing them: arguments checked by name at construction, inputs of the
wrong rank, half precision, state-dict loads (partial, onto meta modules, learned steps below the floor)."""

import copy

import numpy as np
import pytest
import torch

import dsc_kernels.functional as DF
from dsc_kernels.nn import (
    ConvSparseCoding1d,
    ConvSparseCoding2d,
    DeepSparseCoding2d,
    MultiLayerSparseCoding2d,
    SoftThreshold,
    SparseCodingTransformerBlock,
)


# ------------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize(
    "name", ["nonneg", "fista", "relative", "recompute", "untied", "learn_lam", "learn_step", "learn_threshold"]
)
def test_conv_sparse_coding_flags_must_be_bools(name):
    # learn_step="no" used to learn the step, relative=None to switch it off: any truthy value was taken
    options = {"threshold": 0.1} if name == "learn_threshold" else {}
    with pytest.raises(TypeError, match=name):
        ConvSparseCoding2d(2, 3, 3, n_iter=2, **options, **{name: "no"})


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: SoftThreshold(0.1, nonneg=1), "nonneg"),
        (lambda: SoftThreshold(0.1, learnable="yes"), "learnable"),
        (lambda: DeepSparseCoding2d([1, 2, 3], 3, relative=0), "relative"),
        (lambda: DeepSparseCoding2d([1, 2, 3], 3, nonneg="no"), "nonneg"),
    ],
)
def test_other_layers_flags_must_be_bools(make, name):
    with pytest.raises(TypeError, match=name):
        make()


LAYERS_WITH_N_ITER = {
    "ConvSparseCoding2d": lambda n_iter: ConvSparseCoding2d(2, 3, 3, n_iter=n_iter, backend="reference"),
    "DeepSparseCoding2d": lambda n_iter: DeepSparseCoding2d([1, 2, 3], 3, n_iter=n_iter, backend="reference"),
    "MultiLayerSparseCoding2d": lambda n_iter: MultiLayerSparseCoding2d([1, 2], 3, n_iter=n_iter),
    "SparseCodingTransformerBlock": lambda n_iter: SparseCodingTransformerBlock(8, 2, n_iter=n_iter),
}


@pytest.mark.parametrize("make", LAYERS_WITH_N_ITER.values(), ids=LAYERS_WITH_N_ITER.keys())
def test_n_iter_takes_numpy_and_0d_tensor_integers_as_a_plain_int(make):
    for n_iter in (np.int64(2), torch.tensor(2)):
        module = make(n_iter)
        for layer in getattr(module, "layers", [module]):  # a deep stack hands n_iter to each of its layers
            assert type(layer.n_iter) is int and layer.n_iter == 2


@pytest.mark.parametrize("make", LAYERS_WITH_N_ITER.values(), ids=LAYERS_WITH_N_ITER.keys())
@pytest.mark.parametrize("n_iter", [2.0, True, torch.tensor(2.0), "2"], ids=repr)
def test_n_iter_of_a_non_integer_type_is_a_type_error(make, n_iter):
    with pytest.raises(TypeError, match="n_iter must be an int"):
        make(n_iter)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConvSparseCoding2d(2, 3, 3, dtype=torch.int64),
        lambda: SoftThreshold(0.1, dtype=torch.int32),
        lambda: MultiLayerSparseCoding2d([1, 2], 3, dtype=torch.int32),
    ],
)
def test_integer_factory_dtype_is_a_type_error_naming_dtype(make):
    with pytest.raises(TypeError, match="dtype"):
        make()


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: ConvSparseCoding2d(2, 3, 3, lam=10**400), "lam"),  # was an OverflowError
        (lambda: ConvSparseCoding2d(2, 3, 3, lam=1e39), "lam"),  # stored as inf in float32, caught at forward only
        (lambda: ConvSparseCoding1d(2, 3, 3, step=1e39), "step"),
        (lambda: SoftThreshold(1e39), "threshold"),
        (lambda: MultiLayerSparseCoding2d([1, 2], 3, bias=-1e300), "bias"),  # was a RuntimeError from torch.full
        (lambda: MultiLayerSparseCoding2d([1, 2], 3, step=10**400), "step"),
    ],
)
def test_values_beyond_the_dtype_range_are_rejected_by_name(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_float64_layers_take_values_beyond_float32():
    layer = ConvSparseCoding2d(1, 2, 3, n_iter=1, lam=1e39, dtype=torch.float64, backend="reference")
    assert float(layer.lam) == 1e39


@pytest.mark.parametrize("channels", [3, "12"])
def test_deep_stack_channels_must_be_a_sequence(channels):
    with pytest.raises(TypeError, match="channels"):
        DeepSparseCoding2d(channels, 3)


# ------------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize(
    "make,shape",
    [
        # a (B, C, L) input to a 2-D layer was read as 1-D with per-iteration dictionaries: "stride must have 1 entries"
        (lambda: ConvSparseCoding2d(3, 3, 3, n_iter=3, backend="reference"), (2, 3, 10)),
        (lambda: ConvSparseCoding2d(2, 3, 3, n_iter=3, backend="reference"), (2, 2, 10)),
        (lambda: ConvSparseCoding1d(3, 3, 3, n_iter=3, backend="reference"), (2, 3, 10, 10)),
        (lambda: DeepSparseCoding2d([3, 3], 3, n_iter=3, backend="reference"), (2, 3, 10)),
        (lambda: MultiLayerSparseCoding2d([3, 3], 3, n_iter=2, backend="reference"), (2, 3, 10)),
        (lambda: MultiLayerSparseCoding2d([3, 3], 3, n_iter=2, mode="layered", backend="reference"), (2, 3, 10)),
    ],
)
def test_input_of_the_wrong_rank_names_x_and_its_expected_shape(make, shape):
    with pytest.raises(ValueError, match=r"x must be \(B, C_"):
        make()(torch.randn(shape))


def test_layered_mode_says_which_layer_an_input_is_too_small_for():
    net = MultiLayerSparseCoding2d([1, 2, 3], 3, n_iter=1, mode="layered", backend="reference")
    with pytest.raises(ValueError, match="layer 1"):
        net(torch.randn(1, 1, 4, 4))  # layer 0 gives 2 x 2 codes, too small for layer 1's 3 x 3 kernel


def test_multilayer_decode_takes_an_int_signal_size_like_the_constructor():
    net = MultiLayerSparseCoding2d([1, 2, 3], 3, paddings=1, n_iter=1, backend="reference")
    deepest = net(torch.randn(1, 1, 7, 7))[-1]
    torch.testing.assert_close(net.decode(deepest, 7), net.decode(deepest, (7, 7)))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_relative_thresholds_in_float16_do_not_overflow(backend):
    # the input RMS was computed from float16 squares: inf from |x| = 256 on, and every code NaN
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=4, relative=True, backend=backend).eval()
    half, exact = copy.deepcopy(layer).half(), copy.deepcopy(layer).half().double()
    exact.backend = "reference"
    x = (100 * torch.randn(2, 2, 8, 8)).half()
    with torch.no_grad():
        z, expected = half(x), exact(x.double())
    assert torch.isfinite(z).all()
    assert float((z.double() - expected).abs().max()) <= 1e-2 * float(expected.abs().max())


# ------------------------------------------------------------------------------------------------ loading
def _inverse_lipschitz(layer) -> float:
    weight = layer.weight.detach().double()
    return 1 / DF.lipschitz_constant(weight, (64, 64), padding=layer.padding, n_iter=300)


def test_loading_only_the_weight_sets_the_tracked_step_for_it():
    # the step of the old random dictionary was kept: here 1/L of a dictionary ~10x larger, so ISTA diverged
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=3, backend="reference")
    result = layer.load_state_dict({"weight": 3 * torch.randn_like(layer.weight)}, strict=False)
    assert result.missing_keys == ["lam", "step"]
    assert float(layer.step) == pytest.approx(_inverse_lipschitz(layer), rel=0.05)
    # a step that comes with the load, alone or with the weight, is kept as given
    layer.load_state_dict({"step": torch.tensor(0.05)}, strict=False)
    assert layer.step == torch.tensor(0.05)
    source = ConvSparseCoding2d(2, 4, 3, n_iter=3, step=0.05, backend="reference")
    layer.load_state_dict(source.state_dict())
    assert layer.step == torch.tensor(0.05)


@pytest.mark.parametrize("meta", [True, False])
def test_load_with_assign_onto_a_meta_or_other_dtype_module(meta):
    # the post-load power iteration ran with the meta (or float32) power vector against the loaded weight and raised
    source = ConvSparseCoding2d(2, 3, 3, n_iter=2, learn_lam=True, learn_step=True, backend="reference")
    state = source.state_dict() if meta else {k: v.double() for k, v in source.state_dict().items()}
    factory = {"device": "meta"} if meta else {}
    layer = ConvSparseCoding2d(2, 3, 3, n_iter=2, learn_lam=True, learn_step=True, backend="reference", **factory)
    layer.load_state_dict(state, assign=True)
    x = torch.randn(2, 2, 6, 6, dtype=layer.weight.dtype)
    torch.testing.assert_close(layer.eval()(x), source.eval()(x.float()).to(x.dtype))
    assert layer.constraints()[-1][1] > 0  # a learned step keeps a positive floor
    layer.train()(x).sum().backward()


@pytest.mark.parametrize(
    "make",
    [
        lambda step: ConvSparseCoding2d(2, 3, 3, n_iter=2, step=step, learn_step=True, backend="reference"),
        lambda step: MultiLayerSparseCoding2d([2, 3], 3, n_iter=1, **({} if step is None else {"step": step})),
    ],
)
def test_a_loaded_learned_step_below_the_floor_survives_an_optimizer_step(make):
    # the floor was 1e-3 of this module's own initial step: a valid loaded step of 1e-6 jumped to it at step one
    source, layer = make(1e-6), make(None)
    layer.load_state_dict(source.state_dict())
    steps = [p for name, p in layer.named_parameters() if name.startswith("step")]
    before = [s.detach().clone() for s in steps]
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    optimizer.step()
    for s, b in zip(steps, before):
        torch.testing.assert_close(s.detach(), b, rtol=0, atol=0)


@pytest.mark.parametrize("n_steps,error", [(0, ValueError), (2.5, TypeError), (True, TypeError)])
def test_refresh_step_needs_a_positive_number_of_power_iterations(n_steps, error):
    # n_steps=0 set the tracked step to 1, whatever the dictionary
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=2, backend="reference")
    step = layer.step.clone()
    with pytest.raises(error, match="n_steps"):
        layer.refresh_step_(n_steps)
    assert torch.equal(layer.step, step)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_training_forward_under_autocast(backend):
    # the step's power iteration analysed autocast's bfloat16 synthesis against the float32 weight and raised
    layer = ConvSparseCoding2d(2, 3, 3, n_iter=3, learn_lam=True, backend=backend)
    plain = copy.deepcopy(layer)
    x = torch.randn(2, 2, 6, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(x)
    z.sum().backward()
    expected = plain(x)
    torch.testing.assert_close(layer.step, plain.step)  # tracked in the weight's dtype, as without autocast
    torch.testing.assert_close(z.float(), expected, atol=2e-2, rtol=2e-2)
    assert torch.isfinite(layer.lam.grad).all()


def test_multilayer_meta_construction_then_materialise():
    # to_empty() leaves memory uninitialised and the module had no reset_parameters() to fill it again
    torch.manual_seed(0)
    eager = MultiLayerSparseCoding2d([1, 3, 4], 3, paddings=1, n_iter=2, bias=-0.1, input_encoders=True)
    net = MultiLayerSparseCoding2d([1, 3, 4], 3, paddings=1, n_iter=2, bias=-0.1, input_encoders=True, device="meta")
    net.to_empty(device="cpu")
    torch.manual_seed(0)
    net.reset_parameters()
    for (name, a), b in zip(eager.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), name


def test_soft_threshold_meta_construction_then_materialise():
    module = SoftThreshold(0.3, num_channels=2, learnable=True, device="meta").to_empty(device="cpu")
    module.reset_parameters()
    torch.testing.assert_close(module.threshold.detach(), torch.full((2,), 0.3))
