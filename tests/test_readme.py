"""The Python examples of the README run and do what they say."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_run_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(BLOCKS[0], "README.md", "exec"), scope)
    run, again, sweep = scope["run"], scope["again"], scope["sweep"]
    assert run.finished and run.figures and run.figures[-1].name == "reconstruction_error.png"
    assert set(scope["table"]) >= {"iteration", "init_std", "train_loss", "reconstruction_error"}
    assert again.config == run.config and again.summary == run.summary
    assert sweep.seeds == [0, 1, 2] and (sweep.path / "aggregate.json").exists()
    assert "tf-order over seeds 0..2" in capsys.readouterr().out


def test_readme_model_example_runs():
    scope: dict = {}
    exec(compile(BLOCKS[1], "README.md", "exec"), scope)
    norms = scope["cp_component_norms"](scope["factors"])[0]
    assert norms.max() > 0.1  # after 6000 steps at init 0.005 a component has left zero
    assert torch.equal(scope["net"].to_factors()[0], scope["factors"][0])
