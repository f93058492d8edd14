"""The drop-in layers: shapes, state dicts, options, training, devices/dtypes and torch.compile."""

import io
import math

import pytest
import torch
from helpers import count_calls

import dsc_kernels.functional as DF
from dsc_kernels.dictionary_learning import _dictionary_lipschitz
from dsc_kernels.nn import ConvSparseCoding1d, ConvSparseCoding2d, DeepSparseCoding2d, SoftThreshold, sparse_coding


def test_default_padding_keeps_the_size_and_decode_inverts_the_shape():
    layer = ConvSparseCoding2d(3, 8, 5, n_iter=3, backend="reference")
    x = torch.randn(2, 3, 13, 11)
    z = layer(x)
    assert z.shape == (2, 8, 13, 11)
    assert layer.decode(z).shape == x.shape
    layer1d = ConvSparseCoding1d(2, 6, 7, stride=2, n_iter=3, backend="reference")
    x1 = torch.randn(2, 2, 21)
    z1 = layer1d(x1)
    assert layer1d.decode(z1, signal_size=(21,)).shape == x1.shape


@pytest.mark.parametrize("kernel, stride, padding", [(2, 3, None), (1, 3, 1), (3, 4, 2)])
def test_decode_default_size_is_at_least_one(kernel, stride, padding):
    # (n - 1) s - 2p + k is 0 or less here, for a code the layer returns from a length-1 signal: decode raised
    # "signal_size must be >= 1" on it
    layer = ConvSparseCoding1d(1, 2, kernel, stride=stride, padding=padding, n_iter=2, backend="reference")
    layer2d = ConvSparseCoding2d(1, 2, kernel, stride=stride, padding=padding, n_iter=2, backend="reference")
    for module, x in ((layer, torch.randn(2, 1, 1)), (layer2d, torch.randn(2, 1, 1, 5))):
        z = module(x)
        x_hat = module.decode(z)
        assert x_hat.shape[2] == 1
        torch.testing.assert_close(x_hat, module.decode(z, signal_size=x.shape[2:])[..., : x_hat.shape[-1]])


def test_dictionary_has_unit_norm_filters_and_the_step_is_one_over_L():
    layer = ConvSparseCoding2d(3, 8, 5, n_iter=3)
    norms = layer.weight.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(8))
    L = DF.lipschitz_constant(layer.weight.detach(), (64, 64), padding=2, n_iter=100)
    assert layer.step.item() == pytest.approx(1 / L, rel=0.05)


def test_layer_equals_functional_call():
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=4, lam=0.05, fista=True, nonneg=True, backend="reference").eval()
    x = torch.randn(2, 2, 9, 9)
    expected = DF.conv_ista(
        x, layer.weight, 0.05, n_iter=4, step=layer.step.item(), padding=1, fista=True, nonneg=True, backend="reference"
    )
    torch.testing.assert_close(layer(x), expected)


def test_state_dict_keys_and_learned_parameters():
    layer = ConvSparseCoding2d(1, 4, 3, n_iter=5, learn_lam=True, learn_step=True, untied=True)
    # step_floor: the learned step's projection floor, so that a resumed run projects onto the floor it saved
    assert sorted(layer.state_dict()) == ["encoder_weight", "lam", "step", "step_floor", "weight"]
    assert layer.lam.shape == (5, 4) and layer.step.shape == (5,)
    assert {n for n, _ in layer.named_parameters()} == {"weight", "encoder_weight", "lam", "step"}
    plain = ConvSparseCoding2d(1, 4, 3, n_iter=5)
    assert sorted(plain.state_dict()) == ["lam", "step", "weight"]
    assert {n for n, _ in plain.named_parameters()} == {"weight"}
    assert "untied" in repr(layer) and "learn_lam" in repr(layer) and "n_iter=5" in repr(layer)


def _floored_step_module(seed: int) -> ConvSparseCoding2d:
    torch.manual_seed(seed)  # the floor is 1e-3 of the initial 1/L, which depends on the random dictionary
    return ConvSparseCoding2d(2, 4, 3, n_iter=2, learn_step=True, dtype=torch.float64)


def _sgd_down(layer: ConvSparseCoding2d) -> None:
    layer.step.grad = torch.ones_like(layer.step)
    torch.optim.SGD([layer.step], lr=1.0).step()  # far below the floor: projected onto it


def test_a_resumed_learned_step_is_projected_onto_the_floor_it_was_saved_with():
    a, b = _floored_step_module(0), _floored_step_module(1)
    assert float(a.step_floor) != float(b.step_floor)
    with torch.no_grad():
        a.step.fill_(2 * float(a.step_floor))
    b.load_state_dict(a.state_dict())
    _sgd_down(a)
    _sgd_down(b)
    # the floor was an attribute outside the state dict: b went to its own initial floor, 1% lower here
    assert torch.equal(b.step, a.step) and torch.equal(a.step, torch.full_like(a.step, float(a.step_floor)))


def test_a_state_dict_saved_without_the_step_floor_loads_strictly_and_keeps_the_old_rule():
    a, b = _floored_step_module(0), _floored_step_module(1)
    own = float(b.step_floor)
    state = a.state_dict()
    del state["step_floor"]
    assert not b.load_state_dict(state).missing_keys
    # the module's own floor, lowered to 1e-3 of a loaded step below it (a's initial step is above b's floor here)
    lowest = float(a.step.min())
    assert float(b.step_floor) == (1e-3 * lowest if lowest < own else own)


def test_a_floor_less_state_dict_loaded_after_to_empty_sets_the_floor_from_the_loaded_step():
    state = _floored_step_module(0).state_dict()
    del state["step_floor"]
    torch.use_deterministic_algorithms(True)  # fills to_empty()'s memory with NaN, as uninitialised memory may hold
    try:
        layer = ConvSparseCoding2d(2, 4, 3, n_iter=2, learn_step=True, dtype=torch.float64, device="meta")
        layer.to_empty(device="cpu")
    finally:
        torch.use_deterministic_algorithms(False)
    layer.load_state_dict(state)
    _sgd_down(layer)
    # the floor kept to_empty()'s NaN (its 0 likewise projected the step onto 0)
    assert torch.equal(layer.step, torch.full_like(layer.step, 1e-3 * float(state["step"].min())))


def test_a_loaded_floor_stands_for_a_step_rounded_below_it():
    a = _floored_step_module(0).float()
    _sgd_down(a)
    a = a.half()  # the step at its floor rounds 1e-4 below it in float16
    assert float(a.step.min()) < float(a.step_floor)
    torch.manual_seed(1)
    b = ConvSparseCoding2d(2, 4, 3, n_iter=2, learn_step=True, dtype=torch.float16)
    b.load_state_dict(a.state_dict())
    # the loaded step below the loaded floor moved b's floor 1000x lower, where a projects its step back up
    assert float(b.step_floor) == float(a.step_floor)
    _sgd_down(a)
    _sgd_down(b)
    assert torch.equal(b.step, a.step) and float(a.step.min()) >= float(a.step_floor)


def test_a_compiled_optimizer_step_projects_a_learned_step_onto_its_floor():
    torch._dynamo.reset()  # a fresh recompile budget: earlier tests compiled the same forward
    layer = _floored_step_module(0)
    optimizer = torch.optim.SGD([layer.step], lr=1.0)
    layer.step.grad = torch.ones_like(layer.step)
    # traced, constraints() could not read the floor and took 0: the step went to 0, which the next forward refuses
    torch.compile(optimizer.step)()
    assert torch.equal(layer.step, torch.full_like(layer.step, float(layer.step_floor)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_step_floor_is_formed_wide(dtype):
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=2, step=1e-5, learn_step=True, dtype=dtype)
    # formed in the half dtype, 1e-3 of float16's 1e-5 underflowed to 0 (bfloat16's kept 3 digits)
    want = torch.tensor(1e-3, dtype=torch.float32) * layer.step.detach().min().float()
    assert torch.equal(layer.step_floor, want)
    _sgd_down(layer)
    assert float(layer.step.min()) > 0  # onto the floor's nearest value above it in the half dtype, not onto 0
    layer(torch.randn(1, 2, 6, 6, dtype=dtype))


def test_a_learned_step_state_dict_loads_strictly_into_a_fixed_step_layer():
    learned = _floored_step_module(0)
    fixed = ConvSparseCoding2d(2, 4, 3, n_iter=2, step=torch.full((2,), 0.1), dtype=torch.float64)
    fixed.load_state_dict(learned.state_dict())  # the floor is the learned step's: raised "Unexpected key(s)"
    assert torch.equal(fixed.step, learned.step.detach()) and "step_floor" not in fixed.state_dict()


def test_a_step_floor_not_known_yet_projects_onto_zero_not_inf():
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=2, learn_step=True, device="meta").to_empty(device="cpu")
    assert float(layer.step_floor) == math.inf  # to_empty() before reset_parameters(): unknown
    assert layer.constraints()[-1][1] == 0.0


def test_a_module_pickled_before_the_step_floor_was_a_buffer_gets_it_from_the_old_attribute():
    layer = _floored_step_module(0)
    floor = float(layer.step_floor)
    del layer._buffers["step_floor"]
    layer.__dict__["_step_floor"] = floor  # what such a pickle holds
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert float(loaded.step_floor) == floor and loaded.constraints()[-1][1] == floor
    assert "_step_floor" not in loaded.__dict__


