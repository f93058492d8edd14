"""The backend table (dsc_kernels/ops/table.py) against what actually runs: op names, schemas, implementations."""

import ast
import copy
import inspect
import warnings
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch._library.infer_schema import infer_schema

import dsc_kernels.functional as DF
from dsc_kernels import ops
from dsc_kernels.nn import SoftThreshold
from dsc_kernels.ops import registry, table
from dsc_kernels.ops.selection import FAMILY_MODULES

ROOT = Path(__file__).resolve().parent.parent
ROWS = {f"{r.family}-{r.name}": r for r in table.TABLE}


def _arguments(schema: str) -> list[tuple[str, str]]:
    """(name, type) of every argument and the return types of a schema string (with or without an op name)."""
    parsed = torch._C.parse_schema(schema)
    return [(a.name, str(a.type)) for a in parsed.arguments] + [("return", str(r.type)) for r in parsed.returns]


def _family_schema(row, which: str) -> list[tuple[str, str]]:
    module = FAMILY_MODULES[row.family]
    schema = module.FWD_SCHEMA if which == "forward" else module.BWD_SCHEMA
    return _arguments("x" + schema)


@pytest.mark.parametrize("key", ROWS)
def test_op_names_are_the_family_pattern(key):
    row = ROWS[key]
    assert row.forward_op == f"dsc_kernels::{row.family}_fwd_{row.name}"
    assert row.backward_op == f"dsc_kernels::{row.family}_bwd_{row.name}"
    assert (row.devices is None) == (row.name == "reference") and row.dtypes
    assert row.devices is None or set(row.devices) <= {"cpu", "cuda"}
    assert row.registration in table.REGISTRATIONS and row.requires in table.REQUIREMENTS


@pytest.mark.parametrize("key", ROWS)
@pytest.mark.parametrize("which", ["forward", "backward"])
def test_implementation_agrees_with_the_family_schema(key, which):
    """C++ m.def, Python custom_op schemas and Triton launcher annotations all match the family's schema."""
    row = ROWS[key]
    want = _family_schema(row, which)
    impl = row.forward_impl if which == "forward" else row.backward_impl
    op_name = row.forward_op if which == "forward" else row.backward_op
    if row.registration == "native":
        source = ROOT / impl
        assert source.exists(), impl
        assert f'"{op_name.split("::")[1]}(' in source.read_text(), f"{impl} does not define {op_name}"
        reason = ops.unavailable_reason(row.family, row.name, "cpu")
        if reason is not None:
            pytest.skip(reason)
        ops.op_pair(row.family, row.name)
        namespace, name = op_name.split("::")
        got = _arguments(str(getattr(getattr(torch.ops, namespace), name).default._schema))
    elif row.registration == "triton_op":
        pytest.importorskip("triton")
        got = _arguments("x" + infer_schema(registry.implementation(impl), mutates_args=()))
    else:  # custom_op: registered with the family's schema; the Python function must take the same arguments
        parameters = list(inspect.signature(registry.implementation(impl)).parameters)
        assert parameters == [name for name, _ in want if name != "return"]
        ops.op_pair(row.family, row.name)
        namespace, name = op_name.split("::")
        got = _arguments(str(getattr(getattr(torch.ops, namespace), name).default._schema))
    assert got == want


def test_reference_rows_name_their_eager_oracle():
    for row in table.TABLE:
        if row.eager is not None:
            assert callable(registry.implementation(row.eager))
    assert all(r.eager is not None for r in table.TABLE if r.name == "reference")
    assert all(r.eager is None for r in table.TABLE if r.name != "reference")


def test_functional_holds_no_backend_names():
    """functional.py asks the table; no backend name appears in its code (docstrings aside)."""
    tree = ast.parse((ROOT / "dsc_kernels" / "functional.py").read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    names = set(table.BACKEND_NAMES) | set(table.NOT_BUILT)
    found = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and id(node) not in docstrings
        and isinstance(node.value, str)
        and node.value in names
    ]
    assert found == []


