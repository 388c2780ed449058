"""Matrix, tensor and hierarchical tensor factorization side by side (Razin's 2022 blog post,
the figure of MF / TF / HTF dynamics).

Three runs, one after another, each in its own sub-folder of the run folder
(``mf/``, ``tf/``, ``htf/``) and each a full run of its own preset, resumable on
its own: deep matrix factorization (64 x 64, rank 5, depth 3, every layer's
entries N(0, 1e-3^2)),
CP tensor factorization (order 3, modes of 16, CP rank 5, 256 components,
init 1e-3) and hierarchical tensor factorization (``htf-dynamics``).  The
figure puts the top singular values, component norms and root local component
norms over iterations side by side: all three are learned one after another.

The blog names the CP panel's modes (16) and components (256) but not its
order.  256 is the product of all mode sizes but the largest for order 3
(16 x 16), the rule Figure 3 of Razin et al. (ICML 2021) uses for its
component count, so the panel is order 3 (16^3 = 4096 entries, 2048 of them
observed).  The authors' data generator (asafmaman101/imp_reg_htf, read for
facts) defaults to the same problem: order 3, modes of 16, a CP-rank-5 target
of Frobenius norm 64, 4096 entries (2048 of them trained on, as their README's
commands say).  Order 4 with 256 components learns one component and stalls
(README); order 3 learns five near the published iterations and norms.

The MF panel follows the authors' blog code (asafmaman101/imp_reg_htf, read for facts):
every layer's entries are i.i.d. N(0, 1e-3^2) and the optimizer is their adaptive GD with
lr 0.01 and eps 1e-6 (the one of ``tf-dynamics``), not Arora et al.'s (lr 1e-3, eps 1e-4)
that ``mf-dynamics`` defaults to.  ``mf-dynamics``'s ``init_scale`` is end-to-end: a layer's
entries have std ``init_scale^(1/N) / sqrt(d_in)``, so a per-layer std of 1e-3 at depth 3
and width 64 is ``init_scale = (1e-3 * 8)^3 = 5.12e-7``
(:data:`MF_LAYER_STD`, :func:`mf_init_scale`).  With ``init_scale=1e-3`` (per-layer std
0.0125) and Arora's step the five singular values left zero ~4x later than published.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from implreg.config import ConfigError, check, param, with_overrides
from implreg.experiments.base import (
    Claim,
    Experiment,
    Outcome,
    Preset,
    RunContext,
    write_table,
)
from implreg.experiments.dynamics import topk_figure, trajectories
from implreg.metrics import top_components
from implreg.resources import Estimate
from implreg.runs import CHECKPOINT, CONFIG, SUMMARY, read_json, write_json

# (key, preset, figure label, what is tracked)
PANELS = (
    ("mf", "mf-dynamics", "matrix (depth 3)", "singular value"),
    ("tf", "tf-dynamics", "tensor (CP)", "component norm"),
    ("htf", "htf-dynamics", "hierarchical (root)", "local component norm"),
)
TOP = 5  # components drawn and tabled per panel (the published figure's five)

BLOG = "Razin 2022 blog, figure of MF / TF / HTF dynamics"
MF_LAYER_STD = 1e-3  # the authors' DLN init: every layer's entries N(0, 1e-3^2)


def mf_init_scale(layer_std: float, width: int, depth: int) -> float:
    """``mf-dynamics``'s end-to-end ``init_scale`` whose Gaussian layers have entries of std
    ``layer_std`` (:func:`implreg.factorizations.matrix.mf_init`: ``scale^(1/N)/sqrt(d_in)``)."""
    return (layer_std * width**0.5) ** depth


# the HTF panel at the size where its picture runs in seconds (README; 28 min at the published)
SMALL_HTF = (
    "dims=8,8,8,8;widths=64,64;gt_widths=3,3;gt_norm=32;num_observations=1200;num_test=500;"
    "init_stds=0.03;max_iterations=60000;log_every=5"
)


def _panel_claim(key: str, count: int, what: str, budget: str = "both") -> Claim:
    def measure(summary: dict) -> float:
        return float(summary["panels"][key]["n_learned"])

    return Claim(
        f"{key} components learned",
        f"{what}: the top components are learned one after another, as many as the ground "
        f"truth's rank ({count})",
        BLOG,
        float(count),
        measure,
        "equals",
        0.0,  # a count
        budget,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class TrioConfig:
    """Overrides of each panel's preset, ``key=value`` pairs separated by ``;``."""

    mf: str = param(
        "shape=64,64;gt_rank=5;gt_norm=64;num_observations=2048;depths=3;"
        f"init_scale={mf_init_scale(MF_LAYER_STD, 64, 3):.6g};lr=0.01;eps=1e-6;"
        "max_iterations=20000;workers=1",
        doc="overrides of mf-dynamics",
    )
    tf: str = param(
        "dims=16,16,16;gt_rank=5;gt_norm=64;rank=256;num_observations=2048;init_stds=1e-3;"
        "max_iterations=20000",
        doc="overrides of tf-dynamics",
    )
    htf: str = param("", doc="overrides of htf-dynamics")
    seed: int = param(0, ge=0, doc="seed of all three panels")

    def panel(self, key: str) -> Any:
        from implreg.experiments import PRESETS

        preset = next(p for k, p, *_ in PANELS if k == key)
        pairs = [p for p in getattr(self, key).split(";") if p.strip()]
        try:
            cfg = with_overrides(PRESETS[preset].config, [*pairs, f"seed={self.seed}"])
            check(cfg)
        except ConfigError as err:
            raise ConfigError(f"{key}: {err}") from None
        return cfg

    def check(self) -> None:
        for key, *_ in PANELS:
            self.panel(key)


