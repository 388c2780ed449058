"""Convolutional networks and the locality-countering regularizer of Razin et al. (ICML 2022).

Razin, Maman & Cohen, "Implicit Regularization in Hierarchical Tensor Factorization
and Deep Convolutional Neural Networks", ICML 2022, Section 6 (and the authors' 2022
blog post "Implicit regularization in hierarchical tensor factorization and deep
convolutional networks"): the implicit bias of gradient descent towards low
hierarchical tensor rank translates to a bias of convolutional networks towards
locality; an explicit penalty on the input gradient counters it.

:mod:`implreg.cnn.models` holds the networks (a ResNet18 topology and a small plain
CNN, in plain PyTorch); :mod:`implreg.cnn.regularizer` the penalty, the regularized
loss and the patch samplers of the two published tasks; :mod:`implreg.cnn.batchnorm`
and :mod:`implreg.cnn.conv` the layers' closed-form double backwards the penalty uses.
"""

from __future__ import annotations

from implreg.cnn.models import ResNet18, SmallCNN, build_model, count_parameters
from implreg.cnn.regularizer import (
    Patch,
    check_patch,
    input_gradients,
    locality_penalty,
    regularized_loss,
    sample_is_same_patches,
    sample_pathfinder_patches,
    shift_patch,
)

__all__ = [
    "Patch",
    "ResNet18",
    "SmallCNN",
    "build_model",
    "check_patch",
    "count_parameters",
    "input_gradients",
    "locality_penalty",
    "regularized_loss",
    "sample_is_same_patches",
    "sample_pathfinder_patches",
    "shift_patch",
]
