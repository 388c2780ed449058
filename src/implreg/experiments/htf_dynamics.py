"""Dynamics of gradient descent over hierarchical tensor factorization.

Razin, Maman & Cohen, "Implicit Regularization in Hierarchical Tensor Factorization and
Deep Convolutional Neural Networks" (ICML 2022), its synthetic experiments with the
authors' published settings and the 2022 blog post's figure: an order-4 tensor of
hierarchical tensor rank at most 5 is completed from 2048 entries by a factorization of
widths 512 from a small initialization. Local components of every node leave zero one
after another (``dσ/dt ∝ σ^{2 - 2/3}``, the blog post's informal theorem), so the
matricizations over the tree's nodes keep low rank while a non-tree split ({1,3}) does
not. Recorded over time, tracked by identity: every internal node's local component
norms, the top singular values and effective rank of every tree matricization and of the
extra splits, held-out and full-tensor reconstruction errors, unbalancedness, and the
gradient-flow time (for the exponent check).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from implreg.experiments.base import Claim, Preset
from implreg.experiments.dynamics import Dynamics, DynamicsExperiment, flow_spec, learned_now
from implreg.experiments.htf_config import (  # noqa: F401
    DTYPES,
    HTFDynamicsConfig,
    Prepared,
    build_problem,
)
from implreg.experiments.htf_report import (
    htf_figure,
    htf_memory,
    htf_summary_text,
    summarize_htf,
    write_hierarchy,
)
from implreg.factorizations.htf import htf_local_norms
from implreg.flow import FlowRecorder
from implreg.optim import StopRule, make_optimizer
from implreg.resources import Estimate
from implreg.training import Recorder

# Claims of the presets below (checked by ``implreg report``), on the run of the smallest init.
HTF = "Razin, Maman & Cohen 2022"
HTF_BLOG = "Razin, Maman & Cohen 2022; Razin 2022 blog, HTF panel"

# The size at which the hierarchical picture runs in seconds here (README: 3 root components
# one after another, tree matricizations of low effective rank): the reduced budget.
SMALL = {
    "dims": (8, 8, 8, 8),
    "widths": (64, 64),
    "gt_widths": (3, 3),
    "gt_norm": 32.0,
    "num_observations": 1200,
    "num_test": 500,
    "init_stds": (0.03,),
    "max_iterations": 60000,
    "log_every": 5,
}


def _smallest_init(summary: dict) -> dict:
    return min(summary["runs"], key=lambda r: r["init_std"])


def root_learned(summary: dict) -> float:
    """Root local components above 10% of the largest, from the smallest init."""
    return float(_smallest_init(summary)["n_learned"])


def largest_root_norm(summary: dict) -> float:
    return float(_smallest_init(summary)["top_final_norms"][0])


def tree_rank_ratio(summary: dict) -> float:
    """Largest effective rank of a tree matricization over the smallest of the other splits."""
    r = _smallest_init(summary)
    return r["max_tree_effective_rank"] / r["min_other_effective_rank"]


def _root_claim(count: int, what: str, budget: str, tolerance: float = 0.0) -> Claim:
    return Claim(
        "root components learned",
        f"{what}: root local components leave zero one after another, as many as the "
        f"ground truth's hierarchical rank ({count})",
        HTF_BLOG,
        float(count),
        root_learned,
        "equals" if tolerance == 0 else "within_abs",
        tolerance,
        budget,  # type: ignore[arg-type]
    )


TREE_CLAIM = Claim(
    "tree ranks low",
    "the matricizations along the tree keep a lower effective rank than the split off the "
    "tree: implicit regularization towards low hierarchical tensor rank",
    HTF,
    None,
    tree_rank_ratio,
    "at_most",
    1.0,  # a ratio below 1: every tree split is of lower effective rank than the other split
)


class HTFDynamics(DynamicsExperiment):
    """Local component and hierarchical-rank dynamics of HTF (Razin, Maman & Cohen 2022)."""

    name = "htf_dynamics"
    Config = HTFDynamicsConfig
    trajectory = "root_local_norms"
    what = "root local component norm"
    scalars = ("reconstruction_error", "full_reconstruction_error", "unbalancedness")
    scalar_label = "held-out ||W - W*|| / ||W*||"
    _tiny = {
        "dims": (4, 4, 4, 4),
        "widths": (12, 12),
        "gt_widths": (2, 2),
        "gt_norm": 16.0,
        "num_observations": 120,
        "num_test": 60,
        "init_stds": (0.1, 0.05),
        "max_iterations": 300,
        "tol": 0.0,
    }
    presets = (
        Preset(
            "htf-dynamics",
            "Razin, Maman & Cohen 2022 (ICML), local components; Razin 2022 blog, HTF panel",
            "HTF completion of an order-4 tensor (modes of 16, HT ranks <= 5) from 2048 entries, "
            "widths 512, init std 0.01: local component norms, matricization spectra",
            tiny=_tiny,
            claims=(
                # published: five root components (10.2k ... 30.5k iterations); here the
                # plateau is 10x longer and two are learned in 1e5 iterations (README)
                _root_claim(5, "published setting", "full"),
                _root_claim(3, "order 4, modes of 8, ground truth HT ranks <= 3", "reduced"),
                TREE_CLAIM,
            ),
            reduced=SMALL,  # 28 minutes at the published size; ~20 s at this one
        ),
        Preset(
            "htf-more-entries",
            "Razin, Maman & Cohen 2022: the published picture at the published scale",
            "as htf-dynamics with 4096 observed entries (published: 2048, from which runs "
            "here overfit) and init std 0.03 (the plateau ends in ~1k iterations, not ~1e5)",
            overrides={"num_observations": 4096, "init_stds": (0.03,)},
            tiny=_tiny,
            claims=(
                # within 1: the fifth published norm (0.8) is 8% of the largest (9.5), below
                # the 10% by which a component counts as learned, so the published figure
                # itself counts 4 or 5 by this rule
                _root_claim(5, "4096 observed entries", "both", 1.0),
                Claim(
                    "largest root norm",
                    "the largest root local component ends near the published 9.5",
                    "Razin 2022 blog, HTF panel",
                    9.5,
                    largest_root_norm,
                    "within_rel",
                    # 25%: read off a plot; with 4096 / 8192 entries here 10.4 / 11.6
                    0.25,
                ),
                TREE_CLAIM,
            ),
            reduced={},  # 77 s here: the reduced budget is the preset's own
        ),
        Preset(
            "htf-sensing",
            "Razin, Maman & Cohen 2022 (rank-one tensor sensing)",
            "as htf-dynamics with y_i = <x_i1 (x) ... (x) x_i4, W*>, x_in ~ N(0, E^(-1/4) I)",
            overrides={"task": "sensing"},
            tiny={**_tiny, "task": "sensing"},
            claims=(TREE_CLAIM,),
            reduced=SMALL,
        ),
        Preset(
            "htf-tree",
            "Razin, Maman & Cohen 2022: the tree decides which ranks are kept low",
            "ground truth and factorization over the tree ((1,3),(2,4)) (mode i with i + N/2); "
            "extra split {1,2}",
            overrides={"tree": "interleaved", "splits": "1,2"},
            tiny={**_tiny, "tree": "interleaved", "splits": "1,2"},
            claims=(
                dataclasses.replace(
                    TREE_CLAIM,
                    statement="over the tree ((1,3),(2,4)) the splits {1,3} and {2,4} keep "
                    "low effective rank and the off-tree split {1,2} does not: the ranks "
                    "kept low are the tree's",
                ),
            ),
            reduced=SMALL,
        ),
        Preset(
            "htf-large",
            "Razin, Maman & Cohen 2022: the gather path (end tensor never built)",
            "order-8 completion, modes of 10 (1e8 entries), widths 32, ground truth widths 3 "
            "(norm 1e4: entries of RMS 1), 20000 observed entries, init std 0.2, 3000 "
            "iterations: speed and memory of the gather engine",
            overrides={
                "dims": (10,) * 8,
                "widths": (32,),
                "gt_widths": (3,),
                "gt_norm": 10000.0,
                "num_observations": 20000,
                "num_test": 5000,
                "init_stds": (0.2,),
                "recon_sample": 20000,
                "max_iterations": 3000,
                "log_every": 50,
            },
            tiny={
                **_tiny,
                "dims": (3,) * 8,
                "widths": (4,),
                "gt_widths": (2,),
                "num_observations": 300,
                "num_test": 100,
                "dense_max": 1000,
            },
            claims=(
                Claim(
                    "no more root components than the truth",
                    "order 8 (1e8 entries, never built): no more root local components "
                    "leave zero than the ground truth's hierarchical rank (3)",
                    HTF,
                    3.0,
                    root_learned,
                    "at_most",
                    0.0,  # a count
                ),
            ),
            reduced={"max_iterations": 1500},  # one escape by ~1200 iterations (README)
        ),
    )

    def memory_estimate(self, cfg: HTFDynamicsConfig) -> Estimate:
        return htf_memory(cfg)

    def prepare(self, cfg: HTFDynamicsConfig, device: str = "cpu") -> Prepared:
        return build_problem(cfg, device)

    def build(self, cfg: HTFDynamicsConfig, prepared: Prepared) -> Dynamics:
        root = htf_local_norms(prepared.params, prepared.tree)[-1]
        start = root.amax(1).double().cpu().numpy()
        flow = flow_spec(cfg)
        optimizer = None if flow else make_optimizer(cfg.optimizer, lr=cfg.lr, eps=cfg.eps)

        def evaluate(f):
            out = prepared.evaluate(f)
            b = len(cfg.init_stds)
            clock = getattr(optimizer, "time", None)  # Adam has none: no exponent check
            out["time"] = np.asarray([np.nan] * b if clock is None else clock or [0.0] * b)
            return out

        return Dynamics(
            key="init_std",
            values=cfg.init_stds,
            params=prepared.params,
            loss_and_grad=lambda f: prepared.engine.loss_and_grad(f, prepared.loss),
            evaluate=evaluate,
            optimizer=optimizer,
            stop=StopRule(cfg.tol, cfg.patience, cfg.check_every, cfg.max_iterations),
            recorder=FlowRecorder()
            if flow
            else Recorder(log_every=cfg.log_every, max_records=cfg.max_records),
            describe=lambda v: learned_now(v["root_local_norms"], start, cfg.learned_fraction),
            flow=flow,
        )

    def write_metrics(self, run_dir, key, values, recorder, top_k) -> None:
        super().write_metrics(run_dir, key, values, recorder, top_k)
        write_hierarchy(run_dir, recorder)

    def summarize(self, cfg: HTFDynamicsConfig, its, arrays, state) -> dict:
        return summarize_htf(cfg, cfg.mode_tree(), its, arrays, state)

    def summary_text(self, summary: dict) -> str:
        return htf_summary_text(summary)

    def plot(self, run_dir):
        return htf_figure(self, run_dir)


EXPERIMENT = HTFDynamics()
