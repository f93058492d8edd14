"""The public API table of docs/design.md §3 states every function's parameters as the code has them."""

import inspect
import re
from pathlib import Path

import dsc_kernels.functional as DF

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"


def _documented() -> dict[str, str]:
    """name -> the parameter list as the table writes it, from every `name(...)` in the functional table's rows."""
    text = DESIGN.read_text()
    table = text[text.index("`dsc_kernels.functional`") :]
    table = table[: table.index("\n\n", table.index("| function |"))]
    first_cells = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| `")]
    return dict(m for cell in first_cells for m in re.findall(r"`(\w+)\(([^`]*)\)`", cell))


def _rendered(fn) -> str:
    """The signature in the table's notation: defaults as Python writes them, a bare * before keyword-only ones."""
    parts, star = [], False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        default = (
            "" if p.default is p.empty else "=" + (f'"{p.default}"' if isinstance(p.default, str) else repr(p.default))
        )
        parts.append(p.name + default)
    return ", ".join(parts)


def test_every_documented_function_has_the_documented_parameters():
    documented = _documented()
    assert len(documented) >= 12  # the table was found and read
    for name, params in documented.items():
        assert hasattr(DF, name), f"docs/design.md names DF.{name}, which does not exist"
        assert params == _rendered(getattr(DF, name)), (
            f"DF.{name}: documented ({params}), code ({_rendered(getattr(DF, name))})"
        )


def test_every_exported_function_is_in_the_table():
    # check_backend was exported (and named by the CLIs' --backend help) but missing from the table
    missing = sorted(set(DF.__all__) - set(_documented()))
    assert not missing, f"docs/design.md §3 does not document DF.{missing}"


def test_the_backend_table_of_section_7_lists_every_row():
    # the ml_ista rows (reference, cpp) were missing from "these are its rows today"
    from dsc_kernels.ops import table

    text = DESIGN.read_text()
    section = text[text.index("| family | backend | forward op |") :]
    section = section[: section.index("\n\n")]
    family = {"conv-ISTA": "conv_ista", "sparse attention": "sparse_attention", "ML-ISTA": "ml_ista"}
    documented = set()
    for line in section.splitlines()[2:]:
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        documented.add((family[cells[0]], cells[1], cells[2], cells[3], cells[4]))
    code = {(r.family, r.name, r.forward_op, r.backward_op, r.registration) for r in table.TABLE}
    assert documented == code, f"docs/design.md §7: missing {code - documented}, extra {documented - code}"


def test_every_exported_module_is_named_in_section_3():
    import dsc_kernels.nn as N

    text = DESIGN.read_text()
    section = text[text.index("`dsc_kernels.nn`:") : text.index("`dsc_kernels.theory`:")]
    missing = [name for name in N.__all__ if f"`{name}`" not in section and f"`{name}(" not in section]
    assert not missing, f"docs/design.md §3 does not name dsc_kernels.nn.{missing}"


def test_every_op_family_module_is_named():
    # ops/ml_ista.py was left out where design.md §7 and CONTRIBUTING.md list the family modules
    from dsc_kernels.ops import table

    contributing = (DESIGN.parents[1] / "CONTRIBUTING.md").read_text()
    design = DESIGN.read_text()
    for family in table.FAMILIES:
        assert f"`ops/{family}.py`" in design, f"docs/design.md §7 does not name ops/{family}.py"
        assert f"`{family}.py`" in contributing, f"CONTRIBUTING.md does not name ops/{family}.py"


def test_every_exported_name_is_documented():
    # 27 names of sparsity, theory and data (zero_fraction, lista_cp_rate, dsc_problem, ...) appeared nowhere in the
    # README or docs/, only described in words
    import dsc_kernels
    import dsc_kernels.data
    import dsc_kernels.nn
    import dsc_kernels.sparsity
    import dsc_kernels.theory

    root = DESIGN.parents[1]
    text = (root / "README.md").read_text() + "".join(p.read_text() for p in sorted((root / "docs").glob("*.md")))
    modules = (dsc_kernels, DF, dsc_kernels.nn, dsc_kernels.sparsity, dsc_kernels.theory, dsc_kernels.data)
    missing = [
        f"{m.__name__}.{name}"
        for m in modules
        for name in m.__all__
        if not name.startswith("__") and not re.search(rf"\b{re.escape(name)}\b", text)
    ]
    assert not missing, f"README.md and docs/ never name {missing}"
