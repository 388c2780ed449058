"""Training-step speed of hierarchical tensor factorization on the published HTF setting.

``htf-dynamics`` (REFERENCE §4): order 4, modes of 16, tree ((1,2),(3,4)), widths
[512, 512], every parameter N(0, 0.01^2), float32; 2048 observed entries (the first
half of 4096 distinct uniform entries) of a ground truth drawn from the same model
with widths [5, 5] and N(0, 1) parameters, rescaled to ||W*||_F = 64.  Measured in
one run, on each thread count of ``--threads``, ``--repeats`` times (min/median/max):

1. reference: the authors' formulation in plain torch -- each step pushes the 2048
   samples through the per-node matrices (``a_n = W0_n[i_n]``, ``h_12 = (a_1 * a_2)
   W1_12``, ``h_34 = (a_3 * a_4) W1_34``, ``pred = (h_12 * h_34) w_out``; about
   3.2 GMAC), MSE (mean, no 1/2) by autograd, the adaptive GD update
   (``implreg.optim.AdaptiveGD``, lr 0.01).
2. implreg: ``DenseHTFCompletion.loss_and_grad`` + the same update, one run (B = 1)
   and three init scales in one vectorized pass (B = 3, counted in run-steps/s).
   Before timing, its loss and gradients are checked against the reference's autograd
   at the same parameters (so both do the same work).
3. GEMM bound: the dense matrix products one dense step needs, alone, as batched
   ``torch.matmul`` calls on preallocated tensors (per run, about 0.5 GMAC): forward
   two (256 x 512)(512 x 512) node products and the (256 x 512) diag(w) (512 x 256)
   root product; backward per node ``dW = Z^T dT`` and ``dZ = dT W^T``, and the root's
   two (256 x 256)(256 x 512) products.

``--large`` adds the order-8 completion through ``GatherHTFCompletion`` (modes of 10,
10^8 entries never built, adjacent tree, widths [128, 128, 128] so that a step takes
~0.1-1 s, init std 0.1, 20000 observations, chunk 4096): iterations/s and the peak
resident memory of this process (VmHWM, reset through ``/proc/self/clear_refs`` before
the part; ru_maxrss where that is refused), next to a chunked autograd reference of
the same tree.

Targets: implreg B = 1 >= 50x the reference (REFERENCE quotes ~2.7 it/s for the
authors' code; the in-run plain-torch reference is itself much faster, so both
ratios are printed); dense step >= 40% of the GEMM bound; large: peak <= 2 GB.

    python bench/bench_htf_step.py                 # ~1 minute (2 thread counts)
    python bench/bench_htf_step.py --large         # adds the order-8 gather part

The "others" column is the CPU (in cores) other processes used during a measurement.
Beside a busy process, two threads collapse with libgomp's default spin-wait (see
``bench/bench_threads.py``); on a shared machine compare with
``OMP_WAIT_POLICY=PASSIVE python bench/bench_htf_step.py``.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import time
from collections.abc import Callable

import torch
from timing import rate

from implreg.losses import L2Loss
from implreg.optim import AdaptiveGD
from implreg.problems.synthetic import sample_indices

DIMS = [16, 16, 16, 16]
WIDTH = 512
M = 2048
INIT_STD = 0.01
BATCH_STDS = [0.01, 0.005, 0.02]
LR = 0.01
PUBLISHED_REF = 2.7  # it/s of the authors' code here (REFERENCE §4)
LARGE_DIMS = [10] * 8
LARGE_M = 20_000

Tensor = torch.Tensor


def _htf():
    """The lead's HTF modules, or the reason they cannot be imported."""
    try:
        from implreg.factorizations import htf, htf_engine
    except Exception as exc:  # noqa: BLE001 -- any import failure: report and go on
        return None, f"{type(exc).__name__}: {exc}"
    return (htf, htf_engine), ""


# --------------------------------------------------------------------------- problem


