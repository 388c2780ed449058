"""A watchdog that kills what a driver started when the driver dies (kill -9 included).

The local process pool's workers die with the driver by ``PR_SET_PDEATHSIG``
(:mod:`implreg.backends`), but a local Ray cluster started by ``ray.init()``
is a tree of processes (GCS, raylet, agents, workers) of which some outlive a
driver killed with SIGKILL (seen here with Ray 2.5x: the dashboard and runtime
environment agents stay forever, re-parented to init).  :func:`start_reaper`
starts a small separate process (standard library only) that

- records, every ``interval`` seconds, every descendant of the driver with its
  start time (so a recycled pid is never killed);
- exits quietly when the driver stops it (:meth:`Reaper.stop`, after a normal
  ``ray.shutdown()``);
- when the driver has died without stopping it, kills every recorded process
  still alive, then, for a second, every orphan (re-parented to init) of the
  driver's process group started after the driver (what a look between two
  scans could have missed), then exits.  A death is believed only when seen
  twice; an unreadable ``/proc`` entry is not proof of death.
"""

from __future__ import annotations

import os
import subprocess
import sys

WATCHDOG = r"""
import os, select, signal, sys, time
driver, interval = int(sys.argv[1]), float(sys.argv[2])
log = open(sys.argv[3], "a") if len(sys.argv) > 3 and sys.argv[3] else None

def say(*what):
    if log is not None:
        print(*what, file=log, flush=True)

def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None  # gone
    except OSError:
        return ()  # cannot tell now
    try:
        rest = text[text.rindex(")") + 2:].split()
        return int(rest[1]), rest[19], rest[0], rest[2]  # ppid, start time, state, group
    except (ValueError, IndexError):  # read empty or cut while it is being reaped
        return ()

def alive(pid, start):
    s = stat(pid)
    if s == ():
        return True  # unreadable for a moment: not proof of death
    return s is not None and s[1] == start and s[2] not in "ZX"  # a zombie has died

def driver_alive():
    # death must be seen twice, 0.1 s apart: one odd read never kills anything
    if alive(driver, driver_start):
        return True
    time.sleep(0.1)
    return alive(driver, driver_start)

first = stat(driver)
driver_start = first[1] if first else None
driver_group = first[3] if first else None
if driver_start is None:
    sys.exit(0)  # the driver is already gone: nothing was started by it
known = {}
ready_sent = False
while driver_start is not None and driver_alive():
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            s = stat(int(name))
            if s:
                parents.setdefault(s[0], []).append((int(name), s[1]))
    todo = [driver]
    while todo:
        for pid, start in parents.get(todo.pop(), []):
            if pid != os.getpid() and pid not in known:
                known[pid] = start
                todo.append(pid)
    if not ready_sent:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        ready_sent = True
    ready, _, _ = select.select([0], [], [], interval)
    if ready:
        if os.read(0, 1):
            say("stopped by the driver")
            sys.exit(0)  # stopped by the driver
        say("end of file")
        break  # end of file: the driver died (or closed the pipe): decided below
# End of file comes while the dying driver closes its files, a moment before
# /proc shows it dead: give it that moment before deciding it lives on.
for _ in range(100):
    if driver_start is None or not driver_alive():
        break
    time.sleep(0.05)
else:
    say("the driver lives on")
    sys.exit(0)  # it lives and closed the pipe: nothing to do
say("the driver died; known:", sorted(known))
def orphans():
    # processes of the driver's group, started after it, left to init: its descendants
    # even when a scan missed them (started between two looks, or while it was busy)
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            s = stat(int(name))
            if s and s[0] == 1 and s[3] == driver_group and int(s[1]) >= int(driver_start):
                out[int(name)] = s[1]
    return out

for round in range(4):
    targets = known if round == 0 else orphans()
    for pid, start in targets.items():
        if alive(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
                say("killed", pid)
            except OSError as exc:
                say("could not kill", pid, exc)
    time.sleep(0.25)
"""


LOG = "IMPLREG_REAPER_LOG"  # a file the watchdog appends what it saw and did to (debugging)


class Reaper:
    """The handle of a running watchdog; :meth:`stop` ends it without killing anything."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"x")
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_reaper(interval: float = 0.5) -> Reaper | None:
    """Watch this process; ``None`` where ``/proc`` is missing (not Linux)."""
    if not os.path.isdir("/proc"):
        return None
    proc = subprocess.Popen(
        [sys.executable, "-c", WATCHDOG, str(os.getpid()), str(interval), os.environ.get(LOG, "")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C of the driver's terminal does not reach it
        close_fds=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # its first look at this process tree is done
    proc.stdout.close()
    return Reaper(proc)