def test_training_lowers_reconstruction_error():
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(
        1, 8, 5, n_iter=5, lam=0.01, learn_lam=True, learn_step=True, untied=True, backend="reference"
    )
    x = torch.randn(4, 1, 12, 12)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for i in range(30):
        loss = (layer.decode(layer(x)) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if i == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_soft_threshold_module():
    module = SoftThreshold(0.5, num_channels=3, nonneg=False, learnable=True)
    x = torch.randn(2, 3, 4, 4) * 2
    torch.testing.assert_close(module(x), torch.nn.functional.softshrink(x, 0.5))
    assert isinstance(module.threshold, torch.nn.Parameter) and "num_channels=3" in repr(module)


def test_factory_kwargs():
    layer = ConvSparseCoding2d(1, 4, 3, n_iter=2, learn_lam=True, device="cpu", dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in layer.state_dict().values())
    assert layer(torch.randn(1, 1, 6, 6, dtype=torch.float64)).dtype == torch.float64
    deep = DeepSparseCoding2d([1, 4, 8], [3, 3], dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in deep.state_dict().values())


def test_deep_decode_takes_the_signal_size_of_a_strided_stack():
    # the digits recipe's stack: at stride 2 an 8 x 8 input has 4 x 4 codes, which decode to 7 x 7 by default, and
    # decode had no way to ask for 8 x 8 (MultiLayerSparseCoding2d.decode takes signal_size)
    deep = DeepSparseCoding2d([1, 4, 8], 3, strides=[1, 2], n_iter=2, backend="reference", dtype=torch.float64)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    g1, g2 = deep(x)
    assert deep.decode(g2).shape == (2, 1, 7, 7)  # the default is unchanged
    x_hat = deep.decode(g2, (8, 8))
    assert x_hat.shape == x.shape
    first, second = deep.layers
    torch.testing.assert_close(x_hat, first.decode(second.decode(g2, (8, 8)), (8, 8)))
    with pytest.raises(ValueError, match="signal_size"):
        deep.decode(g2, (0, 8))


def test_deep_default_decode_takes_the_models_own_codes():
    # Each layer's own smallest signal, chosen from the deepest layer up, could be one that no signal codes to in the
    # layer above (kernel 2 at its default padding 1 gives every signal at least 2 codes): here the second layer
    # decoded its 1-wide codes to a 1-wide signal, and decode(forward(x)) raised "z has spatial size (7, 1), but a
    # signal of size (6, 1) has codes of size (7, 2)", sizes the caller never gave. 11 of 120 random stacks did.
    deep = DeepSparseCoding2d([1, 2, 2], [2, 1], strides=[1, 3], n_iter=2, backend="reference", dtype=torch.float64)
    x = torch.randn(1, 1, 8, 2, dtype=torch.float64)
    g1, g2 = deep(x)
    assert g2.shape[2:] == (3, 1)
    x_hat = deep.decode(g2)
    assert x_hat.shape == (1, 1, 6, 1)  # the smallest input with (3, 1) deepest codes
    torch.testing.assert_close(x_hat, deep.decode(g2, (6, 1)))
    with pytest.raises(ValueError, match=r"code has spatial size \(1, 1\), which no input of this stack codes to"):
        DeepSparseCoding2d([1, 2, 2], [2, 2], n_iter=1).decode(torch.zeros(1, 2, 1, 1))
    # an empty code: no input codes to it, even where a 1-pixel input has no codes either (kernel 2, padding 0)
    empty = DeepSparseCoding2d([1, 2], [2], paddings=0, n_iter=1, backend="reference")
    with pytest.raises(ValueError, match=r"code has spatial size \(0, 3\), which no input of this stack codes to"):
        empty.decode(torch.zeros(1, 2, 0, 3))


@pytest.mark.parametrize("stack", ["deep", "multilayer"])
def test_stack_decode_names_the_signal_size_that_no_code_maps_to(stack):
    # the size of each layer was left to that layer's decode, whose errors quoted an intermediate size: signal_size
    # (1, 1) was refused as "signal_size must be >= 1, got -1", and a size whose codes are not the given code's
    # named a signal the caller never passed
    from dsc_kernels.nn import MultiLayerSparseCoding2d

    options = dict(strides=[2, 2], n_iter=1, backend="reference")
    if stack == "deep":
        model = DeepSparseCoding2d([1, 2, 3], [5, 3], paddings=[0, 1], **options)
    else:
        model = MultiLayerSparseCoding2d([1, 2, 3], [5, 3], paddings=[0, 1], **options)
    code = model(torch.randn(1, 1, 13, 13))[-1]  # 13 -> 5 -> 3
    assert model.decode(code, (13, 13)).shape == (1, 1, 13, 13)
    with pytest.raises(ValueError, match=r"signal_size \(1, 1\) has no codes: layer 0's input would be \(1, 1\)"):
        model.decode(code, (1, 1))
    with pytest.raises(ValueError, match=r"code has spatial size \(3, 3\), but an input of signal_size \(20, 20\)"):
        model.decode(code, (20, 20))


@pytest.mark.parametrize("stack", ["deep", "multilayer"])
def test_stack_errors_count_layers_as_forward_does_and_decode_names_the_code(stack):
    # decode numbered layers from 1 where forward numbers them from 0, and a code with the wrong channel count was
    # refused by the deepest layer's decode, naming its z and a weight the caller never passed
    from dsc_kernels.nn import MultiLayerSparseCoding2d

    cls = DeepSparseCoding2d if stack == "deep" else MultiLayerSparseCoding2d
    model = cls([1, 2, 3], [5, 5], strides=[2, 1], paddings=[0, 0], n_iter=1, backend="reference")
    with pytest.raises(ValueError, match=r"^layer 1: "):
        model(torch.randn(1, 1, 9, 9))  # 9 -> 3: too small for layer 1's kernel
    with pytest.raises(ValueError, match=r"layer 1's input would be \(2, 2\)"):
        model.decode(torch.randn(1, 3, 1, 1), (7, 7))
    for signal_size in ((13, 13), None):
        with pytest.raises(ValueError, match=r"^code must be \(B, C_L=3, H_L, W_L\).*got shape \(1, 2, 1, 1\)"):
            model.decode(torch.randn(1, 2, 1, 1), signal_size)


def test_deep_sparse_coding_layers_and_decode():
    deep = DeepSparseCoding2d([1, 4, 8], [5, 3], strides=[1, 2], lams=[0.05, 0.02], n_iter=3, backend="reference")
    x = torch.randn(2, 1, 16, 16)
    g1, g2 = deep(x)
    assert g1.shape == (2, 4, 16, 16) and g2.shape == (2, 8, 8, 8)
    assert (g1 >= 0).all() and (g2 >= 0).all()  # nonneg by default: the CNN (ReLU) view of layered pursuit
    assert deep.decode(g2).shape[:2] == (2, 1)
    with pytest.raises(ValueError, match="kernel_sizes must be one value or a list of 2"):
        DeepSparseCoding2d([1, 4, 8], [5, 3, 3])
    # a tuple of per-layer values is every layer's value for sizes ((h, w)); for lams it can only be a misspelt list
    for name in ("lams", "thresholds"):
        with pytest.raises(TypeError, match=f"{name} must be a float, a tensor or a list with one per layer"):
            DeepSparseCoding2d([1, 4, 8], [5, 3], **{name: (0.1, 0.2)})


def test_deep_forward_errors_name_the_layer():
    """A deeper layer's error quoted its own input size without the layer: "the signal size (4, 4) is too small" for
    a 9 x 9 input, as if the caller had passed 4 x 4 (MultiLayerSparseCoding2d and deep_conv_ista name it)."""
    deep = DeepSparseCoding2d([1, 2, 3], [3, 5], strides=[2, 1], paddings=[0, 0], backend="reference")
    with pytest.raises(ValueError, match=r"^layer 1: the signal size \(4, 4\) is too small"):
        deep(torch.randn(1, 1, 9, 9))
    with pytest.raises(ValueError, match=r"^layer 0: x must be"):
        deep(torch.randn(1, 2, 9, 9))


@pytest.mark.parametrize(
    "compiler,make",
    [
        ("inductor", lambda: ConvSparseCoding2d(1, 4, 3, n_iter=3, learn_lam=True, backend="reference")),
        # aot_eager captures the same full graph (forward and backward) without inductor's slow code generation.
        ("aot_eager", lambda: ConvSparseCoding1d(2, 4, 5, n_iter=3, fista=True, untied=True, backend="reference")),
        ("aot_eager", lambda: DeepSparseCoding2d([1, 4, 6], 3, n_iter=2, backend="reference")),
        ("aot_eager", lambda: SoftThreshold(0.1, num_channels=2)),
    ],
)
def test_modules_compile_with_fullgraph(compiler, make):
    torch._dynamo.reset()  # a fresh recompile budget: earlier tests compiled the same forward
    module = make()
    x = torch.randn(
        2,
        2 if isinstance(module, (ConvSparseCoding1d, SoftThreshold)) else 1,
        *((17,) if isinstance(module, ConvSparseCoding1d) else (9, 9)),
        requires_grad=True,
    )
    compiled_module = torch.compile(module, fullgraph=True, backend=compiler)
    # Training mode traces the step tracking (power iteration, in-place buffer update) into the same graph.
    out = compiled_module(x)
    sum(o.sum() for o in (out if isinstance(out, list) else [out])).backward()
    module.eval()  # a fixed step: eager and compiled must agree exactly
    eager, compiled = module(x), compiled_module(x)
    as_list = lambda out: out if isinstance(out, list) else [out]  # noqa: E731
    for a, b in zip(as_list(eager), as_list(compiled)):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------ argument checking (issue: hardening)
@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: ConvSparseCoding2d(3, 4, 3, step=-1.0), "step"),
        (lambda: ConvSparseCoding2d(3, 4, 3, step=0.0), "step"),
        (lambda: ConvSparseCoding2d(3, 4, 3, lam=-0.1), "lam"),
        (lambda: ConvSparseCoding2d(3, 4, 3, lam=float("nan")), "lam"),
        (lambda: ConvSparseCoding2d(3, 4, 3, lam=torch.tensor([0.1, -0.1, 0.1, 0.1])), "lam"),
        (lambda: ConvSparseCoding2d(3, 4, 3, threshold=-0.1), "threshold"),
        (lambda: ConvSparseCoding2d(3, 4, 3, step=float("inf")), "step"),
        (lambda: SoftThreshold(-1), "threshold"),
        (lambda: DeepSparseCoding2d([1, 4, 8], 3, lams=-0.1), "lams"),
        (lambda: DeepSparseCoding2d([1, 4, 8], 3, lams=[0.1, -0.1]), "lams"),
        (lambda: ConvSparseCoding2d(3, 4, (3,)), "kernel_size"),
        (lambda: ConvSparseCoding2d(3, 4, 0), "kernel_size"),
        (lambda: ConvSparseCoding2d(3, 4, 3, stride=0), "stride"),
        (lambda: ConvSparseCoding2d(3, 4, 3, padding="full"), "padding"),
        (lambda: ConvSparseCoding2d(3, 4, 4, padding="same"), "padding"),
        (lambda: ConvSparseCoding2d(3, 4, 3, stride=2, padding="same"), "padding"),
        (lambda: ConvSparseCoding2d(0, 4, 3), "in_channels"),
        (lambda: ConvSparseCoding2d(3, 4, 3, n_iter=0), "n_iter"),
        (lambda: ConvSparseCoding2d(3, 4, 3, backend=None), "backend"),
        (lambda: ConvSparseCoding2d(3, 4, 3, lam=0.1, threshold=0.1), "lam"),
    ],
)
def test_bad_arguments_raise_at_construction_naming_the_argument(make, name):
    with pytest.raises((ValueError, TypeError), match=name):
        make()


def test_padding_same_and_valid_like_conv2d():
    same = ConvSparseCoding2d(1, 4, (3, 5), padding="same", n_iter=2, backend="reference")
    valid = ConvSparseCoding2d(1, 4, 3, padding="valid", n_iter=2, backend="reference")
    assert same.padding == (1, 2) and valid.padding == (0, 0)
    x = torch.randn(1, 1, 9, 10)
    assert same(x).shape == (1, 4, 9, 10) and valid(x).shape == (1, 4, 7, 8)