def test_selection_honours_the_table():
    cpu = torch.device("cpu")
    assert ops.select("conv_ista", "reference", cpu, torch.float16).name == "reference"
    with pytest.raises(TypeError, match="backend='cpp' supports"):
        ops.select("conv_ista", "cpp", cpu, torch.bfloat16)
    # auto never picks a backend whose dtype list excludes the input's dtype (and so never builds it for nothing)
    assert ops.select("conv_ista", "auto", cpu, torch.bfloat16).name == "reference"
    with pytest.raises(RuntimeError, match="not part of this release"):
        ops.select("conv_ista", "cuda", cpu, torch.float32)


def test_auto_on_cuda_takes_what_measured_faster(monkeypatch, recwarn):
    """On a GPU, auto keeps eager cuDNN for conv-ISTA (the fused Triton kernels measured 0.13-0.28x its speed on an
    H200) unless a recompute-mode backward is asked for, and takes Triton's sparse attention; an explicit
    backend='triton' still runs the fused conv kernels. Asked as if Triton could run here, so that the choice is the
    table's and not an availability fallback."""
    from dsc_kernels.ops import selection

    monkeypatch.setattr(selection, "unavailable_reason", lambda family, name, device_type: None)
    monkeypatch.setattr(selection, "_registered", lambda row: row)
    cuda = torch.device("cuda")
    assert ops.select("conv_ista", "auto", cuda, torch.float32).name == "reference"
    # a recompute-mode backward is what only the fused kernels give (0.33x eager's training peak on the H200)
    assert ops.select("conv_ista", "auto", cuda, torch.float32, memory_lean=True).name == "triton"
    assert ops.select("conv_ista", "triton", cuda, torch.float32).name == "triton"
    assert ops.select("sparse_attention", "auto", cuda, torch.float16).name == "triton"
    assert not [w for w in recwarn if "dsc_kernels" in str(w.message)], "a table choice is no fallback: no warning"


def test_auto_falls_back_to_the_reference_with_one_warning_saying_why(monkeypatch):
    """The selection docstring: auto falls back to the reference "with a one-time warning when a preferred fused
    backend cannot run". Simulated with a cpp build that failed: no test covered the warning, and the fallback ran
    silently with it dropped."""
    from dsc_kernels.ops import selection

    reason = "the C++ extension did not build: simulated"
    real = selection.unavailable_reason
    monkeypatch.setattr(selection, "_warned", set())
    monkeypatch.setattr(selection, "unavailable_reason", lambda f, n, d: reason if n == "cpp" else real(f, n, d))
    monkeypatch.delenv("DSC_KERNELS_BACKEND", raising=False)
    cpu = torch.device("cpu")
    with pytest.warns(RuntimeWarning, match="not using cpp because the C\\+\\+ extension did not build: simulated"):
        assert ops.select("conv_ista", "auto", cpu, torch.float32).name == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per backend, not per call
        assert ops.select("conv_ista", "auto", cpu, torch.float64).name == "reference"


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_environment_variable_means_unset(monkeypatch, value):
    monkeypatch.setenv("DSC_KERNELS_BACKEND", value)
    assert ops.select("conv_ista", "auto", torch.device("cpu"), torch.float64).name in DF.available_backends()


def test_environment_variable_is_case_insensitive_and_named_in_errors(monkeypatch):
    monkeypatch.setenv("DSC_KERNELS_BACKEND", "REFERENCE")
    assert ops.select("conv_ista", "auto", torch.device("cpu"), torch.float32).name == "reference"
    monkeypatch.setenv("DSC_KERNELS_BACKEND", "cpu-fast")
    with pytest.raises(ValueError, match="DSC_KERNELS_BACKEND"):
        DF.conv_ista(torch.randn(1, 1, 8, 8), torch.randn(2, 1, 3, 3), 0.1, n_iter=1)


