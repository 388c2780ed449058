"""Seed sweeps: one preset over many seeds, with the spread the papers never showed.

``implreg sweep tf-dynamics --seeds 0-9`` (or ``implreg.seed_sweep("tf-dynamics",
range(10))``) runs the preset once per seed, each run a unit of the sweep
engine (local process pool by default, Ray with ``--backend ray``).  A worker
runs its seed into a scratch folder and hands the files back; the driver
writes them to ``<out>/seed-<s>/`` (a normal run folder: ``implreg plot`` and
``implreg.load`` read it).  The sweep folder then holds

- ``aggregate.json``: per run of the preset (e.g. per init scale) the mean,
  std, min, median and max over seeds of every number of its summary, and for
  the dynamics presets the fraction of seeds showing the published picture
  (exactly ``gt_rank`` components leave zero; final errors ordered by init
  scale, smaller init smaller error) and the iterations at which the k-th
  component left zero;
- ``aggregate.png``: per run, the median over seeds of the reconstruction
  error and of the k-th largest component norm against the iteration, with
  the 25-75% band.

Re-running the same command with the same ``--out`` resumes: finished seeds
are read back, never recomputed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from implreg.config import ConfigError
from implreg.runs import pyplot, write_json
from implreg.sweep import FILES, run_grid

MAX_SEEDS = 10_000


def parse_seeds(text: str) -> list[int]:
    """``"0-9"``, ``"1,4,7"``, ``"0-4,10"`` -> sorted distinct seeds."""
    seeds: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ConfigError(f"--seeds takes seeds like 0-9 or 1,4,7, got {text!r}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ConfigError(f"--seeds range {part} runs backwards")
        if hi - lo + 1 + len(seeds) > MAX_SEEDS:
            raise ConfigError(f"--seeds asks for more than {MAX_SEEDS} seeds")
        seeds.update(range(lo, hi + 1))
    return sorted(seeds)


@dataclass(frozen=True)
class SeedUnit:
    """One seed of a preset; its run folder comes back to the driver as files."""

    name: str
    preset: str
    overrides: tuple[str, ...]
    seed: int
    data_dir: str | None
    device: str

    def execute(self, should_stop=None) -> dict | None:
        from implreg.api import run_preset
        from implreg.training import Poll

        scratch = Path(tempfile.mkdtemp(prefix="implreg-seed-"))
        try:
            flag = Poll(should_stop)
            run = run_preset(
                self.preset,
                out=scratch / "run",
                seed=self.seed,
                overrides=list(self.overrides),
                data_dir=self.data_dir,
                device=self.device,
                interrupt=flag,
                log=lambda *_: None,
            )
            if run.interrupted:
                return None
            files = {
                str(p.relative_to(run.path)): p.read_bytes()
                for p in sorted(run.path.rglob("*"))
                if p.is_file()
            }
            return {"exit_code": run.exit_code, "summary": run.summary, FILES: files}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class SweepResult:
    path: Path
    seeds: list[int]
    interrupted: bool
    aggregate: dict = field(default_factory=dict)
    text: str = ""


def seed_sweep(
    preset: str,
    seeds: Sequence[int],
    *,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    data_dir: str | Path | None = None,
    backend: str = "local",
    device: str = "cpu",
    workers: int | None = None,
    progress: bool = False,
    interrupt=None,
) -> SweepResult:
    """Run ``preset`` once per seed (see the module docstring); returns the aggregate."""
    import datetime as _dt

    from implreg.api import _check_backend, _check_device, _check_out, _reason, resolve
    from implreg.runs import RunLock

    seeds = sorted({int(s) for s in seeds})
    if not seeds or seeds[0] < 0:
        raise ConfigError("give at least one seed, none negative")
    _check_backend(backend)
    _check_device(device)
    overrides = list(overrides)
    name, exp, cfg = resolve(preset, overrides=overrides, seed=seeds[0], data_dir=data_dir)
    if any(o.split("=", 1)[0].strip() == "seed" for o in overrides):
        raise ConfigError("the seeds of a sweep come from --seeds, not --set seed=")
    if "workers" in {f.name for f in dataclasses.fields(cfg)}:
        # one process per seed: no pools inside the sweep's workers
        overrides = [o for o in overrides if o.split("=", 1)[0].strip() != "workers"]
        overrides.append("workers=1")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if out is not None and str(out).strip() == "":
        raise ConfigError("out must name a folder, got ''")
    path = Path(out) if out is not None else Path("runs") / f"sweep-{name}-{stamp}"
    _check_out(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the sweep folder {path}: {_reason(exc)}") from None
    with RunLock(path):
        return _sweep(
            path, name, exp, cfg, seeds, overrides, device, backend, workers, progress, interrupt
        )


def _sweep(path, name, exp, cfg, seeds, overrides, device, backend, workers, progress, interrupt):
    import os

    from implreg.api import _Given
    from implreg.training import Interrupt

    resolved_dir = getattr(cfg, "data_dir", None)
    units = [SeedUnit(f"seed-{s}", name, tuple(overrides), s, resolved_dir, device) for s in seeds]
    write_json(path / "sweep.json", {"preset": name, "seeds": seeds, "overrides": overrides})
    workers = workers or min(len(units), os.cpu_count() or 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(units), unit="seed")
    with Interrupt() if interrupt is None else _Given(interrupt) as stop:
        try:
            results, interrupted = run_grid(
                units,
                path,
                workers=workers,
                backend=backend,
                interrupt=stop,
                on_done=(lambda u, r: bar.update(1)) if bar is not None else None,
            )
        finally:
            if bar is not None:
                bar.close()
    if interrupted:
        return SweepResult(path, seeds, True)
    agg = aggregate(exp, cfg, [path / u.name for u in units], seeds)
    write_json(path / "aggregate.json", agg)
    if agg.get("curves"):
        plot_aggregate(path, agg)
    return SweepResult(path, seeds, False, agg, aggregate_text(agg))


LABEL_KEYS = (
    "init_std",
    "depth",
    "mode",
    "init",
    "init_scale",
    "m",
    "method",
    "dataset",
    "variant",
)
LABEL_KEYS += ("predictor", "rank")


def _label(entry: dict) -> str:
    return ", ".join(f"{k} {entry[k]}" for k in LABEL_KEYS if k in entry) or "run"


def _stats(values: Sequence[float]) -> dict:
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if a.size == 0:
        return {"n": 0}
    return {
        "n": int(a.size),
        "mean": float(a.mean()),
        "std": float(a.std()),
        "min": float(a.min()),
        "median": float(np.median(a)),
        "max": float(a.max()),
    }


def _entries(summary: dict) -> list[dict]:
    """The per-run entries of a summary: ``runs``, else every list of dicts it holds."""
    if isinstance(summary.get("runs"), list):
        return summary["runs"]
    out: list[dict] = []
    for value in summary.values():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out.extend(value)
    return out


def aggregate(exp: Any, cfg: Any, folders: list[Path], seeds: list[int]) -> dict:
    """Per run of the preset: statistics over seeds of every number of the summary's runs."""
    from implreg.api import load
    from implreg.experiments.dynamics import DynamicsExperiment, trajectories

    runs = [load(f) for f in folders]
    per_seed = [_entries(r.summary) for r in runs]
    out: dict[str, Any] = {"preset": runs[0].preset, "seeds": seeds, "runs": []}
    for i, first in enumerate(per_seed[0]):
        entry: dict[str, Any] = {}
        for key, value in first.items():
            if all(s[i].get(key) == value for s in per_seed):
                entry[key] = value  # the same in every seed (what identifies the run)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                entry[key] = _stats([s[i].get(key) for s in per_seed])
        out["runs"].append(entry)
    if not isinstance(exp, DynamicsExperiment):
        return out
    k = getattr(cfg, "gt_rank", None)
    if k is None and callable(getattr(cfg, "expected_components", None)):
        k = cfg.expected_components()  # e.g. the root width of an HTF ground truth
    errors = np.array([[r["final_reconstruction_error"] for r in s] for s in per_seed])
    stds = np.asarray(cfg.init_stds)
    order = np.argsort(stds)  # smallest init first: its error should be the smallest
    ordered = [bool(np.all(np.diff(e[order]) > 0)) for e in errors]
    out["errors_ordered_by_init_fraction"] = float(np.mean(ordered))
    out["errors_ordered_seeds"] = [s for s, ok in zip(seeds, ordered) if ok]
    curves = []
    for i, entry in enumerate(out["runs"]):
        exact = [s[i]["n_learned"] == k for s in per_seed]
        entry["exactly_gt_rank_learned_fraction"] = float(np.mean(exact))
        entry["exactly_gt_rank_learned_seeds"] = [s for s, ok in zip(seeds, exact) if ok]
        entry["published_picture_fraction"] = float(
            np.mean([a and b for a, b in zip(exact, ordered)])
        )
        entry["left_zero_at"] = [
            _stats(
                [s[i]["learned"][j]["left_zero_at"] for s in per_seed if len(s[i]["learned"]) > j]
            )
            for j in range(max(len(s[i]["learned"]) for s in per_seed))
        ]
        curves.append(_curves(exp, folders, i, trajectories, (k or 5) + 1))
    out["curves"] = curves
    return out


