"""Summary, figure, memory estimate and extra trajectories of the HTF dynamics experiment
(:mod:`implreg.experiments.htf_dynamics`)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from implreg.experiments.dynamics import FLOW_AXIS, learned_summary, learned_text, trajectories
from implreg.htf_analysis import local_exponent
from implreg.metrics import top_components
from implreg.resources import Estimate
from implreg.runs import atomic_path, pyplot, reading, save_figure

HIERARCHY = "hierarchy.npz"
_ALLOCATOR = 1.25  # freed blocks malloc keeps, as in cp_dynamics
# drawing the five-panel figure (matplotlib's Agg buffers and text layout): measured 60-99 MB
# above the imports, more than the default run's arrays
_FIGURE = 80 * 2**20


def write_hierarchy(run_dir: Path, recorder) -> None:
    """``hierarchy.npz``: iterations and every recorded array ``(T, B, ...)`` (local norms of
    every internal node, singular values and effective rank of every split, time)."""
    its, arrays = recorder.arrays()
    if its.size == 0:
        return
    with atomic_path(Path(run_dir) / HIERARCHY) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, iterations=its, **arrays)


def load_hierarchy(run_dir: Path) -> dict[str, np.ndarray]:
    path = Path(run_dir) / HIERARCHY
    with reading(path, "hierarchy trajectories"), open(path, "rb") as fh, np.load(fh) as data:
        out = {k: data[k] for k in data.files}
        if "iterations" not in out or "root_local_norms" not in out:
            raise ValueError("not a hierarchy file")
        return out


def _exponents(time: np.ndarray, traj: np.ndarray, learned: list[dict], start: float) -> dict:
    """The local dynamics' exponent (2 - 2/K) fitted on each learned component's plateau
    escape: from 10x its initial norm to 30% of its final norm (γ about constant there)."""
    fits = []
    for c in learned:
        r, final = c["component"], c["final_norm"]
        fit = local_exponent(time, traj[:, r], low=10.0 * start, high=0.3 * final)
        if fit is not None:
            fits.append({"component": r, "exponent": fit[0], "points": fit[1]})
    values = [f["exponent"] for f in fits]
    return {
        "predicted": 2.0 - 2.0 / 3.0,
        "median": float(np.median(values)) if values else None,
        "fits": fits,
    }


def summarize_htf(cfg: Any, tree, its: np.ndarray, arrays: dict, state) -> dict:
    """Per run: status, errors, which root and node components left zero and when, the
    exponent check, and the final spectrum and effective rank of every matricization."""
    runs = []
    node_keys = [k for k in arrays if k.startswith("local ")]
    split_keys = [k[6:] for k in arrays if k.startswith("erank ")]
    tree_labels = {tree.node_text(v) for v in range(len(tree.nodes) - 1)}
    for b, std in enumerate(cfg.init_stds):
        stopped = state.stop["stopped_at"][b]
        status = state.stop["status"][b]
        upto = its <= (stopped if stopped is not None else its[-1])
        root = arrays["root_local_norms"][upto, b, :]
        learned = learned_summary(
            its[upto], root, fraction=cfg.learned_fraction, top_k=cfg.top_k, status=status
        )
        final = np.nan_to_num(root[-1], nan=0.0)
        above = int((final > cfg.learned_fraction * final.max()).sum()) if final.max() > 0 else 0
        nodes = {}
        for k in node_keys:
            s = learned_summary(
                its[upto],
                arrays[k][upto, b, :],
                fraction=cfg.learned_fraction,
                top_k=cfg.top_k,
                status=status,
            )
            nodes[k[6:]] = {
                "n_learned": s["n_learned"],
                "left_zero_at": [c["left_zero_at"] for c in s["learned"]],
            }
        spectra = {
            label: {
                "tree": label in tree_labels,
                "effective_rank": float(arrays[f"erank {label}"][upto, b][-1]),
                "singular_values": [float(x) for x in arrays[f"svals {label}"][upto, b][-1]],
            }
            for label in split_keys
        }
        tree_eranks = [s["effective_rank"] for s in spectra.values() if s["tree"]]
        other = [s["effective_rank"] for s in spectra.values() if not s["tree"]]
        runs.append(
            {
                "init_std": std,
                "status": status,
                "stopped_at": stopped,
                "initial_train_loss": float(arrays["train_loss"][0, b]),
                "final_train_loss": float(arrays["train_loss"][upto, b][-1]),
                "final_reconstruction_error": float(arrays["reconstruction_error"][upto, b][-1]),
                "final_full_reconstruction_error": float(
                    arrays["full_reconstruction_error"][upto, b][-1]
                ),
                "unbalancedness_init": float(arrays["unbalancedness"][0, b]),
                "unbalancedness_final": float(arrays["unbalancedness"][upto, b][-1]),
                **learned,
                "root_above_fraction": above,
                "nodes": nodes,
                "exponent": _exponents(
                    arrays["time"][upto, b], root, learned["learned"], float(root[0].max())
                ),
                "spectra": spectra,
                "max_tree_effective_rank": max(tree_eranks) if tree_eranks else None,
                "min_other_effective_rank": min(other) if other else None,
            }
        )
    return {
        "iterations": state.iteration,
        "tree": tree.describe(),
        "messages": list(state.messages),
        "runs": runs,
    }


def htf_summary_text(summary: dict) -> str:
    lines = [f"mode tree {summary.get('tree', '')}"]
    for r in summary["runs"]:
        head = f"init std {r['init_std']:g}: "
        if r["n_learned"] is None:
            lines.append(head + f"DIVERGED at iteration {r['stopped_at']}")
            continue
        when = learned_text(r["learned"])
        exp = r["exponent"]["median"]
        tree_er, other = r["max_tree_effective_rank"], r["min_other_effective_rank"]
        lines.append(
            head
            + f"{r['n_learned']} root local components left zero"
            + (f" (at iterations {when})" if when else "")
            + f"; {r['root_above_fraction']} end above 10% of the largest"
            + f"; held-out error {r['final_reconstruction_error']:.4g}"
            + f", full-tensor error {r['final_full_reconstruction_error']:.4g}"
            + f"; train loss {r['final_train_loss']:.3g}; {r['status']} at {r['stopped_at']}"
        )
        if tree_er is not None:
            lines.append(
                f"  effective rank: tree matricizations at most {tree_er:.3g}"
                + (f", other splits at least {other:.3g}" if other is not None else "")
                + "; "
                + ", ".join(f"{k} {s['effective_rank']:.3g}" for k, s in r["spectra"].items())
            )
        if exp is not None:
            lines.append(
                f"  local dynamics exponent (log dσ/dt vs log σ, plateau escapes): median "
                f"{exp:.3g} over {len(r['exponent']['fits'])} components (theory: 4/3)"
            )
    return "\n".join(lines)


def htf_memory(cfg: Any) -> Estimate:
    """Peak bytes of a run from the config: parameters (x4: values, gradients, the copy at
    the end, the recorder's norms), the engine's work (dense: the tables and their gradients,
    the end tensor; gather: chunks of observations through every node), the evaluation (the
    end tensor in float64 and the matricizations' SVDs), the records and the figure."""
    from implreg.factorizations.htf_engine import choose_htf_method

    tree, widths = cfg.mode_tree(), cfg.width_arg(cfg.widths)
    shapes = tree.shapes(cfg.dims, widths)
    b, s, size = len(cfg.init_stds), 4 if cfg.dtype == "float32" else 8, math.prod(cfg.dims)
    n_params = b * sum(math.prod(sh) for sh in shapes)
    parts = [Estimate(4.0 * n_params * s, "widths", f"parameters of {n_params:.3g} numbers")]
    method = cfg.method
    if method == "auto":
        method = choose_htf_method(tree, cfg.dims, widths, cfg.num_observations)
    rows = {v: math.prod(cfg.dims[m] for m in tree.nodes[v]) for v in tree.internal}
    if method == "dense":
        tables = sum(rows[v] * (shapes[v][0] + shapes[v][1]) for v in tree.internal[:-1])
        parts.append(Estimate(3.0 * b * tables * s, "widths", "the tables of the tree's nodes"))
        parts.append(Estimate(3.0 * b * size * s, "dims", f"end tensors of {size:.3g} entries"))
    else:
        tables = sum(
            rows[v] * (shapes[v][0] + shapes[v][1])
            for v in tree.internal[:-1]
            if rows[v] <= cfg.num_observations
        )
        parts.append(Estimate(3.0 * b * tables * s, "widths", "the tables of the small nodes"))
        chunk = min(4096, cfg.num_observations)
        per = sum(sh[-1] for sh in shapes[:-1]) + sum(
            sh[0] for v, sh in enumerate(shapes) if v in tree.internal
        )
        parts.append(Estimate(3.0 * b * chunk * per * s, "widths", "chunks through the tree"))
    if size <= cfg.dense_max:
        parts.append(Estimate(b * size * (s + 24.0) + 8.0 * size, "dense_max", "the evaluation"))
    else:
        parts.append(Estimate(32.0 * b * cfg.recon_sample, "recon_sample", "sampled entries"))
    records = min(cfg.max_records + 1, cfg.max_iterations // cfg.log_every + 1) + 16 + b
    per_record = b * (sum(sh[0] for v, sh in enumerate(shapes) if v in tree.internal) + 64)
    parts.append(Estimate(8.0 * records * per_record * 4, "max_records", "the records"))
    m, n = cfg.num_observations, len(cfg.dims)
    if cfg.task == "completion":
        obs = 16.0 * (m + cfg.num_test) * (n + 1)
    else:  # the vectors, and for the dense engine their two Khatri-Rao halves
        half = math.isqrt(size) + 1
        obs = 16.0 * m * sum(cfg.dims) + (2.0 * m * half * s if method == "dense" else 0.0)
    parts.append(Estimate(obs, "num_observations", f"{m} observations"))
    peak = max(parts, key=lambda e: e.bytes)
    total = sum(p.bytes for p in parts) + _FIGURE
    return Estimate(total * _ALLOCATOR, peak.key, peak.what)


def htf_figure(exp, run_dir: Path) -> list[Path]:
    """``figure.png``, one row per run: root local norms, the first middle node's local
    norms, the spectra of a tree matricization and of the first extra split, and the
    reconstruction errors, from the folder alone."""
    plt = pyplot()
    run_dir = Path(run_dir)
    data = load_hierarchy(run_dir)
    its = data["iterations"]
    values = exp.load_trajectories(run_dir)
    stds = next(v for k, v in values.items() if k not in ("iterations", "norms", "top_k", "flow"))
    top_k = int(values.get("top_k", 10))
    xlabel = FLOW_AXIS if bool(values.get("flow", False)) else "iteration"
    nodes = [k for k in data if k.startswith("local ")]
    svals = [k for k in data if k.startswith("svals ")]
    cfg = exp.config_of(run_dir)
    tree_labels = {cfg.mode_tree().node_text(v) for v in range(len(cfg.mode_tree().nodes) - 1)}
    tree_sv = [k for k in svals if k[6:] in tree_labels and "," in k]
    other_sv = [k for k in svals if k[6:] not in tree_labels]
    with reading(run_dir / exp.table, "metrics table"), open(run_dir / exp.table) as fh:
        rows = list(csv.DictReader(fh))
        if len(rows) != its.size * len(stds):
            raise ValueError(f"{len(rows)} rows where {its.size * len(stds)} belong")
    panels = [("root_local_norms", "root local norms")]
    panels += [(nodes[0], f"{nodes[0][6:]} local norms")] if nodes else []
    panels += [(k, f"singular values of {k[6:]}") for k in (tree_sv[:1] + other_sv[:1])]
    ncol = len(panels) + 1
    fig, axes = plt.subplots(len(stds), ncol, figsize=(3.9 * ncol, 3.2 * len(stds)), squeeze=False)
    for b, std in enumerate(stds):
        for j, (key, title) in enumerate(panels):
            a = axes[b, j]
            its_b, traj = trajectories(its, data[key], b)
            if its_b.size:
                sel = (
                    top_components(traj, top_k)
                    if key.startswith(("root", "local"))
                    else range(traj.shape[1])
                )
                for r in sel:
                    a.plot(its_b, traj[:, r], lw=1.1)
            a.set_title(f"init {std:g}: {title}", fontsize=9)
            a.set_xlabel(xlabel)
            a.grid(alpha=0.3)
        a = axes[b, -1]
        mine = [r for r in rows if int(r["run"]) == b]
        xs = [float(r["iteration"]) for r in mine]
        for col, label in (
            ("reconstruction_error", "held-out"),
            ("full_reconstruction_error", "full tensor"),
        ):
            a.plot(xs, [float(r[col]) for r in mine], label=label)
        a.set_yscale("log")
        a.set_title(f"init {std:g}: ||W - W*|| / ||W*||", fontsize=9)
        a.set_xlabel(xlabel)
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    return [save_figure(fig, run_dir / "figure.png")]