def test_docstring_documents_every_argument():
    import inspect

    doc = ConvSparseCoding2d.__doc__
    for name in inspect.signature(ConvSparseCoding2d.__init__).parameters:
        if name != "self":
            assert f"{name}" in doc, name
    assert "(B, C_sig, H, W)" in doc and "(B, C_code, H_z, W_z)" in doc
    assert "kernel_size" in DeepSparseCoding2d.__doc__ and "relative" in DeepSparseCoding2d.__doc__


def test_meta_device_construction_then_materialise():
    layer = ConvSparseCoding2d(2, 6, 5, n_iter=3, learn_lam=True, untied=True, device="meta")
    assert layer.weight.is_meta and layer.step.is_meta and layer.lam.shape == (3, 6)
    deep = DeepSparseCoding2d([1, 4, 8], 3, device="meta")
    assert all(p.is_meta for p in deep.parameters())
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert torch.isfinite(layer.step) and float(layer.step) > 0
    torch.testing.assert_close(layer.encoder_weight, layer.weight)
    assert torch.isfinite(layer(torch.randn(1, 2, 8, 8))).all()


# ------------------------------------------------------------------------------- step tracking (dictionary learning)
def _inverse_lipschitz(weight) -> float:
    """1 / ||D||^2 on infinitely large signals (stride 1): an FFT + SVD bound on a fine grid; the layers' tracked
    step is within 1% above it."""
    return 1 / _dictionary_lipschitz(weight.detach(), [64] * (weight.dim() - 2))


def test_step_stays_one_over_L_while_the_dictionary_grows():
    layer = ConvSparseCoding2d(1, 8, 5, n_iter=4, lam=0.01, backend="reference")
    x = torch.randn(2, 1, 16, 16)
    for growth in (2.0, 3.0, 5.0):
        with torch.no_grad():
            layer.weight.mul_(growth)  # what an optimiser step that grows the atoms does, in place
        layer(x)  # a training forward tracks 1/L with a warm-started power iteration
        assert float(layer.step) == pytest.approx(_inverse_lipschitz(layer.weight), rel=0.01)
    layer.eval()
    before = layer.step.clone()
    layer(x)
    assert torch.equal(layer.step, before)  # an eval forward on an unchanged dictionary keeps the stored step
    with torch.no_grad():
        layer.weight.mul_(2.0)
    layer(x)
    # a changed dictionary is re-estimated in eval too: the old step, 4x 1/L now, made ISTA diverge to inf
    assert float(layer.step) == pytest.approx(_inverse_lipschitz(layer.weight), rel=0.01)
    layer.normalize_dictionary_()
    torch.testing.assert_close(layer.weight.flatten(1).norm(dim=1), torch.ones(8))
    assert float(layer.step) == pytest.approx(_inverse_lipschitz(layer.weight), rel=0.05)


def test_normalize_dictionary_keeps_the_step_as_close_to_one_over_L_as_a_training_forward():
    # normalize_dictionary_ marks the step as estimated, so the next training forward takes no iteration of its
    # own: its estimate must go on while it still rises on the CPU, as a training forward's does (three alone:
    # step * L = 1.10 here)
    torch.manual_seed(3)
    layer = ConvSparseCoding1d(2, 8, 5, backend="reference")
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape) * torch.rand(8, 1, 1) * 3)  # a dictionary learning step
    layer.normalize_dictionary_()
    assert float(layer.step) == pytest.approx(_inverse_lipschitz(layer.weight), rel=0.01)
    before = layer.step.clone()
    layer(torch.randn(2, 2, 16))
    assert torch.equal(layer.step, before)


@pytest.mark.parametrize(("scale", "what"), [(1e-30, "nearly zero"), (1e30, "very large")])
def test_a_tracked_step_out_of_range_is_refused_naming_the_dictionary(scale, what):
    # float32 ||D||^2 of 1e-59 / 1e61 has no 1/L in float32: the refusal named "step", which the caller never gave
    layer = ConvSparseCoding1d(2, 3, 3, stride=2, padding=0)
    with torch.no_grad():
        layer.weight.mul_(scale)
    for training in (True, False):
        layer.train(training)
        with pytest.raises(ValueError, match=f"tracked step 1/L of weight .* {what} dictionary"):
            layer(torch.randn(2, 2, 20))


@pytest.mark.parametrize(
    "change",
    ["no_grad_edit", "optimiser_step", "new_data"],
)
def test_eval_forward_after_a_dictionary_change_uses_the_new_one_over_L(change):
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(1, 6, 5, n_iter=30, lam=0.01, backend="reference")
    x = torch.randn(2, 1, 16, 16)
    layer(x)
    layer.eval()
    if change == "no_grad_edit":
        with torch.no_grad():
            layer.weight.mul_(10.0)
    elif change == "optimiser_step":
        layer.weight.grad = -10.0 * layer.weight.detach()  # SGD with lr 1 then makes the atoms 11x larger
        torch.optim.SGD([layer.weight], lr=1.0).step()
    else:
        layer.weight.data = 10.0 * layer.weight.detach().clone()
    z = layer(x)
    assert float(layer.step) == pytest.approx(_inverse_lipschitz(layer.weight), rel=0.01)
    assert torch.isfinite(z).all()
    expected = DF.conv_ista(
        x, layer.weight.detach(), lam=0.01, n_iter=30, step=layer.step, padding=layer.padding, backend="reference"
    )
    torch.testing.assert_close(z, expected)


def test_eval_forwards_on_an_unchanged_dictionary_run_no_power_iteration(monkeypatch):
    layer = ConvSparseCoding2d(1, 4, 3, n_iter=3, backend="reference").eval()
    calls = []
    monkeypatch.setattr(layer, "_power_iterate", lambda n: calls.append(n))
    x = torch.randn(1, 1, 8, 8)
    layer(x)
    layer(x)
    assert calls == []


def test_naive_dictionary_learning_loop_keeps_improving():
    # The loop a newcomer writes: Adam on the dictionary of a tracked-step layer, reconstruction + l1 loss.
    torch.manual_seed(0)
    target = torch.randn(6, 1, 5, 5)
    x = DF.conv_synthesis(torch.relu(torch.randn(8, 6, 16, 16) - 1.5), target, padding=2, signal_size=(16, 16))
    layer = ConvSparseCoding2d(1, 6, 5, n_iter=20, lam=0.02, fista=True, backend="reference")
    optimizer = torch.optim.Adam(layer.parameters(), lr=2e-2)
    losses = []
    for _ in range(60):
        z = layer(x)
        loss = 0.5 * (layer.decode(z) - x).pow(2).sum() / len(x) + 0.02 * z.abs().sum() / len(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Keeps descending well after the 15 steps where a frozen step size stalled it.
    assert losses[-1] < 0.7 * losses[15] and losses[15] < losses[0]


def test_learned_values_are_projected_after_optimizer_steps_never_clamped_in_forward():
    layer = ConvSparseCoding2d(1, 3, 3, n_iter=2, learn_lam=True, learn_step=True, backend="reference")
    act = SoftThreshold(0.2, 3, learnable=True)
    optimizer = torch.optim.SGD([layer.lam, layer.step, act.threshold], lr=10.0)
    for p in (layer.lam, layer.step, act.threshold):
        p.grad = torch.ones_like(p)  # a step that drives every value far below zero
    optimizer.step()
    assert float(layer.lam.detach().min()) == 0.0 and float(act.threshold.detach().min()) == 0.0
    assert float(layer.step.detach().min()) > 0
    layer(torch.randn(1, 1, 6, 6))  # valid values: runs
    with torch.no_grad():
        layer.lam[0, 0] = -1.0  # set by hand: rejected, not clamped
    with pytest.raises(ValueError, match="lam"):
        layer(torch.randn(1, 1, 6, 6))
    from dsc_kernels.nn import project_

    project_(layer)
    assert float(layer.lam.min()) == 0.0


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
def test_lbfgs_trial_points_inside_a_step_are_projected(line_search):
    # LBFGS evaluates its closure at trial points inside one step(); a loss that rewards larger codes drives lam
    # below zero there, which the forward rejects. The closure is wrapped to project first.
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(1, 3, 3, n_iter=2, lam=0.05, learn_lam=True, backend="reference")
    x = torch.randn(2, 1, 6, 6)
    optimizer = torch.optim.LBFGS([layer.lam], lr=1.0, max_iter=5, line_search_fn=line_search)
    lams = []

    def closure():
        optimizer.zero_grad()
        lams.append(float(layer.lam.detach().min()))
        loss = -layer(x).abs().sum()
        loss.backward()
        return loss

    for _ in range(2):
        optimizer.step(closure)
    assert len(lams) > 2 and min(lams) == 0.0  # trial points reached the bound, projected onto it
    assert float(layer.lam.detach().min()) == 0.0


def test_copies_are_projected_too():
    import copy

    layer = copy.deepcopy(ConvSparseCoding2d(1, 3, 3, n_iter=2, learn_lam=True))
    optimizer = torch.optim.SGD([layer.lam], lr=10.0)
    layer.lam.grad = torch.ones_like(layer.lam)
    optimizer.step()
    assert float(layer.lam.min()) == 0.0


def test_all_zero_codes_in_training_warn():
    layer = ConvSparseCoding2d(1, 4, 3, n_iter=2, lam=100.0, backend="reference")
    with pytest.warns(RuntimeWarning, match="every code is exactly zero") as record:
        layer(torch.randn(2, 1, 8, 8))
    assert record[0].filename == __file__  # the user's call, not torch's Module.__call__ (where stacklevel=3 led)


def test_relative_thresholds_make_the_layer_scale_equivariant():
    layer = ConvSparseCoding2d(1, 4, 3, n_iter=5, lam=0.3, relative=True, backend="reference").eval()
    x = torch.randn(3, 1, 10, 10)
    z = layer(x)
    assert 0.1 < float((z == 0).float().mean()) < 0.95
    torch.testing.assert_close(layer(7.0 * x), 7.0 * z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer(torch.zeros_like(x)), torch.zeros_like(z))


def test_default_deep_stack_is_active_at_every_layer_on_small_inputs():
    torch.manual_seed(0)
    deep = DeepSparseCoding2d([1, 16, 32], 3, strides=[1, 2], n_iter=3, backend="reference")
    x = torch.rand(8, 1, 8, 8) * 0.01  # a small input scale: absolute thresholds would silence the layers
    for code in deep(x):
        assert 0 < float((code != 0).float().mean()) < 1


def test_load_state_dict_keeps_the_step_and_the_outputs():
    layer = ConvSparseCoding2d(1, 4, 3, n_iter=3, learn_lam=True, untied=True, backend="reference")
    with torch.no_grad():
        layer.weight.mul_(1.7)
    layer(torch.randn(1, 1, 8, 8))  # tracks the step
    copy = ConvSparseCoding2d(1, 4, 3, n_iter=3, learn_lam=True, untied=True, backend="reference")
    copy.load_state_dict(layer.state_dict())
    x = torch.randn(2, 1, 9, 9)
    torch.testing.assert_close(copy.eval()(x), layer.eval()(x))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_a_state_dict_taken_right_after_an_optimiser_step_saves_the_new_dictionarys_step(backend):
    """A training loop ends with opt.step(): the tracked step still belonged to the previous dictionary, state_dict
    saved it, and the loaded layer, which takes a loaded step as its weight's, kept it for good: its eval outputs were
    19% away from the trained layer's (step * L = 1.46 after three Adam steps at lr 0.1). The saved step is now the
    new dictionary's (within the estimator's tolerance of the trained layer's next eval re-estimate), computed once
    per weight version, and taking the state dict does not change the layer itself."""
    if backend == "cpp" and "cpp" not in DF.available_backends():
        pytest.skip("the C++ extension is not available")
    torch.manual_seed(3)
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=4, dtype=torch.float64, backend=backend)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (layer.decode(layer(x)) - x).pow(2).sum().backward()
        opt.step()
    stale = layer.step.clone()
    buffers = {k: v.clone() for k, v in layer.named_buffers()}
    saved = layer.state_dict()
    assert layer.state_dict()["step"] is saved["step"]  # one estimate per weight version
    assert all(torch.equal(v, buffers[k]) for k, v in layer.named_buffers())
    loaded = ConvSparseCoding2d(2, 4, 3, n_iter=4, dtype=torch.float64, backend=backend)
    loaded.load_state_dict(saved)
    want = layer.eval()(x)  # the trained layer's eval forward re-estimates 1/L for its new dictionary
    assert not torch.allclose(stale, layer.step, rtol=0.05)
    torch.testing.assert_close(loaded.step, layer.step, rtol=2e-3, atol=0)
    torch.testing.assert_close(loaded.eval()(x), want, rtol=1e-2, atol=1e-3)


