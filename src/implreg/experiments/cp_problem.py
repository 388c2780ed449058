"""The problem of the CP dynamics experiment (:mod:`implreg.experiments.cp_dynamics`): ground
truth, observations, engine, loss and initial factors of Razin, Maman & Cohen, "Implicit
Regularization in Tensor Factorization" (ICML 2021), Figure 3."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from implreg.experiments.cp_config import DTYPES, CPDynamicsConfig
from implreg.factorizations.cp import (
    cp_component_norms,
    cp_init,
    cp_to_tensor,
    cp_unbalancedness,
    cp_values,
)
from implreg.factorizations.cp_engine import DenseSensing, RankOneSensing, completion_engine
from implreg.losses import HuberLoss, make_loss
from implreg.problems.synthetic import completion_problem, low_cp_rank_tensor, sensing_problem


@dataclass
class Prepared:
    """The problem, objective and initial factors of one configuration."""

    engine: Any
    loss: Any
    factors: list[torch.Tensor]
    evaluate: Any


def build_problem(cfg: CPDynamicsConfig, device: str = "cpu") -> Prepared:
    """Ground truth, observations, engine, loss and initial factors (drawn on the CPU, then
    moved to ``device``, so every device starts from the same numbers)."""
    dtype = DTYPES[cfg.dtype]
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    truth = low_cp_rank_tensor(cfg.dims, cfg.gt_rank, norm=cfg.gt_norm, generator=gen)
    if cfg.task == "completion":
        prob = completion_problem(truth, cfg.num_observations, generator=gen)
        engine = completion_engine(
            cfg.dims, prob.idx.to(dev), prob.y.to(dev, dtype), method=cfg.method
        )
    else:
        sens = sensing_problem(truth, cfg.num_observations, kind=cfg.measurement, generator=gen)
        if cfg.measurement == "gaussian":
            assert sens.measurements is not None
            engine = DenseSensing(cfg.dims, sens.measurements.to(dev, dtype), sens.y.to(dev, dtype))
        else:
            assert sens.vectors is not None
            engine = RankOneSensing([v.to(dev, dtype) for v in sens.vectors], sens.y.to(dev, dtype))
    loss = make_loss(cfg.loss, huber_delta=cfg.huber_delta if cfg.loss == "huber" else None)
    factors = cp_init(
        cfg.dims,
        cfg.rank,
        stds=cfg.init_stds,
        mean=cfg.init_mean,
        generator=torch.Generator().manual_seed(cfg.seed + 1),
        dtype=dtype,
    )
    factors = [f.to(dev) for f in factors]
    if isinstance(loss, HuberLoss):
        loss.check_scale(engine.predict(factors) - engine.y)

    if math.prod(cfg.dims) <= cfg.dense_max:
        truth_flat = truth.dense().reshape(-1).to(dev)

        def recon(f):
            w = cp_to_tensor(f).reshape(f[0].shape[0], -1).double()
            return torch.linalg.vector_norm(w - truth_flat, dim=1) / truth_flat.norm()
    else:
        egen = torch.Generator().manual_seed(cfg.seed + 2)
        eidx = torch.stack(
            [torch.randint(0, d, (cfg.recon_sample,), generator=egen) for d in cfg.dims], dim=1
        )
        evals = truth.values(eidx).to(dev)
        eidx = eidx.to(dev)

        def recon(f):
            w = cp_values(f, eidx).double()
            return torch.linalg.vector_norm(w - evals, dim=1) / evals.norm()

    def evaluate(f):
        return {
            "reconstruction_error": recon(f).cpu().numpy(),
            "unbalancedness": cp_unbalancedness(f).double().cpu().numpy(),
            "component_norms": cp_component_norms(f).float().cpu().numpy(),
        }

    return Prepared(engine, loss, factors, evaluate)