def _curves(exp, folders: list[Path], b: int, trajectories, k: int) -> dict:
    """Median and quartiles over seeds of the error and the k largest norms, on one grid."""
    import csv

    per = []
    for f in folders:
        data = exp.load_trajectories(f)
        its, norms = trajectories(data["iterations"], data["norms"], b)
        with open(f / exp.table, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["run"]) == b]
        err_its = np.array([float(r["iteration"]) for r in rows])
        err = np.array([float(r[exp.scalars[0]]) for r in rows])
        keep = np.isfinite(err)  # records after a run stopped are NaN
        err_its, err = err_its[keep], err[keep]
        top = -np.sort(-norms, axis=1)[:, :k]
        per.append((its, top, err_its, err))
    end = max(max(p[0][-1], p[2][-1]) for p in per)
    grid = np.linspace(0, end, 200)

    def interp(x, y):  # hold the last value after a run stopped
        return np.interp(grid, x, y, right=y[-1])

    err = np.stack([interp(p[2], p[3]) for p in per])
    tops = np.stack(
        [np.stack([interp(p[0], p[1][:, j]) for j in range(p[1].shape[1])]) for p in per]
    )
    q = lambda a: np.nanpercentile(a, [25, 50, 75], axis=0).tolist()  # noqa: E731
    return {"iterations": grid.tolist(), "error": q(err), "top": q(tops)}


