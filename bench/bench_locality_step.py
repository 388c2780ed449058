"""Cost of a training step with the locality-countering penalty against a plain step.

Razin, Maman & Cohen, "Implicit Regularization in Hierarchical Tensor Factorization and
Deep Convolutional Neural Networks", ICML 2022, Section 6: the penalty needs the input
gradient of the summed logits for a batch ``x`` and for ``x'`` (patch ``J`` taken from
the next sample), both with ``create_graph``, and the loss then backpropagates through
those gradients (double backpropagation).  The published implementation's regularized
step costs 4-10x a plain step (the authors report; ~2.4 ms/image plain, ~10 ms/image
regularized was measured earlier for the small ResNet18).

Measured in one run, interleaved over ``--repeats`` rounds of ``--seconds`` each (after
warm-up steps), on one random batch of 64 single-channel 32 x 32 images with 0/1 labels,
SGD (lr 0.01, momentum 0.9, the published optimizer):

1. plain (the in-run reference): forward, BCE-with-logits, backward, SGD step, in plain
   torch;
2. regularized: ``implreg.cnn.regularized_loss`` with ``lam = --lam`` (3, a published
   Pathfinder value) and a fresh pair of non-overlapping 2 x 2 patches every step
   (``sample_pathfinder_patches``), backward, SGD step -- the published semantics (two
   separate passes, so BatchNorm statistics are those of ``x`` and of ``x'``);
3. regularized, native conv (and + BN): the same step with ``implreg.cnn.conv.FAST``
   off (and ``implreg.cnn.batchnorm.CLOSED_FORM`` off), i.e. PyTorch's own double
   backward of the convolutions (and of BatchNorm): the closed forms' references;
4. with ``--fused``, a bench-only variant that pushes ``x`` and ``x'`` through the
   network as one batch of 2B.  It is *not* the published computation (BatchNorm
   statistics over the 2B batch) and is only here to show whether it would pay off.

for three networks: ``ResNet18(width=16, stem="small")``, ``SmallCNN(width=32,
depth=4)`` and the cpu-scale presets' ``SmallCNN(width=16, depth=5)``. Printed: ms/step
(min/median/max over rounds), ms/image (from the median), the ratio regularized/plain
from the medians (and from the best rounds) against the target ratio <= 5, and "others"
= CPU cores other processes used meanwhile (median).
``--profile`` adds a torch.profiler table of the regularized step per network.

    python bench/bench_locality_step.py                  # ~2 minutes on 2 cores
    python bench/bench_locality_step.py --threads 1 --fused --profile

Measured on the project's 2-core machine (torch 2.13 CPU; 2026-12-02 after
``implreg.cnn.conv`` and ``implreg.allocator``; medians of the rounds; "native conv" is
the same step with PyTorch's convolution double backward, "native conv + BN" also with
its BatchNorm double backward, i.e. PyTorch's own computation).  The machine's speed
varied up to 2x between rounds that afternoon (other tenants of the host; the "others"
column stayed at 0.01), so the table gives the range of the medians over two runs
(3 and 5 rounds; the last row of each network with ``IMPLREG_MALLOC=system``):

=======================  =======  ============  ==========  ===========  ==============
network                  threads  plain ms/img  reg./plain  native conv  native conv+BN
=======================  =======  ============  ==========  ===========  ==============
ResNet18 w16             2        1.01-1.38     4.56-4.68   4.74-5.30    5.09-6.26
ResNet18 w16             1        1.88-2.19     4.23-5.11   4.58-4.95    4.91-5.92
ResNet18 w16, glibc      1        2.05-2.36     3.71-5.06   4.37-5.49    4.90-6.30
SmallCNN w32 d4          2        0.22-0.27     5.20-5.26   6.09-6.34    7.48-8.51
SmallCNN w32 d4          1        0.42-0.43     5.63-5.69   5.63-7.33    7.07-7.96
SmallCNN w32 d4, glibc   1        0.40-0.41     4.59-4.92   6.04-6.20    7.14-8.07
SmallCNN w16 d5 (preset) 2        0.12-0.19     4.93-5.85   5.78-6.38    6.75-7.00
SmallCNN w16 d5 (preset) 1        0.20-0.22     4.62-4.64   5.78-6.22    6.74-7.59
SmallCNN w16 d5, glibc   1        0.20          4.87-5.33   5.75-5.86    6.59-7.07
=======================  =======  ============  ==========  ===========  ==============

Before ``implreg.cnn.conv`` (same bench, 2026-12-02 morning, quiet): ResNet18 5.48 (2
threads) / 5.40 (1), SmallCNN w32 6.61 / 6.27. The target ratio <= 5 is met for the
published network (ResNet18), 3.7-4.7, except in the noisiest run (5.06-5.11), and not
reliably for the small CNNs (4.6-5.9; best rounds 4.2-5.5). The convolutions' closed
form takes 1.1-1.3x off the regularized step (the ATen weight-gradient kernel instead of
a convolution of transposed tensors; the one-channel first layer's input gradient by
``F.fold``; no gradient for the regularizer's private copy of the batch). The
allocator's effect depends on how expensive the VM's page faults are at the moment: 792
against 589 ms per ResNet18 step (384k against 172k minor faults in 10 steps,
``/usr/bin/time -v``) in one measurement, within noise in others.

The published computation has a floor near 6 forwards per plain step's 2 (here a backward
costs about one forward): per pass (``x`` and ``x'``) a forward, a ``create_graph``
backward to the input, and a double backward through both (about four forward-costs,
since with BatchNorm in train mode the input gradient depends on the activations
through the batch statistics, so the double backward also traverses the forward
graph).  torch.profiler on the ResNet18 step: convolutions ~57% (forward kernels and
``convolution_backward``), PyTorch's BatchNorm double backward ~27% (40% of the small
CNN's step; mostly elementwise ``mul``/``sum``/``sub`` on full activations), which the
closed form of ``implreg.cnn.batchnorm`` cuts to 13% of the small CNN's step.  Tried and
rejected: one concatenated batch of 2B (slower, 6.3-7.0x, and it changes the BatchNorm
statistics), BatchNorm written as composite ops so that autograd differentiates it
(ResNet 5.5x vs 5.1x native in the same one-thread run), channels-last memory format
(plain step 22-35% faster, regularized step 40-70% slower: ratio 11-19x).  Beside a
busy process two threads stall at OpenMP barriers: prefer ``OMP_WAIT_POLICY=PASSIVE``
or ``--threads 1`` on a shared machine (see ``bench/bench_threads.py``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from timing import rate

from implreg.allocator import retained
from implreg.cnn import (
    ResNet18,
    SmallCNN,
    batchnorm,
    conv,
    count_parameters,
    regularized_loss,
    sample_pathfinder_patches,
    shift_patch,
)
from implreg.cnn.regularizer import _penalty_from_grads

BATCH = 64
SIDE = 32
LR, MOMENTUM = 0.01, 0.9
TARGET_RATIO = 5.0


def _busy_seconds() -> float:
    """CPU seconds used by the whole machine so far (all cores, from /proc/stat)."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:9]]
    except OSError:
        return math.nan
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def timed(step: Callable[[], object], seconds: float, warmup: int) -> tuple[float, float]:
    """ms per call of ``step`` and the CPU (in cores) other processes used meanwhile."""
    busy, own, wall = _busy_seconds(), os.times(), time.perf_counter()
    r = rate(step, seconds, warmup=warmup)
    own2 = os.times()
    mine = own2.user + own2.system - own.user - own.system
    return 1e3 / r, (_busy_seconds() - busy - mine) / (time.perf_counter() - wall)


