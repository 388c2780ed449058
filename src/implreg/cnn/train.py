"""Training a one-logit classifier with the locality regularizer, epoch by epoch, resumable.

The recipe of Razin, Maman & Cohen (ICML 2022, Section 6; the 2022 blog post on
hierarchical tensor rank): SGD with momentum, binary cross-entropy on one logit,
mini-batches, the test accuracy after every epoch, and the published stop rule
("stop 20 epochs after the train accuracy reaches 100%", up to a cap of epochs).
With ``lam > 0`` every step adds ``lam`` times the input-gradient penalty of
:func:`implreg.cnn.regularizer.regularized_loss` on one (I, J) patch pair per batch.

Determinism: the batch order and the patch pairs of epoch ``e`` come from
``numpy.random.default_rng([seed, e, k])`` and the initial weights from
``torch.manual_seed(seed)`` inside a forked RNG, so a run resumed from its
per-epoch checkpoint takes exactly the steps of one never interrupted (on the
same machine and thread count).  The train accuracy of the stop rule is the
running accuracy over the epoch's batches in train mode, as the published
trainer measured it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from implreg.cnn.regularizer import Patch, locality_penalty, regularized_loss
from implreg.config import ConfigError
from implreg.runs import atomic_path

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainSpec:
    """Settings of one training run (the published recipe is the default)."""

    epochs: int = 150
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    lam: float = 0.0
    eps: float = 1e-8
    patience: int = 20  # epochs trained after the train accuracy first reaches 100%
    seed: int = 0


@dataclass
class Splits:
    """Train and test images (uint8 or float, ``(n, C, H, W)``), 0/1 labels, and the
    per-channel normalization (the training mean and std) applied to every batch."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def build(cls, x_train, y_train, x_test, y_test) -> Splits:
        scale = 255.0 if x_train.dtype == np.uint8 else 1.0
        s1 = np.zeros(x_train.shape[1])
        s2 = np.zeros(x_train.shape[1])
        for s in range(0, len(x_train), 512):  # in chunks: no float copy of the whole set
            xs = x_train[s : s + 512].astype(np.float64) / scale
            s1 += xs.sum(axis=(0, 2, 3))
            s2 += (xs**2).sum(axis=(0, 2, 3))
        count = max(x_train.shape[0] * x_train.shape[2] * x_train.shape[3], 1)
        mean = s1 / count
        std = np.sqrt(np.maximum(s2 / count - mean**2, 0.0))
        std = np.where(std > 0, std, 1.0)
        return cls(x_train, y_train, x_test, y_test, mean, std)

    def batch(self, x: np.ndarray, idx: np.ndarray, device: torch.device) -> torch.Tensor:
        scale = 255.0 if x.dtype == np.uint8 else 1.0
        t = torch.from_numpy(np.ascontiguousarray(x[idx])).to(device=device, dtype=torch.float32)
        mean = torch.as_tensor(self.mean * scale, dtype=torch.float32, device=device)
        std = torch.as_tensor(self.std * scale, dtype=torch.float32, device=device)
        return (t - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


PatchSampler = Callable[[np.random.Generator], tuple[Patch, Patch]]


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, stream])


@torch.no_grad()
def accuracy(model: torch.nn.Module, splits: Splits, x, y, device, batch: int = 256) -> float:
    """Test-mode accuracy of ``logit > 0`` against 0/1 labels."""
    model.eval()
    correct = 0
    for s in range(0, len(y), batch):
        idx = np.arange(s, min(s + batch, len(y)))
        logits = model(splits.batch(x, idx, device)).reshape(-1)
        correct += int(((logits > 0).cpu().numpy() == (y[idx] > 0)).sum())
    return correct / max(len(y), 1)


def probe_penalty(model, splits: Splits, patches: PatchSampler, spec: TrainSpec, device) -> float:
    """The penalty on the first 64 test images with a fixed patch pair (eval mode): how
    non-local the network's input gradients are, recorded for every lambda (diagnostic)."""
    model.eval()
    n = min(64, len(splits.y_test))
    if n < 2:
        return float("nan")
    x = splits.batch(splits.x_test, np.arange(n), device)
    pi, pj = patches(_rng(spec.seed, 0, 2))  # one fixed pair for every epoch
    with torch.enable_grad():
        value = locality_penalty(model, x, pi, pj, eps=spec.eps)
    return float(value.detach())