def test_state_dict_after_the_dictionary_is_replaced_by_another_shape():
    """Model surgery (a dictionary with more atoms) left the tracked step stale with a start vector of the old shape;
    the state dict's re-estimate raised inside the power iteration. The step is saved as it stands there."""
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=2)
    layer.weight = torch.nn.Parameter(torch.randn(6, 2, 3, 3))
    assert torch.equal(layer.state_dict()["step"], layer.step)


# ------------------------------------------------------------------------- thresholds as biases (absolute thresholds)
def test_absolute_threshold_parameterisation_matches_functional():
    x = torch.randn(2, 2, 9, 9)
    thresholds = torch.tensor([[0.1, -0.05, 0.0, 0.2], [0.05, -0.1, 0.1, 0.0], [0.0, 0.1, -0.2, 0.1]])
    layer = ConvSparseCoding2d(
        2, 4, 3, n_iter=3, threshold=thresholds, nonneg=True, learn_threshold=True, untied=True, backend="reference"
    ).eval()
    assert "threshold" in layer.state_dict() and "lam" not in layer.state_dict()
    assert layer.constraints() == [] or all(p is not layer.threshold for p, *_ in layer.constraints())
    expected = DF.conv_ista(
        x,
        layer.weight,
        threshold=thresholds,
        n_iter=3,
        step=layer.step,
        padding=1,
        encoder_weight=layer.encoder_weight,
        nonneg=True,
        backend="reference",
    )
    torch.testing.assert_close(layer(x), expected)
    signed = ConvSparseCoding2d(2, 4, 3, n_iter=3, threshold=0.1, learn_threshold=True, backend="reference")
    assert [p is signed.threshold for p, *_ in signed.constraints()] == [True]  # kept >= 0 by projection
    with pytest.raises(ValueError, match="learn_threshold"):
        ConvSparseCoding2d(2, 4, 3, threshold=0.1, learn_lam=True)


def test_soft_threshold_negative_bias_with_nonneg():
    module = SoftThreshold(-0.5, num_channels=2, nonneg=True, learnable=True)
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(module(x), torch.relu(x + 0.5))
    assert module.constraints() == []


# ------------------------------------------------------------------ the tracked step across compile, copies, torch.func
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_training_forwards_track_the_step_as_eager(dtype):
    """torch.compile (AOT autograd) dropped the in-place update of the 0-dim float64 step buffer: a compiled float64
    training forward kept its first step and drifted from eager (2e-4, 4e-4, ...)."""
    torch._dynamo.reset()  # a fresh recompile budget: earlier tests compiled the same forward
    import copy

    torch.manual_seed(0)
    compiled_layer = ConvSparseCoding2d(2, 4, 3, n_iter=3, dtype=dtype, backend="reference")
    eager = copy.deepcopy(compiled_layer)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        x = torch.randn(2, 2, 7, 9, dtype=dtype)
        torch.testing.assert_close(compiled(x), eager(x))
        torch.testing.assert_close(compiled_layer.step, eager.step)


def test_compiled_eval_forwards_after_an_optimizer_step_track_the_step_as_eager():
    """A compiled eval forward never looked at the weight (it cannot read version counters): after an optimiser step
    it ran with the previous weight's 1/L. With Adam at lr 0.1 that step was 5x the new 1/L and ISTA diverged
    (codes ~1e4 against eager's ~1). It now re-estimates on the device where the weight's values changed."""
    torch._dynamo.reset()  # a fresh recompile budget: earlier tests compiled the same forward
    import copy

    torch.manual_seed(0)
    dtype = torch.float64  # the 0-dim float64 step buffer is the one compiled graphs once dropped writes into
    compiled_layer = ConvSparseCoding2d(3, 6, 3, n_iter=6, dtype=dtype, backend="reference")
    eager = copy.deepcopy(compiled_layer)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 8, 9, dtype=dtype)
    optimizers = [torch.optim.Adam(layer.parameters(), lr=0.1) for layer in (compiled_layer, eager)]
    for _ in range(2):
        outs = []
        for module, optimizer in zip((compiled, eager), optimizers):
            module.train()
            optimizer.zero_grad()
            (module(x) - 0.3).pow(2).sum().backward()
            optimizer.step()
            module.eval()
            with torch.no_grad():
                outs.append(module(x))
        torch.testing.assert_close(compiled_layer.step, eager.step)
        torch.testing.assert_close(outs[0], outs[1])
    compiled_out = outs[0]
    with torch.no_grad():  # an unchanged weight keeps its step: a second compiled eval forward gives the same codes
        torch.testing.assert_close(compiled(x), compiled_out, rtol=0, atol=0)


def _copies(layer):
    import copy
    import io

    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    return {"deepcopy": copy.deepcopy(layer), "torch.load": torch.load(buffer, weights_only=False)}


def test_a_copy_of_a_layer_computes_exactly_what_the_layer_does():
    """The staleness check keyed the step to the weight's address, which a copy does not share: every copy
    (deepcopy, torch.save/load) re-estimated 1/L in its first eval forward and answered 0.2% differently."""
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(3, 16, 5, n_iter=10, backend="reference")
    x = torch.randn(2, 3, 16, 16)
    layer(x)  # a training forward: the step follows the dictionary
    layer.eval()
    want = layer(x)
    for name, copied in _copies(layer).items():
        assert torch.equal(copied(x), want), name
        assert torch.equal(copied.step, layer.step), name
    as_double = _copies(layer)["deepcopy"].double()
    assert torch.equal(as_double.step, layer.step.double())  # converted, not re-estimated
    # a copy of a layer whose step is out of date re-estimates, as the layer does
    with torch.no_grad():
        layer.weight.mul_(2.0)
    stale_copy = _copies(layer)["deepcopy"]
    torch.testing.assert_close(stale_copy(x), layer(x))
    assert float(layer.step) == pytest.approx(_inverse_lipschitz(layer.weight), rel=0.01)


def test_functional_call_leaves_the_layer_as_it_was_and_never_uses_a_stale_step():
    """A substituted weight gets its own 1/L; the module's own weight then gets its step back exactly. Successive
    temporaries can sit at one address with one version, and each still gets its own step (a stale 1/L for a 3x
    larger dictionary makes ISTA diverge)."""
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=3, backend="reference").eval()
    x = torch.randn(2, 2, 7, 9)
    want, step = layer(x), layer.step.clone()
    for scale in (2.0, 3.0, 4.0):
        weight = layer.weight.detach() * scale
        got = torch.func.functional_call(layer, {"weight": weight}, (x,))
        inverse_lipschitz = _inverse_lipschitz(weight)
        expected = DF.conv_ista(x, weight, layer.lam, n_iter=3, step=inverse_lipschitz, padding=1)
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)  # the layer's grid against a finer one
        assert torch.equal(layer(x), want) and torch.equal(layer.step, step)


def test_torch_func_grad_through_an_eval_layer():
    """functorch's wrapped weight has no storage to read the staleness from: it raised from data_ptr()."""
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=3, backend="reference").eval()
    x = torch.randn(2, 2, 7, 9)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).sum())(params)
    layer(x).sum().backward()
    torch.testing.assert_close(grads["weight"], layer.weight.grad)


@pytest.mark.parametrize("kw", [{}, dict(step=0.1)])
def test_training_forward_on_meta_tensors(kw):
    """Shape propagation on meta in training mode (the default) raised: torch.autocast("meta") in the power
    iteration, Tensor.item() in the all-zero check."""
    layer = ConvSparseCoding2d(2, 4, 3, device="meta", **kw)
    assert layer.training
    z = layer(torch.empty(2, 2, 7, 9, device="meta"))
    assert z.shape == (2, 4, 7, 9) and z.is_meta


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
def test_relative_thresholds_are_scale_invariant_at_extreme_scales(scale):
    """The input RMS overflowed in float32 above ~1e19 (NaN codes) and underflowed below ~1e-19 (absolute
    thresholds, all-zero codes)."""
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=3, relative=True, backend="reference").eval()
    x = torch.randn(2, 2, 7, 9)
    z = layer(x)
    torch.testing.assert_close(layer(x * scale) / scale, z, rtol=1e-5, atol=1e-6 * float(z.abs().max()))
    deep = DeepSparseCoding2d([2, 4, 8], 3, n_iter=2, backend="reference").eval()
    for got, want in zip(deep(x * scale), deep(x)):
        torch.testing.assert_close(got / scale, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert layer(nan)[0].isnan().all() and not layer(nan)[1].isnan().any()


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_relative_thresholds_give_an_all_zero_sample_finite_gradients(backend):
    """An all-zero sample (scale 1 in the forward) got NaN input gradients from the RMS's sqrt at 0 (0 * inf); in a
    deep stack (relative by default) a layer that codes one sample to all zeros passed them down to that sample's
    input, and in one fuzzed stack to layer 0's encoder_weight gradient."""
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(2, 3, 2, stride=2, n_iter=2, threshold=0.2, relative=True, nonneg=True, backend=backend)
    layer = layer.double().eval()
    absolute = ConvSparseCoding2d(2, 3, 2, stride=2, n_iter=2, threshold=0.2, nonneg=True, backend=backend)
    absolute = absolute.double().eval()
    absolute.load_state_dict(layer.state_dict())
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64)
    x[1] = 0.0
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(layer(x).sum(), x)
    assert grad.isfinite().all()
    # scale 1 for the zero sample, as in the forward: the absolute-threshold layer's gradient there
    (want,) = torch.autograd.grad(absolute(x[1:]).sum(), x)
    torch.testing.assert_close(grad[1], want[1])
    deep = DeepSparseCoding2d([2, 3, 4], [2, 1], strides=[2, 1], thresholds=[0.0, 0.1], n_iter=2, backend=backend)
    deep = deep.double()
    with torch.no_grad():
        deep.layers[0].weight.abs_()
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64)
    x[1] = -x[1].abs()  # layer 0 codes sample 1 to exactly zero
    x.requires_grad_(True)
    codes = deep(x)
    assert not codes[0][1].any() and codes[0][0].any()
    grads = torch.autograd.grad(codes[-1].sum(), [x, *deep.parameters()])
    assert all(g.isfinite().all() for g in grads)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("dtype, scale", [(torch.float64, 1e-310), (torch.float64, 1e-308), (torch.float32, 1e-40)])