def test_environment_variable_acts_as_an_explicit_backend_and_says_so(monkeypatch):
    """DSC_KERNELS_BACKEND=triton with backend='auto': calls that triton cannot run raise naming the variable
    (they read as if backend='triton' had been passed)."""
    monkeypatch.setenv("DSC_KERNELS_BACKEND", "triton")
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    env_named = r"DSC_KERNELS_BACKEND='triton' \(the backend argument was 'auto'\): .*no ml_ista"
    with pytest.raises(ValueError, match=env_named):
        DF.ml_ista(x, [w], [0.1], n_iter=1)
    with pytest.raises(ValueError, match=r"DSC_KERNELS_BACKEND='triton'.*cannot run per_iteration_weight"):
        DF.conv_ista(x, w.expand(2, -1, -1, -1, -1), 0.1, n_iter=2, padding=1)
    # an explicit argument wins over the variable and is named as the argument
    with pytest.raises(ValueError, match=r"^backend='triton': that backend has no ml_ista"):
        DF.ml_ista(x, [w], [0.1], n_iter=1, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks about CUDA on a machine without it")
def test_no_backend_claims_cuda_tensors_on_a_machine_without_cuda():
    """available_backends('cuda') listed triton where torch sees no GPU."""
    assert DF.available_backends("cuda") == ["reference"]
    assert "CUDA is not available" in DF.backend_unavailable_reason("triton", "cuda")


def test_the_backend_list_in_errors_says_which_name_is_not_built():
    with pytest.raises(ValueError, match=r"auto, reference, cpp, triton, cuda \(not in this release\), got 'bogus'"):
        DF.check_backend("bogus")


def test_auto_takes_the_reference_inside_torch_func(monkeypatch):
    """torch.func.grad / jacrev through `auto`: PyTorch's custom-op autograd supports no gradient transform (a fused
    op raised its own "must override the setup_context staticmethod", and under jvp returned zeros), so inside a
    transform auto runs the reference, and outside it the fused op still. The gradients are the ordinary backward's;
    a fused backend named explicitly raises our ValueError naming the transform."""
    if ops.unavailable_reason("conv_ista", "cpp", "cpu") is not None:
        pytest.skip("the C++ extension is not available")
    monkeypatch.delenv("DSC_KERNELS_BACKEND", raising=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    w = 0.2 * torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    picked = []

    def loss(w):
        picked.append(ops.select("conv_ista", "auto", x.device, x.dtype).name)
        return DF.conv_ista(x, w, 0.05, n_iter=3, padding=1).sum()

    g = torch.func.grad(loss)(w)
    assert picked == ["reference"]
    assert ops.select("conv_ista", "auto", x.device, x.dtype).name == "cpp"
    w_leaf = w.clone().requires_grad_()
    DF.conv_ista(x, w_leaf, 0.05, n_iter=3, padding=1, backend="cpp").sum().backward()
    torch.testing.assert_close(g, w_leaf.grad)
    q = torch.randn(1, 2, 6, 4, generator=gen, dtype=torch.float64)
    jac = torch.func.jacrev(lambda q: DF.sparse_attention(q, q, q).sum(-1))(q)
    assert jac.shape == (1, 2, 6, 1, 2, 6, 4) and torch.isfinite(jac).all()
    with pytest.raises(ValueError, match="backend='cpp' cannot run a torch.func gradient transform"):
        torch.func.grad(lambda w: DF.conv_ista(x, w, 0.05, n_iter=3, padding=1, backend="cpp").sum())(w)
    with pytest.raises(ValueError, match="backend='cpp' cannot run a torch.func gradient transform"):
        torch.func.jvp(lambda w: DF.conv_ista(x, w, 0.05, n_iter=3, padding=1, backend="cpp"), (w,), (w,))


def _forward_ad_cases(gen):
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    w = 0.2 * torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    ml = [w, 0.3 * torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)]
    return {
        "conv_ista": (lambda w, b: DF.conv_ista(x, w, 0.05, n_iter=3, step=0.4, padding=1, backend=b), w),
        "conv_ista_fista_step": (
            lambda s, b: DF.conv_ista(x, w, 0.05, n_iter=3, step=s, padding=1, fista=True, backend=b),
            torch.tensor(0.3, dtype=torch.float64),
        ),
        "ml_ista": (
            lambda w0, b: DF.ml_ista(x, [w0, ml[1]], [0.05, 0.05], n_iter=2, steps=[0.3, 0.3], backend=b)[-1],
            w,
        ),
        "sparse_attention": (lambda q, b: DF.sparse_attention(q, k, v, backend=b), q),
    }


@pytest.mark.parametrize("case", ["conv_ista", "conv_ista_fista_step", "ml_ista", "sparse_attention"])
def test_forward_mode_tangents_are_never_dropped(case, monkeypatch):
    """torch.autograd.forward_ad through a fused op: its autograd is reverse-mode only, and a tangent passed through
    it was silently dropped (z had no tangent: a zero derivative, also through `auto`, which picked cpp). `auto`
    now takes the reference for an input with a tangent, giving the directional derivative of finite differences;
    an explicit fused backend raises; a dual level without a tangent on the call's inputs still runs the fused op."""
    if ops.unavailable_reason("conv_ista", "cpp", "cpu") is not None:
        pytest.skip("the C++ extension is not available")
    monkeypatch.delenv("DSC_KERNELS_BACKEND", raising=False)
    f, primal = _forward_ad_cases(torch.Generator().manual_seed(1))[case]
    direction = torch.randn(primal.shape, generator=torch.Generator().manual_seed(2), dtype=primal.dtype)
    with fwAD.dual_level():
        out = f(fwAD.make_dual(primal, direction), "auto")
        tangent = fwAD.unpack_dual(out).tangent
        with pytest.raises(ValueError, match="backend='cpp' cannot run forward-mode AD"):
            f(fwAD.make_dual(primal, direction), "cpp")
        plain = f(primal, "cpp")  # no tangent on the inputs: the fused op runs
    assert tangent is not None
    eps = 1e-6
    numeric = (f(primal + eps * direction, "reference") - f(primal - eps * direction, "reference")) / (2 * eps)
    torch.testing.assert_close(tangent, numeric, atol=1e-6, rtol=1e-5)
    assert tangent.abs().sum() > 0
    torch.testing.assert_close(plain, f(primal, "reference"))


def test_vmap_over_the_dictionary_with_the_default_step(monkeypatch):
    """vmap over weights: the default step's power iteration and the divergence warning read the weight's values,
    which a BatchedTensor refuses (float()/item() raised). Each sample now gets its own 1/L, as one call per sample
    does, and the explicit-cpp path still runs one sample at a time."""
    monkeypatch.delenv("DSC_KERNELS_BACKEND", raising=False)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    ws = (
        0.3
        * torch.randn(3, 4, 1, 3, 3, generator=gen, dtype=torch.float64)
        * torch.tensor([1.0, 2.0, 0.5]).view(3, 1, 1, 1, 1)
    )
    one_by_one = torch.stack([DF.conv_ista(x, w, 0.05, n_iter=3, padding=1) for w in ws])
    torch.testing.assert_close(torch.func.vmap(lambda w: DF.conv_ista(x, w, 0.05, n_iter=3, padding=1))(ws), one_by_one)
    by_ml = torch.func.vmap(lambda w: DF.ml_ista(x, [w], [0.05], n_iter=3, paddings=[1])[0])(ws)
    assert by_ml.shape == one_by_one.shape and torch.isfinite(by_ml).all()
    with_step = torch.stack([DF.conv_ista(x, w, 0.05, n_iter=3, step=0.2, padding=1) for w in ws])
    torch.testing.assert_close(
        torch.func.vmap(lambda w: DF.conv_ista(x, w, 0.05, n_iter=3, step=0.2, padding=1))(ws), with_step
    )


def test_an_explicit_fused_backend_under_vmap_keeps_its_backward(monkeypatch):
    """vmap's BatchedTensor reads requires_grad False even when the tensor it wraps requires grad. The fused op, run a
    sample at a time on the unwrapped tensors, is still recorded by autograd: conv-ISTA's forward decided that no
    backward would follow and saved nothing, and the backward then failed with "conv_ista_bwd_cpp: checkpoint must
    be >= 0" (ensembles of cpp layers under stack_module_state could not train); a learned float mask batched by vmap
    was not seen as learned, so backend='cpp' ran and its gradient was silently None. The gradients must be the
    reference's, and the mask gradient must raise as it does outside vmap."""
    if ops.unavailable_reason("conv_ista", "cpp", "cpu") is not None:
        pytest.skip("the C++ extension is not available")
    monkeypatch.delenv("DSC_KERNELS_BACKEND", raising=False)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2, 7, 6, generator=gen, dtype=torch.float64)
    ws = 0.3 * torch.randn(3, 4, 2, 3, 3, generator=gen, dtype=torch.float64)
    for recompute in (False, True):
        grads = {}
        for backend in ("reference", "cpp"):
            w = ws.clone().requires_grad_()
            z = torch.func.vmap(
                lambda d, b=backend: DF.conv_ista(
                    x, d, 0.05, n_iter=3, step=0.3, padding=1, backend=b, recompute=recompute
                )
            )(w)
            (z * z.detach().sign()).sum().backward()
            grads[backend] = w.grad
        torch.testing.assert_close(grads["cpp"], grads["reference"])
    xs = torch.randn(3, *x.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    dx = {}
    for backend in ("reference", "cpp"):
        z = torch.func.vmap(
            lambda s, b=backend: DF.conv_ista(s, ws[0], 0.05, n_iter=3, step=0.3, padding=1, backend=b)
        )(xs)
        (dx[backend],) = torch.autograd.grad(z.pow(2).sum(), xs)
    torch.testing.assert_close(dx["cpp"], dx["reference"])
    q = torch.randn(3, 1, 2, 5, 4, generator=gen, dtype=torch.float64)
    masks = torch.randn(3, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="backend='cpp' cannot run mask_grad"):
        torch.func.vmap(lambda a, m: DF.sparse_attention(a, a, a, attn_mask=m, backend="cpp"))(q, masks)
    out = torch.func.vmap(lambda a, m: DF.sparse_attention(a, a, a, attn_mask=m))(q, masks)  # auto: the reference
    assert torch.autograd.grad(out.pow(2).sum(), masks)[0].abs().sum() > 0


def test_a_threshold_batched_by_vmap_gets_its_gradient_at_zero():
    """The reference soft threshold clamps in two steps when the threshold requires grad, since one
    clamp(x, -t, t) sends a negative entry's gradient to the upper bound when the bounds tie (t = 0, where projection
    puts learned thresholds). A threshold batched by vmap (per-sample thresholds, an ensemble's stacked parameters)
    read requires_grad False through its BatchedTensor, took the one clamp, and dL/dt silently lost the negative
    entries' +1: SoftThreshold ensembles got [-2, -3, -7] for [6, 4, -4]; conv_ista and ml_ista on the reference
    were off by up to 5.7. Each must equal the per-sample autograd gradient."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    w = 0.3 * torch.randn(3, 3, 2, generator=gen, dtype=torch.float64)
    calls = {
        "soft_threshold": lambda s, t: DF.soft_threshold(s, t[:, None]),
        "conv_ista": lambda s, t: DF.conv_ista(s, w, threshold=t, n_iter=2, step=0.1, backend="reference"),
        "conv_ista lam": lambda s, t: DF.conv_ista(s, w, t, n_iter=2, step=0.1, backend="reference"),
        "ml_ista": lambda s, t: DF.ml_ista(s, [w], [t], n_iter=2, steps=[0.1], nonneg=False, backend="reference")[0],
    }
    for name, call in calls.items():
        want = []
        for i in range(len(x)):
            t = torch.zeros(3, dtype=torch.float64, requires_grad=True)
            want.append(torch.autograd.grad(call(x[i : i + 1], t).sum(), t)[0])
        ts = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
        out = torch.func.vmap(lambda s, t, f=call: f(s[None], t).sum())(x, ts)
        torch.testing.assert_close(torch.autograd.grad(out.sum(), ts)[0], torch.stack(want), msg=name)
    models = [SoftThreshold(0.0, learnable=True, num_channels=3).double() for _ in range(2)]
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    out = torch.func.vmap(lambda p, b: torch.func.functional_call(base, (p, b), (x,)).sum(), in_dims=(0, 0))(
        params, buffers
    )
    (got,) = torch.autograd.grad(out.sum(), list(params.values()))
    (want,) = torch.autograd.grad(models[0](x).sum(), models[0].threshold)
    torch.testing.assert_close(got, torch.stack([want, want]))


def test_a_threshold_batched_by_vmap_gets_its_gradient_at_zero_when_compiled():
    """As above under torch.compile, where the vmap wrappers cannot be unwrapped and requires_grad read the
    wrapper's False: the compiled vmap took the one clamp, and dL/dt at t = 0 lost every negative entry's +1 (off by
    5.8 on this soft threshold; eager gave the per-sample gradient)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    w = 0.3 * torch.randn(3, 3, 2, generator=gen, dtype=torch.float64)
    calls = {
        "soft_threshold": lambda s, t: DF.soft_threshold(s, t[:, None]),
        "conv_ista lam": lambda s, t: DF.conv_ista(s, w, t, n_iter=2, step=0.1, backend="reference"),
    }
    for name, call in calls.items():
        torch._dynamo.reset()
        want = []
        for i in range(len(x)):
            t = torch.zeros(3, dtype=torch.float64, requires_grad=True)
            want.append(torch.autograd.grad(call(x[i : i + 1], t).sum(), t)[0])
        ts = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
        compiled = torch.compile(torch.func.vmap(lambda s, t, f=call: f(s[None], t).sum()), backend="aot_eager")
        torch.testing.assert_close(torch.autograd.grad(compiled(x, ts).sum(), ts)[0], torch.stack(want), msg=name)


def test_an_explicit_fused_ml_ista_under_vmap_raises_our_error(monkeypatch):
    """The ml_ista ops return lists of tensors, for which vmap has no per-sample fallback: backend='cpp' under vmap
    (ml_ista, conv_ista with per-iteration dictionaries or an input encoder, MultiLayerSparseCoding2d) failed with
    PyTorch's "Batching rule not implemented for dsc_kernels::ml_ista_fwd_cpp. We could not generate a fallback"."""
    if ops.unavailable_reason("ml_ista", "cpp", "cpu") is not None:
        pytest.skip("the C++ extension is not available")
    monkeypatch.delenv("DSC_KERNELS_BACKEND", raising=False)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 7, 6, generator=gen, dtype=torch.float64)
    ws = 0.3 * torch.randn(3, 4, 2, 3, 3, generator=gen, dtype=torch.float64)
    per_step = 0.3 * torch.randn(3, 3, 4, 2, 3, 3, generator=gen, dtype=torch.float64)
    calls = {
        "ml_ista": (lambda w, b: DF.ml_ista(x, [w], [0.05], n_iter=2, steps=[0.3], paddings=[1], backend=b)[0], ws),
        "per-step": (lambda w, b: DF.conv_ista(x, w, 0.05, n_iter=3, step=0.3, padding=1, backend=b), per_step),
        "input encoder": (
            lambda w, b: DF.conv_ista(x, w, 0.05, n_iter=3, step=0.3, padding=1, input_encoder_weight=w, backend=b),
            ws,
        ),
    }
    for f, batch in calls.values():
        with pytest.raises(ValueError, match="cannot run under torch.func.vmap for a multi-layer pursuit"):
            torch.func.vmap(lambda w, f=f: f(w, "cpp"))(batch)
        batched = torch.func.vmap(lambda w, f=f: f(w, "auto"))(batch)
        torch.testing.assert_close(batched, torch.stack([f(w, "cpp") for w in batch]))