class DynamicsTrio(Experiment):
    name = "dynamics_mf_tf_htf"
    Config = TrioConfig
    presets = (
        Preset(
            "dynamics-mf-tf-htf",
            "Razin 2022 blog post, figure of MF / TF / HTF dynamics",
            "deep MF 64x64 rank 5 depth 3; CP order 3 with 256 components on modes of 16; "
            "HTF as htf-dynamics: each panel's top components over iterations",
            tiny={
                "mf": "shape=12,12;gt_rank=2;gt_norm=12;num_observations=80;depths=3;"
                "max_iterations=300;log_every=20;workers=1",
                "tf": "dims=4,4,4;gt_rank=2;rank=20;num_observations=40;init_stds=0.1;"
                "max_iterations=300;tol=0",
                "htf": "dims=4,4,4,4;widths=12,12;gt_widths=2,2;gt_norm=16;"
                "num_observations=120;num_test=60;init_stds=0.1;max_iterations=300;tol=0",
            },
            claims=(
                _panel_claim("mf", 5, "deep matrix factorization (depth 3, 64 x 64, rank 5)"),
                _panel_claim("tf", 5, "CP factorization (order 3, modes of 16, rank 5)"),
                _panel_claim("htf", 5, "hierarchical factorization (published size)", "full"),
                _panel_claim("htf", 3, "hierarchical factorization (modes of 8)", "reduced"),
            ),
            reduced={"htf": SMALL_HTF},
        ),
    )

    def memory_estimate(self, cfg: TrioConfig) -> Estimate:
        """The largest panel's (they run one after another)."""
        from implreg.experiments import PRESETS

        return max(
            (PRESETS[p].experiment.memory_estimate(cfg.panel(k)) for k, p, *_ in PANELS),
            key=lambda e: e.bytes,
        )

    def run_threads(self, cfg: TrioConfig, requested: int | None = None) -> int:
        """The busiest panel's (they run one after another)."""
        from implreg.experiments import PRESETS

        return max(
            PRESETS[p].experiment.run_threads(cfg.panel(k), requested) for k, p, *_ in PANELS
        )

    def run_configs(self, cfg: TrioConfig) -> list[tuple[str, Any]]:
        """The trio and its three panels (the HTF one is ``htf-dynamics``' configuration)."""
        from implreg.experiments import PRESETS

        panels = [(PRESETS[p].experiment.name, cfg.panel(k)) for k, p, *_ in PANELS]
        return [(self.name, cfg), *panels]

    def has_finished_work(self, run_dir: Path) -> bool:
        return any(
            (Path(run_dir) / k / f).exists() for k, *_ in PANELS for f in (SUMMARY, CHECKPOINT)
        )

    def run(self, cfg: TrioConfig, prepared: Any, ctx: RunContext) -> Outcome:
        from implreg.api import run_preset

        for key, preset, *_ in PANELS:
            sub = ctx.run_dir / key
            if (sub / SUMMARY).exists():
                continue
            ctx.log(f"panel {key} ({preset}) in {sub}")
            again = (sub / CONFIG).exists()
            run = run_preset(
                None if again else cfg.panel(key),
                out=sub,
                resume=again,
                device=ctx.device,
                progress=ctx.progress,
                interrupt=ctx.interrupt,
                log=ctx.log,
                checkpoint_every=ctx.checkpoint_every,
                checkpoint_seconds=ctx.checkpoint_seconds,
                threads=ctx.threads,
            )
            if run.interrupted:
                return Outcome(None, 130, True, f"panel {key}; resume continues it")
            if run.exit_code:
                return Outcome(None, run.exit_code, False, f"panel {key} failed")
        summary = self.summarize(ctx.run_dir)
        self.write_table(ctx.run_dir)
        write_json(ctx.run_dir / SUMMARY, summary)
        self.plot(ctx.run_dir)
        return Outcome(summary, 0)

    def summarize(self, run_dir: Path) -> dict:
        panels = {}
        for key, preset, label, _ in PANELS:
            first = read_json(Path(run_dir) / key / SUMMARY)["runs"][0]
            panels[key] = {
                "preset": preset,
                "label": label,
                "n_learned": first.get("n_learned"),
                "left_zero_at": [c["left_zero_at"] for c in first.get("learned", [])],
                "top_final": first.get("top_final_norms", first.get("singular_values_top10")),
            }
        return {"panels": panels}

    def summary_text(self, summary: dict) -> str:
        return "\n".join(
            f"{p['label']}: {p['n_learned']} learned one after another, leaving zero at "
            + ", ".join(str(i) for i in p["left_zero_at"][:10])
            + "; top final values "
            + ", ".join(f"{x:.3g}" for x in (p["top_final"] or [])[:6])
            for p in summary["panels"].values()
        )

    def _series(self, run_dir: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
        from implreg.experiments import PRESETS

        exp = PRESETS[next(p for k, p, *_ in PANELS if k == key)].experiment
        sub = Path(run_dir) / key
        if key == "mf":
            _, units, hist = exp.unit_results(sub)
            h = hist[units[-1].name]["history"]
            return np.asarray(h["iteration"]), np.asarray(h["singular_values"])
        data = exp.load_trajectories(sub)
        return trajectories(data["iterations"], data["norms"], 0)

    def write_table(self, run_dir: Path) -> None:
        """``metrics.csv``: per panel and record, the five components largest at the end
        (by identity, largest first)."""
        rows = []
        for key, *_ in PANELS:
            its, traj = self._series(run_dir, key)
            top = top_components(traj, TOP) if its.size else []
            for t, it in enumerate(its):
                row = {"panel": key, "iteration": int(it)}
                row.update({f"top{j + 1}": float(traj[t, r]) for j, r in enumerate(top)})
                rows.append(row)
        write_table(Path(run_dir) / self.table, rows)

    def plot(self, run_dir: Path) -> list[Path]:
        """``figure.png``: the three panels' top components over iterations."""
        series = [(label, *self._series(run_dir, k)) for k, _, label, _ in PANELS]
        return topk_figure(run_dir, series, top_k=TOP, what="component")


EXPERIMENT = DynamicsTrio()
