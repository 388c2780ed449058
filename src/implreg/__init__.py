"""implreg: implicit regularization in matrix, tensor and hierarchical tensor factorization.

``implreg.run("tf-dynamics", rank=200, out="runs/x")`` runs a preset and
returns a :class:`~implreg.api.Run`; ``implreg.load("runs/x")`` reads a run
folder; ``implreg.seed_sweep("tf-dynamics", range(10))`` runs a preset over
seeds and aggregates.  The registry of presets is
:data:`implreg.experiments.PRESETS`.
"""

from implreg.allocator import retain_freed_memory as _retain_freed_memory
from implreg.threads import prefer_passive_wait as _prefer_passive_wait

# Idle OpenMP threads sleep instead of spinning (unless OMP_WAIT_POLICY is set):
# measured in bench/bench_threads.py, it keeps multi-threaded steps from stalling
# beside a busy process and changes no numbers.  Effective only before torch loads.
_prefer_passive_wait()
# Freed tensors' memory stays in the process (glibc mallopt; IMPLREG_MALLOC=system keeps
# the defaults): re-faulting it every step cost up to a quarter of the regularized CNN
# step (implreg.allocator).  Changes no numbers.
_retain_freed_memory()

__version__ = "0.1.0"


def run(preset, *, out=None, **kwargs):
    """Run a preset (or a config, or a ``config.json``); see :func:`implreg.api.run`."""
    from implreg.api import run as _run

    return _run(preset, out=out, **kwargs)


def load(run_dir):
    """The run in ``run_dir``; see :func:`implreg.api.load`."""
    from implreg.api import load as _load

    return _load(run_dir)


def seed_sweep(preset, seeds, **kwargs):
    """A preset over seeds with an aggregate; see :func:`implreg.seeds.seed_sweep`."""
    from implreg.seeds import seed_sweep as _seed_sweep

    return _seed_sweep(preset, list(seeds), **kwargs)


__all__ = ["__version__", "load", "run", "seed_sweep"]