def test_a_conv_ista_variant_under_vmap_names_the_environment_variable(monkeypatch):
    """DSC_KERNELS_BACKEND=cpp with backend='auto' (the default) and a per-iteration dictionary or an input encoder
    under vmap: the ml_ista row was asked for by its name, so the error said backend='cpp' and advised 'auto', which
    the caller was already passing; it now names the variable, as ml_ista's own call and every other refusal do."""
    if ops.unavailable_reason("ml_ista", "cpp", "cpu") is not None:
        pytest.skip("the C++ extension is not available")
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 2, 7, 6, generator=gen, dtype=torch.float64)
    per_step = 0.3 * torch.randn(3, 3, 2, 3, 3, generator=gen, dtype=torch.float64)
    w = per_step[0]
    calls = (
        lambda s: DF.conv_ista(s[None], per_step, 0.05, n_iter=3, step=0.3, padding=1),
        lambda s: DF.conv_ista(s[None], w, 0.05, n_iter=3, step=0.3, padding=1, input_encoder_weight=w),
    )
    monkeypatch.setenv("DSC_KERNELS_BACKEND", "cpp")
    for f in calls:
        with pytest.raises(ValueError, match=r"^DSC_KERNELS_BACKEND='cpp' \(the backend argument was 'auto'\).*vmap"):
            torch.func.vmap(f)(x)
    monkeypatch.delenv("DSC_KERNELS_BACKEND")
    for f in calls:  # auto alone runs the reference, batched
        torch.testing.assert_close(torch.func.vmap(f)(x), torch.stack([f(s) for s in x]))


