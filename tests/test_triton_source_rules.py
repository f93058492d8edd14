"""Rules every Triton kernel source must follow that no run here can check.

A masked `tl.load` without `other=` leaves the masked lanes undefined. Under the interpreter they read whatever numpy
gives (usually zeros, so the tests pass) and on a GPU they read garbage, which a reduction over the tile then picks up:
a wrong answer only a GPU shows. So every masked load in `dsc_kernels/triton` names the value of its masked lanes.
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


@pytest.mark.parametrize("path", TRITON_SOURCES, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_every_masked_load_names_its_masked_value(path):
    assert TRITON_SOURCES, "no Triton sources found"
    offending = masked_loads_without_other(path.read_text())
    assert not offending, f"{path.name}: masked tl.load without other= at " + "; ".join(
        f"line {line}: {call}" for line, call in offending
    )