def make_steps(model: torch.nn.Module, x, y, lam: float, fused: bool):
    """(name, step) pairs sharing one model and optimizer (the model keeps training)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    rng = np.random.default_rng(0)
    yf = y.to(x.dtype)
    h, w = x.shape[-2:]

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(model(x), yf).backward()
        opt.step()

    def regularized() -> None:
        opt.zero_grad(set_to_none=True)
        pi, pj = sample_pathfinder_patches(h, w, rng, size=2)
        regularized_loss(model, x, y, lam, pi, pj)[0].backward()
        opt.step()

    def with_native(conv_native: bool, bn_native: bool) -> Callable[[], None]:
        # the same step with PyTorch's own double backward of the convolutions and/or of
        # BatchNorm (the references of implreg.cnn.conv and implreg.cnn.batchnorm)
        def step() -> None:
            conv.FAST, batchnorm.CLOSED_FORM = not conv_native, not bn_native
            try:
                regularized()
            finally:
                conv.FAST, batchnorm.CLOSED_FORM = True, True

        return step

    def fused_2b() -> None:
        # Not the published semantics: BatchNorm sees x and x' as one batch of 2B.
        opt.zero_grad(set_to_none=True)
        pi, pj = sample_pathfinder_patches(h, w, rng, size=2)
        both = torch.cat([x, shift_patch(x, pj)]).requires_grad_(True)
        logits = model(both)
        (g,) = torch.autograd.grad(logits.sum(), both, create_graph=True)
        b = x.shape[0]
        penalty = _penalty_from_grads(g[:b], g[b:], pi, 1e-8)
        (F.binary_cross_entropy_with_logits(logits[:b], yf) + lam * penalty).backward()
        opt.step()

    steps = [
        ("plain", plain),
        ("regularized", regularized),
        ("regularized, native conv", with_native(True, False)),
        ("reg., native conv + BN", with_native(True, True)),
    ]
    return steps + ([("fused 2B (not published)", fused_2b)] if fused else [])


def profile_step(step: Callable[[], None], rows: int) -> None:
    from torch.profiler import profile

    step()
    with profile() as prof:
        for _ in range(2):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="timing window per round")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (variants interleaved)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before each window")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--lam", type=float, default=3.0, help="penalty weight (> 0)")
    ap.add_argument("--fused", action="store_true", help="add the bench-only 2B variant")
    ap.add_argument("--profile", action="store_true", help="profile the regularized step")
    ap.add_argument(
        "--models", default="resnet18,cnn,preset", help="comma-separated: resnet18, cnn, preset"
    )
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(
        f"torch {torch.__version__}; threads {torch.get_num_threads()}, usable cores {affinity}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; allocator: "
        + ("freed memory retained (implreg.allocator)" if retained() else "glibc's defaults")
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 1, SIDE, SIDE, generator=g)
    y = torch.randint(0, 2, (BATCH,), generator=g)
    builders = {
        "resnet18": ("ResNet18 width 16, small stem", lambda: ResNet18(1, 16, stem="small")),
        "cnn": ("SmallCNN width 32, depth 4", lambda: SmallCNN(1, 32, depth=4)),
        "preset": (
            "SmallCNN width 16, depth 5 (the cpu-scale presets' network)",
            lambda: SmallCNN(1, 16, depth=5),
        ),
    }
    torch.manual_seed(0)
    for key in args.models.split(","):
        label, build = builders[key]
        model = build()
        steps = make_steps(model, x, y, args.lam, args.fused)
        res: dict[str, list[float]] = {n: [] for n, _ in steps}
        oth: dict[str, list[float]] = {n: [] for n, _ in steps}
        start = time.perf_counter()
        for _ in range(args.repeats):
            for name, fn in steps:
                ms, o = timed(fn, args.seconds, args.warmup)
                res[name].append(ms)
                oth[name].append(o)
        print(
            f"\n{label} ({count_parameters(model):,} parameters), batch {BATCH} x 1 x {SIDE} x "
            f"{SIDE}, lam {args.lam:g}, 2 x 2 Pathfinder patches; {args.repeats} rounds of "
            f"{args.seconds:g} s (timed part {time.perf_counter() - start:.0f} s)"
        )
        print(
            f"{'variant':<28} {'min':>8} {'median':>8} {'max':>8}  ms/step  "
            f"{'ms/image':>8} {'others':>6}"
        )
        med = {n: statistics.median(v) for n, v in res.items()}
        for name, v in res.items():
            print(
                f"{name:<28} {min(v):8.1f} {med[name]:8.1f} {max(v):8.1f}  ms/step  "
                f"{med[name] / BATCH:8.2f} {statistics.median(oth[name]):6.2f}"
            )
        for name in res:
            if name == "plain":
                continue
            ratio, best = med[name] / med["plain"], min(res[name]) / min(res["plain"])
            verdict = ""
            if name == "regularized":
                verdict = f"; target <= {TARGET_RATIO:g}: {'MET' if ratio <= 5 else 'NOT MET'}"
            print(
                f"ratio {name}/plain: {ratio:.2f} from medians ({best:.2f} from best rounds)"
                f"{verdict}; published implementation 4-10x"
            )
        if args.profile:
            print(f"\nprofile of 2 regularized steps, {label}:")
            profile_step(dict(steps)["regularized"], 15)


if __name__ == "__main__":
    main()