def test_availability_of_auto_follows_the_environment_variable(monkeypatch):
    """backend_unavailable_reason('auto', ...) said None (auto falls back) while DSC_KERNELS_BACKEND named a backend
    that cannot run there, where every auto call raises: it answers for the backend the variable names."""
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    monkeypatch.setenv("DSC_KERNELS_BACKEND", " CUDA")  # no row here (triton may run on CPU: the interpreter)
    reason = DF.backend_unavailable_reason("auto", "cpu")
    assert reason is not None and "DSC_KERNELS_BACKEND='cuda'" in reason and "not part of this release" in reason
    with pytest.raises(RuntimeError, match="DSC_KERNELS_BACKEND='cuda'"):
        DF.conv_ista(x, w, 0.1, n_iter=1)
    monkeypatch.setenv("DSC_KERNELS_BACKEND", "cpu-fast")
    with pytest.raises(ValueError, match="DSC_KERNELS_BACKEND"):
        DF.backend_unavailable_reason("auto", "cpu")
    # an explicit name is what calls run whatever the variable says; reference runs everywhere
    assert DF.backend_unavailable_reason("reference", "cpu") is None
    monkeypatch.setenv("DSC_KERNELS_BACKEND", "reference")
    assert DF.backend_unavailable_reason("auto", "meta") is None
    monkeypatch.setenv("DSC_KERNELS_BACKEND", "cpp")
    assert DF.backend_unavailable_reason("auto", "meta") is not None  # the call raises there too
    with pytest.raises(RuntimeError, match="DSC_KERNELS_BACKEND='cpp'"):
        DF.conv_ista(x.to("meta"), w.to("meta"), 0.1, n_iter=1, step=0.1)


def test_availability_questions_read_names_and_devices_as_the_calls_do():
    # backend_unavailable_reason refused "CPP" and "auto" (names every call takes) with "no conv_ista backend
    # named", and None with a ValueError; a device it could not parse ("gpu", 3) raised torch's RuntimeError
    assert DF.backend_unavailable_reason(" CPP", "cpu") == DF.backend_unavailable_reason("cpp", "cpu")
    assert DF.backend_unavailable_reason("auto", "cuda") is None
    assert "not part of this release" in DF.backend_unavailable_reason("cuda", "cpu")
    with pytest.raises(TypeError, match="backend must be a string"):
        DF.backend_unavailable_reason(None, "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        DF.backend_unavailable_reason("fastest", "cpu")
    for ask in (DF.available_backends, lambda d: DF.backend_unavailable_reason("cpp", d)):
        with pytest.raises(ValueError, match="device must name a torch device"):
            ask("gpu")
        with pytest.raises(TypeError, match="device must be a str or a torch.device"):
            ask(3)
    assert DF.available_backends(torch.device("cpu"))[0] == "reference"
