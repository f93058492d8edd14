"""The layers under process-wide and context-wide torch state: the default device and dtype, inference mode.

Whatever torch.set_default_device / set_default_dtype say, and whether a call runs inside torch.inference_mode(), a
layer's own state (its power-iteration vector, the values it projects onto) is what a plain run makes of it.
"""

import contextlib

import pytest
import torch

from dsc_kernels.nn import ConvSparseCoding2d


@pytest.fixture
def default_dtype():
    before = torch.get_default_dtype()
    yield
    torch.set_default_dtype(before)


def test_a_layer_built_on_its_device_under_another_default_device():
    # The power iteration's start vector was drawn on the default device: a layer built with device="cpu" inside
    # ``with torch.device("meta")`` raised "Cannot copy out of meta tensor" (under set_default_device("cuda"), the
    # CPU generator was refused), where nn.Conv2d(device="cpu") builds there.
    torch.manual_seed(0)
    plain = ConvSparseCoding2d(3, 5, 3, n_iter=3)
    torch.manual_seed(0)
    with torch.device("meta"):
        layer = ConvSparseCoding2d(3, 5, 3, n_iter=3, device="cpu")
    assert layer.weight.device.type == layer._power_vector.device.type == layer.step.device.type == "cpu"
    torch.testing.assert_close(layer.weight, plain.weight, rtol=0, atol=0)
    torch.testing.assert_close(layer.step, plain.step, rtol=0, atol=0)
    torch.testing.assert_close(layer._power_vector, plain._power_vector, rtol=0, atol=0)


def test_the_start_vector_does_not_follow_the_default_dtype(default_dtype):
    # Drawn in the default dtype, the same float32 layer started its power iteration from other numbers under
    # set_default_dtype(torch.float64).
    torch.manual_seed(0)
    plain = ConvSparseCoding2d(3, 5, 3, n_iter=3, dtype=torch.float32)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(3, 5, 3, n_iter=3, dtype=torch.float32)
    torch.testing.assert_close(layer.weight, plain.weight, rtol=0, atol=0)
    torch.testing.assert_close(layer._power_vector, plain._power_vector, rtol=0, atol=0)
    torch.testing.assert_close(layer.step, plain.step, rtol=0, atol=0)


def test_projection_after_an_optimizer_step_under_a_meta_default_device():
    # The projection formed its float16-safe floor as a tensor on the default device and read it back: inside
    # ``with torch.device("meta")`` every optimiser step of a layer with a learned step raised "Tensor.item() cannot
    # be called on meta tensors".
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(2, 3, 3, n_iter=2, learn_step=True)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    x = torch.randn(2, 2, 6, 6)
    with torch.device("meta"):
        (-layer(x).square().sum() * 1e6).backward()  # pushes the step far below its floor
        optimizer.step()
    assert layer.step.device.type == "cpu"
    assert bool((layer.step >= layer.step_floor).all())


def _train_step(layer, x):
    layer.train()
    layer(x).square().sum().backward()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    return layer(x).detach()


@pytest.mark.parametrize("learn_step", [False, True])
def test_a_load_with_assign_under_inference_mode_trains_after(learn_step):
    # A meta-built layer loaded with assign=True under torch.inference_mode() holds the state dict's (normal)
    # tensors, as nn.Linear does, but its power vector, estimated weight and step floor were made there as inference
    # tensors: the next training forward raised "Inplace update to inference tensor outside InferenceMode".
    torch.manual_seed(0)
    source = ConvSparseCoding2d(2, 3, 3, n_iter=2, learn_step=learn_step)
    state = source.state_dict()
    state.pop("step_floor", None)  # a state dict saved before the floor was state: the load makes one
    x = torch.randn(2, 2, 6, 6)
    results = []
    for inference in (False, True):
        layer = ConvSparseCoding2d(2, 3, 3, n_iter=2, learn_step=learn_step, device="meta")
        copied = {k: v.clone() for k, v in state.items()}
        with torch.inference_mode(inference):
            layer.load_state_dict(copied, assign=True, strict=False)
        assert not any(t.is_inference() for t in layer.buffers())
        results.append(_train_step(layer, x))
        layer.load_state_dict(state, strict=False)  # in place into the loaded buffers
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def test_a_state_dict_taken_under_inference_mode_holds_no_inference_tensor():
    # Right after an optimiser step the saved tracked step is re-estimated for the new weight; under
    # torch.inference_mode() it came back as an inference tensor (the parameters are not), and a layer loaded from it
    # with assign=True could not train.
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(2, 3, 3, n_iter=2)
    x = torch.randn(2, 2, 6, 6)
    layer(x).square().sum().backward()
    torch.optim.SGD(layer.parameters(), lr=0.5).step()
    with torch.inference_mode():
        state = layer.state_dict()
    assert not any(t.is_inference() for t in state.values())
    loaded = ConvSparseCoding2d(2, 3, 3, n_iter=2, device="meta")
    loaded.load_state_dict(state, assign=True)
    _train_step(loaded, x)


def test_threshold_warmup_of_float_thresholds_under_a_meta_default_device():
    # The target of a threshold held as a Python float (nn.Softshrink's lambd, the transformer block's lam) was a
    # tensor on the default device, read back at every step: inside ``with torch.device("meta")`` building the
    # warm-up raised "Tensor.item() cannot be called on meta tensors" (a host sync per step on a CUDA default).
    from torch import nn

    from dsc_kernels.nn import SoftThreshold, SparseCodingTransformerBlock
    from dsc_kernels.sparsity import ThresholdWarmup

    def run(context):
        torch.manual_seed(0)
        model = nn.ModuleList([nn.Softshrink(0.5), SoftThreshold(0.2), SparseCodingTransformerBlock(4, 2, lam=0.3)])
        with context():
            warmup = ThresholdWarmup(model, 4, start=0.5)
            warmup.step()
        return model[0].lambd, float(model[1].threshold), model[2].lam, {k: v.device for k, v in warmup.targets.items()}

    plain = run(contextlib.nullcontext)
    assert run(lambda: torch.device("meta")) == plain
    assert plain[:3] == pytest.approx((0.5 * 0.625, 0.2 * 0.625, 0.3 * 0.625))
    assert set(plain[3].values()) == {torch.device("cpu")}