def test_relative_thresholds_give_a_subnormal_sample_finite_gradients(backend, dtype, scale):
    """A sample whose largest entry is near the smallest normal number got a NaN input gradient in every entry
    (float64 from ~1e-308, float32 from ~1e-39): the RMS's peak normalisation was differentiated, forming
    (x / peak) / peak = inf. The layer is positively homogeneous, so its input gradient at c x is the one at x."""
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(2, 3, 3, n_iter=3, lam=0.1, step=0.2, relative=True, backend=backend).to(dtype)
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64)
    tiny = (x * scale).to(dtype).requires_grad_(True)
    unit = (tiny.detach().double() / scale).to(dtype).requires_grad_(True)
    z = layer(tiny)
    g = torch.randn_like(z)
    (got,) = torch.autograd.grad((z * g).sum(), tiny)
    (want,) = torch.autograd.grad((layer(unit) * g).sum(), unit)
    assert got.isfinite().all()
    # the upstream gradient times the scale is itself subnormal there: a few digits go
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


def test_soft_threshold_refuses_a_non_tensor_by_name():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        SoftThreshold(0.1, 3)([1.0, 2.0])


def test_repr_shows_a_fixed_scalar_threshold():
    assert "lam=0.1," in repr(ConvSparseCoding2d(1, 8, 5))
    assert "threshold=0.2," in repr(ConvSparseCoding2d(1, 8, 5, threshold=0.2, nonneg=True))
    # SoftThreshold(0.1) and SoftThreshold(0.5) printed alike: "SoftThreshold(nonneg=False, learnable=False)"
    assert repr(SoftThreshold(0.5)) == "SoftThreshold(threshold=0.5, nonneg=False, learnable=False)"
    assert repr(SoftThreshold(0.5, 3, learnable=True)) == "SoftThreshold(num_channels=3, nonneg=False, learnable=True)"
    assert "threshold=" not in repr(SoftThreshold(0.5, device="meta"))


def test_repr_shows_a_fixed_step_and_fixed_value_tensors():
    # a fixed step and fixed per-channel or per-iteration lam / threshold tensors did not appear at all
    assert "step=0.05," in repr(ConvSparseCoding2d(1, 8, 5, step=0.05))
    assert "step of shape (3,)," in repr(ConvSparseCoding2d(1, 8, 5, n_iter=3, step=torch.full((3,), 0.05)))
    assert "lam of shape (8,)," in repr(ConvSparseCoding2d(1, 8, 5, lam=torch.full((8,), 0.1)))
    assert "threshold of shape (2, 8)," in repr(ConvSparseCoding2d(1, 8, 5, n_iter=2, threshold=torch.ones(2, 8)))
    assert "step=1/L (tracked)" in repr(ConvSparseCoding2d(1, 8, 5)) and "step=" not in repr(
        ConvSparseCoding2d(1, 8, 5, learn_step=True, step=0.1)
    )


@pytest.mark.parametrize("step", [None, 0.1])
def test_per_sample_gradients_of_a_training_layer_under_vmap(step):
    """vmap(grad(...)) over samples in training mode: the all-zero check read a value (bool) and the tracked step's
    refresh wrote wrapped values into the module's buffers, both refused by vmap. Each sample's gradient must equal
    plain autograd on that sample alone, and the transform must leave the module's state as it was."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    layer = ConvSparseCoding2d(1, 4, 3, n_iter=4, step=step, backend="reference").train()
    with torch.no_grad():
        layer.weight.add_(0.3 * torch.randn_like(layer.weight))  # as after an optimiser step: the step is stale
    params = {k: v.detach() for k, v in layer.named_parameters()}
    state = {k: v.clone() for k, v in layer.named_buffers()}

    def loss(p, xi):
        return torch.func.functional_call(layer, p, (xi.unsqueeze(0),)).pow(2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    assert all(torch.equal(v, state[k]) for k, v in layer.named_buffers())
    for i in range(len(x)):
        copy = ConvSparseCoding2d(1, 4, 3, n_iter=4, step=step, backend="reference").train()
        copy.load_state_dict(layer.state_dict())
        copy._power_vector.copy_(layer._power_vector)
        copy._estimated_weight.copy_(layer._estimated_weight)
        copy(x[i : i + 1]).pow(2).sum().backward()
        torch.testing.assert_close(per_sample["weight"][i], copy.weight.grad, rtol=1e-5, atol=1e-6)


def test_vmap_over_dictionaries_gives_each_its_own_step():
    """An ensemble of dictionaries under vmap (eval): each runs with its own 1/L (the module's step would make the
    3x larger one diverge), the module's own values get exactly its step, and the module's state is left alone."""
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(1, 4, 3, n_iter=5, backend="reference").eval()
    x = torch.randn(2, 1, 8, 8)
    want, step = layer(x), layer.step.clone()
    weights = torch.stack([layer.weight.detach(), 3.0 * layer.weight.detach()])
    batched = torch.func.vmap(lambda w: torch.func.functional_call(layer, {"weight": w}, (x,)))(weights)
    torch.testing.assert_close(batched[0], want, rtol=1e-5, atol=1e-6)  # vmap's batched convolutions round apart
    assert torch.equal(layer.step, step)
    inverse_lipschitz = _inverse_lipschitz(weights[1])
    expected = DF.conv_ista(x, weights[1], layer.lam, n_iter=5, step=inverse_lipschitz, padding=1)
    torch.testing.assert_close(batched[1], expected, rtol=1e-2, atol=1e-2)  # the layer's grid against a finer one


def test_a_state_dict_taken_after_functional_call_holds_the_modules_own_step():
    """functional_call on an eval layer left the substituted weight's 1/L in the step buffer until the next
    forward: a state_dict or a copy taken in between reloaded into a layer whose outputs were off by 0.56."""
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=10).eval()
    x = torch.randn(2, 2, 8, 8)
    want = layer(x).detach()
    for copy_of in (lambda m: m.state_dict(), lambda m: __import__("copy").deepcopy(m)):
        torch.func.functional_call(layer, {"weight": 1.5 * layer.weight.detach()}, (x,))
        saved = copy_of(layer)
        if isinstance(saved, dict):
            restored = ConvSparseCoding2d(2, 4, 3, n_iter=10).eval()
            restored.load_state_dict(saved)
        else:
            restored = saved
        assert torch.equal(restored(x), want)
    assert torch.equal(layer(x), want)


def test_checkpointed_training_forward_differentiates_the_step_it_ran_with():
    """torch.utils.checkpoint replays a training forward in the backward. The replay advanced the tracked step's
    power iteration, so the gradient (0.6% off) belonged to another step than the output; a layer applied twice
    on the same weight now runs both times with one step."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = ConvSparseCoding2d(1, 8, 5, n_iter=10, dtype=torch.float64, backend="reference")
    with torch.no_grad():
        layer.weight.add_(0.5 * torch.randn_like(layer.weight))  # as after an optimiser step
    twin = __import__("copy").deepcopy(layer)
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    plain = torch.autograd.grad(layer(x).pow(2).sum(), layer.weight)[0]
    replayed = torch.autograd.grad(checkpoint(twin, x, use_reentrant=False).pow(2).sum(), twin.weight)[0]
    assert torch.equal(plain, replayed) and torch.equal(layer.step, twin.step)
    step = layer.step.clone()
    layer(x)
    assert torch.equal(layer.step, step)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_cpu_training_forward_on_an_unchanged_weight_runs_no_power_iteration(channels, monkeypatch):
    """A training forward re-estimates the tracked step only where the weight changed, and ran the power iterations
    on every forward anyway, discarding them on the device when it had not (a gradient-accumulation loop's later
    micro-batches: 3 to 20 iterations each). On the CPU the decision is read first: none then, the same step."""
    from dsc_kernels.reference import spectrum

    calls = count_calls(monkeypatch, spectrum, "dictionary_norm_sq")
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(channels, 4, 3, n_iter=3, backend="reference")
    with torch.no_grad():
        layer.weight.add_(0.1 * torch.randn_like(layer.weight))  # as after an optimiser step
    x = torch.randn(2, channels, 8, 8)
    calls[0] = 0
    layer(x).sum().backward()
    assert calls[0] == 1
    step, vector = layer.step.clone(), layer._power_vector.clone()
    for _ in range(3):  # micro-batches before the next optimiser step
        layer(x).sum().backward()
    assert calls[0] == 1
    assert torch.equal(layer.step, step) and torch.equal(layer._power_vector, vector)
    with torch.no_grad():
        layer.weight.mul_(1.5)
    layer(x)
    assert calls[0] == 2
    torch.testing.assert_close(layer.step, step / 1.5**2, rtol=2e-3, atol=0)


def test_a_parametrized_weight_is_not_taken_for_a_changed_one():
    """torch.nn.utils.parametrize computes weight anew at every access: every eval forward re-estimated 1/L (50
    power iterations) and the step drifted between identical calls. The original tensor's version is read now."""
    from torch.nn.utils import parametrize

    class UnitAtoms(torch.nn.Module):
        def forward(self, w):
            return w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)

    layer = ConvSparseCoding2d(1, 4, 3, n_iter=5, backend="reference")
    parametrize.register_parametrization(layer, "weight", UnitAtoms())
    layer.eval()
    x = torch.randn(2, 1, 8, 8)
    first = layer(x)
    step = layer.step.clone()
    assert torch.equal(layer(x), first) and torch.equal(layer.step, step)
    with torch.no_grad():
        layer.parametrizations.weight.original.add_(torch.randn_like(layer.weight))
    layer(x)
    assert not torch.equal(layer.step, step)  # an edit of the original still counts


