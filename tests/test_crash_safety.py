"""Crash safety of run folders: periodic checkpoints, the folder lock, damaged checkpoints,
cleanup that never deletes finished work (issue 9, items 1, 3, 5)."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch

from implreg.api import RunError, run_preset
from implreg.config import ConfigError
from implreg.experiments import get_preset
from implreg.runs import (
    CHECKPOINT,
    CONFIG,
    SUMMARY,
    DamagedRunError,
    RunInUseError,
    RunLock,
    load_checkpoint,
    read_json,
    write_json,
)
from implreg.training import Checkpointer

TINY = {
    "dims": (5, 5, 5),
    "rank": 30,
    "gt_rank": 2,
    "num_observations": 60,
    "max_iterations": 400,
    "tol": 0.0,
    "log_every": 10,
}


class Killed(BaseException):
    """Stands for SIGKILL: the run dies at once, with no chance to write anything."""


class DieAfter:
    """An interrupt flag that kills the run (raises) when polled for the ``k + 1``-th time."""

    def __init__(self, k: int):
        self.k, self.calls = k, 0

    def is_set(self) -> bool:
        self.calls += 1
        if self.calls > self.k:
            raise Killed
        return False


def _run(out, method="auto", **kw):
    cfg = get_preset("tf-dynamics").config
    over = {**TINY, "method": method}
    return run_preset(cfg, out=out, overrides=over, log=lambda *_: None, **kw)


def _same_folder_results(a, b) -> None:
    assert (a / "metrics.csv").read_bytes() == (b / "metrics.csv").read_bytes()
    with np.load(a / "component_norms.npz") as x, np.load(b / "component_norms.npz") as y:
        for k in x.files:
            np.testing.assert_array_equal(x[k], y[k])


def test_checkpointer_is_due_by_count_and_by_time():
    now = [0.0]
    saved = []
    c = Checkpointer(saved.append, every=10, seconds=5.0, clock=lambda: now[0])
    assert not c.due(3) and c.due(10) and c.due(20)
    now[0] = 4.9
    assert not c.due(11)
    now[0] = 5.0
    assert c.due(11)
    c.write({"x": 1})
    assert saved == [{"x": 1}] and c.written == 1 and not c.due(12)  # the clock restarts
    off = Checkpointer(saved.append, every=0, seconds=0.0, clock=lambda: 1e9)
    assert not any(off.due(t) for t in range(1, 100))
    with pytest.raises(ValueError, match="intervals"):
        Checkpointer(saved.append, every=-1)


@pytest.mark.parametrize("method", ["auto", "sampled"])  # auto: the dense step at this size
@pytest.mark.parametrize("die_at", [57, 230, 399])
def test_a_killed_run_resumes_from_its_last_periodic_checkpoint_bit_identically(
    tmp_path, die_at, method
):
    whole = _run(tmp_path / "whole", method)
    assert whole.exit_code == 0
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        _run(out, method, interrupt=DieAfter(die_at), checkpoint_every=50, checkpoint_seconds=0.0)
    assert (out / CHECKPOINT).is_file(), "the folder keeps its last checkpoint"
    assert not (out / SUMMARY).exists()
    saved = load_checkpoint(out)["iteration"]
    assert saved == (die_at // 50) * 50, "at most one interval is lost"
    resumed = run_preset(out=out, resume=True, log=lambda *_: None)
    assert resumed.exit_code == 0 and not (out / CHECKPOINT).exists()
    _same_folder_results(out, tmp_path / "whole")


def test_killed_before_the_first_checkpoint_resumes_from_the_start(tmp_path):
    out = tmp_path / "early"
    with pytest.raises(Killed):
        _run(out, interrupt=DieAfter(5), checkpoint_every=1000, checkpoint_seconds=0.0)
    assert sorted(p.name for p in out.iterdir()) == [".lock", CONFIG], "only config.json is left"
    assert run_preset(out=out, resume=True, log=lambda *_: None).exit_code == 0
    _run(tmp_path / "whole")
    _same_folder_results(out, tmp_path / "whole")


def test_a_periodic_checkpoint_is_written_by_time(tmp_path):
    out = tmp_path / "timed"
    with pytest.raises(Killed):
        # seconds=1e-9: due at every iteration after the first, whatever the machine's speed
        _run(out, interrupt=DieAfter(30), checkpoint_seconds=1e-9)
    assert load_checkpoint(out)["iteration"] == 29


def test_the_run_folder_lock_names_its_holder(tmp_path):
    with RunLock(tmp_path) as lock:
        assert lock.path.read_text() == str(os.getpid())
        with pytest.raises(RunInUseError, match=f"in use by process {os.getpid()}"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # released on exit


def test_resume_of_a_folder_in_use_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "busy"
    with pytest.raises(Killed):
        _run(out, interrupt=DieAfter(120), checkpoint_every=50, checkpoint_seconds=0.0)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}
    with RunLock(out):
        with pytest.raises(ConfigError, match="in use by process"):
            run_preset(out=out, resume=True, log=lambda *_: None)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before


@pytest.mark.parametrize(
    "damage",
    [
        "empty",
        "truncated",
        "random",
        "not_a_dict",
        "lacks_params",
    ],
)
def test_a_damaged_checkpoint_is_refused_in_one_sentence(tmp_path, damage):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        _run(out, interrupt=DieAfter(120), checkpoint_every=50, checkpoint_seconds=0.0)
    ck = out / CHECKPOINT
    data = ck.read_bytes()
    if damage == "empty":
        ck.write_bytes(b"")
    elif damage == "truncated":
        ck.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        ck.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif damage == "not_a_dict":
        torch.save([1, 2, 3], ck)
    else:
        state = load_checkpoint(out)
        del state["params"]
        torch.save(state, ck)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}
    with pytest.raises(DamagedRunError, match="checkpoint.pt") as info:
        run_preset(out=out, resume=True, log=lambda *_: None)
    assert "\n" not in str(info.value)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before


def test_a_config_edited_against_its_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        _run(out, interrupt=DieAfter(120), checkpoint_every=50, checkpoint_seconds=0.0)
    info = read_json(out / CONFIG)
    info["config"]["rank"] = 31
    write_json(out / CONFIG, info)
    with pytest.raises(DamagedRunError, match="does not match config.json"):
        run_preset(out=out, resume=True, log=lambda *_: None)
    info["config"]["rank"] = 30
    info["config"]["init_stds"] = [0.05, 0.01]
    write_json(out / CONFIG, info)
    with pytest.raises(DamagedRunError, match="does not match config.json"):
        run_preset(out=out, resume=True, log=lambda *_: None)


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_figure_that_cannot_be_saved_keeps_the_metrics(tmp_path, monkeypatch):
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _no_space)
    out = tmp_path / "full"
    with pytest.raises(RunError, match=r"figure.*\.png: no space left on the device"):
        _run(out)
    for name in ("metrics.csv", "component_norms.npz", SUMMARY, CONFIG):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    monkeypatch.undo()
    from implreg.api import load

    assert load(out).plot(), "the figures can be redrawn once there is space"


def test_no_space_for_config_json_leaves_no_folder(tmp_path, monkeypatch):
    import implreg.api

    def fail(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(implreg.api, "write_json", fail)
    out = tmp_path / "new"
    with pytest.raises(RunError, match="config.json: no space left"):
        _run(out)
    assert not out.exists()


def test_a_failure_mid_run_keeps_a_folder_with_a_checkpoint_and_removes_an_empty_one(tmp_path):
    empty = tmp_path / "empty"
    with pytest.raises(Killed):
        _run(empty, interrupt=DieAfter(3), checkpoint_every=1000, checkpoint_seconds=0.0)
    assert empty.is_dir()  # a Killed run cannot clean up; its config.json lets it resume
    with pytest.raises(RuntimeError):

        class Boom:
            def is_set(self):
                raise RuntimeError("boom")

        _run(tmp_path / "boom", interrupt=Boom())
    assert not (tmp_path / "boom").exists(), "a run that wrote nothing leaves no folder"


@pytest.mark.parametrize(
    ("key", "value"),
    [("huber_delta", 1e300), ("gt_norm", 1e300), ("lr", 1e200), ("init_stds", (1e30,))],
)
def test_numbers_beyond_the_dtype_are_refused_before_any_work(tmp_path, key, value):
    over = {"loss": "huber", "huber_delta": 0.5, key: value}
    with pytest.raises(ConfigError, match=f"{key}=.* is too large for float32"):
        run_preset("tf-dynamics", out=tmp_path / "x", overrides=over, log=lambda *_: None)
    assert not (tmp_path / "x").exists()


def test_a_run_that_diverges_at_once_is_summarized_and_drawn_as_diverged(tmp_path):
    over = dict(TINY, init_stds=(1e15, 0.01), max_iterations=50)
    cfg = get_preset("tf-dynamics").config
    run = run_preset(cfg, out=tmp_path / "d", overrides=over, log=lambda *_: None)
    assert run.exit_code == 1
    first, second = run.summary["runs"]
    assert first["status"] == "diverged" and first["n_learned"] is None
    assert second["n_learned"] is not None
    assert any("diverged at iteration 0" in p for p in run.summary["problems"])
    assert (tmp_path / "d" / "figure.png").is_file()
