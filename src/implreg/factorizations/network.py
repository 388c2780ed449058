"""CP tensor factorization as a shallow non-linear network (paper Figure 2).

Input: an index tuple ``(i_1, ..., i_N)`` encoded as one-hot vectors
``x_n in R^{d_n}``.  Hidden layer: a locally connected linear operator with
``R`` channels, channel ``r`` computing ``<w_r^n, x_n>`` for every mode ``n``,
followed by global product pooling over the modes.  Output: the sum over the
channels.  The output at ``(i_1, ..., i_N)`` equals entry ``(i_1, ..., i_N)``
of the end tensor ``sum_r w_r^1 (x) ... (x) w_r^N`` (paper eq. 3); the filters
``w_r^n`` are the factors' columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

Tensor = torch.Tensor


class CPNetwork(nn.Module):
    """The network of paper Figure 2 with one filter bank ``(d_n, R)`` per mode.

    Parameters
    ----------
    dims
        Mode sizes ``d_1, ..., d_N`` (the number of values of each input variable).
    rank
        Number of channels ``R`` (components of the factorization).
    """

    def __init__(self, dims: Sequence[int], rank: int, *, dtype: torch.dtype = torch.float32):
        super().__init__()
        dims = [int(d) for d in dims]
        if not dims or any(d < 1 for d in dims) or rank < 1:
            raise ValueError(f"mode sizes and rank must be positive, got dims={dims}, rank={rank}")
        self.dims = dims
        self.rank = int(rank)
        self.filters = nn.ParameterList(
            [nn.Parameter(torch.zeros(d, rank, dtype=dtype)) for d in dims]
        )

    @classmethod
    def from_factors(cls, factors: Sequence[Tensor]) -> CPNetwork:
        """A network whose filters are copies of implreg factors ``(1, d_n, R)``."""
        if any(f.dim() != 3 or f.shape[0] != 1 for f in factors):
            raise ValueError("from_factors takes factors of shape (1, d_n, R)")
        net = cls([f.shape[1] for f in factors], factors[0].shape[2], dtype=factors[0].dtype)
        with torch.no_grad():
            for p, f in zip(net.filters, factors):
                p.copy_(f[0])
        return net

    def to_factors(self) -> list[Tensor]:
        """The filters as implreg factors ``(1, d_n, R)`` (detached copies)."""
        return [p.detach().clone().unsqueeze(0) for p in self.filters]

    def one_hot(self, idx: Tensor) -> list[Tensor]:
        """One-hot encodings ``(batch, d_n)`` of integer index tuples ``(batch, N)``."""
        dtype = self.filters[0].dtype
        return [
            nn.functional.one_hot(idx[:, n].long(), d).to(dtype) for n, d in enumerate(self.dims)
        ]

    def forward(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        """Outputs ``(batch,)`` for index tuples ``(batch, N)`` or N one-hot ``(batch, d_n)``."""
        if isinstance(x, Tensor):
            if x.dim() != 2 or x.shape[1] != len(self.dims):
                raise ValueError(f"index input must have shape (batch, {len(self.dims)})")
            x = self.one_hot(x)
        if len(x) != len(self.dims):
            raise ValueError(f"expected {len(self.dims)} one-hot inputs, got {len(x)}")
        pooled = None
        for xn, w in zip(x, self.filters):
            act = xn @ w  # locally connected layer: channel r computes <w_r^n, x_n>
            pooled = act if pooled is None else pooled * act  # global product pooling
        assert pooled is not None
        return pooled.sum(-1)  # sum over the R channels
