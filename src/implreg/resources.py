"""Up-front resource checks: a run's peak memory, estimated from its config, against what is free.

Every experiment states :meth:`~implreg.experiments.base.Experiment.memory_estimate`
(bytes, and the config key that drives them); :func:`check_memory` refuses a
run that cannot fit before anything is allocated or written, in one sentence
naming that key.  The limit is the memory available now (``MemAvailable`` of
``/proc/meminfo``, or free GPU memory for ``cuda``), or ``max_memory`` when given.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from implreg.config import ConfigError

UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclass(frozen=True)
class Estimate:
    """Estimated peak memory of a run and the key to lower when it is too much."""

    bytes: float
    key: str
    what: str = ""  # the largest allocation, in words ("a tensor of 1e12 entries")

    def __add__(self, other: Estimate) -> Estimate:
        big = self if self.bytes >= other.bytes else other
        return Estimate(self.bytes + other.bytes, big.key, big.what)


def parse_size(text: str | int | float) -> int:
    """``"4G"``, ``"512M"``, ``"1.5GB"``, ``"2000000"`` -> bytes (binary units)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([KMGT]?)i?B?\s*", str(text), re.I)
        if m is None:
            raise ConfigError(f"max_memory must be a size such as 4G or 512M, got {text!r}")
        value, unit = float(m.group(1)), m.group(2).upper()
    size = value * UNITS[unit]
    if not size > 0:
        raise ConfigError(f"max_memory must be positive, got {text!r}")
    return int(size)


def available_memory(device: str = "cpu") -> int | None:
    """Bytes that can be allocated now on ``device``; None when it cannot be told."""
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} PB"


def check_memory(
    estimate: Estimate, *, device: str = "cpu", max_memory: int | None = None, name: str = ""
) -> None:
    """Refuse (ConfigError) a run whose estimated peak exceeds the limit."""
    limit = max_memory if max_memory is not None else available_memory(device)
    if limit is None or estimate.bytes <= limit:
        return
    source = "--max-memory" if max_memory is not None else f"available {device} memory"
    what = f" ({estimate.what})" if estimate.what else ""
    raise ConfigError(
        f"{name or 'the run'} needs about {human(estimate.bytes)}{what}, more than the "
        f"{human(limit)} of {source}; lower {estimate.key}"
    )
