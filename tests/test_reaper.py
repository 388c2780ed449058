"""Workers die with their driver: the reaper kills what a driver killed with SIGKILL started
(issue 9, item 2); the local pool and Ray are tested through real drivers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from implreg.reaper import start_reaper


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _wait_gone(pids, seconds: float = 15.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _driver(code: str) -> tuple[subprocess.Popen, list[int]]:
    """A python driver that prints the pids it wants watched, one line, then waits."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the driver printed nothing"
    return proc, [int(x) for x in line.split()]


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="the reaper needs /proc")
def test_a_sigkilled_driver_takes_its_detached_children_along():
    proc, pids = _driver(
        """
        import subprocess, sys, time
        from implreg.reaper import start_reaper
        reaper = start_reaper(interval=0.1)
        # detached like Ray's agents: its own session, not a direct child by the end
        kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                               start_new_session=True)
        time.sleep(2.0)  # let the reaper record it (it looks every 0.1 s)
        print(kid.pid, reaper.proc.pid, flush=True)
        time.sleep(120)
        """
    )
    kid, watchdog = pids
    assert _alive(kid) and _alive(watchdog)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    assert _wait_gone([kid, watchdog]) == []


def test_a_stopped_reaper_kills_nothing():
    kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        reaper = start_reaper(interval=0.1)
        assert reaper is not None
        time.sleep(0.5)
        reaper.stop()
        assert reaper.proc.poll() is not None
        time.sleep(0.3)
        assert kid.poll() is None, "a normal stop leaves the driver's processes alone"
    finally:
        kid.kill()
        kid.wait()


def test_local_pool_workers_die_with_a_sigkilled_driver():
    proc, pids = _driver(
        """
        import os, time
        from implreg.backends import map_local

        def unit(x):
            time.sleep(120)

        import threading
        def report():
            for _ in range(600):  # until both workers run (torch's import may be slow)
                time.sleep(0.1)
                kids = []
                for task in os.listdir(f"/proc/{os.getpid()}/task"):
                    kids += open(f"/proc/{os.getpid()}/task/{task}/children").read().split()
                if len(kids) >= 2:
                    break
            print(" ".join(kids), flush=True)
        threading.Thread(target=report, daemon=True).start()
        map_local(unit, [1, 2], workers=2, threads=1, on_result=lambda i, v: None)
        """
    )
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    assert _wait_gone(pids) == []