def test_mutual_coherence_under_a_meta_default_device():
    # mutual_coherence works on a CPU float64 copy of the filters, but made its masks, windows and constants on the
    # default device: inside ``with torch.device("meta")`` it raised "Tensor on device cpu is not on the expected
    # device meta" (and so did sparsity.max_coherence); a CUDA default met the CPU copy the same way.
    from dsc_kernels import sparsity, theory

    torch.manual_seed(0)
    w = torch.randn(4, 2, 3, 3)
    w[1, :, 0] = 0  # border atoms of another truncation class
    plain = theory.mutual_coherence(w, (7, 7), padding=1)
    with torch.device("meta"):
        assert theory.mutual_coherence(w, (7, 7), padding=1) == plain
        assert sparsity.max_coherence(w, (7, 7), padding=1) == plain
    assert 0 < plain <= 1


def test_dictionary_learning_tools_under_a_meta_default_device(default_dtype):
    # The random crops were drawn on the default device ("Tensor.item() cannot be called on meta tensors" inside
    # ``with torch.device("meta")``; a CUDA default refuses the CPU generator), low_frequency_fraction's frequency grid
    # met the weight's device there, and atom_grid's grid was a meta tensor (no numpy() for imshow).
    from dsc_kernels import dictionary_learning as dl

    torch.manual_seed(0)
    x = torch.randn(2, 1, 10, 10)
    x[1, :, :4, :4] = 0  # a flat crop is replaced by noise from the generator
    w = torch.randn(3, 1, 4, 4)
    plain = dl.learn_conv_dictionary(x, 6, 4, 0.1, n_outer=2, seed=3)
    with torch.device("meta"):
        got = dl.learn_conv_dictionary(x, 6, 4, 0.1, n_outer=2, seed=3)
        fraction = dl.low_frequency_fraction(w)
        grid = dl.atom_grid(w)
    torch.testing.assert_close(got.weight, plain.weight, rtol=0, atol=0)
    torch.testing.assert_close(fraction, dl.low_frequency_fraction(w), rtol=0, atol=0)
    torch.testing.assert_close(grid, dl.atom_grid(w), rtol=0, atol=0, equal_nan=True)
    assert grid.device.type == "cpu"
    # in float32 whatever the default dtype, as for a non-empty dictionary
    torch.set_default_dtype(torch.float64)
    assert dl.atom_grid(w).dtype == torch.float32
    assert dl.low_frequency_fraction(w[:0]).dtype == dl.low_frequency_fraction(w).dtype == torch.float32


def test_denoise_recipe_data_under_another_default_device_and_dtype(default_dtype):
    # noisy_copy drew its noise on the default device in the default dtype (float64 noise, so a float64 noisy image
    # of a float32 one, under set_default_dtype(torch.float64); a meta image inside ``with torch.device("meta")``),
    # and random_patches drew its corners there too ("Tensor.item() cannot be called on meta tensors").
    pytest.importorskip("sklearn")  # the recipes' "train" extra, as test_recipes
    from dsc_kernels.recipes import data, denoise

    torch.manual_seed(0)
    clean = torch.rand(12, 12)
    plain_noisy = denoise.noisy_copy(clean, 5)
    plain_patches = data.random_patches(clean, 3, 4, torch.Generator().manual_seed(1))
    for context in (lambda: torch.device("meta"), contextlib.nullcontext):
        if context is contextlib.nullcontext:
            torch.set_default_dtype(torch.float64)
        with context():
            noisy = denoise.noisy_copy(clean, 5)
            patches = data.random_patches(clean, 3, 4, torch.Generator().manual_seed(1))
        assert noisy.dtype == torch.float32 and noisy.device.type == "cpu"
        torch.testing.assert_close(noisy, plain_noisy, rtol=0, atol=0)
        torch.testing.assert_close(patches, plain_patches, rtol=0, atol=0)


def test_built_in_data_is_the_same_under_another_default_device_and_dtype(default_dtype):
    # A seed names one dataset: the generators drew on the default device (a meta default raised "Tensor.item()
    # cannot be called on meta tensors", a CUDA one refuses the CPU generator) and drew the codes' signs in the
    # default dtype (another stream under set_default_dtype(torch.float64): other codes for the same seed).
    from dsc_kernels import data

    def make():
        d = data.conv_dictionary(data.random_filters(3, 2, (5, 5), seed=1), (8, 8))
        return {
            "barker": data.barker_filter(13, 2),
            "dct": data.dct_filters(4, 8, 2),
            "codes": data.sparse_codes(2, 3, (16, 16), 4, seed=2),
            "tight": data.sparse_codes(1, 1, (4, 4), 16, seed=5),  # the placement that cannot get stuck
            "problem": data.dsc_problem([d], 3, noise_std=0.1, seed=3).x,
        }

    plain = make()
    with torch.device("meta"):
        on_meta = make()
    torch.set_default_dtype(torch.float64)
    in_float64 = make()
    for name, value in plain.items():
        assert on_meta[name].device.type == "cpu", name
        torch.testing.assert_close(on_meta[name], value, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(in_float64[name], value, rtol=0, atol=0, msg=name)
