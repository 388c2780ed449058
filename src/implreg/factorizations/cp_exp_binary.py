"""The exp-sum objective of :mod:`implreg.factorizations.cp_exp` over binary features.

Razin, Maman & Cohen (ICML 2021), Section 5.2 and Figure 4.  One-hot features are
binary (about 15% ones on MNIST), so the standardization is applied affinely,
``std(x) . w = x . (w / scale) - mean . (w / scale)``, and the two products with the
feature matrix are taken on its 0/1 values: by table look-up over its bits
(:mod:`implreg.factorizations.binary_products`, the default on the CPU) or as sparse
CSR products.  Constant features are zero after standardization and carry no
parameter: the caller drops them (``scale > 0`` here).

Precision (measured at the end of a 500-iteration rank-15 fit of the twenty MNIST tasks,
float32): the loss is within 1.8e-7 of its float64 value, as with the dense engine's
GEMMs, and the gradient within 4.5e-4 (dense: 6.1e-4), relative.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from implreg.factorizations.binary_products import PackedBinary
from implreg.factorizations.cp import _check_tensor

Tensor = torch.Tensor

ENGINES = ("packed", "csr")


def check_targets_and_signs(n: int, targets: Tensor, signs: Tensor) -> None:
    """``targets`` ``(n, T)`` and ``signs`` ``(T, R)`` for ``n`` samples, else a ValueError."""
    if targets.dim() != 2 or targets.shape[0] != n:
        raise ValueError(
            f"targets must be (samples, tasks) with the {n} samples of feats, "
            f"got shape {tuple(targets.shape)}"
        )
    if signs.dim() != 2 or signs.shape[0] != targets.shape[1] or signs.shape[1] < 1:
        raise ValueError(
            f"signs must be (tasks, rank) with the {targets.shape[1]} tasks of targets, "
            f"got shape {tuple(signs.shape)}"
        )


CSR_BLOCK = 16  # columns per sparse X^T G product (measured: 15 ms at 16 columns, 580 ms at 100)


def _csr32(dense: Tensor) -> Tensor:
    """A binary float matrix as CSR with int32 indices (half the index bytes of int64)."""
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support", category=UserWarning)
        s = dense.to_sparse_csr()
        return torch.sparse_csr_tensor(
            s.crow_indices().to(torch.int32),
            s.col_indices().to(torch.int32),
            s.values(),
            s.shape,
            check_invariants=False,
        )


class BinaryExpSumObjective:
    """Mean squared error of ``T`` exp-sum predictors over binary features.

    ``feats`` ``(n, D)`` holds 0/1 (the one-hot features of the non-constant inputs),
    ``mean`` and ``scale`` ``(D,)`` their standardization (``scale > 0``), ``targets``
    ``(n, T)``, ``signs`` ``(T, R)``.  Parameters of task ``t`` are flattened as
    ``(R, D + 1)`` (weights on the standardized features, then the bias), as in
    :class:`implreg.factorizations.cp_exp.ExpSumObjective`, whose values and gradients
    this reproduces; ``obj(params, idx)`` follows :func:`implreg.optim.lbfgs.minimize`.

    ``engine`` computes the two products with ``feats``: ``"packed"`` (CPU only) by table
    look-up over its bits (:class:`~implreg.factorizations.binary_products.PackedBinary`),
    ``"csr"`` as torch sparse CSR products (any device).
    """

    def __init__(
        self,
        feats: Tensor,
        mean: Tensor,
        scale: Tensor,
        targets: Tensor,
        signs: Tensor,
        engine: str = "packed",
    ):
        _check_tensor("feats", feats, floating=True)
        if feats.dim() != 2:
            raise ValueError(f"feats must be (samples, features), got shape {tuple(feats.shape)}")
        n, d = feats.shape
        if tuple(mean.shape) != (d,) or tuple(scale.shape) != (d,):
            raise ValueError(
                f"mean and scale must have the {d} features of feats, "
                f"got {tuple(mean.shape)} and {tuple(scale.shape)}"
            )
        if not bool((scale > 0).all()):
            raise ValueError("scale must be positive (drop constant features first)")
        check_targets_and_signs(n, targets, signs)
        dtype = feats.dtype
        self.n, self.d, self.rank = n, d, signs.shape[1]
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        if engine == "packed" and feats.device.type != "cpu":
            raise ValueError(f"engine 'packed' runs on the CPU; feats are on {feats.device}")
        self.engine = engine
        if engine == "packed":
            self.packed = PackedBinary(feats)
        else:
            self.rows = _csr32(feats)
            self.cols = _csr32(feats.T.contiguous())
        self.mean = mean.to(dtype)
        self.inv_scale = (1.0 / scale).to(dtype)
        self.targets = targets.to(dtype)
        self.signs = signs.to(dtype)
        self.positive = bool((signs > 0).all())
        # Two (n, k*R) buffers kept between evaluations (the terms, the gradient's weights):
        # fresh ones page-fault every call, 35 ms per 72 MB here (a rank-15 grid of 20
        # tasks).  Results of an evaluation are views of them, valid until the next one.
        self._buffers: dict[str, Tensor] = {}
        self._generation = 0

    def _buffer(self, name: str, cols: int, like: Tensor) -> Tensor:
        """An ``(n, cols)`` tensor of ``like``'s dtype viewing the kept buffer ``name``."""
        size = self.n * cols
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != like.dtype or buf.numel() < size:
            buf = torch.empty(size, dtype=like.dtype)
            self._buffers[name] = buf
        return buf[:size].view(self.n, cols)

    def _raw(self, params: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Weights ``(k*R, D)`` and biases ``(k*R,)`` on the raw 0/1 features."""
        p = params.view(k, self.rank, self.d + 1)
        w = p[:, :, : self.d] * self.inv_scale
        b = p[:, :, self.d] - (w * self.mean).sum(-1)
        return w.reshape(k * self.rank, self.d), b.reshape(k * self.rank)

    def terms(self, params: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """``(s * exp(z)`` ``(n, k, R)``, predictions ``(n, k)``) for tasks ``idx``.

        Without autograd the terms are a view of the objective's kept buffer, overwritten
        by the next evaluation.
        """
        k = idx.shape[0]
        w, b = self._raw(params, k)
        wt = w.T.contiguous()
        if torch.is_grad_enabled() and params.requires_grad:
            z = self.packed.matmul(wt) if self.engine == "packed" else self.rows @ wt
            terms = torch.exp((z + b).view(self.n, k, self.rank)) * self.signs[idx]
        else:  # in place, in the kept buffer: no fresh (n, k*R) tensors
            self._generation += 1
            if self.engine == "packed":
                z = self.packed.matmul(wt, out=self._buffer("terms", wt.shape[1], wt))
            else:
                z = self.rows @ wt
            terms = z.add_(b).exp_().view(self.n, k, self.rank)
            if not self.positive:
                terms.mul_(self.signs[idx])
        return terms, terms.sum(2)

    def back(self, g: Tensor) -> Tensor:
        """``X^T g`` on the standardized features and ``sum g`` (bias), ``(m, D + 1)``, for
        ``g`` ``(n, m)``."""
        if self.engine == "packed":
            raw = self.packed.rmatmul(g.contiguous()).T  # (m, D)
        else:
            parts = [
                self.cols @ g[:, i : i + CSR_BLOCK].contiguous()
                for i in range(0, g.shape[1], CSR_BLOCK)
            ]
            raw = torch.cat(parts, dim=1).T  # (m, D)
        total = g.sum(0)  # torch sums floats by cascade: no float64 copy of g needed
        gw = (raw - total[:, None] * self.mean) * self.inv_scale
        return torch.cat([gw, total[:, None]], dim=1)

    def __call__(self, params: Tensor, idx: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """Losses ``(k,)`` of tasks ``idx`` at ``params`` and ``grad_of(sel)``.

        Without autograd the evaluation lives in the objective's kept buffers, so its
        ``grad_of`` must be called before the next such evaluation (it raises otherwise);
        :func:`implreg.optim.lbfgs.minimize` does.
        """
        kept = not (torch.is_grad_enabled() and params.requires_grad)
        terms, pred = self.terms(params, idx)
        generation = self._generation
        resid = pred - self.targets[:, idx]
        n, r = self.n, self.rank
        loss = resid.pow(2).sum(0, dtype=torch.float64).to(params.dtype) / n

        def grad_of(sel: Tensor) -> Tensor:
            if kept and generation != self._generation:
                raise RuntimeError(
                    "grad_of was called after a later evaluation of the objective, which "
                    "reused its buffers: take the gradient before evaluating again"
                )
            k = sel.shape[0]
            weight = (resid[:, sel] * (2.0 / n)).unsqueeze(2)
            g = self._buffer("grad", k * r, terms).view(n, k, r) if kept else None
            if k == terms.shape[1]:  # every problem: no gather (sel is then 0..k-1)
                g = torch.mul(terms, weight, out=g) if kept else terms * weight  # (n, k, R)
            elif kept:
                g = torch.index_select(terms, 1, sel, out=g).mul_(weight)
            else:
                g = terms[:, sel, :] * weight
            return self.back(g.reshape(n, k * r)).reshape(k, r * (self.d + 1))

        return loss, grad_of
