"""The ray backend keeps the contract of :mod:`implreg.backends`, and leaves no Ray behind.

Every test that runs tasks starts a local Ray of its own (a few seconds): what
is tested is precisely that ``map_ray`` starts it and shuts it down, or leaves
a caller's Ray running.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from implreg.backends import map_items
from implreg.ray_backend import RAY_MISSING, RayMissingError, _import_ray, _init_ray, map_ray

try:
    ray = _import_ray()
except ImportError:
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed: pip install '.[ray]'")

if ray is not None:
    # pytest imports this file as the top-level module ``test_ray_backend`` from
    # tests/, which Ray's workers cannot import: ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def torch_unit(seed: int) -> list[float]:
    """Deterministic torch work given ``seed``: a few products of a seeded random matrix."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(48, 48, generator=g, dtype=torch.float64)
    b = a @ a.T / 48
    for _ in range(3):
        b = b @ a / 48
    return [float(b.sum()), float(b.norm()), float(torch.linalg.eigvalsh(a @ a.T)[-1])]


def slow_unit(x: int) -> int:
    """Item 0 returns at once, the others take a while (they are in flight when interrupted)."""
    if x:
        time.sleep(2.0)
    return x


def failing_unit(x: int) -> int:
    if x == 3:
        raise ValueError("boom")
    time.sleep(0.05)
    return x


class _Flag:
    def __init__(self) -> None:
        self.value = False

    def is_set(self) -> bool:
        return self.value


def _processes() -> dict[int, tuple[int, str, str]]:
    """``pid -> (parent, state, start time)`` of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        table[int(entry.name)] = (int(fields[1]), fields[0], fields[19])
    return table


def _multiprocessing_helper(pid: int) -> bool:
    """The fork server and resource tracker of ``multiprocessing`` (the local backend starts
    them once Ray is loaded in this process; they live as long as it, and are not Ray's)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ")
    except OSError:
        return False
    return b"multiprocessing.forkserver" in cmd or b"multiprocessing.resource_tracker" in cmd


def _descendants() -> dict[int, str]:
    """``pid -> start time`` of this process's descendants (Ray's raylet, GCS, workers)."""
    table = _processes()
    found, frontier = {}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, start) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return {pid: start for pid, start in found.items() if not _multiprocessing_helper(pid)}


