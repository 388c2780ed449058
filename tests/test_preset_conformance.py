"""Every preset passes the same checks, with no line written for it (scikit-learn's
``check_estimator`` style): it validates and documents its keys, runs at its ``tiny`` budget,
its ``config.json`` reproduces it, ``plot`` redraws from the folder alone, and an interrupt
followed by ``--resume`` gives what an uninterrupted run gives."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import StopAfter, run_config

from implreg.api import load, run_preset
from implreg.cli import main
from implreg.config import check, describe, with_overrides
from implreg.experiments import PRESETS

NAMES = sorted(PRESETS)


def _config(name: str, data_dir):
    preset = PRESETS[name]
    cfg = with_overrides(preset.config, dict(preset.tiny))
    if "data_dir" in {f.name for f in dataclasses.fields(cfg)}:
        cfg = dataclasses.replace(cfg, data_dir=str(data_dir))
    return cfg


def _untimed(obj):
    """A summary or table without wall-clock fields (they differ from run to run)."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if "second" not in k}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _table(run_dir, name: str) -> list[dict]:
    with open(run_dir / name, newline="") as fh:
        return _untimed(list(csv.DictReader(fh)))


def _same_results(a, b) -> None:
    assert _untimed(a.summary) == _untimed(b.summary)
    assert _table(a.path, a.experiment.table) == _table(b.path, b.experiment.table)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, fake_data):
    """One tiny run of every preset, shared by the checks below."""
    root = tmp_path_factory.mktemp("tiny")
    return {n: run_config(_config(n, fake_data), root / n) for n in NAMES}


def test_every_preset_has_a_tiny_budget_and_documents_its_keys():
    for name in NAMES:
        preset = PRESETS[name]
        assert preset.tiny, f"{name} declares no tiny budget"
        check(preset.config)
        rows = describe(preset.config)
        assert {r["key"] for r in rows} == {f.name for f in dataclasses.fields(preset.config)}


@pytest.mark.parametrize("name", NAMES)
def test_show_prints_every_key(name, capsys):
    assert main(["show", name]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(PRESETS[name].config):
        assert f"\n{f.name} " in out


@pytest.mark.parametrize("name", NAMES)
def test_tiny_run_writes_a_complete_folder(name, tiny_runs):
    run = tiny_runs[name]
    assert run.exit_code == 0 and run.finished and not run.interrupted
    assert (run.path / "figure.png").stat().st_size > 0
    table = run.metrics()
    assert table and all(len(v) == len(next(iter(table.values()))) for v in table.values())
    saved = json.loads((run.path / "config.json").read_text())
    assert saved["preset"] == run.experiment.name and saved["device"] == "cpu"
    back = load(run.path)
    assert back.config == run.config and back.summary == run.summary


@pytest.mark.parametrize("name", NAMES)
def test_config_json_reproduces_the_run(name, tiny_runs, tmp_path):
    run = tiny_runs[name]
    again = run_preset(run.path / "config.json", out=tmp_path / "again", log=lambda *_: None)
    _same_results(run, again)


@pytest.mark.parametrize("name", NAMES)
def test_run_threads_is_what_the_run_used(name, tiny_runs):
    """``Experiment.run_threads`` (how ``report --jobs`` fits runs to the cores) agrees with
    the thread count the run recorded: the step's own, or per unit times the units at once."""
    run = tiny_runs[name]
    exp = run.experiment
    said = exp.run_threads(run.config)
    assert isinstance(said, int) and said >= 1
    if "threads" in run.summary:
        assert said == run.summary["threads"]
    elif run.summary.get("threads_per_unit") is not None:
        at_once = min(max(1, exp.workers(run.config)), len(exp.units(run.config)))
        assert said == run.summary["threads_per_unit"] * at_once
    assert exp.run_threads(run.config, requested=3) % 3 == 0  # --threads 3 per step or unit


@pytest.mark.parametrize("name", NAMES)
def test_plot_redraws_from_the_folder_alone(name, tiny_runs, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_runs[name].path, copy)
    for p in copy.glob("*.png"):
        p.unlink()
    assert main(["plot", str(copy)]) == 0
    assert (copy / "figure.png").stat().st_size > 0


@pytest.mark.parametrize("name", NAMES)
def test_interrupt_then_resume_equals_uninterrupted(name, tiny_runs, tmp_path, fake_data):
    cut = tmp_path / "cut"
    first = run_config(_config(name, fake_data), cut, interrupt=StopAfter(3))
    assert first.interrupted and not first.finished
    done = run_preset(out=cut, resume=True, log=lambda *_: None)
    assert done.finished and not done.interrupted
    _same_results(tiny_runs[name], done)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_gives_the_cpu_numbers_within_float_tolerance(name, tiny_runs, tmp_path, fake_data):
    exp = PRESETS[name].experiment
    if "cuda" not in exp.devices:
        return
    gpu = run_config(_config(name, fake_data), tmp_path / "gpu", device="cuda")
    cpu = tiny_runs[name]
    a, b = cpu.metrics(), gpu.metrics()
    for key, col in a.items():
        if "second" in key or not all(isinstance(v, float) for v in col):
            continue
        np.testing.assert_allclose(b[key], col, rtol=1e-3, atol=1e-6, err_msg=f"{name}: {key}")


def test_device_cuda_without_cuda_is_one_sentence(tmp_path, capsys):
    if torch.cuda.is_available():
        return
    out = tmp_path / "r"
    assert main(["run", "tf-dynamics", "--device", "cuda", "--out", str(out)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not out.exists()
