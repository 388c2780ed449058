"""The sweep engine: typed units run once, resume, refuse foreign unit files, stop on interrupt."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass

import pytest
from conftest import StopAfter

from implreg.config import ConfigError
from implreg.sweep import load_results, run_grid, unit_path, worker_cache


@dataclass(frozen=True)
class Square:
    name: str
    x: int

    def execute(self, should_stop=None) -> dict:
        return {"value": self.x**2, "pid": os.getpid()}


@dataclass(frozen=True)
class Boom:
    name: str

    def execute(self, should_stop=None) -> dict:
        raise ValueError("boom in a unit")


@dataclass(frozen=True)
class Killed:
    name: str

    def execute(self, should_stop=None) -> dict:
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
        return {}


def _values(results: dict) -> dict:
    return {k: v["value"] for k, v in results.items()}


def test_units_run_once_resume_and_are_read_back(tmp_path):
    units = [Square(f"u{i}", i) for i in range(5)]
    results, interrupted = run_grid(units[:3], tmp_path, workers=1)
    assert not interrupted and _values(results) == {f"u{i}": i * i for i in range(3)}
    saved = json.loads(unit_path(tmp_path, "u1").read_text())
    assert saved["unit"] == {"type": "Square", "name": "u1", "x": 1}
    # tamper with a finished result: it must be read back, not recomputed
    saved["result"]["value"] = -1
    unit_path(tmp_path, "u1").write_text(json.dumps(saved))
    results, _ = run_grid(units, tmp_path, workers=2)
    assert results["u1"]["value"] == -1 and results["u4"]["value"] == 16
    assert results["u4"]["pid"] != os.getpid()  # ran in a pool worker
    assert set(load_results(tmp_path, units)) == {f"u{i}" for i in range(5)}


def test_a_unit_file_of_other_settings_is_refused(tmp_path):
    run_grid([Square("u0", 2)], tmp_path)
    with pytest.raises(ConfigError, match="other settings"):
        run_grid([Square("u0", 3)], tmp_path)


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupt_keeps_finished_units(tmp_path, workers):
    units = [Square(f"u{i}", i) for i in range(4)]
    results, interrupted = run_grid(units, tmp_path, workers=workers, interrupt=StopAfter(0))
    assert interrupted and not results
    results, interrupted = run_grid(units, tmp_path, workers=1, interrupt=StopAfter(2))
    assert interrupted and set(results) == {"u0", "u1"}
    results, interrupted = run_grid(units, tmp_path, workers=workers)
    assert not interrupted and len(results) == 4


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_unit_raises_its_error_and_keeps_the_others(tmp_path, workers):
    with pytest.raises(ValueError, match="boom in a unit"):
        run_grid([Square("a", 1), Boom("b")], tmp_path, workers=workers)
    assert unit_path(tmp_path, "a").exists() or workers == 2
    assert not unit_path(tmp_path, "b").exists()


def test_a_worker_that_dies_is_an_error_not_a_hang(tmp_path):
    with pytest.raises(RuntimeError, match="died \\(exit code -9\\)"):
        run_grid([Square("a", 1), Killed("b"), Square("c", 3)], tmp_path, workers=2)
    assert not unit_path(tmp_path, "b").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [("{bad", "not a readable unit file"), ('{"value": 1}', "no unit settings")],
)
def test_a_damaged_unit_file_is_one_sentence(tmp_path, text, message):
    run_grid([Square("u0", 2)], tmp_path)
    unit_path(tmp_path, "u0").write_text(text)
    with pytest.raises(ConfigError, match=message):
        run_grid([Square("u0", 2)], tmp_path)


def test_repeated_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="repeat"):
        run_grid([Square("u", 1), Square("u", 2)], tmp_path)


def test_worker_cache_builds_once_and_keeps_the_last_four():
    calls = []

    def build(k):
        calls.append(k)
        return k * 10

    assert [worker_cache(("t", k), lambda k=k: build(k)) for k in (1, 1, 2)] == [10, 10, 20]
    assert calls == [1, 2]
    for k in range(3, 8):
        worker_cache(("t", k), lambda k=k: build(k))
    worker_cache(("t", 1), lambda: build(1))
    assert calls == [1, 2, 3, 4, 5, 6, 7, 1]


def _touch(path):
    with open(path, "w") as fh:
        fh.write("ran")
    return "done"


@pytest.mark.parametrize("orphaned", [False, True])
def test_a_worker_whose_driver_died_before_its_prctl_exits_at_once(tmp_path, orphaned):
    """PR_SET_PDEATHSIG set after the parent died never fires (man 2 prctl): a worker that
    finds its parent changed by then must exit instead of running its unit."""
    import multiprocessing

    from implreg.backends import ORPHANED, _child

    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe(duplex=False)
    marker = tmp_path / "ran"
    # a pid that is not this worker's parent stands for a parent that died and was replaced
    parent = os.getpid() + (1 if orphaned else 0)
    proc = ctx.Process(target=_child, args=(there, _touch, marker, 1, parent), daemon=True)
    proc.start()
    there.close()
    proc.join(60)
    if orphaned:
        assert proc.exitcode == ORPHANED and not marker.exists()
    else:
        assert here.recv() == ("ok", "done") and marker.exists() and proc.exitcode == 0


_AFTER_TWO_THREADS = """
import sys, time
import torch
from implreg.backends import map_local, start_method

def unit(x):
    a = torch.randn(400, 400)
    for _ in range(3):
        a @ a
    return torch.get_num_threads()

if __name__ == "__main__":
    assert "ray" not in sys.modules
    assert (start_method(1), start_method(2)) == ("fork", "forkserver")
    torch.set_num_threads(2)
    a = torch.randn(400, 400)
    for _ in range(5):
        a @ a  # the driver has run two-thread OpenMP regions
    seen = {}
    map_local(unit, [0, 1], workers=2, threads=int(sys.argv[1]), on_result=seen.__setitem__)
    print(sorted(seen.items()))
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_workers_run_after_the_driver_computed_on_two_threads(tmp_path, threads):
    """A worker forked from a driver that has run a two-thread OpenMP region hangs in its own
    first two-thread region (GNU OpenMP's pool does not survive fork): workers of more than
    one thread start from a fork server.  Before that this run never ended at threads=2."""
    import subprocess
    import sys

    script = tmp_path / "driver.py"
    script.write_text(_AFTER_TWO_THREADS)
    proc = subprocess.run(
        [sys.executable, str(script), str(threads)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str([(0, threads), (1, threads)])