def truth_tensor(generator: torch.Generator) -> tuple[Tensor, list[Tensor]]:
    """Ground truth (order-4 model, widths [5, 5], N(0, 1) params, ||.||_F = 64), its params.

    The parameters are returned unscaled (node order), for checking ``htf_to_tensor``.
    """
    leaves = [torch.randn(d, 5, generator=generator) for d in DIMS]
    w12, w34 = torch.randn(5, 5, generator=generator), torch.randn(5, 5, generator=generator)
    w_out = torch.randn(5, generator=generator)
    k12 = (leaves[0][:, None, :] * leaves[1][None, :, :]).reshape(-1, 5) @ w12
    k34 = (leaves[2][:, None, :] * leaves[3][None, :, :]).reshape(-1, 5) @ w34
    end = (k12 * w_out) @ k34.T
    # One common factor on all 7 parameters scales the end tensor by its 7th power.
    return (end * (64.0 / torch.linalg.matrix_norm(end))).reshape(DIMS), (
        leaves + [w12, w34, w_out]
    )


def init_params(generator: torch.Generator) -> list[Tensor]:
    """One run's parameters in node order: 4 leaves (16 x 512), W1_12, W1_34, w_out."""
    leaves = [torch.randn(d, WIDTH, generator=generator) * INIT_STD for d in DIMS]
    inner = [torch.randn(WIDTH, WIDTH, generator=generator) * INIT_STD for _ in range(2)]
    return leaves + inner + [torch.randn(WIDTH, generator=generator) * INIT_STD]


# ------------------------------------------------------------------------- reference


class Reference:
    """The authors' formulation: the observed samples through the per-node matrices."""

    def __init__(self, params: list[Tensor], idx: Tensor, y: Tensor):
        self.params = [p.detach().clone().requires_grad_() for p in params]
        self.cols = [idx[:, n].contiguous() for n in range(idx.shape[1])]
        self.y = y
        self.opt = AdaptiveGD(LR, eps=1e-6)
        self.active = torch.ones(1, dtype=torch.bool)

    def loss(self) -> Tensor:
        w1, w2, w3, w4, w12, w34, w_out = self.params
        a1, a2, a3, a4 = (w[c] for w, c in zip((w1, w2, w3, w4), self.cols))
        h12 = (a1 * a2) @ w12
        h34 = (a3 * a4) @ w34
        pred = (h12 * h34) @ w_out
        return ((pred - self.y) ** 2).mean()

    def step(self) -> None:
        for p in self.params:
            p.grad = None
        self.loss().backward()
        with torch.no_grad():
            self.opt.step(
                [p.unsqueeze(0) for p in self.params],
                [p.grad.unsqueeze(0) for p in self.params],
                self.active,
            )


# ------------------------------------------------------------------------ GEMM bound


def gemm_bound(batch: int) -> Callable[[], None]:
    """The matrix products of one dense step of ``batch`` runs, on preallocated tensors."""
    rows, r1, r2 = DIMS[0] * DIMS[1], WIDTH, WIDTH  # 256 rows per half, widths 512, 512
    nb = 2 * batch  # two nodes per run
    g = torch.Generator().manual_seed(7)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    z, w, k = rnd(nb, rows, r1), rnd(nb, r1, r2), torch.empty(nb, rows, r2)
    left, right_t, end = rnd(batch, rows, r2), rnd(batch, r2, rows), torch.empty(batch, rows, rows)
    d_end, k_w, d_k = rnd(nb, rows, rows), rnd(nb, rows, r2), torch.empty(nb, rows, r2)
    d_t, d_w, d_z = rnd(nb, rows, r2), torch.empty(nb, r1, r2), torch.empty(nb, rows, r1)
    z_t, w_t = z.transpose(1, 2), w.transpose(1, 2)

    def step() -> None:
        torch.matmul(z, w, out=k)  # forward: K_v = Z_v W_v, both nodes
        torch.matmul(left, right_t, out=end)  # forward: K_12 diag(w) K_34^T
        torch.matmul(d_end, k_w, out=d_k)  # backward root: G K_34 diag(w), G^T K_12 diag(w)
        torch.matmul(z_t, d_t, out=d_w)  # backward nodes: dW = Z^T dT
        torch.matmul(d_t, w_t, out=d_z)  # backward nodes: dZ = dT W^T

    return step


def gemm_flops(batch: int) -> float:
    rows = DIMS[0] * DIMS[1]
    node = rows * WIDTH * WIDTH
    root = rows * WIDTH * rows
    return 2.0 * batch * (2 * node + root + 2 * root + 4 * node)


# --------------------------------------------------------------------------- memory


def _status_gb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024**2
    return math.nan


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def peak_gb(resettable: bool) -> float:
    if resettable:
        return _status_gb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


# ----------------------------------------------------------------------------- report


