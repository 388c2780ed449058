"""Keep freed memory in the process instead of handing it back to the OS at once (glibc).

PyTorch on the CPU allocates every tensor with the C library's ``malloc``. glibc returns
memory to the OS eagerly: a block above the mmap threshold (128 KiB, raised dynamically)
is ``munmap``-ed when freed, and free space at the top of the heap above the trim
threshold is given back. A training step that frees and reallocates the same few hundred
megabytes of activations every step then page-faults all of them in again, every step.
On the project's machines (a Firecracker VM, where a page fault is expensive) that was a
quarter of the locality regularizer's step in one measurement (within noise in later
ones; it depends on the host's state): ResNet18 width 16, batch 64, one thread, 10 steps
took 384k minor page faults and 792 ms/step with glibc's defaults, 172k and 589 ms/step
with the settings below (peak resident memory unchanged, 777 MB against 779 MB,
``/usr/bin/time -v``; ``bench/bench_locality_step.py`` prints which policy is in effect,
so ``IMPLREG_MALLOC=system`` gives the comparison). Steps dominated by large matrix
products change little (the ``htf-dynamics`` step: 80.7 against 83.7 it/s,
``bench/bench_htf_step.py --threads 1``).

:func:`retain_freed_memory` sets ``M_MMAP_THRESHOLD`` to 32 MiB (glibc's maximum:
smaller blocks come from the heap and are reused) and ``M_TRIM_THRESHOLD`` to 1 GiB
(up to that much free heap stays mapped), through ``mallopt``.  The price: after a
peak, up to 1 GiB of freed memory stays resident until the process ends; peak memory
itself does not grow.  It changes no numbers.  ``import implreg`` calls it, unless
the environment says otherwise:

* ``IMPLREG_MALLOC=system`` keeps glibc's defaults (``retain``, or unset, applies them;
  any other value applies nothing, and the command line refuses it:
  :func:`env_error`);
* any ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_`` the
  user set wins (glibc read them at start-up);
* not Linux, or a C library without ``mallopt`` (musl's does nothing): nothing happens.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
"""Bytes from which a block gets its own mapping (glibc accepts at most 32 MiB on 64-bit)."""
TRIM_THRESHOLD = 2**30
"""Bytes of free heap kept before glibc returns the top of the heap to the OS."""
_USER_KNOBS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

ENV = "IMPLREG_MALLOC"
CHOICES = ("retain", "system")

_applied: bool | None = None


def _env_value() -> str:
    return os.environ.get(ENV, "").strip().lower()


def env_error() -> str | None:
    """One sentence on a bad ``IMPLREG_MALLOC`` value, or ``None`` when it is unset or valid."""
    value = _env_value()
    if value and value not in CHOICES:
        return f"{ENV} must be one of {', '.join(CHOICES)}, got {os.environ[ENV]!r}"
    return None


def retain_freed_memory() -> bool:
    """Apply the thresholds above through glibc's ``mallopt``; whether they are in effect.

    Idempotent (the first call decides); a no-op returning ``False`` when the
    environment opts out or the C library cannot take them (see the module docstring).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if _env_value() not in ("", "retain"):  # "system", or a bad value the CLI refuses
        return False
    if any(k in os.environ for k in _USER_KNOBS) or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # glibc returns 1 on success; musl's stub returns 0 and changes nothing.
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _applied


def retained() -> bool:
    """Whether :func:`retain_freed_memory` has put its thresholds in effect in this process."""
    return bool(_applied)
