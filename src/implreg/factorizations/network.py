"""CP tensor factorization as a shallow non-linear network (paper Figure 2).

Razin, Maman & Cohen, "Implicit Regularization in Tensor Factorization"
(ICML 2021), Figure 2: the input is an index tuple ``(i_1, ..., i_N)`` encoded
as one-hot vectors ``x_n in R^{d_n}``.  The hidden layer is

(i) a locally connected linear operator with ``R`` channels, channel ``r``
    computing ``<w_r^1, x_1>, ..., <w_r^N, x_N>`` with the filters ``w_r^n``;
(ii) channel-wise global product pooling over the ``N`` modes;

and the ``R`` pooled activations are summed into the scalar output.  For a
one-hot input the output is entry ``(i_1, ..., i_N)`` of the end tensor
``sum_r w_r^1 (x) ... (x) w_r^N`` (paper eq. 3): the number of channels is
the number of components and the filters are the factors' columns.  For
general inputs the output is ``<W_e, x_1 (x) ... (x) x_N>``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from implreg.factorizations.cp import _check_dims, _check_float_dtype, _check_int, _factor_error

Tensor = torch.Tensor


class CPNetwork(nn.Module):
    """The network of paper Figure 2: one filter bank ``(d_n, R)`` per input mode.

    Parameters
    ----------
    dims : Sequence[int]
        Mode sizes ``d_1, ..., d_N`` (the number of values of each input variable).
    rank : int
        Number of channels ``R`` (the width; components of the factorization).
    dtype : torch.dtype, optional
        Dtype of the filters (default ``torch.float32``).

    Attributes
    ----------
    filters : torch.nn.ParameterList
        ``N`` parameters; ``filters[n]`` has shape ``(d_n, R)`` and its column
        ``r`` is the filter ``w_r^n`` of Figure 2.  They start at zero: load
        values with :meth:`from_factors` or by copying into them.
    dims : list[int]
        The mode sizes.
    rank : int
        The number of channels.

    Raises
    ------
    TypeError
        If a mode size or the rank is not an integer, or ``dtype`` is not floating.
    ValueError
        If ``dims`` is empty or a mode size or the rank is not positive.

    Notes
    -----
    The output for index tuple ``I`` equals ``cp_values(self.to_factors(), I)``,
    and gradients through the network equal those of the CP objective
    (``tests/test_network.py``).
    """

    def __init__(
        self, dims: Sequence[int], rank: int, *, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        dims = _check_dims("dims", dims)
        rank = _check_int("rank", rank, minimum=1)
        _check_float_dtype("dtype", dtype)
        self.dims: list[int] = dims
        self.rank: int = rank
        self.filters = nn.ParameterList(
            [nn.Parameter(torch.zeros(d, self.rank, dtype=dtype)) for d in dims]
        )

    @classmethod
    def from_factors(cls, factors: Sequence[Tensor]) -> CPNetwork:
        """Network whose filters are copies of an implreg CP factorization.

        Parameters
        ----------
        factors : Sequence[Tensor]
            implreg factors, one per mode, of shape ``(B, d_n, R)`` with ``B == 1``
            (see :mod:`implreg.factorizations.cp`).  The batch-0 slices are copied;
            the network shares no memory with ``factors``.

        Returns
        -------
        CPNetwork
            A network with ``filters[n] == factors[n][0]`` and the factors' dtype.

        Raises
        ------
        TypeError
            If ``factors`` is not a sequence of floating-point tensors of one dtype.
        ValueError
            If ``factors`` is empty, a factor is not 3-D, ``B != 1``, or the ranks differ.
        """
        err = _factor_error("factors", factors, None, None)
        if err is not None:
            raise err
        rank = factors[0].shape[-1]
        if any(f.dim() != 3 or f.shape[0] != 1 or f.shape[2] != rank for f in factors):
            raise ValueError(
                "from_factors takes factors of shape (1, d_n, R) with a common R, got "
                f"{[tuple(f.shape) for f in factors]}"
            )
        net = cls([f.shape[1] for f in factors], rank, dtype=factors[0].dtype)
        with torch.no_grad():
            for p, f in zip(net.filters, factors):
                p.copy_(f[0])
        return net

    def to_factors(self) -> list[Tensor]:
        """The filters as an implreg CP factorization.

        Returns
        -------
        list[Tensor]
            ``N`` detached copies of shape ``(1, d_n, R)``: changing them does not
            change the network.
        """
        return [p.detach().clone().unsqueeze(0) for p in self.filters]

    def one_hot(self, idx: Tensor) -> list[Tensor]:
        """One-hot encoding of index tuples, the input encoding of Figure 2.

        Parameters
        ----------
        idx : Tensor
            Integer tensor of shape ``(batch, N)``; ``idx[:, n]`` in ``[0, d_n)``.

        Returns
        -------
        list[Tensor]
            ``N`` tensors of shape ``(batch, d_n)`` in the filters' dtype.

        Raises
        ------
        TypeError
            If ``idx`` is not an integer tensor.
        ValueError
            If ``idx`` does not have shape ``(batch, N)`` or an index is out of range.
        """
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise TypeError(f"index input must be an integer tensor, got {idx.dtype}")
        if idx.dim() != 2 or idx.shape[1] != len(self.dims):
            raise ValueError(
                f"index input must have shape (batch, {len(self.dims)}), got {tuple(idx.shape)}"
            )
        idx = idx.long()
        bound = torch.tensor(self.dims, dtype=torch.long, device=idx.device)
        if idx.numel() and bool(((idx < 0) | (idx >= bound)).any()):
            raise ValueError(f"indices out of range for mode sizes {self.dims}")
        dtype = self.filters[0].dtype
        return [nn.functional.one_hot(idx[:, n], d).to(dtype) for n, d in enumerate(self.dims)]

    def forward(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        """Network output of paper Figure 2.

        Parameters
        ----------
        x : Tensor or Sequence[Tensor]
            Either an integer tensor of index tuples, shape ``(batch, N)``, which is
            one-hot encoded with :func:`torch.nn.functional.one_hot`; or ``N``
            input vectors of shapes ``(batch, d_n)`` (one-hot in the paper, but any
            real vectors are accepted).

        Returns
        -------
        Tensor
            Shape ``(batch,)``: ``sum_r prod_n <w_r^n, x_n>``, which for one-hot
            inputs is the end tensor's entry at the encoded tuple.

        Raises
        ------
        TypeError
            If a single tensor given as ``x`` is not an integer tensor.
        ValueError
            If the number of inputs or their shapes do not match ``dims``.
        """
        xs = self.one_hot(x) if isinstance(x, Tensor) else list(x)
        if len(xs) != len(self.dims):
            raise ValueError(f"expected {len(self.dims)} inputs (one per mode), got {len(xs)}")
        batch = xs[0].shape[0] if xs[0].dim() == 2 else -1
        for n, (xn, d) in enumerate(zip(xs, self.dims)):
            if xn.dim() != 2 or xn.shape != (batch, d):
                raise ValueError(
                    f"input {n} must have shape (batch, {d}) with a common batch, "
                    f"got {tuple(xn.shape)}"
                )
        pooled: Tensor | None = None
        for xn, w in zip(xs, self.filters):
            act = xn.to(w.dtype) @ w  # (i) locally connected layer: channel r gives <w_r^n, x_n>
            pooled = act if pooled is None else pooled * act  # (ii) global product pooling
        assert pooled is not None
        return pooled.sum(-1)  # sum over the R channels

    def extra_repr(self) -> str:
        return f"dims={self.dims}, rank={self.rank}"