def test_a_parametrization_change_of_its_own_parameter_or_weight_norm_is_followed():
    """A parametrization's own parameter changes weight too: following only its `original` kept the old 1/L and
    ISTA diverged (NaN). weight_norm keeps two originals, and fell back to the new tensor of every access."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.s = torch.nn.Parameter(torch.ones(()))

        def forward(self, w):
            return w * self.s

    torch.manual_seed(0)
    layer = ConvSparseCoding2d(1, 4, 3, n_iter=50, lam=0.01, backend="reference").eval()
    parametrize.register_parametrization(layer, "weight", Scale())
    x = torch.randn(2, 1, 16, 16)
    layer(x)
    with torch.no_grad():
        layer.parametrizations.weight[0].s.fill_(3.0)
    assert torch.isfinite(layer(x)).all()
    assert float(layer.step) == pytest.approx(float(layer.refresh_step_()), rel=1e-3)

    normed = weight_norm(ConvSparseCoding2d(1, 8, 3, n_iter=5, backend="reference"), name="weight", dim=0).eval()
    normed(x)
    step = normed.step.clone()
    for _ in range(3):
        normed(x)
    assert torch.equal(normed.step, step)


def _spectral_normed(backend="reference"):
    from torch.nn.utils.parametrizations import spectral_norm

    return spectral_norm(ConvSparseCoding2d(3, 8, 3, n_iter=4, backend=backend), name="weight")


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_a_spectral_normed_layer_takes_one_power_iteration_per_training_forward(backend):
    """spectral_norm runs its power iteration at every read of weight in training mode; the forward read weight five
    times (the step's estimate, its source, the iterations), so u and v moved five times per step where nn.Conv2d's
    move once, and ISTA ran on another weight than the one its 1/L was estimated from."""
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    layer = _spectral_normed(backend)
    conv = spectral_norm(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), name="weight")
    with torch.no_grad():
        conv.parametrizations.weight.original.copy_(layer.parametrizations.weight.original)
        conv.parametrizations.weight[0]._u.copy_(layer.parametrizations.weight[0]._u)
        conv.parametrizations.weight[0]._v.copy_(layer.parametrizations.weight[0]._v)
    x = torch.randn(2, 3, 10, 11)
    z = layer(x)
    conv(x)
    assert torch.equal(layer.parametrizations.weight[0]._u, conv.parametrizations.weight[0]._u)
    assert torch.equal(layer.parametrizations.weight[0]._v, conv.parametrizations.weight[0]._v)
    weight = conv.eval().weight.detach()  # the weight of that one iteration
    assert float(layer.step) == pytest.approx(1 / _dictionary_lipschitz(weight, (10, 11)), rel=5e-2)
    expected = DF.conv_ista(x, weight, 0.1, n_iter=4, step=layer.step, padding=1, backend="reference")
    torch.testing.assert_close(z, expected)


def test_a_refused_call_leaves_a_spectral_normed_layer_as_it_was():
    """The forward evaluated a parametrized weight before checking x: in training mode a call refused for its x ran
    spectral_norm's power iteration first, so each refused call moved u and v (4 of 4 here)."""
    torch.manual_seed(0)
    layer = _spectral_normed()
    norm = layer.parametrizations.weight[0]
    u, v = norm._u.clone(), norm._v.clone()
    bad = [torch.randn(2, 4, 8, 8), torch.randn(3, 8, 8), "x", torch.ones(2, 3, 8, 8, dtype=torch.int64)]
    for x in bad:
        with pytest.raises((ValueError, TypeError), match="x must"):
            layer(x)
    assert torch.equal(norm._u, u) and torch.equal(norm._v, v)


def test_reading_a_spectral_normed_layers_state_in_training_mode_leaves_it_as_it_was():
    """state_dict(), deepcopy and .to() read weight (is the step stale?), and load_state_dict's hook re-estimates
    1/L from it: in training mode each read ran spectral_norm's power iteration on u and v, so saving changed the
    module and a layer loaded in training mode computed another weight than the saved one (codes 5e-4 off)."""
    import copy

    torch.manual_seed(0)
    layer = _spectral_normed()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(2, 3, 10, 11)
    for _ in range(2):
        optimizer.zero_grad()
        layer(x).pow(2).sum().backward()
        optimizer.step()
    before = {k: v.clone() for k, v in layer.state_dict(keep_vars=True).items()}
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    copy.deepcopy(layer)
    layer.to(torch.float32)
    for name, value in layer.state_dict(keep_vars=True).items():
        assert torch.equal(value, before[name]), name
    loaded = _spectral_normed()  # in training mode, as a fresh module is
    loaded.load_state_dict(saved)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, saved[name]), name
    torch.testing.assert_close(loaded.eval()(x), layer.eval()(x), rtol=0, atol=0)


def test_a_parametrized_layers_forward_leaves_other_threads_parametrized_tensors_alone(monkeypatch):
    """The forward evaluated a parametrized weight once through parametrize.cached(), which is process-wide: while
    it ran, every parametrized tensor read on another thread came from that cache, which outlived the changes made
    there (a weight_norm nn.Linear edited between two forwards returned the old output; trained, its backward raised
    "Trying to backward through the graph a second time"). Forced here: the layer's forward pauses on one thread
    while the main thread uses the Linear."""
    import threading

    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    layer = weight_norm(ConvSparseCoding2d(2, 3, 3, n_iter=2, backend="reference"), name="weight").eval()
    linear = weight_norm(torch.nn.Linear(4, 4, bias=False), name="weight")
    inside, leave = threading.Event(), threading.Event()
    check_input = sparse_coding._ConvSparseCoding._check_input

    def pausing_check(self, x):
        if threading.current_thread() is not threading.main_thread():
            inside.set()
            leave.wait(5)
        check_input(self, x)

    monkeypatch.setattr(sparse_coding._ConvSparseCoding, "_check_input", pausing_check)

    def forward():
        with torch.no_grad():
            layer(torch.randn(1, 2, 6, 6))

    thread = threading.Thread(target=forward)
    thread.start()
    try:
        assert inside.wait(5)
        y = torch.randn(3, 4)
        with torch.no_grad():
            linear(y)
            linear.parametrizations.weight.original0.mul_(2.0)  # the norms g: the weight doubles
            after = linear(y)
    finally:
        leave.set()
        thread.join(10)
    with torch.no_grad():
        torch.testing.assert_close(after, linear(y), rtol=0, atol=0)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_child_forked_while_another_thread_held_the_layer_locks_runs_its_layers():
    """Eval forwards take _STEP_LOCK and building a layer takes _projection's lock. A child forked (DataLoader
    workers, multiprocessing's fork) while another thread of the parent held one inherited it held by a thread that
    does not exist there: its first eval forward (or layer built) waited forever."""
    from helpers import child_exit_code_forked_under_held_locks

    from dsc_kernels.nn import _projection

    torch.manual_seed(0)
    layer = ConvSparseCoding2d(1, 2, 3, n_iter=2, backend="reference").eval()
    x = torch.randn(1, 1, 5, 5)
    with torch.no_grad():
        expected = layer(x)

    def child() -> bool:
        torch.set_num_threads(1)  # torch's own thread pool does not survive a fork here
        with torch.no_grad():
            ok = torch.equal(layer(x), expected)
        ConvSparseCoding2d(1, 2, 3, n_iter=1, backend="reference")
        return ok

    code = child_exit_code_forked_under_held_locks([sparse_coding._STEP_LOCK, _projection._LOCK], child, timeout=10)
    assert code != -1, "the forked child hung on a lock its parent's thread held at the fork"
    assert code == 0


def test_a_layer_pickled_before_the_estimated_weight_buffer_loads_and_runs():
    """Whole modules pickled by an earlier version lack the _estimated_weight buffer: torch.load raised."""
    import io

    torch.manual_seed(0)
    layer = ConvSparseCoding2d(1, 4, 3, n_iter=5, backend="reference")
    x = torch.randn(1, 1, 8, 8)
    want = layer.eval()(x)
    del layer._buffers["_estimated_weight"]  # as an earlier version pickled it
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x), want)
    loaded.train()(x).sum().backward()


def test_layers_take_numpy_scalars_like_functional():
    """np.float32 is no float subclass: the layers refused it for lam, step, threshold and bias while functional
    took it; np.bool_ stays refused."""
    import numpy as np

    from dsc_kernels.nn import MultiLayerSparseCoding2d, SparseCodingTransformerBlock

    value = np.float32(0.1)
    ConvSparseCoding2d(1, 4, 3, lam=value)
    ConvSparseCoding2d(1, 4, 3, threshold=value)
    layer = ConvSparseCoding2d(1, 4, 3, step=value, n_iter=2, backend="reference")
    assert float(layer.step) == pytest.approx(0.1)
    SoftThreshold(value)
    DeepSparseCoding2d([1, 4, 8], 3, lams=value)
    MultiLayerSparseCoding2d([1, 4], 3, bias=np.float32(-0.1), nonneg=False)
    SparseCodingTransformerBlock(8, 2, lam=value)
    with pytest.raises(TypeError, match="lam must be a float or a tensor"):
        ConvSparseCoding2d(1, 4, 3, lam=np.bool_(True))


