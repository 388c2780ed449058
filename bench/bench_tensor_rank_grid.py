"""The whole Figure-4 grid (issue 4 targets: 900 fits <= 2 hours, peak memory <= 4 GB).

Runs the ``tensor-rank-complexity`` preset in-process into a fresh folder
(``--out``, default a temporary one), with any ``--set KEY=VALUE`` overrides
(e.g. ``--set datasets=mnist`` for half the grid), then prints the wall time,
the peak resident memory of the process, the seconds of every unit and the
mean train MSE per (dataset, variant, rank).  The reference is the authors'
code: about 2.4 s per epoch at rank 5 and 10000 epochs per fit (REFERENCE §2),
i.e. 6.7 hours for one fit; ``bench_tensor_rank_fit.py`` re-measures it.

    python bench/bench_tensor_rank_grid.py --data-dir ../shared/data [--set ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import tempfile
import time
from pathlib import Path

from implreg.api import run_preset
from implreg.config import with_overrides
from implreg.experiments import tensor_rank_complexity as tensor_rank

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = with_overrides(tensor_rank.TensorRankConfig(), args.overrides)
    cfg = dataclasses.replace(cfg, data_dir=str(args.data_dir.resolve()))
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-tensor-rank-")) / "run"
    fits = len(cfg.datasets) * len(cfg.variants) * len(cfg.classes) * len(set(cfg.ranks))
    print(f"{fits} fits into {out}")
    start = time.perf_counter()
    if (out / "config.json").exists():  # continue the grid in that folder
        res = run_preset(out=out, resume=True, progress=True)
    else:
        res = run_preset(cfg, out=out, progress=True)
    wall = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    for f in sorted((out / "units").glob("*.json")):
        u = json.loads(f.read_text())["result"]
        print(f"{f.stem:<36} {u['seconds']:7.1f} s  {u.get('iterations', '-')} iterations")
    print(res.summary_text())
    print(
        f"grid of {fits} fits: {wall:.0f} s wall ({wall / 3600:.2f} h), peak RSS {peak_gb:.2f} GB"
    )
    print(
        f"reference (authors' code, 6.7 h per fit): {fits * 6.7:.0f} h; "
        f"ratio {fits * 6.7 * 3600 / wall:.0f}x"
    )


if __name__ == "__main__":
    main()