def plot_aggregate(path: Path, agg: dict) -> Path:
    """Median trajectories with 25-75% bands over seeds, one column per run of the preset."""
    plt = pyplot()

    curves = agg["curves"]
    fig, axes = plt.subplots(2, len(curves), figsize=(4.4 * len(curves), 6.4), squeeze=False)
    for c, (entry, cur) in enumerate(zip(agg["runs"], curves)):
        x = np.asarray(cur["iterations"])
        label = _label(entry)
        lo, mid, hi = (np.asarray(a) for a in cur["top"])
        ax = axes[0, c]
        for j in range(mid.shape[0]):
            ax.plot(x, mid[j], lw=1.2)
            ax.fill_between(x, lo[j], hi[j], alpha=0.2)
        ax.set_title(f"{label}: k-th largest component norm", fontsize=8)
        ax = axes[1, c]
        lo, mid, hi = (np.asarray(a) for a in cur["error"])
        ax.plot(x, mid, color="k")
        ax.fill_between(x, lo, hi, color="k", alpha=0.2)
        ax.set_yscale("log")
        ax.set_title("reconstruction error", fontsize=8)
        for a in axes[:, c]:
            a.set_xlabel("iteration")
            a.grid(alpha=0.3)
    fig.suptitle(f"{agg['preset']}: median over {len(agg['seeds'])} seeds, 25-75% band")
    fig.tight_layout()
    p = path / "aggregate.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p


def aggregate_text(agg: dict) -> str:
    lines = [
        f"{agg['preset']} over seeds {agg['seeds'][0]}..{agg['seeds'][-1]} ({len(agg['seeds'])})"
    ]
    for entry in agg["runs"]:
        label = _label(entry)
        nums = []
        for key in ("final_reconstruction_error", "test_mse", "final_abs_w11"):
            st = entry.get(key)
            if isinstance(st, dict) and st.get("n"):
                nums.append(
                    f"{key} median {st['median']:.3g} (range {st['min']:.3g}-{st['max']:.3g})"
                )
        if "exactly_gt_rank_learned_fraction" in entry:
            nums.append(
                f"exactly gt_rank components learned in "
                f"{entry['exactly_gt_rank_learned_fraction']:.0%} of seeds"
            )
        lines.append(f"{label}: " + "; ".join(nums))
    if "errors_ordered_by_init_fraction" in agg:
        lines.append(
            f"errors ordered by init scale in {agg['errors_ordered_by_init_fraction']:.0%} "
            f"of seeds ({', '.join(map(str, agg['errors_ordered_seeds'])) or 'none'})"
        )
    return "\n".join(lines)