def _busy_seconds() -> float:
    """CPU seconds used by the whole machine so far (all cores, from /proc/stat)."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:9]]
    except OSError:
        return math.nan
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def timed(step: Callable[[], object], seconds: float, warmup: int) -> tuple[float, float]:
    """Calls/s of ``step`` and the CPU (in cores) other processes used meanwhile."""
    busy, own, wall = _busy_seconds(), os.times(), time.perf_counter()
    r = rate(step, seconds, warmup=warmup)
    own2 = os.times()
    mine = own2.user + own2.system - own.user - own.system
    return r, (_busy_seconds() - busy - mine) / (time.perf_counter() - wall)


def summary(xs: list[float]) -> str:
    return f"{min(xs):9.2f} {statistics.median(xs):9.2f} {max(xs):9.2f}"


def rel_err(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


def check_engine(eng, params1, ref: Reference) -> str:
    """Engine loss and gradients vs the reference's autograd at the same parameters."""
    values, grads = eng.loss_and_grad(params1, L2Loss())
    for p in ref.params:
        p.grad = None
    lv = ref.loss()
    lv.backward()
    errs = [rel_err(g[0], p.grad) for g, p in zip(grads, ref.params)]
    ve, vr = float(values[0]), float(lv.detach())
    return (
        f"loss {ve:.6g} vs reference {vr:.6g} (rel {abs(ve - vr) / abs(vr):.1e}); "
        f"gradients max rel err {max(errs):.1e}"
    )


