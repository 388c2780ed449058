"""Ground truths of low hierarchical tensor rank and their observations (Razin, Maman & Cohen,
ICML 2022: synthetic completion and sensing, the authors' published settings).

The ground truth is the hierarchical tensor factorization itself at small widths
(HT ranks at most the widths, 5 in the paper) with i.i.d. ``N(0, 1)`` parameters,
all rescaled by one common factor to a given Frobenius norm (64 in the paper),
computed without building the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from implreg.factorizations.cp import (
    _check_generator,
    _check_int,
    _check_real,
)
from implreg.factorizations.htf import (
    ModeTree,
    check_params,
    htf_init,
    htf_network,
    htf_to_tensor,
    htf_values,
)
from implreg.problems.synthetic import sample_indices

Tensor = torch.Tensor


def htf_frobenius_norm(params: Sequence[Tensor], tree: ModeTree) -> Tensor:
    """``||W||_F`` per run, ``(B,)``, from Gram matrices up the tree (never builds ``W``):
    ``G_leaf = W_n^T W_n``, ``G_v = W_v^T (prod_c G_c) W_v``, ``||W||^2 = w^T (prod_c G_c) w``."""
    check_params(params, tree)
    gram: dict[int, Tensor] = {n: params[n].transpose(1, 2) @ params[n] for n in range(tree.order)}
    for v in tree.internal:
        prod = gram[tree.children[v][0]]
        for c in tree.children[v][1:]:
            prod = prod * gram[c]
        if v == tree.root:
            w = params[v]
            sq = (w.unsqueeze(1) @ prod @ w.unsqueeze(2)).reshape(-1)
            return sq.clamp_min(0).sqrt()
        gram[v] = params[v].transpose(1, 2) @ prod @ params[v]
    raise AssertionError("the tree has no root")


@dataclass
class HTFTensor:
    """A tensor held as a hierarchical tensor factorization with batch 1 (float64)."""

    tree: ModeTree
    params: list[Tensor]

    @property
    def dims(self) -> list[int]:
        return [int(self.params[n].shape[1]) for n in range(self.tree.order)]

    @property
    def size(self) -> int:
        return math.prod(self.dims)

    def values(self, idx: Tensor) -> Tensor:
        return htf_values(self.params, self.tree, idx)[0]

    def dense(self) -> Tensor:
        return htf_to_tensor(self.params, self.tree)[0]

    def norm(self) -> float:
        return float(htf_frobenius_norm(self.params, self.tree)[0])

    def sense(self, vectors: Sequence[Tensor]) -> Tensor:
        """``<x_i1 (x) ... (x) x_iN, W>`` for every measurement ``i``, ``(m,)``."""
        return htf_network(self.params, self.tree, vectors)[0]


def low_ht_rank_tensor(
    dims: Sequence[int], tree: ModeTree, widths, *, norm: float, generator: torch.Generator
) -> HTFTensor:
    """Ground truth: the factorization at ``widths`` with i.i.d. ``N(0, 1)`` parameters, every
    parameter multiplied by one common factor so that ``||W||_F = norm`` (the end tensor is
    of degree ``#nodes`` in that factor)."""
    norm = _check_real("norm", norm, positive=True)
    _check_generator("generator", generator)
    params = htf_init(dims, tree, widths, stds=[1.0], generator=generator, dtype=torch.float64)
    current = float(htf_frobenius_norm(params, tree)[0])
    if not current > 0:
        raise ValueError("the drawn ground truth is zero; draw again with another seed")
    scale = (norm / current) ** (1.0 / len(params))
    return HTFTensor(tree, [p * scale for p in params])


def cp_ht_tensor(
    dims: Sequence[int], tree: ModeTree, rank: int, *, norm: float, generator: torch.Generator
) -> HTFTensor:
    """Ground truth of CP rank ``rank`` written as a hierarchical factorization over ``tree``.

    The leaves hold the CP factors, i.i.d. ``N(0, 1)`` (``d_n x rank``, drawn in mode
    order), every internal node the ``rank x rank`` identity and the root a vector of
    ones, so the end tensor is ``sum_r a_r^1 (x) ... (x) a_r^N``; the factors are then
    multiplied by one common factor so that ``||W||_F = norm``.  This is the default
    target of the authors' data generator (asafmaman101/imp_reg_htf: order 3, modes of
    16, CP rank 5, norm 64); its HT ranks are at most ``rank`` over every tree."""
    rank = _check_int("rank", rank, minimum=1)
    norm = _check_real("norm", norm, positive=True)
    _check_generator("generator", generator)
    params: list[Tensor] = []
    for v, shape in enumerate(tree.shapes(dims, rank)):
        if not tree.children[v]:
            params.append(torch.randn(1, *shape, generator=generator, dtype=torch.float64))
        elif tree.parent(v) is None:
            params.append(torch.ones(1, *shape, dtype=torch.float64))
        else:
            params.append(torch.eye(*shape, dtype=torch.float64).unsqueeze(0))
    current = float(htf_frobenius_norm(params, tree)[0])
    if not current > 0:
        raise ValueError("the drawn ground truth is zero; draw again with another seed")
    scale = (norm / current) ** (1.0 / tree.order)
    return HTFTensor(tree, [p * scale if not tree.children[v] else p for v, p in enumerate(params)])


@dataclass
class HTFCompletion:
    """Distinct entries, the first ``m_train`` observed, the rest held out."""

    truth: HTFTensor
    idx: Tensor
    y: Tensor
    test_idx: Tensor
    test_y: Tensor


def htf_completion_problem(
    truth: HTFTensor, m_train: int, m_test: int, *, generator: torch.Generator
) -> HTFCompletion:
    """``m_train + m_test`` distinct entries drawn uniformly without replacement: the first
    ``m_train`` train, the others test (the authors' split)."""
    m_train = _check_int("m_train", m_train, minimum=1)
    m_test = _check_int("m_test", m_test, minimum=0)
    idx = sample_indices(truth.dims, m_train + m_test, generator=generator)
    y = truth.values(idx)
    return HTFCompletion(truth, idx[:m_train], y[:m_train], idx[m_train:], y[m_train:])


@dataclass
class HTFSensing:
    """Rank-one sensing ``y_i = <x_i1 (x) ... (x) x_iN, W*>``: the vectors, never the ``X_i``."""

    truth: HTFTensor
    vectors: list[Tensor]
    y: Tensor


def htf_sensing_problem(truth: HTFTensor, m: int, *, generator: torch.Generator) -> HTFSensing:
    """``x_in ~ N(0, E^{-1/N} I)`` with ``E`` the number of entries (the authors' scaling: each
    entry of ``X_i`` then has variance ``1 / E``)."""
    m = _check_int("m", m, minimum=1)
    _check_generator("generator", generator)
    dims = truth.dims
    std = truth.size ** (-0.5 / len(dims))
    vectors = [torch.randn(m, d, generator=generator, dtype=torch.float64) * std for d in dims]
    return HTFSensing(truth, vectors, truth.sense(vectors))
