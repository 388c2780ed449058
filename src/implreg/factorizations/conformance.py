"""Registry of small random problems for every loss engine (conformance testing).

An *engine* computes, for ``B`` independent factorizations at once (every
parameter tensor has the batch as its first axis):

* ``engine.predict(params) -> (B, m)``: the predictions at the ``m``
  observations (entries of the end tensor for completion, ``<X_i, W_e>`` for
  sensing);
* ``engine.loss_and_grad(params, loss) -> (values (B,), grads)``: the mean
  pointwise loss ``1/m sum_i l(pred_i - y_i)`` (see :mod:`implreg.losses`) and
  its analytic gradient with respect to every parameter;
* ``engine.m``: the number of observations.

Each registered example factory builds one random problem for one engine and
describes it *by definition* as well: ``end_tensor`` (the model's own
end-tensor function, for example :func:`~implreg.factorizations.cp.cp_to_tensor`)
and ``observe`` (what the engine must predict from an end tensor).  The
conformance tests (``tests/test_engine_conformance.py``) check every registered
engine against these definitions, with autograd for the gradients, so a new
engine is covered by registering an example here::

    @register_example("MyEngine")
    def _my_engine(*, generator, dtype=torch.float64, batch=None, size=None):
        ...
        return EngineExample(engine=..., params=..., end_tensor=..., observe=..., y=...)

Factory contract
----------------
* Keyword-only arguments: ``generator`` (all randomness comes from it),
  ``dtype`` (of the parameters, targets and measurements), ``batch`` (``B >= 2``;
  drawn in ``2..4`` when omitted) and the example's own shape parameters, each
  drawn from ``generator`` when omitted.
* Integers are drawn first and every tensor is drawn in float64 and then
  converted, so the same seed gives the same problem (rounded) in every dtype.
* ``observe`` must be linear and act batch-wise: it maps ``(K, *dims)`` to
  ``(K, m)`` for any ``K``.
* ``end_tensor`` must be a sum of products of parameter entries (true of CP,
  deep matrix and hierarchical tensor factorizations), so that evaluated at
  ``|params|`` it bounds the magnitude of the terms (used for tolerances).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from implreg.factorizations.cp import cp_to_tensor
from implreg.factorizations.cp_engine import (
    DenseCompletion,
    DenseSensing,
    GatherCompletion,
    RankOneSensing,
    SampledCompletion,
)
from implreg.factorizations.htf import ModeTree, htf_to_tensor
from implreg.factorizations.htf_engine import (
    DenseHTFCompletion,
    GatherHTFCompletion,
    RankOneHTFSensing,
)
from implreg.factorizations.matrix import (
    MatrixCompletion,
    MatrixSensing,
    layer_sizes,
    mf_product,
)
from implreg.losses import PointwiseLoss

Tensor = torch.Tensor

__all__ = [
    "ENGINE_EXAMPLES",
    "Engine",
    "EngineExample",
    "register_example",
]


class Engine(Protocol):
    """What every loss engine provides."""

    m: int

    def predict(self, params: Sequence[Tensor]) -> Tensor: ...

    def loss_and_grad(
        self, params: Sequence[Tensor], loss: PointwiseLoss
    ) -> tuple[Tensor, list[Tensor]]: ...


@dataclass(frozen=True)
class EngineExample:
    """One random problem for one engine, with its definition-level description.

    Attributes
    ----------
    engine : Engine
        The engine under test.
    params : list of Tensor
        Random batched parameters (first axis ``B >= 2``).
    end_tensor : callable
        ``params -> (B, *dims)``: the model's end tensor (or matrix) by its own
        definition function.
    observe : callable
        ``(K, *dims) -> (K, m)``: what the engine should predict from an end
        tensor (its observed entries, or ``<X_i, W>`` for sensing).  Linear.
    y : Tensor
        Targets ``(m,)``.
    info : dict
        The drawn shape parameters and engine options (for failure messages).
    """

    engine: Engine
    params: list[Tensor]
    end_tensor: Callable[[Sequence[Tensor]], Tensor]
    observe: Callable[[Tensor], Tensor]
    y: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.params[0].shape[0])


ExampleFactory = Callable[..., EngineExample]
ENGINE_EXAMPLES: dict[str, ExampleFactory] = {}

_F = TypeVar("_F", bound=ExampleFactory)


def register_example(name: str) -> Callable[[_F], _F]:
    """Decorator registering an example factory under ``name`` (unique)."""

    def decorate(factory: _F) -> _F:
        if name in ENGINE_EXAMPLES:
            raise ValueError(f"an engine example named {name!r} is already registered")
        ENGINE_EXAMPLES[name] = factory
        return factory

    return decorate


# ---------------------------------------------------------------- random helpers


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in ``[low, high]`` (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _choice(generator: torch.Generator, options: Sequence[Any]) -> Any:
    return options[_randint(generator, 0, len(options) - 1)]


def _normal(generator: torch.Generator, *shape: int, dtype: torch.dtype) -> Tensor:
    """Standard normal draw in float64, converted (same values, rounded, in every dtype)."""
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def _batch(generator: torch.Generator, batch: int | None) -> int:
    batch = _randint(generator, 2, 4) if batch is None else int(batch)
    if batch < 2:
        raise ValueError(f"conformance examples need a batch of at least 2, got {batch}")
    return batch


def _cp_shape(
    generator: torch.Generator,
    batch: int | None,
    dims: Sequence[int] | None,
    rank: int | None,
) -> tuple[int, list[int], int]:
    batch = _batch(generator, batch)
    if dims is None:
        dims = [_randint(generator, 1, 5) for _ in range(_randint(generator, 1, 4))]
    rank = _randint(generator, 1, 4) if rank is None else int(rank)
    return batch, [int(d) for d in dims], rank


def _cp_factors(
    generator: torch.Generator, batch: int, dims: Sequence[int], rank: int, dtype: torch.dtype
) -> list[Tensor]:
    return [_normal(generator, batch, d, rank, dtype=dtype) for d in dims]


def _num_obs(generator: torch.Generator, m: int | None, size: int) -> int:
    """``m`` drawn in ``1..min(40, 2 * size)``: with random entries, repeats do occur."""
    return _randint(generator, 1, min(40, 2 * size)) if m is None else int(m)


def _inner_products(measurements: Tensor) -> Callable[[Tensor], Tensor]:
    """``end -> (<X_i, end_k>)_{k, i}`` for measurement tensors ``(m, *dims)``, elementwise."""

    def observe(end: Tensor) -> Tensor:
        prods = end.unsqueeze(1) * measurements.unsqueeze(0)  # (K, m, *dims)
        return prods.flatten(2).sum(-1)

    return observe


def _entries(idx: Tensor) -> Callable[[Tensor], Tensor]:
    """``end -> end[k, idx_i]`` for index tuples ``idx`` ``(m, N)``, by advanced indexing."""

    def observe(end: Tensor) -> Tensor:
        return end[(slice(None), *idx.T)]

    return observe


# ---------------------------------------------------------------- CP engines


def _cp_completion(generator, dtype, batch, dims, rank, m):
    batch, dims, rank = _cp_shape(generator, batch, dims, rank)
    m = _num_obs(generator, m, math.prod(dims))
    idx = torch.stack([torch.randint(0, d, (m,), generator=generator) for d in dims], dim=1)
    params = _cp_factors(generator, batch, dims, rank, dtype)
    y = _normal(generator, m, dtype=dtype)
    info = {"batch": batch, "dims": dims, "rank": rank, "m": m}
    return params, idx, y, info


@register_example("DenseCompletion")
def dense_completion_example(
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    batch: int | None = None,
    dims: Sequence[int] | None = None,
    rank: int | None = None,
    m: int | None = None,
) -> EngineExample:
    """CP completion, dense ``T_1 T_2^T`` formulation; entries drawn with replacement."""
    params, idx, y, info = _cp_completion(generator, dtype, batch, dims, rank, m)
    engine = DenseCompletion(info["dims"], idx, y)
    return EngineExample(engine, params, cp_to_tensor, _entries(idx), y, info)


@register_example("SampledCompletion")
def sampled_completion_example(
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    batch: int | None = None,
    dims: Sequence[int] | None = None,
    rank: int | None = None,
    m: int | None = None,
) -> EngineExample:
    """CP completion by sampled products of the halves (order >= 2); entries with replacement."""
    if dims is None:  # the engine needs two modes or more
        dims = [_randint(generator, 1, 5) for _ in range(_randint(generator, 2, 4))]
    params, idx, y, info = _cp_completion(generator, dtype, batch, dims, rank, m)
    engine = SampledCompletion(info["dims"], idx, y)
    return EngineExample(engine, params, cp_to_tensor, _entries(idx), y, info)


@register_example("GatherCompletion")
def gather_completion_example(
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    batch: int | None = None,
    dims: Sequence[int] | None = None,
    rank: int | None = None,
    m: int | None = None,
    table_max: int | None = None,
    chunk: int | None = None,
) -> EngineExample:
    """CP completion by gathering; random mode grouping (``table_max``) and ``chunk``."""
    params, idx, y, info = _cp_completion(generator, dtype, batch, dims, rank, m)
    table_max = _choice(generator, [1, 2, 6, 36, 1024]) if table_max is None else table_max
    chunk = _choice(generator, [1, 3, 7, 4096]) if chunk is None else chunk
    engine = GatherCompletion(info["dims"], idx, y, table_max=table_max, chunk=chunk)
    info = {**info, "table_max": table_max, "chunk": chunk}
    return EngineExample(engine, params, cp_to_tensor, _entries(idx), y, info)


@register_example("DenseSensing")
def dense_sensing_example(
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    batch: int | None = None,
    dims: Sequence[int] | None = None,
    rank: int | None = None,
    m: int | None = None,
) -> EngineExample:
    """CP sensing with dense Gaussian measurement tensors."""
    batch, dims, rank = _cp_shape(generator, batch, dims, rank)
    m = _randint(generator, 1, 30) if m is None else int(m)
    x = _normal(generator, m, *dims, dtype=dtype)
    params = _cp_factors(generator, batch, dims, rank, dtype)
    y = _normal(generator, m, dtype=dtype)
    engine = DenseSensing(dims, x.reshape(m, -1), y)
    info = {"batch": batch, "dims": dims, "rank": rank, "m": m}
    return EngineExample(engine, params, cp_to_tensor, _inner_products(x), y, info)


@register_example("RankOneSensing")
def rank_one_sensing_example(
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    batch: int | None = None,
    dims: Sequence[int] | None = None,
    rank: int | None = None,
    m: int | None = None,
    chunk: int | None = None,
) -> EngineExample:
    """CP sensing with rank-one measurements ``X_i = x_i^1 (x) ... (x) x_i^N``; random chunk."""
    batch, dims, rank = _cp_shape(generator, batch, dims, rank)
    m = _randint(generator, 1, 30) if m is None else int(m)
    chunk = _choice(generator, [1, 4, 4096]) if chunk is None else chunk
    vectors = [_normal(generator, m, d, dtype=dtype) for d in dims]
    params = _cp_factors(generator, batch, dims, rank, dtype)
    y = _normal(generator, m, dtype=dtype)
    x = vectors[0]  # explicit measurement tensors (m, *dims), one outer product at a time
    for v in vectors[1:]:
        x = x.unsqueeze(-1) * v.reshape(m, *([1] * (x.dim() - 1)), -1)
    engine = RankOneSensing(vectors, y, chunk=chunk)
    info = {"batch": batch, "dims": dims, "rank": rank, "m": m, "chunk": chunk}
    return EngineExample(engine, params, cp_to_tensor, _inner_products(x), y, info)


# ---------------------------------------------------------------- deep matrix engines


def _mf_layers(generator, dtype, batch, shape, depth, widths):
    batch = _batch(generator, batch)
    if shape is None:
        shape = (_randint(generator, 1, 5), _randint(generator, 1, 5))
    depth = _randint(generator, 1, 4) if depth is None else int(depth)
    if widths is None:
        widths = [_randint(generator, 1, 5) for _ in range(depth - 1)]
    sizes = layer_sizes(shape, depth, widths)
    params = [_normal(generator, batch, sizes[j + 1], sizes[j], dtype=dtype) for j in range(depth)]
    info = {"batch": batch, "shape": tuple(shape), "depth": depth, "widths": list(widths)}
    return params, info


@register_example("MatrixCompletion")
def matrix_completion_example(
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    batch: int | None = None,
    shape: Sequence[int] | None = None,
    depth: int | None = None,
    widths: Sequence[int] | None = None,
    m: int | None = None,
) -> EngineExample:
    """Deep matrix completion; entries drawn with replacement."""
    params, info = _mf_layers(generator, dtype, batch, shape, depth, widths)
    n_rows, n_cols = info["shape"]
    m = _num_obs(generator, m, n_rows * n_cols)
    rows = torch.randint(0, n_rows, (m,), generator=generator)
    cols = torch.randint(0, n_cols, (m,), generator=generator)
    y = _normal(generator, m, dtype=dtype)
    engine = MatrixCompletion((n_rows, n_cols), rows, cols, y)
    idx = torch.stack([rows, cols], dim=1)
    return EngineExample(engine, params, mf_product, _entries(idx), y, {**info, "m": m})


@register_example("MatrixSensing")
def matrix_sensing_example(
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    batch: int | None = None,
    shape: Sequence[int] | None = None,
    depth: int | None = None,
    widths: Sequence[int] | None = None,
    m: int | None = None,
) -> EngineExample:
    """Deep matrix sensing with dense Gaussian measurement matrices."""
    params, info = _mf_layers(generator, dtype, batch, shape, depth, widths)
    n_rows, n_cols = info["shape"]
    m = _randint(generator, 1, 30) if m is None else int(m)
    a = _normal(generator, m, n_rows, n_cols, dtype=dtype)
    y = _normal(generator, m, dtype=dtype)
    engine = MatrixSensing((n_rows, n_cols), a.reshape(m, -1), y)
    return EngineExample(engine, params, mf_product, _inner_products(a), y, {**info, "m": m})


# ---------------------------------------------------------------- hierarchical tensor engines


def _random_nesting(generator: torch.Generator, modes: list[int]):
    """A random mode tree over ``modes``: groups of 2 or 3 members, split recursively."""
    if len(modes) == 1:
        return modes[0]
    k = min(len(modes), _choice(generator, [2, 2, 3]))
    cuts = sorted(torch.randperm(len(modes) - 1, generator=generator)[: k - 1].add(1).tolist())
    parts = [modes[a:b] for a, b in zip([0, *cuts], [*cuts, len(modes)])]
    return tuple(_random_nesting(generator, p) for p in parts)


def _htf_params(generator, dtype, batch, dims, tree):
    batch = _batch(generator, batch)
    if dims is None:
        dims = [_randint(generator, 1, 3) for _ in range(_randint(generator, 2, 4))]
    dims = [int(d) for d in dims]
    if tree is None:
        order = torch.randperm(len(dims), generator=generator).tolist()
        tree = ModeTree.from_nested(_random_nesting(generator, order))
    widths = {v: _randint(generator, 1, 3) for v in tree.internal}
    params = [_normal(generator, batch, *shape, dtype=dtype) for shape in tree.shapes(dims, widths)]
    info = {"batch": batch, "dims": dims, "tree": tree.describe(), "widths": widths}
    return params, dims, tree, info


def _htf_end(tree: ModeTree) -> Callable[[Sequence[Tensor]], Tensor]:
    return lambda params: htf_to_tensor(params, tree)


@register_example("DenseHTFCompletion")
def dense_htf_completion_example(
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    batch: int | None = None,
    dims: Sequence[int] | None = None,
    tree: ModeTree | None = None,
    m: int | None = None,
) -> EngineExample:
    """Hierarchical tensor completion over a random mode tree, end tensor built each step."""
    params, dims, tree, info = _htf_params(generator, dtype, batch, dims, tree)
    m = _num_obs(generator, m, math.prod(dims))
    idx = torch.stack([torch.randint(0, d, (m,), generator=generator) for d in dims], dim=1)
    y = _normal(generator, m, dtype=dtype)
    engine = DenseHTFCompletion(tree, dims, idx, y)
    return EngineExample(engine, params, _htf_end(tree), _entries(idx), y, {**info, "m": m})


@register_example("GatherHTFCompletion")
def gather_htf_completion_example(
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    batch: int | None = None,
    dims: Sequence[int] | None = None,
    tree: ModeTree | None = None,
    m: int | None = None,
    chunk: int | None = None,
) -> EngineExample:
    """Hierarchical tensor completion pushing chunks of observations up a random tree from
    dense tables of its small nodes (random ``table_max``)."""
    params, dims, tree, info = _htf_params(generator, dtype, batch, dims, tree)
    m = _num_obs(generator, m, math.prod(dims))
    chunk = _choice(generator, [1, 3, 7, 4096]) if chunk is None else chunk
    table_max = _choice(generator, [0, 2, 6, None, 10**9])  # leaves only ... every node
    idx = torch.stack([torch.randint(0, d, (m,), generator=generator) for d in dims], dim=1)
    y = _normal(generator, m, dtype=dtype)
    engine = GatherHTFCompletion(tree, dims, idx, y, chunk=chunk, table_max=table_max)
    info = {**info, "m": m, "chunk": chunk, "table_max": table_max}
    return EngineExample(engine, params, _htf_end(tree), _entries(idx), y, info)


def _htf_sensing(generator, dtype, batch, dims, tree, m, method):
    params, dims, tree, info = _htf_params(generator, dtype, batch, dims, tree)
    m = _randint(generator, 1, 30) if m is None else int(m)
    vectors = [_normal(generator, m, d, dtype=dtype) for d in dims]
    y = _normal(generator, m, dtype=dtype)
    x = vectors[0]
    for v in vectors[1:]:
        x = x.unsqueeze(-1) * v.reshape(m, *([1] * (x.dim() - 1)), -1)
    engine = RankOneHTFSensing(tree, dims, vectors, y, method=method)
    info = {**info, "m": m, "method": method}
    return EngineExample(engine, params, _htf_end(tree), _inner_products(x), y, info)


@register_example("DenseHTFSensing")
def dense_htf_sensing_example(
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    batch: int | None = None,
    dims: Sequence[int] | None = None,
    tree: ModeTree | None = None,
    m: int | None = None,
) -> EngineExample:
    """Hierarchical rank-one sensing through the end matrix and the vectors' halves."""
    return _htf_sensing(generator, dtype, batch, dims, tree, m, "dense")


@register_example("GatherHTFSensing")
def gather_htf_sensing_example(
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    batch: int | None = None,
    dims: Sequence[int] | None = None,
    tree: ModeTree | None = None,
    m: int | None = None,
) -> EngineExample:
    """Hierarchical rank-one sensing, each leaf seeing ``x_in^T W_n``."""
    return _htf_sensing(generator, dtype, batch, dims, tree, m, "gather")
