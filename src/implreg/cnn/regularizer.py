"""The input-gradient regularizer that counters locality in convolutional networks.

Razin, Maman & Cohen, "Implicit Regularization in Hierarchical Tensor Factorization
and Deep Convolutional Neural Networks", ICML 2022, Section 6 (summarized in the
authors' 2022 blog post "Implicit regularization in hierarchical tensor factorization
and deep convolutional networks", section "Countering locality in convolutional
networks via explicit regularization"): gradient descent implicitly lowers
hierarchical tensor rank, i.e. the strength of long-range dependencies a network
models; an explicit penalty promotes the dependence between a patch ``I`` and a
distant patch ``J`` of the input.

The penalty, for a batch ``x`` of ``B`` images and one pair of patches ``(I, J)``:

* ``g(x) = d (sum of logits) / d x`` (double backpropagation, ``create_graph``);
* ``x'`` is ``x`` with patch ``J`` of sample ``b`` replaced by patch ``J`` of sample
  ``(b + 1) mod B`` (all channels);
* ``g_I(x)`` is ``g(x)`` restricted to patch ``I`` (all channels), flattened and
  divided by its L2 norm plus ``eps``;
* ``penalty = mean_b |<g_I(x)_b, g_I(x')_b>|``.

A small penalty means the gradient on ``I`` changes direction when ``J`` changes: the
output depends jointly on ``I`` and ``J``.  The training loss is ``BCE + lam * penalty``
with one ``(I, J)`` pair per batch: Is-Same-Class takes ``I`` as one of the two image
locations and ``J`` the other (``lam`` in {0, 0.1, 1}); Pathfinder takes uniform
2 x 2 patches ``I`` and ``J`` that do not overlap (``lam`` in {0, 3, 9}).

BatchNorm in train mode: the batched input gradient ``g(x)_b`` is the gradient of
the *sum* of all logits, and batch statistics make every logit depend on every sample,
so ``g(x)_b`` also carries the other samples' logits.  This coupling is what the
published implementation computes (one batched double backward per pass), and what
this module computes.  Each of the two forward passes (``x`` and ``x'``) also updates
the BatchNorm running statistics.  In eval mode (or without BatchNorm) ``g(x)_b`` is
exactly the per-sample gradient.

The passes run inside :func:`implreg.cnn.batchnorm.double_backward`, so the networks'
:class:`~implreg.cnn.batchnorm.BatchNorm2d` and :class:`~implreg.cnn.conv.Conv2d` layers
differentiate twice by closed forms (equal to PyTorch's to rounding; together 1.2-1.6x
faster regularized steps, ``bench/bench_locality_step.py``), and the detached copy of the
batch the input gradient is taken at gets no gradient from the training loss's backward
(:func:`implreg.cnn.conv.private_input`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from implreg.cnn.batchnorm import double_backward
from implreg.cnn.conv import private_input
from implreg.config import ConfigError

__all__ = [
    "Patch",
    "check_patch",
    "input_gradients",
    "locality_penalty",
    "regularized_loss",
    "sample_is_same_patches",
    "sample_pathfinder_patches",
    "shift_patch",
]

Tensor = torch.Tensor


@dataclass(frozen=True)
class Patch:
    """A rectangle of pixels: rows ``top .. top+height-1``, columns ``left .. left+width-1``."""

    top: int
    left: int
    height: int
    width: int

    def slices(self) -> tuple[slice, slice]:
        """(row slice, column slice), for indexing the last two axes of an image batch."""
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    def overlaps(self, other: Patch) -> bool:
        """Whether the two rectangles share at least one pixel."""
        return (
            self.top < other.top + other.height
            and other.top < self.top + self.height
            and self.left < other.left + other.width
            and other.left < self.left + self.width
        )


def check_patch(patch: Patch, height: int, width: int, name: str = "patch") -> Patch:
    """``patch`` itself if it is a non-empty rectangle inside a ``height x width`` image.

    Raises :class:`~implreg.config.ConfigError` (one sentence naming ``name``) otherwise.
    """
    if not isinstance(patch, Patch):
        raise ConfigError(f"{name} must be a Patch, got {type(patch).__name__}")
    fields = (patch.top, patch.left, patch.height, patch.width)
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in fields):
        raise ConfigError(f"{name} must have integer coordinates, got {patch}")
    if patch.height < 1 or patch.width < 1:
        raise ConfigError(f"{name} must be non-empty, got {patch}")
    if (
        patch.top < 0
        or patch.left < 0
        or patch.top + patch.height > height
        or patch.left + patch.width > width
    ):
        raise ConfigError(f"{name} {patch} does not lie inside the {height} x {width} image")
    return patch


def _check_batch(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ConfigError(f"{name} must be a (batch, channels, height, width) tensor, got {shape}")


def _logits_and_input_grad(
    model: nn.Module, x: Tensor, create_graph: bool = True
) -> tuple[Tensor, Tensor]:
    """``model(x)`` and ``d (sum of logits) / d x`` from the same forward pass.

    Grad mode is switched on for the pass, so this also works under ``torch.no_grad()``.
    """
    xr = x.detach().requires_grad_(True)
    with torch.enable_grad(), double_backward(), private_input(xr):
        logits = model(xr)
        (g,) = torch.autograd.grad(logits.sum(), xr, create_graph=create_graph)
    return logits, g


def input_gradients(model: nn.Module, x: Tensor, create_graph: bool = True) -> Tensor:
    """``g(x) = d (sum of logits) / d x``, the shape of ``x`` (Razin et al., ICML 2022, Sec. 6).

    With ``create_graph`` (the default) ``g`` is differentiable with respect to the
    model parameters (double backpropagation).  With BatchNorm in train mode ``g`` couples
    the samples through the batch statistics, as in the published implementation; in
    eval mode row ``b`` is the gradient of logit ``b`` alone.
    """
    _check_batch(x)
    return _logits_and_input_grad(model, x, create_graph)[1]


def shift_patch(x: Tensor, patch: Patch) -> Tensor:
    """A copy of ``x`` whose ``patch`` of sample ``b`` is that of sample ``(b + 1) mod B``.

    All channels of the patch move; everything else is copied unchanged and ``x`` is not
    modified.  This is the ``x'`` of the locality penalty (Razin et al., ICML 2022, Sec. 6).
    """
    _check_batch(x)
    check_patch(patch, x.shape[-2], x.shape[-1], "patch")
    rows, cols = patch.slices()
    out = x.detach().clone()
    out[:, :, rows, cols] = torch.roll(x.detach()[:, :, rows, cols], shifts=-1, dims=0)
    return out


def _unit_patch_grad(g: Tensor, patch: Patch, eps: float) -> Tensor:
    rows, cols = patch.slices()
    gi = g[:, :, rows, cols].flatten(1)
    return gi / (torch.linalg.vector_norm(gi, dim=1, keepdim=True) + eps)


def _penalty_from_grads(g: Tensor, g_shift: Tensor, patch_i: Patch, eps: float) -> Tensor:
    u, v = _unit_patch_grad(g, patch_i, eps), _unit_patch_grad(g_shift, patch_i, eps)
    return (u * v).sum(dim=1).abs().mean()


def _check_penalty_args(x: Tensor, patch_i, patch_j, eps) -> None:
    _check_batch(x)
    h, w = x.shape[-2], x.shape[-1]
    check_patch(patch_i, h, w, "patch_i")
    check_patch(patch_j, h, w, "patch_j")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ConfigError(f"eps must be a non-negative number, got {eps!r}")


def locality_penalty(
    model: nn.Module, x: Tensor, patch_i: Patch, patch_j: Patch, eps: float = 1e-8
) -> Tensor:
    """The locality-countering penalty of Razin et al. (ICML 2022, Section 6), a 0-dim tensor.

    ``mean_b |<g_I(x)_b, g_I(x')_b>|`` with ``g_I`` the input gradient of the summed
    logits restricted to ``patch_i`` (all channels), flattened and divided by its L2 norm
    plus ``eps``, and ``x'`` = :func:`shift_patch` ``(x, patch_j)``.  Two forward passes
    (``x``, ``x'``), each followed by a ``create_graph`` backward to the input, so the
    result is differentiable with respect to the model parameters.
    """
    _check_penalty_args(x, patch_i, patch_j, eps)
    _, g = _logits_and_input_grad(model, x)
    _, g_shift = _logits_and_input_grad(model, shift_patch(x, patch_j))
    return _penalty_from_grads(g, g_shift, patch_i, float(eps))


def regularized_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    lam: float,
    patch_i: Patch | None = None,
    patch_j: Patch | None = None,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, bce, penalty, logits)`` with ``loss = BCE-with-logits + lam * penalty``.

    The training objective of Razin et al. (ICML 2022, Section 6): ``y`` holds 0/1 labels
    (cast to the logits' dtype), ``bce`` is the mean binary cross-entropy of ``logits =
    model(x)`` and ``penalty`` is :func:`locality_penalty` for ``(patch_i, patch_j)``,
    computed from the same forward pass of ``x`` as the logits (plus one of ``x'``).

    ``lam == 0``: the penalty is not computed at all (no second pass, no input gradient),
    ``loss`` is ``bce`` itself, so the step is exactly the plain step; ``penalty`` is then
    a detached 0-dim zero tensor.  ``lam > 0`` needs both patches.  ``lam < 0`` (or a
    non-finite ``lam``) raises :class:`~implreg.config.ConfigError`.
    """
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ConfigError(f"lam must be a finite non-negative number, got {lam!r}")
    if lam < 0:
        raise ConfigError(f"lam must be non-negative, got {lam!r}")
    _check_batch(x)
    if lam == 0:
        logits = model(x)
        bce = F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))
        return bce, bce, torch.zeros((), dtype=logits.dtype, device=logits.device), logits
    if patch_i is None or patch_j is None:
        missing = "patch_i" if patch_i is None else "patch_j"
        raise ConfigError(f"{missing} must be given when lam > 0")
    _check_penalty_args(x, patch_i, patch_j, eps)
    logits, g = _logits_and_input_grad(model, x)
    _, g_shift = _logits_and_input_grad(model, shift_patch(x, patch_j))
    penalty = _penalty_from_grads(g, g_shift, patch_i, float(eps))
    bce = F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))
    return bce + lam * penalty, bce, penalty, logits