def train(
    model: torch.nn.Module,
    splits: Splits,
    spec: TrainSpec,
    patches: PatchSampler,
    *,
    device: str | torch.device = "cpu",
    checkpoint: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[int, dict], None] | None = None,
) -> dict | None:
    """Train ``model`` (already initialized) on ``splits``; the history and the outcome.

    ``checkpoint``: a file written (atomically, durably) after every epoch and read
    on start, so an interrupted run (even kill -9) loses at most one epoch.
    Returns ``None`` when ``should_stop()`` became true (after checkpointing).
    """
    device = torch.device(device)
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum)
    history: dict[str, list] = {
        k: []
        for k in (
            "train_loss",
            "train_bce",
            "train_penalty",
            "train_acc",
            "test_acc",
            "probe_penalty",
            "seconds",
        )
    }
    epoch, perfect_at, reason = 0, None, ""
    spec_map = dataclasses.asdict(spec)
    if checkpoint is not None and Path(checkpoint).exists():
        try:
            state = torch.load(checkpoint, map_location=device, weights_only=False)
        except Exception as exc:  # a damaged file: name it, do not guess
            raise ConfigError(
                f"{checkpoint} cannot be read ({type(exc).__name__}); delete it to restart the unit"
            ) from None
        if state.get("spec") != spec_map:
            raise ConfigError(
                f"{checkpoint} was written with other training settings; delete it to restart"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, epoch, perfect_at = state["history"], state["epoch"], state["perfect_at"]
    n = len(splits.y_train)
    y_all = torch.from_numpy(splits.y_train.astype(np.float32))
    while epoch < spec.epochs:
        if perfect_at is not None and epoch >= perfect_at + spec.patience:
            reason = "perfect_train_accuracy"
            break
        start = time.perf_counter()
        model.train()
        order = _rng(spec.seed, epoch, 0).permutation(n)
        prng = _rng(spec.seed, epoch, 1)
        sums = np.zeros(3)
        correct = 0
        for s in range(0, n, spec.batch_size):
            if should_stop is not None and should_stop():
                return None
            idx = order[s : s + spec.batch_size]
            x = splits.batch(splits.x_train, idx, device)
            y = y_all[idx].to(device)
            pi, pj = patches(prng) if spec.lam > 0 and len(idx) > 1 else (None, None)
            lam = spec.lam if pi is not None else 0.0
            loss, bce, pen, logits = regularized_loss(model, x, y, lam, pi, pj, eps=spec.eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            k = len(idx)
            pen_value = 0.0 if pen is None else float(pen.detach())
            sums += k * np.array([float(loss.detach()), float(bce.detach()), pen_value])
            correct += int(((logits.detach().reshape(-1) > 0) == (y > 0)).sum())
        if not all(math.isfinite(v) for v in sums):
            reason = "non_finite"
            epoch += 1
            break
        train_acc = correct / n
        test_acc = accuracy(model, splits, splits.x_test, splits.y_test, device)
        probe = probe_penalty(model, splits, patches, spec, device)
        for key, value in zip(("train_loss", "train_bce", "train_penalty"), sums / n, strict=True):
            history[key].append(float(value))
        history["train_acc"].append(train_acc)
        history["test_acc"].append(test_acc)
        history["probe_penalty"].append(probe)
        history["seconds"].append(time.perf_counter() - start)
        epoch += 1
        if perfect_at is None and train_acc >= 1.0:
            perfect_at = epoch
        if checkpoint is not None:
            state = {
                "spec": spec_map,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "history": history,
                "epoch": epoch,
                "perfect_at": perfect_at,
            }
            with atomic_path(Path(checkpoint), durable=True) as tmp:
                torch.save(state, tmp)
        if progress is not None:
            progress(epoch, {k: v[-1] for k, v in history.items()})
    if not reason:
        reason = (
            "perfect_train_accuracy"
            if perfect_at is not None and epoch >= perfect_at + spec.patience
            else "max_epochs"
        )
    acc = history["test_acc"]
    return {
        "epochs_run": epoch,
        "stop_reason": reason,
        "perfect_train_at_epoch": perfect_at,
        "final_test_acc": acc[-1] if acc else float("nan"),
        "best_test_acc": max(acc) if acc else float("nan"),
        "final_train_acc": history["train_acc"][-1] if acc else float("nan"),
        "seconds": float(sum(history["seconds"])),
        "history": history,
    }


def init_model(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """``build()`` under ``torch.manual_seed(seed)`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