def _assert_gone(snapshot: dict[int, str], wait: float = 10.0) -> None:
    """Every process of ``snapshot`` exits (or is a zombie) within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        table = _processes()
        alive = [
            pid
            for pid, start in snapshot.items()
            if pid in table and table[pid][2] == start and table[pid][1] != "Z"
        ]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not alive, f"Ray processes still running: {alive}"


@needs_ray
def test_interrupt_cancels_and_shuts_down():
    flag, got, seen = _Flag(), {}, {}

    def on_result(i: int, value: int) -> None:
        got[i] = value
        seen.update(_descendants())  # Ray's processes, while they run
        flag.value = True

    start = time.monotonic()
    assert map_ray(
        slow_unit, list(range(16)), workers=2, threads=1, on_result=on_result, interrupt=flag
    )
    # the first unit to finish (under load, not always unit 0) and nothing after it
    assert len(got) == 1 and all(k == v for k, v in got.items()), got
    assert time.monotonic() - start < 30  # not the 15 x 2 s of the whole grid
    assert not ray.is_initialized()
    assert seen, "no Ray process was seen"
    _assert_gone(seen)


@needs_ray
def test_worker_error_is_reraised_after_shutdown():
    seen = {}
    with pytest.raises(ValueError) as info:
        map_ray(
            failing_unit,
            list(range(8)),
            workers=2,
            threads=1,
            on_result=lambda i, v: seen.update(_descendants()),
        )
    assert type(info.value) is ValueError and str(info.value) == "boom"
    assert isinstance(info.value.__cause__, ray.exceptions.RayTaskError)
    assert not ray.is_initialized()
    _assert_gone(seen)


@needs_ray
def test_ray_matches_local_and_leaves_callers_ray_running():
    items = list(range(16))
    local: dict[int, list[float]] = {}
    # before Ray starts: the local pool forks this process, better without Ray's threads
    assert not map_items(torch_unit, items, backend="local", workers=2, on_result=local.__setitem__)
    assert sorted(local) == items and len({tuple(v) for v in local.values()}) == len(items)
    reaper = _init_ray(ray, threads=1)  # the caller's Ray: used, then left initialized
    try:
        remote: dict[int, list[float]] = {}
        assert not map_items(
            torch_unit, items, backend="ray", workers=2, on_result=remote.__setitem__
        )
        assert remote == local  # the same torch threads per unit: the same numbers
        assert ray.is_initialized()
        with pytest.raises(ValueError, match="boom"):
            map_ray(failing_unit, list(range(8)), workers=2, threads=1, on_result=lambda i, v: None)
        assert ray.is_initialized()
    finally:
        ray.shutdown()
        if reaper is not None:
            reaper.stop()


@needs_ray
def test_ray_address_connects_without_local_options(monkeypatch):
    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        raise ConnectionError("no cluster here")

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # never contacted: init is faked
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda **kwargs: pytest.fail("nothing to shut down"))
    with pytest.raises(ConnectionError):
        map_ray(torch_unit, [1], workers=1, threads=1, on_result=lambda i, v: None)
    (kwargs,) = calls
    assert kwargs["address"] == "127.0.0.1:6379"
    assert not {"num_cpus", "include_dashboard"} & set(kwargs)  # the cluster's own


@needs_ray
def test_a_preset_grid_on_ray_equals_local(tmp_path):
    """The whole path: run_preset -> sweep engine -> Ray tasks -> unit files by the driver."""
    from conftest import run_config

    from implreg.config import with_overrides
    from implreg.experiments import PRESETS

    preset = PRESETS["mf-dynamics"]
    cfg = with_overrides(preset.config, {**preset.tiny, "depths": (1, 2, 3), "workers": 2})
    local = run_config(cfg, tmp_path / "local")
    remote = run_config(cfg, tmp_path / "ray", backend="ray")
    assert not ray.is_initialized()
    for a, b in zip(local.summary["runs"], remote.summary["runs"]):
        a.pop("seconds"), b.pop("seconds")
        assert a == b
    for unit in (tmp_path / "local" / "units").glob("*.json"):
        theirs = json.loads(unit.read_text())
        mine = json.loads((tmp_path / "ray" / "units" / unit.name).read_text())
        assert mine["unit"] == theirs["unit"]
        assert mine["result"]["history"] == theirs["result"]["history"]


def test_a_locality_grid_on_ray_equals_local(tmp_path):
    """Training units (per-epoch checkpoints in the run folder) give the same accuracies."""
    from conftest import run_config

    from implreg.config import with_overrides
    from implreg.experiments import PRESETS

    preset = PRESETS["locality-pathfinder"]
    cfg = with_overrides(preset.config, {**preset.tiny, "workers": 2})
    local = run_config(cfg, tmp_path / "local")
    remote = run_config(cfg, tmp_path / "ray", backend="ray")
    assert not ray.is_initialized()
    assert local.metrics()["final_test_acc"] == remote.metrics()["final_test_acc"]
    for unit in (tmp_path / "local" / "units").glob("*.json"):
        theirs = json.loads(unit.read_text())["result"]["history"]
        mine = json.loads((tmp_path / "ray" / "units" / unit.name).read_text())["result"]
        for key in ("train_loss", "test_acc", "probe_penalty"):
            assert mine["history"][key] == theirs[key], key
    assert not (tmp_path / "ray" / "work").exists()


def test_missing_ray_is_a_one_sentence_value_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails
    with pytest.raises(ValueError) as info:
        map_items(torch_unit, [1], backend="ray", workers=1, on_result=lambda i, v: None)
    assert isinstance(info.value, ImportError) and isinstance(info.value, RayMissingError)
    assert str(info.value) == RAY_MISSING


DRIVER = """
import sys, time
import ray
from implreg.ray_backend import map_ray

def slow(x):
    time.sleep(300)

map_ray(slow, [1, 2], workers=2, threads=1, on_result=lambda i, v: None)
"""


def _tree(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as fh:
                kids = [int(k) for k in fh.read().split()]
        except OSError:
            continue
        out.update(kids)
        todo.extend(kids)
    return out


@needs_ray
def test_a_sigkilled_driver_leaves_no_ray_process(tmp_path):
    import signal
    import subprocess

    log = tmp_path / "reaper.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER],
        env={**os.environ, "IMPLREG_REAPER_LOG": str(log)},
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    tree: set[int] = set()
    while time.monotonic() < deadline:  # until both tasks run
        tree |= _tree(proc.pid)
        names = [
            Path(f"/proc/{p}/cmdline").read_bytes() for p in tree if Path(f"/proc/{p}").exists()
        ]
        if sum(b"call_with_threads" in n for n in names) >= 2:
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the Ray tasks did not start within 120 s")
    time.sleep(1.0)
    tree |= _tree(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = [
            p
            for p in tree
            if Path(f"/proc/{p}").exists()
            and Path(f"/proc/{p}/stat").read_text().split(") ")[1][0] != "Z"
        ]
        if not alive:
            break
        time.sleep(0.5)
    left = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in alive}
    seen = log.read_text()[-1500:] if log.exists() else "(no reaper log)"
    seen += " | alive: " + str({p: Path(f"/proc/{p}/stat").read_text()[:60] for p in alive})
    assert not alive, f"Ray processes left behind: {left}; the reaper: {seen}"