# ------------------------------------------------------------------------ patch samplers


def sample_is_same_patches(
    locations: Sequence[Patch], rng: np.random.Generator
) -> tuple[Patch, Patch]:
    """``(I, J)`` for Is-Same-Class: ``I`` one of the two locations at random, ``J`` the other.

    Razin et al. (ICML 2022, Section 6): the two 32 x 32 images sit at fixed places of
    the canvas; each batch draws which of them is ``I`` with probability 1/2.
    """
    locs = list(locations)
    if len(locs) != 2:
        raise ConfigError(f"locations must hold exactly two patches, got {len(locs)}")
    for k, p in enumerate(locs):
        if not isinstance(p, Patch):
            raise ConfigError(f"locations[{k}] must be a Patch, got {type(p).__name__}")
    first = int(rng.integers(2))
    return locs[first], locs[1 - first]


def sample_pathfinder_patches(
    height: int, width: int, rng: np.random.Generator, size: int = 2
) -> tuple[Patch, Patch]:
    """``(I, J)`` for Pathfinder: ``size x size`` patches, ``J`` not overlapping ``I``.

    Razin et al. (ICML 2022, Section 6): ``I`` is uniform over all ``size x size``
    positions of the image and ``J`` uniform over the positions that do not overlap
    ``I`` (drawn by rejection, so exactly uniform).  Every position of ``I`` must leave
    room for some ``J``, which holds exactly when ``min(height, width) >= size`` and
    ``max(height, width) >= 3 * size - 1``; smaller images raise
    :class:`~implreg.config.ConfigError`.
    """
    for v, name in ((height, "height"), (width, "width"), (size, "size")):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if min(height, width) < size or max(height, width) < 3 * size - 1:
        raise ConfigError(
            f"the {height} x {width} image is too small for two non-overlapping {size} x {size} "
            f"patches at every position (needs min side >= {size} and max side >= {3 * size - 1})"
        )
    n_rows, n_cols = height - size + 1, width - size + 1
    i = Patch(int(rng.integers(n_rows)), int(rng.integers(n_cols)), size, size)
    while True:
        j = Patch(int(rng.integers(n_rows)), int(rng.integers(n_cols)), size, size)
        if not i.overlaps(j):
            return i, j
