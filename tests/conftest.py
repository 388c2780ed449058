"""Shared strategies and helpers."""

from __future__ import annotations

import atexit
import gzip
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

settings.register_profile(
    "implreg", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("implreg")

# MNIST / Fashion-MNIST for tests that read the real files (skipped where absent).
DATA_DIR = Path(
    os.environ.get("IMPLREG_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)

# Generated datasets (Pathfinder) are cached here, not in the user's ~/.cache.
os.environ["IMPLREG_CACHE_DIR"] = tempfile.mkdtemp(prefix="implreg-test-cache-")
atexit.register(shutil.rmtree, os.environ["IMPLREG_CACHE_DIR"], ignore_errors=True)


@st.composite
def cp_shapes(draw, min_order: int = 1, max_order: int = 5, max_dim: int = 5):
    """(dims, rank, batch) for a random CP factorization."""
    order = draw(st.integers(min_order, max_order))
    dims = draw(st.lists(st.integers(1, max_dim), min_size=order, max_size=order))
    rank = draw(st.integers(1, 5))
    batch = draw(st.sampled_from([1, 3]))
    return dims, rank, batch


def random_factors(dims, rank, batch, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d, rank, generator=g, dtype=dtype) for d in dims]


def random_entries(dims, m: int, seed: int):
    """``m`` distinct index tuples and their linear indices."""
    g = torch.Generator().manual_seed(seed)
    size = math.prod(dims)
    lin = torch.randperm(size, generator=g)[: min(m, size)]
    return torch.stack(torch.unravel_index(lin, dims), dim=1), lin


def dense_by_definition(factors):
    """``sum_r w_r^1 (x) ... (x) w_r^N`` by explicit outer products, ``(B, *dims)``."""
    batch, _, rank = factors[0].shape
    dims = [f.shape[1] for f in factors]
    out = torch.zeros(batch, *dims, dtype=factors[0].dtype)
    for b in range(batch):
        for r in range(rank):
            comp = factors[0][b, :, r]
            for f in factors[1:]:
                comp = torch.tensordot(comp, f[b, :, r], dims=0)
            out[b] += comp
    return out


def run_config(cfg, out, **kw):
    """Run a config object into ``out`` through the library API, quietly."""
    from implreg.api import run_preset

    return run_preset(cfg, out=out, log=lambda *_: None, **kw)


class StopAfter:
    """An interrupt flag raised when polled for the ``k + 1``-th time."""

    def __init__(self, k: int):
        self.k, self.calls = k, 0

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls > self.k


def _idx(array: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return head + array.astype(np.uint8).tobytes()


def _fake_split(rng, n: int, side: int):
    """Images whose class is drawn as a bright block at a class-specific place, plus noise."""
    labels = rng.integers(0, 10, size=n)
    images = (rng.random((n, side, side)) < 0.05).astype(np.uint8) * 255
    for i, c in enumerate(labels):
        r, col = divmod(int(c), 4)
        images[i, 2 * r : 2 * r + 2, 2 * col : 2 * col + 2] = 255
    return images, labels.astype(np.uint8)


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name in ("mnist", "fashion-mnist"):
        folder = root / name
        folder.mkdir()
        for prefix, n in (("train", 600), ("t10k", 200)):
            images, labels = _fake_split(rng, n, 8)
            (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
            (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels))
    return root
