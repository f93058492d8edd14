"""The README's usage example runs as written, and the shapes its comments state are the ones it returns."""

import ast
import re
from pathlib import Path


def test_readme_usage_example_runs():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "the README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["z"].shape == (8, 32, 64, 64) and namespace["out"].shape == (2, 128, 64)
    assert namespace["layer"].weight.grad is not None
    # every `name = ...  # (shape)` or `# [(shape), ...]` comment (the multi-layer codes' was never checked)
    promised = re.findall(r"^(\w+) = .*?#\s*(\[\([\d, ()]+\)\]|\([\d, ]+\))", blocks[0], flags=re.M)
    assert len(promised) >= 2, promised
    for name, shape in promised:
        value = namespace[name]
        got = [tuple(t.shape) for t in value] if isinstance(value, list) else tuple(value.shape)
        assert got == ast.literal_eval(shape), f"README: {name} is {got}, its comment says {shape}"
