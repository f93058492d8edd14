"""Rules every Triton kernel source must follow that no run here can check.

A masked `tl.load` without `other=` leaves the masked lanes undefined. Under the interpreter they read whatever numpy
gives (usually zeros, so the tests pass) and on a GPU they read garbage, which a reduction over the tile then picks up:
a wrong answer only a GPU shows. So every masked load in `dsc_kernels/triton` names the value of its masked lanes.

`tl.maximum` / `tl.minimum` / `tl.clamp` of floats default to PropagateNan.NONE, which a GPU compiles to max.f32 /
min.f32: where one operand is NaN they return the other. The interpreter computes both settings with numpy's
np.maximum / np.minimum, which return NaN. So a NaN that the interpreter tests see propagate (the package's rule: as in
torch.nn.functional) would vanish on a GPU, e.g. `tl.maximum(u - th, 0.0)` maps a NaN code to 0. Every such call
names its propagate_nan; integer ones (an integer literal among the operands, or `# ints` on the line) need none.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TRITON_SOURCES = sorted((Path(__file__).resolve().parents[1] / "dsc_kernels" / "triton").rglob("*.py"))


def masked_loads_without_other(source: str) -> list[tuple[int, str]]:
    """(line, call) of each `*.load(ptr, mask, ...)` / `*.load(..., mask=...)` call that gives no `other`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"):
            continue
        keywords = {k.arg for k in node.keywords}
        masked = "mask" in keywords or len(node.args) >= 2
        has_other = "other" in keywords or len(node.args) >= 3
        if masked and not has_other:
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_rule_sees_keyword_and_positional_masks():
    bad = "x = tl.load(p + offs, mask=offs < n)\ny = tl.load(p, offs < n)\n"
    good = "x = tl.load(p + offs, mask=offs < n, other=0.0)\ny = tl.load(p, offs < n, 0.0)\nz = tl.load(p)\n"
    assert [line for line, _ in masked_loads_without_other(bad)] == [1, 2]
    assert masked_loads_without_other(good) == []


_MINMAX_NAN_ARG = {"maximum": 2, "minimum": 2, "clamp": 3}  # positional index of propagate_nan


def minmax_without_propagate_nan(source: str) -> list[tuple[int, str]]:
    """(line, call) of each `tl.maximum` / `tl.minimum` / `tl.clamp` call that leaves propagate_nan to its default,
    except integer ones: an integer literal among the operands, or `# ints` on the call's line."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "tl"
            and node.func.attr in _MINMAX_NAN_ARG
        ):
            continue
        if "propagate_nan" in {k.arg for k in node.keywords} or len(node.args) > _MINMAX_NAN_ARG[node.func.attr]:
            continue
        integer = (
            any(isinstance(a, ast.Constant) and type(a.value) is int for a in node.args)
            or "# ints" in lines[node.lineno - 1]
        )
        if not integer:
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_nan_rule_sees_float_minmax_calls():
    bad = "a = tl.maximum(u - th, 0.0)\nb = tl.minimum(x, y)\nc = tl.clamp(x, lo, hi)\n"
    good = (
        "a = tl.maximum(u, 0.0, propagate_nan=tl.PropagateNan.ALL)\nb = tl.minimum(x, y, tl.PropagateNan.ALL)\n"
        "c = tl.maximum(k - 1, 0)\nd = tl.minimum(n, start + BLOCK)  # ints\ne = np.maximum(x, y)\n"
    )
    assert [line for line, _ in minmax_without_propagate_nan(bad)] == [1, 2, 3]
    assert minmax_without_propagate_nan(good) == []


@pytest.mark.parametrize("path", TRITON_SOURCES, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_every_float_min_and_max_names_its_nan_semantics(path):
    offending = minmax_without_propagate_nan(path.read_text())
    assert not offending, f"{path.name}: tl.maximum/minimum/clamp without propagate_nan= (a GPU drops NaN) at " + (
        "; ".join(f"line {line}: {call}" for line, call in offending)
    )


@pytest.mark.parametrize("path", TRITON_SOURCES, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_every_masked_load_names_its_masked_value(path):
    assert TRITON_SOURCES, "no Triton sources found"
    offending = masked_loads_without_other(path.read_text())
    assert not offending, f"{path.name}: masked tl.load without other= at " + "; ".join(
        f"line {line}: {call}" for line, call in offending
    )
