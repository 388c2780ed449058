"""Reading hierarchical tensor rank and local dynamics off a hierarchical tensor factorization.

Razin, Maman & Cohen (ICML 2022): the hierarchical tensor rank of a tensor with
respect to a mode tree is the tuple of ranks of its matricizations over the modes
of every tree node (Razin's 2022 blog post); gradient descent from a small initialization
keeps it low, while matricizations over splits that are not tree nodes (the
published {1,3} for the tree ((1,2),(3,4))) are not constrained.  Local component
norms evolve as ``dσ/dt = K γ σ^{2 - 2/K}`` (the blog post's informal theorem,
``K`` = children + 1), which :func:`local_exponent` checks from recorded trajectories.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from implreg.factorizations.htf import ModeTree, matricize

Tensor = torch.Tensor


@dataclass(frozen=True)
class Split:
    """A matricization: ``modes`` (0-based) as rows; ``tree`` when a tree node's modes."""

    label: str  # the paper's notation, e.g. "{1,2}"
    modes: tuple[int, ...]
    tree: bool


def _label(modes: Sequence[int]) -> str:
    return "{" + ",".join(str(m + 1) for m in modes) + "}"


def parse_splits(text: str, order: int) -> list[tuple[int, ...]]:
    """``"1,3"`` or ``"1,3;2,4"`` (1-based modes, ``;`` between splits; empty for none) ->
    0-based mode tuples.  A split names at least one mode and leaves at least one out."""
    out = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        try:
            modes = sorted({int(x) for x in part.replace("{", "").replace("}", "").split(",")})
        except ValueError:
            raise ValueError(
                f"split {part!r} must list 1-based modes separated by commas, like 1,3"
            ) from None
        bad = [m for m in modes if not 1 <= m <= order]
        if bad:
            raise ValueError(f"split {part!r} names mode {bad[0]}, not one of 1..{order}")
        if len(modes) == order:
            raise ValueError(f"split {part!r} names every mode: a matricization needs columns")
        out.append(tuple(m - 1 for m in modes))
    return out


def splits_of(tree: ModeTree, extra: Sequence[Sequence[int]] = ()) -> list[Split]:
    """Every non-root tree node's matricization, then the ``extra`` ones; a split and its
    complement give the same singular values and are listed once."""
    seen: dict[frozenset, int] = {}
    out: list[Split] = []
    full = frozenset(range(tree.order))

    def add(modes: Sequence[int], is_tree: bool) -> None:
        key = frozenset(modes)
        key = key if 0 in key else full - key
        if key in seen:
            return
        seen[key] = len(out)
        rows = tuple(sorted(modes))
        out.append(Split(_label(rows), rows, is_tree))

    for v in range(len(tree.nodes) - 1):
        add(tree.nodes[v], True)
    for modes in extra:
        add(modes, False)
    return out


def split_spectra(end: Tensor, splits: Sequence[Split], k: int) -> dict[str, np.ndarray]:
    """Top-``k`` singular values ``(B, k)`` (zero-padded) and effective rank ``(B,)`` of every
    split's matricization of ``end (B, *dims)``, in float64.  Effective rank (Roy &
    Vetterli 2007): ``exp(-sum p_i log p_i)``, ``p = σ / sum σ``, zero σ dropped."""
    out: dict[str, np.ndarray] = {}
    for s in splits:
        mat = matricize(end, s.modes).double()
        finite = torch.isfinite(mat).all(2).all(1)
        sv = mat.new_full((mat.shape[0], min(mat.shape[1:])), math.nan)  # a diverged run: NaN
        if bool(finite.any()):
            sv[finite] = torch.linalg.svdvals(mat[finite])  # descending
        top = sv.new_zeros(sv.shape[0], k)
        top[:, : min(k, sv.shape[1])] = sv[:, :k]
        p = sv / sv.sum(1, keepdim=True).clamp_min(torch.finfo(sv.dtype).tiny)
        ent = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(1)
        out[f"svals {s.label}"] = top.cpu().numpy()
        out[f"erank {s.label}"] = ent.exp().cpu().numpy()
    return out


def local_exponent(
    time: np.ndarray, sigma: np.ndarray, *, low: float, high: float
) -> tuple[float, int] | None:
    """Slope of ``log dσ/dt`` against ``log σ`` while ``low <= σ <= high`` (a plateau escape).

    ``time`` is the gradient-flow time of the records (the sum of the step sizes),
    ``sigma`` one component's norm there.  Finite differences between consecutive
    records, each placed at the geometric mean of its two norms; only growing steps
    count.  Returns ``(slope, points)``, or ``None`` with fewer than 4 points.
    The theorem predicts ``2 - 2/K`` (4/3 for binary trees) while ``γ`` stays about constant.
    """
    t = np.asarray(time, dtype=np.float64)
    s = np.asarray(sigma, dtype=np.float64)
    dt, ds = np.diff(t), np.diff(s)
    mid = np.sqrt(np.clip(s[1:] * s[:-1], 0, None))
    keep = (dt > 0) & (ds > 0) & (mid >= low) & (mid <= high) & np.isfinite(mid)
    if keep.sum() < 4:
        return None
    x, y = np.log(mid[keep]), np.log(ds[keep] / dt[keep])
    slope = float(np.polyfit(x, y, 1)[0])
    return slope, int(keep.sum())
