"""The README's usage example runs as written."""

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