def test_eval_output_depends_on_the_dictionary_values_not_its_tensor():
    """An eval forward re-estimated 1/L (another number, from more power iterations) whenever the weight tensor or
    its version changed, even with the same values: functional_call with the module's own values, a tied
    dictionary loaded from a state_dict, and an in-place no-op all changed the output."""
    from torch.func import functional_call

    torch.manual_seed(0)
    x = torch.randn(2, 2, 12, 12)
    m = ConvSparseCoding2d(2, 8, 5, n_iter=6, lam=0.05, backend="reference").eval()
    want = m(x)
    same = {k: v.detach().clone() for k, v in m.named_parameters()}
    assert torch.equal(functional_call(m, same, (x,)), want)
    with torch.no_grad():
        m.weight.clamp_(-10, 10)  # changes no value
    assert torch.equal(m(x), want)

    def tied():
        a = ConvSparseCoding2d(2, 8, 5, n_iter=6, backend="reference")
        b = ConvSparseCoding2d(2, 8, 5, n_iter=6, fista=True, backend="reference")
        b.weight = a.weight
        return torch.nn.ModuleList([a, b])

    trained = tied()
    opt = torch.optim.SGD(trained.parameters(), lr=0.5)
    for _ in range(2):
        loss = trained[0](x).pow(2).mean() + trained[1](x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained.eval()
    want = trained[0](x)
    loaded = tied()
    loaded.load_state_dict(trained.state_dict())
    assert torch.equal(loaded.eval()[0](x), want)
    before = float(m.step)
    with torch.no_grad():
        m.weight.mul_(1.5)  # a real change still re-estimates
    m(x)
    assert float(m.step) == pytest.approx(before / 1.5**2, rel=0.05)


def test_a_deep_copy_of_a_parametrized_layer_still_projects_its_parameters():
    """parametrize gives a parametrized module a __deepcopy__ that copies __dict__ and skipped the registration for
    projection: the copy's learned lam went negative after an optimiser step and its next forward raised."""
    import copy

    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    layer = ConvSparseCoding2d(1, 4, 3, n_iter=3, learn_lam=True, backend="reference")
    weight_norm(layer, "weight")
    clone = copy.deepcopy(layer)
    opt = torch.optim.SGD(clone.parameters(), lr=1.0)
    loss = clone(x).pow(2).mean() + 10 * clone.lam.sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert float(clone.lam.min()) >= 0
    clone(x)


@pytest.mark.parametrize("held", [False, True])
def test_functional_call_in_training_mode_gives_the_module_its_own_step_back(held, monkeypatch):
    """A training forward under functional_call wrote the substitute's 1/L and vector into the module; its own
    weight's next training forward then re-estimated warm from that vector, and with the three iterations of a GPU or
    compiled forward kept a step 3.5% above its 1/L (16 -> 16 channels), for good: an unchanged weight is not
    re-estimated again."""
    monkeypatch.setattr(sparse_coding, "POWER_STEPS_MAX_PER_FORWARD", sparse_coding.POWER_STEPS_PER_FORWARD)
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(16, 16, 3, n_iter=3, backend="reference", dtype=torch.float64)
    x = torch.randn(2, 16, 12, 12, dtype=torch.float64)
    want, step = layer(x), layer.step.clone()
    substitutes = [torch.randn_like(layer.weight) for _ in range(2)]
    for weight in substitutes if held else (torch.randn_like(layer.weight) for _ in range(2)):
        torch.func.functional_call(layer, {"weight": weight}, (x,))
    assert torch.equal(layer.state_dict()["step"], step)
    torch.func.functional_call(layer, {"weight": substitutes[0]}, (x,))
    assert torch.equal(layer(x), want) and torch.equal(layer.step, step)


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.SGD])
def test_an_eval_forward_after_a_fused_optimiser_step_re_estimates_the_step(optimizer):
    """torch.optim's fused steps write the weight without bumping its version counter: the eval forward after one
    ran with the previous weight's step (4.8x its 1/L after one Adam step at lr 0.5, ISTA diverging), and
    state_dict saved that step."""
    torch.manual_seed(0)
    layer = ConvSparseCoding1d(4, 16, 7, n_iter=4, dtype=torch.float64)
    x = torch.randn(2, 4, 13, dtype=torch.float64)
    layer.eval()(x)
    opt = optimizer(layer.parameters(), lr=0.5, fused=True)
    ((layer.train()(x) ** 2).sum() + (layer.weight**2).sum()).backward()
    opt.step()
    saved = layer.state_dict()["step"]
    layer.eval()(x)
    atoms = torch.fft.rfft(layer.weight.detach(), n=1024, dim=2).permute(2, 1, 0)  # (frequency, C_sig, C_code)
    want = torch.linalg.matrix_norm(atoms, ord=2).max() ** -2  # 1/L of infinite signals: a tracked L is <= 1% below
    assert torch.allclose(layer.step, want, rtol=0.02) and torch.allclose(saved, want, rtol=0.02)


@pytest.mark.parametrize("modes", [(False, False), (True, False), (False, True)])
def test_successive_functional_calls_in_eval_mode_give_the_module_its_own_step_back(modes):
    """An eval forward on a second substitute in a row overwrote the module's own step kept by the first: its
    state_dict then saved a re-estimate 0.1% off its step, and its next eval forward ran with a cold one."""
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(16, 16, 3, n_iter=3, backend="reference", dtype=torch.float64).eval()
    x = torch.randn(2, 16, 12, 12, dtype=torch.float64)
    want, step = layer(x), layer.step.clone()
    for training in modes:
        torch.func.functional_call(layer.train(training), {"weight": torch.randn_like(layer.weight)}, (x,))
    assert torch.equal(layer.state_dict()["step"], step)
    assert torch.equal(layer.eval()(x), want) and torch.equal(layer.step, step)


@pytest.mark.parametrize("training", [True, False])
def test_a_new_weight_gets_its_own_step_back_after_functional_call(training):
    """A step kept for the old weight (alive, say in an optimiser, and unchanged) stood for the module's own weight
    after a new nn.Parameter was assigned: a functional_call then kept the old one's instead, and the new weight got
    a re-estimate back (step 3e-4 off in training, its state_dict 0.09% off in eval; 16 -> 16 channels)."""
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(16, 16, 3, n_iter=3, backend="reference", dtype=torch.float64)
    x = torch.randn(2, 16, 12, 12, dtype=torch.float64)
    old = layer.weight
    torch.func.functional_call(layer, {"weight": torch.randn_like(old)}, (x,))
    layer.weight = torch.nn.Parameter(torch.randn_like(old))
    want, step = layer.train(training)(x), layer.step.clone()
    torch.func.functional_call(layer, {"weight": torch.randn_like(old)}, (x,))
    assert torch.equal(layer.state_dict()["step"], step)
    assert torch.equal(layer(x), want) and torch.equal(layer.step, step)


def test_normalize_dictionary_leaves_a_zero_atom_zero():
    # the docstring's "zero atoms stay zero": dividing by a zero norm would make that atom 0/0 = NaN, and every code
    # (and the tracked step) with it
    layer = ConvSparseCoding1d(2, 4, 3, backend="reference")
    with torch.no_grad():
        layer.weight.mul_(3.0)
        layer.weight[1].zero_()
    layer.normalize_dictionary_()
    norms = layer.weight.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert torch.isfinite(layer.step).all()
    assert torch.isfinite(layer(torch.randn(2, 2, 12))).all()


def test_anisotropic_stride_and_padding_match_an_independent_ista():
    # ISTA written out from the class docstring, stride and padding different per axis, on a square signal: a swap
    # of stride or padding between H and W still runs (both codes fit), and only this comparison shows it
    torch.manual_seed(0)
    stride, padding, lam, step, n_iter = (1, 2), (2, 0), 0.05, 0.2, 4
    layer = ConvSparseCoding2d(2, 3, (3, 5), stride=stride, padding=padding, n_iter=n_iter, lam=lam, step=step)
    layer = layer.double()
    x = torch.randn(2, 2, 11, 11, dtype=torch.float64)
    w = layer.weight.detach()
    z = torch.zeros(2, 3, (11 + 4 - 3) // 1 + 1, (11 - 5) // 2 + 1, dtype=torch.float64)
    for _ in range(n_iter):
        out_pad = [
            n - ((nz - 1) * s - 2 * p + k) for n, nz, s, p, k in zip((11, 11), z.shape[2:], stride, padding, (3, 5))
        ]
        dz = torch.nn.functional.conv_transpose2d(z, w, stride=stride, padding=padding, output_padding=out_pad)
        u = z + step * torch.nn.functional.conv2d(x - dz, w, stride=stride, padding=padding)
        z = torch.sign(u) * torch.clamp(u.abs() - step * lam, min=0)
    torch.testing.assert_close(layer(x), z)


@pytest.mark.parametrize("name", ["thresholds", "lams"])
def test_deep_stack_gives_each_layer_its_own_threshold(name):
    # per-layer thresholds (lams) reach their layer: a huge one silences only the layer it is given to
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    options = dict(n_iter=2, relative=False, backend="reference", dtype=torch.float64)
    g1, g2 = DeepSparseCoding2d([1, 4, 6], 3, **{name: [0.0, 1e6]}, **options).eval()(x)
    assert bool((g1 > 0).any()) and bool((g2 == 0).all())
    g1, g2 = DeepSparseCoding2d([1, 4, 6], 3, **{name: [1e6, 0.0]}, **options).eval()(x)
    assert bool((g1 == 0).all())


# ---- independent computations from the class docstring (mutation testing, round 2)
def _independent_ista(x, w, e, lam_t, step, n_iter, stride=1, padding=1, nonneg=False):
    """ISTA written out from the docstring: z <- S_t(z + step E(x - D z)), D = conv_transpose, E = conv(., e);
    lam_t: the threshold step * lam, a float or one per sample (B,)."""
    conv, tconv = torch.nn.functional.conv2d, torch.nn.functional.conv_transpose2d
    t = torch.as_tensor(lam_t, dtype=x.dtype).reshape(-1, 1, 1, 1)
    z = torch.zeros_like(conv(x, w, stride=stride, padding=padding))
    for _ in range(n_iter):
        dz = tconv(z, w, stride=stride, padding=padding)
        pad = [n - m for n, m in zip(x.shape[2:], dz.shape[2:])]
        dz = tconv(z, w, stride=stride, padding=padding, output_padding=pad)
        u = z + step * conv(x - dz, e, stride=stride, padding=padding)
        z = torch.clamp(u - t, min=0) if nonneg else torch.sign(u) * torch.clamp(u.abs() - t, min=0)
    return z


def _independent_lipschitz(w, size, stride=1, padding=0, n_iter=300):
    """||D||^2 at this signal size by power iteration on D^T D (conv2d / conv_transpose2d)."""
    conv, tconv = torch.nn.functional.conv2d, torch.nn.functional.conv_transpose2d
    x = torch.randn(1, w.shape[1], *size, dtype=w.dtype, generator=torch.Generator().manual_seed(1))
    z = conv(x, w, stride=stride, padding=padding)
    for _ in range(n_iter):
        z = z / z.norm()
        dz = tconv(z, w, stride=stride, padding=padding)
        dz = tconv(z, w, stride=stride, padding=padding, output_padding=[n - m for n, m in zip(size, dz.shape[2:])])
        z = conv(dz, w, stride=stride, padding=padding)
    return float((z * z).sum().sqrt())


def test_a_training_forward_after_an_in_place_edit_of_one_atom_re_estimates_the_step():
    # a change of some of the weight's values (one atom rescaled under no_grad, a sparse update) is a change: the
    # training forward's re-estimate must not wait for every value to differ
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=2, backend="reference").double().train()
    x = torch.randn(1, 2, 12, 12, dtype=torch.float64)
    layer(x)
    with torch.no_grad():
        layer.weight[0] *= 4.0
    layer(x)
    ratio = float(layer.step) * _independent_lipschitz(layer.weight.detach(), (48, 48), padding=1)
    assert 0.9 < ratio < 1.1, ratio


