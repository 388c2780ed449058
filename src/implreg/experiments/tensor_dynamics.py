"""Dynamics of gradient descent over CP tensor factorization (paper Figure 3; REFERENCE §1).

A low-CP-rank ground truth is completed (or sensed) from a few observations by
a CP factorization with many more components than needed, started from small
random initializations of several scales.  All scales share one vectorized
pass.  Recorded over time: train loss, reconstruction error, unbalancedness
(Definition 1) and every component norm, tracked by component identity.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from implreg.experiments.config import ConfigError, require
from implreg.factorizations.cp import (
    cp_component_norms,
    cp_init,
    cp_to_tensor,
    cp_unbalancedness,
    cp_values,
)
from implreg.factorizations.cp_engine import (
    DenseSensing,
    RankOneSensing,
    completion_engine,
)
from implreg.losses import HuberLoss, make_loss
from implreg.metrics import Recorder, learned_components, top_components
from implreg.optim import StopRule, make_optimizer
from implreg.problems.synthetic import (
    completion_problem,
    low_cp_rank_tensor,
    sensing_problem,
)
from implreg.runs import CHECKPOINT, SUMMARY, load_checkpoint, save_checkpoint, write_json
from implreg.training import Interrupt, TrainState, train

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DENSE_SENSING_MAX = 250_000_000  # numbers in the m x P measurement matrix


@dataclass(frozen=True)
class TensorDynamicsConfig:
    """Settings of the CP dynamics experiment; defaults are the paper's Figure 3 (REFERENCE §1).

    Runs stop at the paper's rule (train loss below ``tol`` for ``patience``
    checks every ``check_every`` iterations).  ``max_iterations`` defaults to
    1e5, which every seed 0-9 of ``tf-dynamics`` needed less of (the slowest,
    about 34k iterations); the paper's own cap is 1e6.  The default seed is 3:
    see the README for what seeds 0-9 give.
    """

    dims: tuple[int, ...] = (10, 10, 10, 10)
    gt_rank: int = 5
    gt_norm: float = 1.0
    task: str = "completion"
    measurement: str = "gaussian"
    num_observations: int = 2000
    rank: int = 1000
    init_stds: tuple[float, ...] = (0.05, 0.01, 0.005)
    init_mean: float = 0.0
    loss: str = "l2"
    huber_delta: float = 0.0
    optimizer: str = "adaptive"
    lr: float = 0.01
    eps: float = 1e-6
    tol: float = 1e-8
    patience: int = 51
    check_every: int = 25
    max_iterations: int = 100_000
    log_every: int = 25
    max_records: int = 4000
    top_k: int = 10
    learned_fraction: float = 0.1
    method: str = "auto"
    dtype: str = "float32"
    recon_sample: int = 100_000
    dense_max: int = 1 << 22
    seed: int = 3

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first problem found."""
        require(len(self.dims) >= 2, f"dims needs an order of at least 2, got {list(self.dims)}")
        require(
            all(d >= 1 for d in self.dims),
            f"every mode size must be positive, got {list(self.dims)}",
        )
        require(self.gt_rank >= 1, f"gt_rank must be positive, got {self.gt_rank}")
        require(self.gt_norm > 0, f"gt_norm must be positive, got {self.gt_norm}")
        require(self.rank >= 1, f"rank must be positive, got {self.rank}")
        require(len(self.init_stds) >= 1, "init_stds needs at least one value")
        require(
            all(s > 0 and math.isfinite(s) for s in self.init_stds),
            f"every init std must be positive, got {list(self.init_stds)}",
        )
        require(
            self.task in {"completion", "sensing"},
            f"task must be 'completion' or 'sensing', got {self.task!r}",
        )
        require(
            self.measurement in {"gaussian", "rank_one"},
            f"measurement must be 'gaussian' or 'rank_one', got {self.measurement!r}",
        )
        size = math.prod(self.dims)
        require(
            self.num_observations >= 1,
            f"num_observations must be positive, got {self.num_observations}",
        )
        if self.task == "completion":
            require(
                self.num_observations <= size,
                f"num_observations={self.num_observations} is larger than "
                f"the tensor's {size} entries",
            )
        elif self.measurement == "gaussian":
            require(
                self.num_observations * size <= DENSE_SENSING_MAX,
                f"dense Gaussian sensing needs {self.num_observations} x {size} numbers; "
                "use measurement=rank_one for a tensor this large",
            )
        require(self.loss in {"l2", "huber"}, f"loss must be 'l2' or 'huber', got {self.loss!r}")
        if self.loss == "huber":
            require(
                self.huber_delta > 0,
                f"the huber loss needs huber_delta > 0, got {self.huber_delta}",
            )
        require(
            self.optimizer in {"adaptive", "gd", "adam"},
            f"optimizer must be 'adaptive', 'gd' or 'adam', got {self.optimizer!r}",
        )
        require(self.lr > 0, f"lr must be positive, got {self.lr}")
        require(self.eps > 0, f"eps must be positive, got {self.eps}")
        require(self.tol >= 0, f"tol must be non-negative, got {self.tol}")
        require(self.patience >= 1, f"patience must be positive, got {self.patience}")
        require(self.check_every >= 1, f"check_every must be positive, got {self.check_every}")
        require(
            self.max_iterations >= 1, f"max_iterations must be positive, got {self.max_iterations}"
        )
        require(self.log_every >= 1, f"log_every must be positive, got {self.log_every}")
        require(self.max_records >= 4, f"max_records must be at least 4, got {self.max_records}")
        require(self.top_k >= 1, f"top_k must be positive, got {self.top_k}")
        require(
            0 < self.learned_fraction < 1,
            f"learned_fraction must lie in (0, 1), got {self.learned_fraction}",
        )
        require(
            self.method in {"auto", "dense", "gather"},
            f"method must be 'auto', 'dense' or 'gather', got {self.method!r}",
        )
        require(self.dtype in DTYPES, f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        require(self.recon_sample >= 1, f"recon_sample must be positive, got {self.recon_sample}")
        require(self.dense_max >= 1, f"dense_max must be positive, got {self.dense_max}")
        if self.task == "sensing" and self.measurement == "gaussian" and self.method == "gather":
            raise ConfigError(
                "method=gather applies to completion; dense Gaussian sensing is dense"
            )


Config = TensorDynamicsConfig


@dataclass
class Prepared:
    """The problem, objective and initial factors of one configuration."""

    cfg: TensorDynamicsConfig
    truth_norm: float
    engine: object
    loss: object
    factors: list[torch.Tensor]
    evaluate: object


def prepare(cfg: TensorDynamicsConfig) -> Prepared:
    """Validate ``cfg`` and build everything a run needs; nothing is written to disk."""
    cfg.validate()
    dtype = DTYPES[cfg.dtype]
    gen = torch.Generator().manual_seed(cfg.seed)
    truth = low_cp_rank_tensor(cfg.dims, cfg.gt_rank, norm=cfg.gt_norm, generator=gen)
    if cfg.task == "completion":
        prob = completion_problem(truth, cfg.num_observations, generator=gen)
        engine = completion_engine(cfg.dims, prob.idx, prob.y.to(dtype), method=cfg.method)
    else:
        sens = sensing_problem(truth, cfg.num_observations, kind=cfg.measurement, generator=gen)
        if cfg.measurement == "gaussian":
            assert sens.measurements is not None
            engine = DenseSensing(cfg.dims, sens.measurements.to(dtype), sens.y.to(dtype))
        else:
            assert sens.vectors is not None
            engine = RankOneSensing([v.to(dtype) for v in sens.vectors], sens.y.to(dtype))
    loss = make_loss(cfg.loss, huber_delta=cfg.huber_delta if cfg.loss == "huber" else None)
    factors = cp_init(
        cfg.dims,
        cfg.rank,
        stds=cfg.init_stds,
        mean=cfg.init_mean,
        generator=torch.Generator().manual_seed(cfg.seed + 1),
        dtype=dtype,
    )
    if isinstance(loss, HuberLoss):
        loss.check_scale(engine.predict(factors) - engine.y)  # type: ignore[attr-defined]

    size = math.prod(cfg.dims)
    truth_norm = truth.norm()
    if size <= cfg.dense_max:
        truth_flat = truth.dense().reshape(-1)

        def recon(f):
            w = cp_to_tensor(f).reshape(f[0].shape[0], -1).double()
            return (torch.linalg.vector_norm(w - truth_flat, dim=1) / truth_flat.norm()).numpy()
    else:
        egen = torch.Generator().manual_seed(cfg.seed + 2)
        eidx = torch.stack(
            [torch.randint(0, d, (cfg.recon_sample,), generator=egen) for d in cfg.dims], dim=1
        )
        evals = truth.values(eidx)

        def recon(f):
            w = cp_values(f, eidx).double()
            return (torch.linalg.vector_norm(w - evals, dim=1) / evals.norm()).numpy()

    def evaluate(f):
        return {
            "reconstruction_error": recon(f),
            "unbalancedness": cp_unbalancedness(f).double().numpy(),
            "component_norms": cp_component_norms(f).float().numpy(),
        }

    return Prepared(cfg, truth_norm, engine, loss, factors, evaluate)


def _learned_now(values: dict, start: np.ndarray, fraction: float) -> dict:
    """Live count for the progress bar, by the summary's rule on the current norms."""
    counts = []
    for b, norms in enumerate(values["component_norms"]):
        if not np.isfinite(norms).all():
            counts.append("-")  # this run has stopped
            continue
        threshold = max(fraction * float(norms.max()), 10.0 * float(start[b]))
        counts.append(str(int((norms > threshold).sum())))
    return {"learned": "/".join(counts)}


def run(
    cfg: TensorDynamicsConfig,
    run_dir: Path,
    *,
    prepared: Prepared | None = None,
    resume: bool = False,
    progress: bool = True,
    interrupt: Interrupt | None = None,
    log=print,
) -> dict:
    """Train all init scales in one batched pass and write metrics, summary and figures.

    Returns ``{"interrupted": bool, "summary": dict | None, "exit_code": int}``.
    """
    prep = prepared if prepared is not None else prepare(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(cfg.optimizer, lr=cfg.lr, eps=cfg.eps)
    stop = StopRule(cfg.tol, cfg.patience, cfg.check_every, cfg.max_iterations)
    recorder = Recorder(log_every=cfg.log_every, max_records=cfg.max_records)
    if resume and not (run_dir / CHECKPOINT).is_file():
        raise ConfigError(f"{run_dir} has no checkpoint to resume from")
    state = TrainState.from_dict(load_checkpoint(run_dir)) if resume else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.max_iterations,
            initial=state.iteration if state else 0,
            unit="it",
            dynamic_ncols=True,
            desc="iteration",
        )
    labels = [f"init std {s:g}" for s in cfg.init_stds]
    start = time.perf_counter()
    start_it = state.iteration if state else 0

    def on_message(b: int, msg: str) -> None:
        log(f"{labels[b]}: {msg}")

    start_norms = cp_component_norms(prep.factors).amax(1).double().numpy()
    try:
        state, interrupted = train(
            params=prep.factors,
            loss_and_grad=lambda f: prep.engine.loss_and_grad(f, prep.loss),  # type: ignore[attr-defined]
            optimizer=optimizer,
            stop=stop,
            recorder=recorder,
            evaluate=prep.evaluate,  # type: ignore[arg-type]
            state=state,
            interrupt=interrupt,
            progress=bar,
            describe=lambda v: _learned_now(v, start_norms, cfg.learned_fraction),
            on_message=on_message,
        )
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - start
    write_metrics(run_dir, cfg, recorder)
    if interrupted:
        save_checkpoint(run_dir, state.to_dict())
        return {
            "interrupted": True,
            "summary": None,
            "exit_code": 130,
            "iteration": state.iteration,
        }
    summary = summarize(cfg, recorder, state)
    summary["wall_seconds_this_session"] = elapsed
    summary["iterations_per_second"] = (
        (state.iteration - start_it) / elapsed if elapsed > 0 else None
    )
    write_json(run_dir / SUMMARY, summary)
    plot(run_dir)
    ckpt = run_dir / CHECKPOINT
    if ckpt.exists():
        ckpt.unlink()
    diverged = any(r["status"] == "diverged" for r in summary["runs"])
    return {"interrupted": False, "summary": summary, "exit_code": 1 if diverged else 0}


def write_metrics(run_dir: Path, cfg: TensorDynamicsConfig, recorder: Recorder) -> None:
    """``metrics.csv`` (one row per run and record) and ``component_norms.npz``."""
    from implreg.runs import atomic_path

    its, arrays = recorder.arrays()
    if its.size == 0:
        return
    with atomic_path(run_dir / "metrics.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(
                [
                    "iteration",
                    "run",
                    "init_std",
                    "train_loss",
                    "reconstruction_error",
                    "unbalancedness",
                ]
            )
            for t, it in enumerate(its):
                for b, std in enumerate(cfg.init_stds):
                    w.writerow(
                        [
                            int(it),
                            b,
                            std,
                            repr(float(arrays["train_loss"][t, b])),
                            repr(float(arrays["reconstruction_error"][t, b])),
                            repr(float(arrays["unbalancedness"][t, b])),
                        ]
                    )
    with atomic_path(run_dir / "component_norms.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh,
                iterations=its,
                norms=arrays["component_norms"],
                init_stds=np.asarray(cfg.init_stds),
                top_k=cfg.top_k,
            )


def summarize(cfg: TensorDynamicsConfig, recorder: Recorder, state: TrainState) -> dict:
    """Per init: status, final errors, and which components left zero and when."""
    its, arrays = recorder.arrays()
    runs = []
    for b, std in enumerate(cfg.init_stds):
        stopped = state.stop["stopped_at"][b]
        upto = its <= (stopped if stopped is not None else its[-1])
        norms = arrays["component_norms"][upto, b, :]
        it_b = its[upto]
        learned = learned_components(it_b, norms, fraction=cfg.learned_fraction)
        final_sorted = np.sort(np.nan_to_num(norms[-1], nan=0.0))[::-1]
        n = len(learned)
        ratio = (
            float(final_sorted[n] / final_sorted[n - 1])
            if 0 < n < final_sorted.size and final_sorted[n - 1] > 0
            else None
        )
        runs.append(
            {
                "init_std": std,
                "status": state.stop["status"][b],
                "stopped_at": stopped,
                "final_train_loss": float(arrays["train_loss"][upto, b][-1]),
                "final_reconstruction_error": float(arrays["reconstruction_error"][upto, b][-1]),
                "unbalancedness_init": float(arrays["unbalancedness"][0, b]),
                "unbalancedness_final": float(arrays["unbalancedness"][upto, b][-1]),
                "n_learned": n,
                "learned": learned,
                "next_largest_over_smallest_learned": ratio,
                "top_final_norms": [float(x) for x in final_sorted[: cfg.top_k]],
            }
        )
    return {"iterations": state.iteration, "messages": list(state.messages), "runs": runs}


def summary_text(summary: dict) -> str:
    """The end-of-run summary printed by the CLI."""
    lines = []
    for r in summary["runs"]:
        when = ", ".join(str(c["left_zero_at"]) for c in r["learned"][:10])
        if len(r["learned"]) > 10:
            when += ", ..."
        ratio = r["next_largest_over_smallest_learned"]
        lines.append(
            f"init std {r['init_std']:g}: {r['n_learned']} components left zero"
            + (f" (at iterations {when})" if when else "")
            + f"; final reconstruction error {r['final_reconstruction_error']:.4g}"
            + f"; train loss {r['final_train_loss']:.3g}"
            + f"; {r['status']} at iteration {r['stopped_at']}"
            + (f"; next-largest/smallest learned norm {ratio:.3g}" if ratio is not None else "")
        )
    return "\n".join(lines)


def load_norms(run_dir: Path) -> dict[str, np.ndarray]:
    """The arrays of ``component_norms.npz`` (iterations, norms ``(T, B, R)``, init_stds, top_k)."""
    with np.load(Path(run_dir) / "component_norms.npz") as data:
        return {k: data[k] for k in data.files}


def trajectories(its: np.ndarray, norms: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of run ``b`` up to its stop (later records of a stopped run are NaN)."""
    valid = np.isfinite(norms[:, b, :]).all(axis=1)
    return its[valid], norms[valid, b, :]


def plot(run_dir: Path) -> list[Path]:
    """Figure 3 from the run folder alone: top-k component norms per init, reconstruction errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    data = load_norms(run_dir)
    its, norms, stds = data["iterations"], data["norms"], data["init_stds"]
    with open(run_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    top_k = int(data["top_k"]) if "top_k" in data else 10
    paths = []
    nb = len(stds)
    fig, axes = plt.subplots(1, nb + 1, figsize=(4.2 * (nb + 1), 3.4), squeeze=False)
    for b, std in enumerate(stds):
        its_b, norms_b = trajectories(its, norms, b)
        sel = top_components(norms_b, top_k)
        single, sax = plt.subplots(figsize=(4.8, 3.6))
        for a in (axes[0, b], sax):
            for r in sel:
                a.plot(its_b, norms_b[:, r], lw=1.2)
            a.set_title(f"init std {std:g}: top {len(sel)} component norms")
            a.set_xlabel("iteration")
            a.set_ylabel("component norm")
            a.grid(alpha=0.3)
        single.tight_layout()
        p = run_dir / f"component_norms_std{std:g}.png"
        single.savefig(p, dpi=110)
        plt.close(single)
        paths.append(p)
    ax = axes[0, nb]
    rec, rax = plt.subplots(figsize=(4.8, 3.6))
    for b, std in enumerate(stds):
        xs = [int(r["iteration"]) for r in rows if int(r["run"]) == b]
        ys = [float(r["reconstruction_error"]) for r in rows if int(r["run"]) == b]
        for a in (ax, rax):
            a.plot(xs, ys, label=f"init std {std:g}")
    for a in (ax, rax):
        a.set_yscale("log")
        a.set_title("reconstruction error")
        a.set_xlabel("iteration")
        a.set_ylabel("||W - W*|| / ||W*||")
        a.legend()
        a.grid(alpha=0.3)
    rec.tight_layout()
    p = run_dir / "reconstruction_error.png"
    rec.savefig(p, dpi=110)
    plt.close(rec)
    paths.append(p)
    fig.tight_layout()
    p = run_dir / "figure.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths
