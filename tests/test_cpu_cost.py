"""auto's CPU choice between eager and the fused cpp conv-ISTA backend (dsc_kernels/ops/cpu_cost.py): a pure
function of the call's key, overridable by backend= and DSC_KERNELS_BACKEND."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

import dsc_kernels.functional as DF
from dsc_kernels import ops
from dsc_kernels.ops import cpu_cost

# (x, weight): many channels on small maps (intensity 1152, above the limit) and one signal channel (8.7)
CONV_BOUND = ((8, 256, 8, 8), (256, 256, 3, 3))
LIGHT = ((8, 1, 8, 8), (32, 1, 3, 3))


def _key(xs, ws, backward):
    return cpu_cost.ConvIstaKey(xs, ws, (1, 1), (1, 1), torch.float32, backward)


def test_intensity_and_code_size():
    key = _key(*CONV_BOUND, True)
    assert key.code_size == (8, 8)
    assert key.intensity == pytest.approx(256 * 9 * 256 * 64 / (256 * 64 + 256 * 64))
    assert not key.kernel_covers_map
    full = cpu_cost.ConvIstaKey((4, 64, 4, 4), (512, 64, 4, 4), (1, 1), (0, 0), torch.float32, True)
    assert full.kernel_covers_map and full.code_size == (1, 1)


def test_choice_by_key():
    assert cpu_cost.faster_on_cpu(_key(*CONV_BOUND, backward=False)) == "cpp"  # inference: always the fused path
    assert cpu_cost.faster_on_cpu(_key(*CONV_BOUND, backward=True)) == "reference"
    assert cpu_cost.faster_on_cpu(_key(*LIGHT, backward=True)) == "cpp"
    # many signal channels under the limit (64 -> 64 on 8 x 8, k 3: I = 288): the fused gemm strategy trains faster
    many = cpu_cost.ConvIstaKey((32, 64, 8, 8), (64, 64, 3, 3), (1, 1), (1, 1), torch.float32, True)
    assert many.intensity < cpu_cost.INTENSITY_LIMIT and cpu_cost.faster_on_cpu(many) == "cpp"
    full = cpu_cost.ConvIstaKey((4, 64, 4, 4), (512, 64, 4, 4), (1, 1), (0, 0), torch.float32, True)
    assert cpu_cost.faster_on_cpu(full) == "cpp"  # a matrix product on the cpp side, whatever the intensity


def test_deterministic_for_a_key():
    first = [cpu_cost.faster_on_cpu(_key(*s, b)) for s in (CONV_BOUND, LIGHT) for b in (False, True)]
    again = [cpu_cost.faster_on_cpu(_key(*s, b)) for s in (CONV_BOUND, LIGHT) for b in (False, True)]
    assert first == again


def _chosen(monkeypatch, xs, ws, backward, env=None):
    if env is None:
        monkeypatch.delenv("DSC_KERNELS_BACKEND", raising=False)
    else:
        monkeypatch.setenv("DSC_KERNELS_BACKEND", env)
    prefers = cpu_cost.hook(xs, ws, (1, 1), (1, 1), torch.float32, backward)
    return ops.select("conv_ista", "auto", torch.device("cpu"), torch.float32, prefers=prefers).name


def test_auto_follows_the_model_and_the_environment_overrides_it(monkeypatch):
    if ops.unavailable_reason("conv_ista", "cpp", "cpu") is not None:
        pytest.skip("the C++ extension is not available")
    assert _chosen(monkeypatch, *CONV_BOUND, backward=True) == "reference"
    assert _chosen(monkeypatch, *CONV_BOUND, backward=False) == "cpp"
    assert _chosen(monkeypatch, *LIGHT, backward=True) == "cpp"
    assert _chosen(monkeypatch, *CONV_BOUND, backward=True, env="cpp") == "cpp"
    assert _chosen(monkeypatch, *LIGHT, backward=True, env="reference") == "reference"


def test_functional_auto_runs_what_the_model_picks(monkeypatch):
    """Through functional: a conv-bound training call runs eager autograd, its no-grad forward the fused op, and
    backend='cpp' runs the fused op whatever the model says. Both give the same z."""
    if ops.unavailable_reason("conv_ista", "cpp", "cpu") is not None:
        pytest.skip("the C++ extension is not available")
    monkeypatch.delenv("DSC_KERNELS_BACKEND", raising=False)
    x, w = torch.randn(CONV_BOUND[0]), 0.1 * torch.randn(CONV_BOUND[1])
    w.requires_grad_()
    z_auto = DF.conv_ista(x, w, 0.05, n_iter=2, step=0.1, padding=1)
    assert "cpp" not in type(z_auto.grad_fn).__name__.lower()
    z_cpp = DF.conv_ista(x, w, 0.05, n_iter=2, step=0.1, padding=1, backend="cpp")
    assert "conv_ista_fwd_cpp" in type(z_cpp.grad_fn).__name__
    with torch.no_grad():
        z_nograd = DF.conv_ista(x, w, 0.05, n_iter=2, step=0.1, padding=1)
    torch.testing.assert_close(z_nograd, z_cpp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_auto.detach(), z_cpp.detach(), rtol=1e-5, atol=1e-5)


def test_recompute_asks_auto_for_a_fused_backward(monkeypatch):
    """recompute=True asks for a backward that keeps nothing code-sized, which eager autograd cannot give: auto takes
    the fused op even where the cost model prefers eager for speed (a conv-bound training call)."""
    if ops.unavailable_reason("conv_ista", "cpp", "cpu") is not None:
        pytest.skip("the C++ extension is not available")
    monkeypatch.delenv("DSC_KERNELS_BACKEND", raising=False)
    x, w = torch.randn(CONV_BOUND[0]), (0.1 * torch.randn(CONV_BOUND[1])).requires_grad_()
    z = DF.conv_ista(x, w, 0.05, n_iter=2, step=0.1, padding=1, recompute=True)
    assert "conv_ista_fwd_cpp" in type(z.grad_fn).__name__
    z_eager = DF.conv_ista(x, w, 0.05, n_iter=2, step=0.1, padding=1)
    assert "cpp" not in type(z_eager.grad_fn).__name__.lower()
    # the explicit reference still runs as asked (recompute is a fused backends' option), and so does inference
    z_ref = DF.conv_ista(x, w, 0.05, n_iter=2, step=0.1, padding=1, recompute=True, backend="reference")
    assert "cpp" not in type(z_ref.grad_fn).__name__.lower()
    torch.testing.assert_close(z.detach(), z_ref.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "xs,ws,stride,padding,keep",
    [
        ((4, 1, 64, 64), (32, 1, 7, 7), (1, 1), (3, 3), True),  # a signal a 32nd of a code: always cheap
        ((8, 64, 32, 32), (64, 64, 3, 3), (1, 1), (1, 1), True),  # signal = code, >= 32 signal channels
        ((64, 16, 8, 8), (16, 16, 3, 3), (1, 1), (1, 1), True),  # signal = code on an 8 x 8 code map
        ((8, 8, 64, 64), (16, 8, 3, 3), (1, 1), (1, 1), False),  # half a code, few channels on a large map
        ((128, 64, 4, 4), (512, 64, 4, 4), (1, 1), (0, 0), False),  # signal larger than the code
        ((2, 32, 32, 32), (64, 32, 3, 3), (1, 1), (1, 1), True),  # half a code, exactly 32 signal channels
        ((2, 8, 16, 16), (16, 8, 3, 3), (1, 1), (1, 1), True),  # half a code on a code map of exactly 16 x 16
        ((2, 4, 32, 32), (16, 4, 3, 3), (1, 1), (1, 1), True),  # a signal exactly a quarter of a code
    ],
)
def test_keep_residuals_rule(xs, ws, stride, padding, keep):
    assert cpu_cost.keep_residuals(xs, ws, stride, padding) is keep


def test_save_mode_passes_keep_residuals_where_the_rule_says(monkeypatch):
    """functional's cpp forward gets m | KEEP_RESIDUALS in save mode where the rule keeps them, the bare interval
    where it does not, 0 in recompute mode and NO_BACKWARD without grad."""
    if ops.unavailable_reason("conv_ista", "cpp", "cpu") is not None:
        pytest.skip("the C++ extension is not available")
    from dsc_kernels.ops import conv_ista as conv_ista_ops
    from dsc_kernels.reference.conv_ista import KEEP_RESIDUALS, NO_BACKWARD

    seen = []
    real = conv_ista_ops.traced_op_pair

    def spy(row, spec):
        pair = real(row, spec)

        def forward(*args):
            seen.append(args[-1])
            return pair.forward(*args)

        return ops.OpPair(forward, pair.backward)

    monkeypatch.setattr(conv_ista_ops, "traced_op_pair", spy)
    interval = ops.table.row("conv_ista", "cpp").save_interval[0]
    for xs, ws, keep in (((2, 1, 16, 16), (8, 1, 3, 3), True), ((2, 8, 32, 32), (16, 8, 3, 3), False)):
        x, w = torch.randn(xs), (0.1 * torch.randn(ws)).requires_grad_()
        for recompute in (False, True):
            DF.conv_ista(x, w, 0.05, n_iter=3, step=0.1, padding=1, backend="cpp", recompute=recompute).sum().backward()
        with torch.no_grad():
            DF.conv_ista(x, w, 0.05, n_iter=3, step=0.1, padding=1, backend="cpp")
        assert seen == [interval | KEEP_RESIDUALS if keep else interval, 0, NO_BACKWARD]
        seen.clear()


class _ConvIsta(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.weight = torch.nn.Parameter(0.3 * torch.randn(4, 2, 3, 3, dtype=torch.float64))

    def forward(self, x):
        return DF.conv_ista(x, self.weight, 0.1, n_iter=2, step=0.2, padding=1, backend=self.backend)


@pytest.mark.parametrize("backend", ["reference", "cpp", "auto"])
def test_compiled_calls_keep_the_batch_and_signal_sizes_dynamic(backend):
    """The cost model's hook read every size with int(), which specialises a symbolic one, on every call (an explicit
    backend too): torch.export refused a dynamic batch ("specialized it to be a constant (2)") and
    torch.compile(dynamic=True) compiled a new graph for each batch and signal size."""
    if backend != "reference" and "cpp" not in DF.available_backends("cpu"):
        pytest.skip(DF.backend_unavailable_reason("cpp", "cpu"))
    torch.manual_seed(0)
    module = _ConvIsta(backend).eval()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        exported = torch.export.export(module, (x,), dynamic_shapes=({0: batch},)).module()
        x5 = torch.randn(5, 2, 8, 8, dtype=torch.float64)
        torch.testing.assert_close(exported(x5), module(x5), rtol=1e-12, atol=1e-12)

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for shape in ((3, 2, 8, 7), (5, 2, 8, 7), (6, 2, 10, 9)):  # no size equal to another (duck sizing)
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-12, atol=1e-12)
        frames.append(counter.frame_count)
    assert frames == frames[:1] * 3  # nothing compiled after the first call


def test_only_an_unpadded_kernel_covering_the_map_is_cpp_above_the_limit():
    """64 -> 2048 channels with a 16 x 16 kernel on a 16 x 16 map: I = 64*256 * 2048*1 / (2048*1 + 64*256) = 1820,
    above the limit, yet unpadded the convolution is one matrix product on the cpp side (the module docstring):
    cpp. Padded by 1 the code map is 3 x 3 (I = 64*256 * 2048*9 / (2048*9 + 64*256) = 8674), no longer a matrix
    product: the intensity rule holds and eager is taken. The full-map case of test_choice_by_key has I = 341, under
    the limit, so it passed with the exemption dropped or the padding ignored."""
    xs, ws = (2, 64, 16, 16), (2048, 64, 16, 16)
    full = cpu_cost.ConvIstaKey(xs, ws, (1, 1), (0, 0), torch.float32, True)
    assert full.intensity == pytest.approx(64 * 256 * 2048 / (2048 + 64 * 256))
    assert full.intensity > cpu_cost.INTENSITY_LIMIT and cpu_cost.faster_on_cpu(full) == "cpp"
    padded = cpu_cost.ConvIstaKey(xs, ws, (1, 1), (1, 1), torch.float32, True)
    assert padded.code_size == (3, 3)
    assert padded.intensity == pytest.approx(64 * 256 * 2048 * 9 / (2048 * 9 + 64 * 256))
    assert cpu_cost.faster_on_cpu(padded) == "reference"
