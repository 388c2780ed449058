"""The configuration of the HTF dynamics experiment (:mod:`implreg.experiments.htf_dynamics`):
the published setting of Razin, Maman & Cohen (ICML 2022), its checks, the step's work
for the thread policy, and the problem it builds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from implreg.config import ConfigError, param, require
from implreg.factorizations.htf import (
    ModeTree,
    htf_init,
    htf_local_norms,
    htf_to_tensor,
    htf_unbalancedness,
    htf_values,
)
from implreg.factorizations.htf_engine import (
    DENSE_MAX,
    RankOneHTFSensing,
    htf_completion_engine,
    htf_step_flops,
)
from implreg.flow import FlowOptions, GDOptions
from implreg.htf_analysis import parse_splits, split_spectra, splits_of
from implreg.losses import make_loss
from implreg.problems.hierarchical import (
    cp_ht_tensor,
    htf_completion_problem,
    htf_sensing_problem,
    low_ht_rank_tensor,
)
from implreg.problems.synthetic import sample_indices


@dataclass(frozen=True)
class HTFDynamicsConfig(FlowOptions, GDOptions):
    """Settings of the HTF dynamics experiment; defaults are the published setting
    (Razin, Maman & Cohen 2022), with a 100k iteration cap (the authors': 500k)."""

    dims: tuple[int, ...] = param((16, 16, 16, 16), ge=1, min_len=2, doc="mode sizes")
    tree: str = param(
        "adjacent",
        doc="mode tree: adjacent, adjacent:P, checkerboard (the authors'), checkerboard:P, "
        "interleaved or groups like ((1,2),(3,4)); (3,) is a node with one child",
    )
    widths: tuple[int, ...] = param((512, 512), ge=1, doc="local components per level (or one)")
    gt_widths: tuple[int, ...] = param((5, 5), ge=1, doc="ground truth widths (HT ranks)")
    gt_norm: float = param(64.0, gt=0, doc="Frobenius norm of the ground truth")
    gt_type: Literal["ht", "cp"] = param(
        "ht", doc="ground truth: ht (the model at gt_widths) or cp (CP rank gt_widths)"
    )
    task: Literal["completion", "sensing"] = "completion"
    num_observations: int = param(2048, ge=1, doc="observed entries or rank-one measurements")
    num_test: int = param(2048, ge=1, doc="held-out entries for the reconstruction error")
    init_stds: tuple[float, ...] = param((0.01,), gt=0, doc="one run per init std")
    loss: Literal["l2", "huber", "l1"] = "l2"
    huber_delta: float = param(0.0, ge=0, doc="Huber threshold (loss=huber)")
    tol: float = param(5e-5, ge=0, doc="stop once the train loss stays below tol ...")
    patience: int = param(101, ge=1, doc="... for this many checks ...")
    top_k: int = param(10, ge=1, doc="trajectories drawn per node")
    top_svals: int = param(10, ge=1, doc="singular values recorded per matricization")
    learned_fraction: float = param(0.1, gt=0, lt=1, doc="a component left zero above this")
    splits: str = param("1,3", doc="extra matricizations (1-based modes, ';' between)")
    method: Literal["auto", "dense", "gather"] = param("auto", doc="gradient engine")
    dtype: Literal["float32", "float64"] = "float32"
    recon_sample: int = param(100_000, ge=1, doc="entries sampled for the full error when large")
    dense_max: int = param(1 << 22, ge=1, doc="largest end tensor built for metrics")
    seed: int = param(0, ge=0)

    def mode_tree(self) -> ModeTree:
        try:
            return ModeTree.parse(self.tree, len(self.dims))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"tree: {err}") from None

    def width_arg(self, widths: tuple[int, ...]) -> Any:
        return widths[0] if len(widths) == 1 else list(widths)

    def check(self) -> None:
        self.check_flow()
        # every number must fit the dtype it is computed in, squared (losses square it)
        self.check_range(("gt_norm", "huber_delta", "lr", "tol"))
        tree = self.mode_tree()
        for key in ("widths", "gt_widths"):
            try:
                tree.resolve_widths(self.width_arg(getattr(self, key)))
            except (ValueError, TypeError) as err:
                raise ConfigError(f"{key}: {err}") from None
        try:
            parse_splits(self.splits, len(self.dims))
        except ValueError as err:
            raise ConfigError(f"splits: {err}") from None
        size = math.prod(self.dims)
        if self.task == "completion":
            require(
                self.num_observations + self.num_test <= size,
                f"num_observations + num_test = {self.num_observations + self.num_test} is "
                f"larger than the tensor's {size} entries",
            )
        else:
            require(self.num_test <= size, f"num_test is larger than the tensor's {size} entries")
        require(
            self.loss != "huber" or self.huber_delta > 0, "the huber loss needs huber_delta > 0"
        )
        require(
            self.gt_type != "cp" or len(set(self.gt_widths)) == 1,
            f"gt_type=cp takes one CP rank as gt_widths, got {','.join(map(str, self.gt_widths))}",
        )
        require(
            self.method != "dense" or size <= DENSE_MAX,
            f"method=dense builds all {size} entries each step (at most {DENSE_MAX}); "
            "use method=gather",
        )

    def expected_components(self) -> int:
        """Root local components of the ground truth: how many a run should learn."""
        if self.gt_type == "cp":
            return self.gt_widths[0]
        tree = self.mode_tree()
        return tree.resolve_widths(self.width_arg(self.gt_widths))[-1]

    # No thread override: the flop policy (implreg.threads) gives the width-512 dense
    # step (~1e9 flops) one thread.  Two threads won 1.7x with libgomp spinning at each
    # barrier (bench/bench_htf_step.py) but lose under the OMP_WAIT_POLICY=PASSIVE that
    # implreg sets: 2026-12-03, quiet, 47 it/s on two against 57 on one
    # (``OMP_WAIT_POLICY=PASSIVE python bench/bench_htf_step.py``), and 3000 iterations of
    # ``implreg run htf-dynamics`` took 63-65 s on one thread against 80-96 s on two.

    def step_flops(self) -> float:
        """Flops of one step of all runs (the thread policy of :mod:`implreg.threads`)."""
        tree, widths = self.mode_tree(), self.width_arg(self.widths)
        method, m, sensing = self.method, self.num_observations, self.task == "sensing"
        if method == "auto":
            from implreg.factorizations.htf_engine import choose_htf_method

            method = choose_htf_method(tree, self.dims, widths, m)
        flops = htf_step_flops(tree, self.dims, widths, m, method, sensing=sensing)
        if sensing and method == "dense":
            flops += 2.0 * m * math.prod(self.dims)
        return 2.0 * flops * len(self.init_stds)


DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Prepared:
    engine: Any
    loss: Any
    params: list[torch.Tensor]
    evaluate: Any
    tree: ModeTree


def build_problem(cfg: HTFDynamicsConfig, device: str = "cpu") -> Prepared:
    """Ground truth, observations, engine, loss and initial parameters (drawn on the CPU in
    float64, then moved)."""
    dtype, dev = DTYPES[cfg.dtype], torch.device(device)
    tree, widths = cfg.mode_tree(), cfg.width_arg(cfg.widths)
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.gt_type == "cp":
        truth = cp_ht_tensor(cfg.dims, tree, cfg.gt_widths[0], norm=cfg.gt_norm, generator=gen)
    else:
        truth = low_ht_rank_tensor(
            cfg.dims, tree, cfg.width_arg(cfg.gt_widths), norm=cfg.gt_norm, generator=gen
        )
    if cfg.task == "completion":
        prob = htf_completion_problem(truth, cfg.num_observations, cfg.num_test, generator=gen)
        engine = htf_completion_engine(
            tree,
            cfg.dims,
            prob.idx.to(dev),
            prob.y.to(dev, dtype),
            widths=widths,
            method=cfg.method,
        )
        test_idx, test_y = prob.test_idx, prob.test_y
    else:
        sens = htf_sensing_problem(truth, cfg.num_observations, generator=gen)
        engine = RankOneHTFSensing(
            tree,
            cfg.dims,
            [v.to(dev, dtype) for v in sens.vectors],
            sens.y.to(dev, dtype),
            widths=widths,
            method=cfg.method,
        )
        test_idx = sample_indices(cfg.dims, cfg.num_test, generator=gen)
        test_y = truth.values(test_idx)
    loss = make_loss(cfg.loss, huber_delta=cfg.huber_delta if cfg.loss == "huber" else None)
    params = htf_init(
        cfg.dims,
        tree,
        widths,
        stds=cfg.init_stds,
        generator=torch.Generator().manual_seed(cfg.seed + 1),
        dtype=dtype,
    )
    params = [p.to(dev) for p in params]
    splits = splits_of(tree, parse_splits(cfg.splits, len(cfg.dims)))
    test_idx, test_y = test_idx.to(dev), test_y.to(dev)
    dense = math.prod(cfg.dims) <= cfg.dense_max
    if dense:
        truth_flat = truth.dense().reshape(-1).to(dev)
        test_lin = torch.as_tensor(np.ravel_multi_index(test_idx.T.cpu().numpy(), cfg.dims))
        test_lin = test_lin.to(dev)
    else:
        egen = torch.Generator().manual_seed(cfg.seed + 2)
        eidx = sample_indices(cfg.dims, min(cfg.recon_sample, math.prod(cfg.dims)), generator=egen)
        evals, eidx = truth.values(eidx).to(dev), eidx.to(dev)

    def errors(values: torch.Tensor, truth_values: torch.Tensor) -> np.ndarray:
        err = [torch.linalg.vector_norm(v.double() - truth_values) for v in values]
        return (torch.stack(err) / truth_values.norm()).cpu().numpy()

    def evaluate(f) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if dense:
            end = htf_to_tensor(f, tree)
            flat = end.reshape(end.shape[0], -1)
            out["reconstruction_error"] = errors(flat[:, test_lin], test_y)
            out["full_reconstruction_error"] = errors(flat, truth_flat)
            out.update(split_spectra(end, splits, cfg.top_svals))
        else:
            out["reconstruction_error"] = errors(htf_values(f, tree, test_idx), test_y)
            out["full_reconstruction_error"] = errors(htf_values(f, tree, eidx), evals)
        out["unbalancedness"] = htf_unbalancedness(f, tree).double().cpu().numpy()
        for v, norms in zip(tree.internal, htf_local_norms(f, tree)):
            key = "root_local_norms" if v == tree.root else f"local {tree.node_text(v)}"
            out[key] = norms.float().cpu().numpy()
        return out

    return Prepared(engine, loss, params, evaluate, tree)
