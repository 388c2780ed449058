"""Registry of presets: one published experiment each, with the paper's defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from implreg.experiments import (
    det_sign,
    mf_depth_nuclear,
    mf_dynamics,
    tensor_dynamics,
    tensor_rank,
)
from implreg.experiments.config import ConfigError


@dataclass(frozen=True)
class Preset:
    """A named configuration of an experiment module and the figure it reproduces."""

    name: str
    description: str
    reproduces: str
    module: ModuleType
    config: Any

    @property
    def experiment(self) -> str:
        return self.module.__name__.rsplit(".", 1)[-1]


_TD = tensor_dynamics.TensorDynamicsConfig()

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "tf-dynamics",
            "CP completion of an order-4 rank-5 tensor from 2000 entries, R = 1000, "
            "init std 0.05 / 0.01 / 0.005",
            "Razin et al. 2021, Figure 3",
            tensor_dynamics,
            _TD,
        ),
        Preset(
            "tf-huber",
            "as tf-dynamics with the Huber loss (eq. 8), delta = 0.002 below the residual scale",
            "Razin et al. 2021, Appendix B (Huber loss)",
            tensor_dynamics,
            dataclasses.replace(_TD, loss="huber", huber_delta=0.002),
        ),
        Preset(
            "tf-sensing",
            "CP sensing y_i = <X_i, W*> with Gaussian X_i (variance 1/#entries), "
            "order 4, rank 5, 2000 measurements",
            "Razin et al. 2021, Appendix B (tensor sensing)",
            tensor_dynamics,
            dataclasses.replace(_TD, task="sensing", measurement="gaussian"),
        ),
        Preset(
            "tf-order",
            "order-3 completion (modes of size 10), ground-truth rank 3, R = 100, 500 entries, "
            "30k iterations",
            "Razin et al. 2021, Appendix B (other orders and ranks)",
            tensor_dynamics,
            dataclasses.replace(
                _TD,
                dims=(10, 10, 10),
                gt_rank=3,
                rank=100,
                num_observations=500,
                max_iterations=30000,
            ),
        ),
        Preset(
            "mf-det-sign",
            "2x2 completion with det > 0 at init, depth 2 / 3 / 4, published GD (lr 3e-3) and a "
            "flow-faithful step control, random and balanced inits, to loss 1e-4",
            "Razin & Cohen 2020 (|W_11| against the loss); Cohen 2021 slides",
            det_sign,
            det_sign.DetSignConfig(),
        ),
        Preset(
            "mf-dynamics",
            "100x100 rank-5 completion from 2000 entries, depth 1 / 2 / 3, init scale 1e-3: "
            "top singular values over iterations",
            "Arora et al. 2019 Figure 3; Razin 2022 blog Figure 1",
            mf_dynamics,
            mf_dynamics.MFDynamicsConfig(),
        ),
        Preset(
            "mf-depth-vs-nuclear",
            "depth 2 / 3 / 4 x init 1e-3 ... 1e-6 x 2000 / 5000 entries against nuclear-norm "
            "minimization (cvxpy + SCS): error, nuclear norm, effective rank; error vs entries",
            "Arora et al. 2019; Cohen 2021 slides (MF gives up min nuclear norm for low rank)",
            mf_depth_nuclear,
            mf_depth_nuclear.DepthNuclearConfig(),
        ),
        Preset(
            "tensor-rank-complexity",
            "MNIST and Fashion-MNIST (--data-dir) as order-784 tensor completion: original, "
            "rand image, rand label x 10 one-vs-all tasks x CP ranks 1..15, linear baseline",
            "Razin et al. 2021, Figure 4 (tensor rank as a measure of complexity)",
            tensor_rank,
            tensor_rank.TensorRankConfig(),
        ),
    ]
}

EXPERIMENTS: dict[str, ModuleType] = {
    "tensor_dynamics": tensor_dynamics,
    "det_sign": det_sign,
    "mf_dynamics": mf_dynamics,
    "mf_depth_nuclear": mf_depth_nuclear,
    "tensor_rank": tensor_rank,
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]
