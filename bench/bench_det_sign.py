"""Wall time of the whole ``mf-det-sign`` preset (12 runs to loss 1e-4, millions of GD steps).

Compares with a simple reference measured in the same run: a plain PyTorch
float64 GD loop (autograd through the 2x2 product each step), timed over a
few thousand steps and extrapolated to the total number of steps the preset
took.

    python bench/bench_det_sign.py           # target: <= 300 s
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from implreg.api import run_preset
from implreg.config import with_overrides
from implreg.experiments import get_preset
from implreg.factorizations.det_sign import OBSERVED, TARGET, init_layers


def reference_rate(depth: int, steps: int) -> float:
    layers = torch.tensor(
        init_layers(depth, "random", 1e-3, np.random.default_rng(0)), requires_grad=True
    )
    target, mask = torch.tensor(TARGET), torch.tensor(OBSERVED)
    start = time.perf_counter()
    for _ in range(steps):
        prod = layers[0]
        for j in range(1, depth):
            prod = layers[j] @ prod
        loss = 0.5 * (((prod - target) * mask) ** 2).sum()
        (g,) = torch.autograd.grad(loss, layers)
        with torch.no_grad():
            layers -= 3e-3 * g
    return steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = with_overrides(get_preset("mf-det-sign").config, args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = run_preset(cfg, out=Path(tmp) / "run", log=lambda *_: None)
        wall = time.perf_counter() - start
    steps = sum(r["steps"] for r in out.summary["runs"])
    ref = reference_rate(3, 5000)
    print(out.summary_text())
    print(
        f"implreg mf-det-sign: {wall:.1f} s wall for {steps} GD steps over "
        f"{len(out.summary['runs'])} runs, target <= 300 s: "
        f"{'MET' if wall <= 300 else 'NOT MET'}"
    )
    print(
        f"reference (PyTorch autograd loop, depth 3): {ref:.0f} steps/s, so about "
        f"{steps / ref / 3600:.1f} h for the same steps; ratio {steps / ref / wall:.0f}x"
    )


if __name__ == "__main__":
    main()