@pytest.mark.parametrize("size", [(5, 23), (23, 5)])
def test_functional_default_step_follows_a_change_of_geometry_with_the_same_weight(size):
    # one ISTA step from zero with lam = 0 is z = step * D^T x: the default step read off the code, for the same
    # weight tensor at another stride, padding and (non-square) size each call
    torch.manual_seed(0)
    w = torch.randn(3, 2, 3, 4, dtype=torch.float64)
    for stride, padding in [(1, 0), (2, 1), ((1, 3), (2, 0)), (1, 0)]:
        x = torch.randn(1, 2, *size, dtype=torch.float64)
        z = DF.conv_ista(x, w, 0.0, n_iter=1, stride=stride, padding=padding, backend="reference")
        analysis = torch.nn.functional.conv2d(x, w, stride=stride, padding=padding)
        step = float((z * analysis).sum() / (analysis * analysis).sum())
        ratio = step * _independent_lipschitz(w, size, stride, padding)
        assert 0.97 < ratio < 1.03, (stride, padding, ratio)


def test_a_loaded_step_is_kept_exactly_through_the_next_eval_forward():
    # "A loaded step is kept as is": a saved step that is not the cold 1/L (here half of it, as a lagging or hand-set
    # one would be) is neither replaced at load nor re-estimated by the loaded layer's first eval forward
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=3, backend="reference").double().eval()
    with torch.no_grad():
        layer.step.mul_(0.5)
    saved = layer.state_dict()
    copy = ConvSparseCoding2d(2, 4, 3, n_iter=3, backend="reference").double().eval()
    copy.load_state_dict(saved)
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    z = copy(x)
    assert float(copy.step) == float(saved["step"])
    w = copy.weight.detach()
    torch.testing.assert_close(z, _independent_ista(x, w, w, float(saved["step"]) * 0.1, float(saved["step"]), 3))


def test_a_dtype_conversion_after_an_unseen_in_place_edit_still_re_estimates_the_step():
    # an in-place edit under no_grad after the last estimate, then .double(): the conversion must not declare the
    # old step current for the converted weight
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=2, backend="reference").eval()
    x = torch.randn(1, 2, 8, 8)
    layer(x)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    layer = layer.double()
    layer(x.double())
    ratio = float(layer.step) * _independent_lipschitz(layer.weight.detach(), (48, 48), padding=1)
    assert 0.95 < ratio < 1.05, ratio


def test_each_state_dict_after_a_dictionary_change_saves_that_dictionarys_step():
    # the saved step is computed once per weight version: a second change before the next forward (two optimiser
    # steps, or edits, between checkpoints) must not save the step computed for the first
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=2, backend="reference").double().train()
    layer(torch.randn(1, 2, 8, 8, dtype=torch.float64))
    for factor in (2.0, 3.0):
        with torch.no_grad():
            layer.weight.mul_(factor)
        saved = float(layer.state_dict()["step"])
        ratio = saved * _independent_lipschitz(layer.weight.detach(), (48, 48), padding=1)
        assert 0.95 < ratio < 1.05, (factor, ratio)


def test_an_in_place_change_of_a_parametrizations_buffer_is_followed_in_eval():
    # weight = factor * original with factor a buffer of the parametrization (a mask or a fixed scale): editing it
    # changes the dictionary, and the next eval forward must take the new 1/L
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("factor", torch.tensor(1.0, dtype=torch.float64))

        def forward(self, w):
            return self.factor * w

    torch.manual_seed(0)
    layer = ConvSparseCoding2d(2, 4, 3, n_iter=2, backend="reference").double().eval()
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", Scaled())
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    layer(x)
    layer.parametrizations.weight[0].factor.fill_(3.0)
    layer(x)
    ratio = float(layer.step) * _independent_lipschitz(layer.weight.detach(), (48, 48), padding=1)
    assert 0.95 < ratio < 1.05, ratio


def test_project_reaches_the_constrained_layers_inside_a_model():
    # project_ is for loops that update parameters without torch.optim; it was checked only on a bare layer, so a
    # project_ that looked at the top module alone (projecting nothing inside an nn.Sequential) passed
    from dsc_kernels.nn import project_

    layer = ConvSparseCoding2d(1, 3, 3, n_iter=2, learn_lam=True, backend="reference")
    signed, one_sided = SoftThreshold(0.2, 3, learnable=True), SoftThreshold(0.2, 3, learnable=True, nonneg=True)
    model = torch.nn.Sequential(layer, torch.nn.Sequential(signed, one_sided))
    with torch.no_grad():
        for p in (layer.lam, signed.threshold, one_sided.threshold):
            p.copy_(torch.tensor([-1.0, 0.5, -2.0]).reshape(p.shape) if p.numel() == 3 else p.new_full(p.shape, -1.0))
    assert project_(model) is model
    assert float(layer.lam.detach().min()) == 0.0
    assert signed.threshold.tolist() == [0.0, 0.5, 0.0]  # max(t, 0), elementwise
    assert one_sided.threshold.tolist() == [-1.0, 0.5, -2.0]  # max(x - t, 0) takes any t: left alone


def test_an_optimizer_step_while_another_thread_builds_a_layer(monkeypatch):
    """The projection hooks iterate the registered layers: a layer built (or deep-copied) on another thread during
    that iteration changed the set under it, and optimizer.step() raised "Set changed size during iteration"
    (within 10 steps next to a thread building layers). Forced here: the iteration pauses after its first layer
    while the other thread builds one."""
    import threading
    import weakref

    from dsc_kernels.nn import _projection

    paused, built = threading.Event(), threading.Event()

    class PausingSet(weakref.WeakSet):
        def __iter__(self):
            for i, layer in enumerate(super().__iter__()):
                if i == 1 and threading.current_thread() is threading.main_thread():
                    paused.set()
                    built.wait(0.5)  # the other thread may instead wait for the iteration to end
                yield layer

    layers = PausingSet()
    monkeypatch.setattr(_projection, "_LAYERS", layers)
    model = SoftThreshold(learnable=True)
    others = [SoftThreshold(learnable=True) for _ in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4)).sum().backward()

    def build():
        paused.wait(5)
        others.append(SoftThreshold(learnable=True))
        built.set()

    thread = threading.Thread(target=build)
    thread.start()
    try:
        opt.step()
    finally:
        paused.set()
        thread.join(5)
    assert len(list(layers)) == 5


def test_eval_forwards_on_two_threads_re_estimate_a_changed_weight_once(monkeypatch):
    """An eval forward re-estimates 1/L of a changed weight and writes it into the module. A second thread's forward
    that checked the step after the first had written its vector but before it noted the weight as estimated saw it
    stale too and re-estimated again from that vector: both outputs and the module's step then differed from a serial
    run (step 0.005094607826 -> 0.005094607361), and the first thread's kernel read the step while it was rewritten.
    Forced here: the first forward pauses there while the second one runs."""
    import copy
    import threading

    torch.manual_seed(0)
    layer = ConvSparseCoding2d(3, 8, 5, n_iter=6, lam=0.1, backend="reference").eval()
    with torch.no_grad():
        layer.weight.mul_(1.7)
    x = torch.randn(2, 3, 12, 12)
    serial = copy.deepcopy(layer)
    serial._step_source = None  # the copy carried "up to date" over from the original's stale state: stale again
    with torch.no_grad():
        expected = [serial(x), serial(x)]

    wrote, second_done = threading.Event(), threading.Event()
    first = {}
    note = sparse_coding._ConvSparseCoding._note_step_source

    def pausing_note(self):
        if not first and threading.current_thread() is not threading.main_thread():
            first["thread"] = threading.current_thread()
            wrote.set()
            second_done.wait(0.5)  # the second forward may instead wait for this one to end
        note(self)

    monkeypatch.setattr(sparse_coding._ConvSparseCoding, "_note_step_source", pausing_note)
    outputs = {}

    def forward(name, done=None):
        with torch.no_grad():
            outputs[name] = layer(x)
        if done is not None:
            done.set()

    threads = [threading.Thread(target=forward, args=("first",))]
    threads[0].start()
    assert wrote.wait(5)
    threads.append(threading.Thread(target=forward, args=("second", second_done)))
    threads[1].start()
    for thread in threads:
        thread.join(10)
    assert torch.equal(layer.step, serial.step)
    assert torch.equal(outputs["first"], expected[0]) and torch.equal(outputs["second"], expected[1])


@pytest.mark.parametrize(
    "make", [lambda: ConvSparseCoding2d(1, 4, 3, n_iter=2), lambda: DeepSparseCoding2d([1, 3, 4], 3)]
)
def test_conversion_and_loading_with_swapped_parameters(make, monkeypatch):
    """With torch.__future__.set_swap_module_params_on_conversion(True), .to()/.double() and load_state_dict swap
    parameters through torch.utils.swap_tensors, which refuses a tensor with weak references: the tracked step's
    note of its weight made both raise ("_apply(): Couldn't swap ConvSparseCoding2d.weight")."""
    monkeypatch.setattr(torch.__future__, "_swap_module_params_on_conversion", True)
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    module = make()
    module(x)
    twin = make()
    twin.load_state_dict(module.state_dict())
    module.eval(), twin.eval()
    as_list = lambda out: out if isinstance(out, list) else [out]  # noqa: E731
    with torch.no_grad():  # an output's graph holding the weight would block the swap, as for any nn.Module
        expected = as_list(module(x))
        for a, b in zip(as_list(twin(x)), expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(as_list(module.double()(x.double())), expected):
            torch.testing.assert_close(a, b.double(), rtol=1e-6, atol=1e-6)


def test_a_compiled_eval_forward_loops_its_re_estimate_rather_than_unrolling_it():
    """The eval forward's changed-weight re-estimate (a cold estimate: 50 power iterations) was unrolled into the
    compiled graph: 3246 nodes for a 2-iteration layer, and compiling an eval forward took a minute. The iterations
    are now a torch.while_loop (223 nodes)."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    layer = ConvSparseCoding2d(3, 6, 3, n_iter=2, backend="reference").eval()
    with torch.no_grad():
        torch.compile(layer, fullgraph=True, backend=backend)(torch.randn(1, 3, 8, 8))
    modules = [m for gm in graphs for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
    nodes = sum(1 for m in modules for node in m.graph.nodes if node.op == "call_function")
    assert len(graphs) == 1 and nodes < 500, nodes


def test_a_dynamic_compiled_eval_forward_compiles_without_a_graph_break():
    """Under torch.compile(dynamic=True) dynamo lifted spectrum's math.pi into a graph input read back with .item(),
    which the backend could not compile inside the eval forward's torch.cond (the changed-weight re-estimate): a graph
    break that ran the whole eval forward eagerly (and 15 compiled frames for 3 train/eval rounds instead of 3)."""
    import copy

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = ConvSparseCoding1d(2, 3, 3, n_iter=2, dtype=torch.float64, backend="reference").eval()
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, dynamic=True, backend="aot_eager")
    x = torch.randn(2, 2, 9, dtype=torch.float64)
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        for module in (layer, eager):
            module.weight.mul_(1.5)  # a changed weight: the compiled forward re-estimates its step
        torch.testing.assert_close(compiled(x), eager(x))
        torch.testing.assert_close(layer.step, eager.step)
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
