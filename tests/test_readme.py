"""The Python example of the README runs and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def test_readme_python_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    norms = scope["cp_component_norms"](scope["factors"])[0]
    assert norms.max() > 0.1  # after 6000 steps at init 0.005 a component has left zero
    assert torch.equal(scope["net"].to_factors()[0], scope["factors"][0])