def small_part(args, threads: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    truth, truth_params = truth_tensor(g)
    idx = sample_indices(DIMS, 2 * M, generator=g)[:M]
    y = truth[tuple(idx.T)].contiguous()
    base = init_params(torch.Generator().manual_seed(1))
    ref = Reference(base, idx, y)
    loss = L2Loss()

    variants: list[tuple[str, Callable[[], None], int]] = [("reference", ref.step, 1)]
    mods, why = _htf()
    if mods is not None:
        htf, htf_engine = mods
        tree = htf.ModeTree.parse("((1,2),(3,4))", 4)
        # The contract's end tensor must equal the plain formula on the same parameters.
        tp = [p.unsqueeze(0) for p in truth_params]
        raw = htf.htf_to_tensor(tp, tree)[0]
        scale = 64.0 / float(torch.linalg.vector_norm(raw))
        print(
            f"check: htf_to_tensor vs plain truth formula rel err {rel_err(raw * scale, truth):.1e}"
        )
        eng = htf_engine.DenseHTFCompletion(tree, DIMS, idx, y)
        p1 = [p.clone().unsqueeze(0) for p in base]
        print("check: DenseHTFCompletion " + check_engine(eng, p1, ref))
        ref = Reference(base, idx, y)  # fresh optimizer state after the check
        variants[0] = ("reference", ref.step, 1)
        opt1, act1 = AdaptiveGD(LR, eps=1e-6), torch.ones(1, dtype=torch.bool)

        def step1() -> None:
            _, grads = eng.loss_and_grad(p1, loss)
            opt1.step(p1, grads, act1)

        p3 = htf.htf_init(
            DIMS, tree, [WIDTH, WIDTH], stds=BATCH_STDS, generator=torch.Generator().manual_seed(2)
        )
        opt3, act3 = AdaptiveGD(LR, eps=1e-6), torch.ones(3, dtype=torch.bool)

        def step3() -> None:
            _, grads = eng.loss_and_grad(p3, loss)
            opt3.step(p3, grads, act3)

        variants += [("implreg B=1", step1, 3), ("implreg B=3", step3, 3)]
    else:
        print(f"implreg HTF engine not importable ({why}): reference and GEMM bound only")
    variants += [("GEMM bound B=1", gemm_bound(1), 5), ("GEMM bound B=3", gemm_bound(3), 5)]

    res: dict[tuple[int, str], list[float]] = {(t, n): [] for t in threads for n, _, _ in variants}
    others: dict[tuple[int, str], list[float]] = {k: [] for k in res}
    start = time.perf_counter()
    for _ in range(args.repeats):  # rounds interleave variants and thread counts
        for t in threads:
            torch.set_num_threads(t)
            for name, fn, warm in variants:
                r, o = timed(fn, args.seconds, warm)
                res[(t, name)].append(r)
                others[(t, name)].append(o)
    print(f"(timed part: {time.perf_counter() - start:.0f} s)")

    print(
        f"\nhtf-dynamics step, order 4, d=16, widths [{WIDTH}, {WIDTH}], m={M}, float32; "
        f"{args.repeats} repeats of {args.seconds:g} s; 'others' = CPU cores other processes "
        "used meanwhile (median)"
    )
    head = (
        f"{'threads':>7} {'variant':<15} {'min':>9} {'median':>9} {'max':>9}  "
        f"{'unit':<12} {'ms/step':>8} {'others':>6}"
    )
    for t in threads:
        print("\n" + head)
        med = {name: statistics.median(res[(t, name)]) for name, _, _ in variants}
        best = {name: max(res[(t, name)]) for name, _, _ in variants}
        for name, _, _ in variants:
            xs, unit = res[(t, name)], "it/s"
            if name == "implreg B=3":
                xs, unit = [3 * x for x in xs], "run-steps/s"
            print(
                f"{t:>7} {name:<15} {summary(xs)}  {unit:<12} {1e3 / med[name]:8.2f} "
                f"{statistics.median(others[(t, name)]):6.2f}"
            )
        r_ref = med["reference"]
        flops = [f"reference {6.4 * r_ref:.0f} (~6.4 GFLOP/step)"] + [
            f"GEMM bound B={b} {gemm_flops(b) * med[f'GEMM bound B={b}'] / 1e9:.0f}" for b in (1, 3)
        ]
        print(f"{'':>7} GFLOP/s (median): " + ", ".join(flops))
        if "implreg B=1" not in med:
            continue
        print(f"{'':>7} ratios, from medians (from best rates):")
        for b in (1, 3):
            key, bound = f"implreg B={b}", f"GEMM bound B={b}"
            x_ref = (b * med[key] / med["reference"], b * best[key] / best["reference"])
            x_pub = (b * med[key] / PUBLISHED_REF, b * best[key] / PUBLISHED_REF)
            frac = (med[key] / med[bound], best[key] / best[bound])
            verdict = (
                f"  targets: >= 50x in-run {'MET' if x_ref[0] >= 50 else 'NOT MET'}, "
                f">= 50x published {'MET' if x_pub[0] >= 50 else 'NOT MET'}, "
                f">= 40% of bound {'MET' if frac[0] >= 0.4 else 'NOT MET'}"
                if b == 1
                else ""
            )
            print(
                f"{'':>7}   implreg B={b}: {x_ref[0]:5.1f}x ({x_ref[1]:5.1f}x) the in-run "
                f"reference, {x_pub[0]:5.1f}x ({x_pub[1]:5.1f}x) the published "
                f"{PUBLISHED_REF} it/s, {frac[0]:4.0%} ({frac[1]:4.0%}) of the GEMM bound" + verdict
            )


# ------------------------------------------------------------------------ large part


def large_reference(params: list[Tensor], tree, idx: Tensor, y: Tensor, chunk: int):
    """Chunked autograd push of the observations through the tree (plain torch)."""
    ps = [p[0].detach().clone().requires_grad_() for p in params]
    opt, active = AdaptiveGD(LR, eps=1e-6), torch.ones(1, dtype=torch.bool)
    m = idx.shape[0]

    def step() -> None:
        for p in ps:
            p.grad = None
        for s in range(0, m, chunk):
            sub = idx[s : s + chunk]
            h: list[Tensor | None] = [ps[n][sub[:, n]] for n in range(tree.order)]
            h += [None] * (len(tree.nodes) - tree.order)
            for v in tree.internal:
                prod = h[tree.children[v][0]]
                for c in tree.children[v][1:]:
                    prod = prod * h[c]
                h[v] = prod @ ps[v]
            ((h[tree.root] - y[s : s + chunk]) ** 2).sum().div(m).backward()
        with torch.no_grad():
            opt.step([p.unsqueeze(0) for p in ps], [p.grad.unsqueeze(0) for p in ps], active)

    return step


def large_part(args, threads: list[int]) -> None:
    mods, why = _htf()
    if mods is None:
        print(f"\n--large skipped: implreg HTF engine not importable ({why})")
        return
    htf, htf_engine = mods
    resettable = reset_peak()
    base = _status_gb("VmRSS")
    tree = htf.ModeTree.adjacent(len(LARGE_DIMS))
    g = torch.Generator().manual_seed(0)
    truth = htf.htf_init(LARGE_DIMS, tree, 5, stds=[1.0], generator=g)
    idx = sample_indices(LARGE_DIMS, LARGE_M, generator=g)
    y = htf.htf_values(truth, tree, idx)[0]
    # ||W*||_F = 64, with ||W*||_F^2 estimated as (number of entries) * mean(y^2).
    y = (y * (64.0 / math.sqrt(math.prod(LARGE_DIMS) * float((y * y).mean())))).contiguous()
    widths = [int(w) for w in args.large_widths.split(",")]
    params = htf.htf_init(
        LARGE_DIMS, tree, widths, stds=[args.large_std], generator=torch.Generator().manual_seed(1)
    )
    eng = htf_engine.GatherHTFCompletion(tree, LARGE_DIMS, idx, y, chunk=args.chunk)
    loss, opt, act = L2Loss(), AdaptiveGD(LR, eps=1e-6), torch.ones(1, dtype=torch.bool)

    def step() -> None:
        _, grads = eng.loss_and_grad(params, loss)
        opt.step(params, grads, act)

    n_params = sum(p.numel() for p in params)
    print(
        f"\nlarge: order {len(LARGE_DIMS)}, d=10 (10^8 entries), tree {tree.describe()}, "
        f"widths {widths}, {n_params} params, init std {args.large_std}, m={LARGE_M}, "
        f"chunk {args.chunk}; memory: "
        f"{'VmHWM after a reset' if resettable else 'ru_maxrss (process lifetime)'}, "
        f"RSS at the reset {base:.2f} GB"
    )
    res: dict[int, list[float]] = {t: [] for t in threads}
    oth: dict[int, list[float]] = {t: [] for t in threads}
    for _ in range(args.repeats):
        for t in threads:
            torch.set_num_threads(t)
            r, o = timed(step, args.large_seconds, 1)
            res[t].append(r)
            oth[t].append(o)
    peak = peak_gb(resettable)
    ref_step = large_reference(params, tree, idx, y, args.chunk)
    if resettable:
        reset_peak()
    ref_res: dict[int, list[float]] = {t: [] for t in threads}
    ref_oth: dict[int, list[float]] = {t: [] for t in threads}
    for _ in range(args.repeats):
        for t in threads:
            torch.set_num_threads(t)
            r, o = timed(ref_step, args.large_seconds, 1)
            ref_res[t].append(r)
            ref_oth[t].append(o)
    ref_peak = peak_gb(resettable)
    print(
        f"{'threads':>7} {'variant':<22} {'min':>9} {'median':>9} {'max':>9}  "
        f"{'unit':<5} {'ms/step':>8} {'others':>6}"
    )
    for t in threads:
        r, rr = statistics.median(res[t]), statistics.median(ref_res[t])
        for name, xs, os_, med in (
            ("GatherHTFCompletion", res[t], oth[t], r),
            ("autograd reference", ref_res[t], ref_oth[t], rr),
        ):
            print(
                f"{t:>7} {name:<22} {summary(xs)}  it/s  {1e3 / med:8.1f} "
                f"{statistics.median(os_):6.2f}"
            )
        print(
            f"{'':>7} engine / reference: {r / rr:.2f}x (best {max(res[t]) / max(ref_res[t]):.2f}x)"
            f"; step in 0.1-1 s: {'yes' if 0.1 <= 1 / r <= 1 else 'no'}"
        )
    print(
        f"peak resident memory: GatherHTFCompletion {peak:.2f} GB "
        f"(target <= 2 GB: {'MET' if peak <= 2 else 'NOT MET'}), "
        f"autograd reference {ref_peak:.2f} GB"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.5, help="timing window per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--large", action="store_true", help="add the order-8 gather part")
    ap.add_argument("--large-only", action="store_true", help="only the order-8 gather part")
    ap.add_argument("--large-widths", default="128,128,128", help="widths by height, order 8")
    ap.add_argument("--large-std", type=float, default=0.1, help="init std of the large part")
    ap.add_argument("--large-seconds", type=float, default=2.0)
    ap.add_argument("--chunk", type=int, default=4096)
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(
        f"torch {torch.__version__}; default threads {torch.get_num_threads()}, "
        f"usable cores {affinity}, measured on threads {threads}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    if not args.large_only:
        small_part(args, threads)
    if args.large or args.large_only:
        large_part(args, threads)


if __name__ == "__main__":
    main()
