"""Conformance of every registered loss engine (scikit-learn ``check_estimator`` style).

Every example in :data:`implreg.factorizations.conformance.ENGINE_EXAMPLES` is
checked, on random shapes and seeds, against the definitions it carries:

* predictions equal ``observe(end_tensor(params))``;
* the loss is the mean pointwise loss over the ``m`` observations,
  ``loss_b = 1/m sum_{i<m} l(pred_{b,i} - y_i)`` (repeated observations count
  once each; ``l(z) = z^2`` for L2, with no 1/2, and paper eq. (8) for Huber),
  and the analytic gradients equal autograd through ``end_tensor``;
* batch entries are independent (a sub-batch and a permuted batch give the
  corresponding rows), the dtype is kept and inputs are not modified.

Tolerances
----------
A float64 result computed in a different order than the reference differs by
at most ``gamma_n * S`` with ``gamma_n ~ n * 2^-53`` and ``S`` the sum of the
magnitudes of the terms.  End tensors are sums of products of parameter
entries, so with ``J`` the (linear) observation map the term scale of
prediction ``i`` is ``S_i = (|J| vec(end_tensor(|params|)))_i``; the gradient
scale is the derivative of ``sum_i w_i S_i`` at ``|params|`` with weights
``w_i = (|l'(z_i)| + 2 (S_i + |y_i|)) / m`` (the second term bounds the error
of ``l'(z_i)``: 2 bounds the Lipschitz constant of ``l'`` for both losses).
Problems here have at most ~10^3 operations per result, so ``gamma_n < 3e-13``
and ``RTOL64 = 1e-10`` leaves a wide margin without hiding real errors.
Float32 results are compared with the float64 results of the same (rounded)
problem at ``RTOL32 = 1e-4`` (about 1700 float32 unit roundoffs).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import implreg.factorizations
from implreg.factorizations.conformance import (
    ENGINE_EXAMPLES,
    EngineExample,
    register_example,
)
from implreg.losses import HuberLoss, L2Loss

RTOL64 = 1e-10
RTOL32 = 1e-4
LIP = 2.0  # Lipschitz constant of l' bound: 2 for L2, 1 for Huber

NAMES = sorted(ENGINE_EXAMPLES)
SEEDS = st.integers(0, 2**32 - 1)
BATCHES = st.integers(2, 4)
ENGINE_MODULES = ("implreg.factorizations.cp_engine", "implreg.factorizations.matrix")

by_name = pytest.mark.parametrize("name", NAMES)
by_loss = pytest.mark.parametrize("loss_kind", ["l2", "huber"])


# ---------------------------------------------------------------- helpers


def build(name: str, seed: int, batch: int, dtype: torch.dtype = torch.float64) -> EngineExample:
    """The registered example, checked to be well formed."""
    ex = ENGINE_EXAMPLES[name](
        generator=torch.Generator().manual_seed(seed), dtype=dtype, batch=batch
    )
    assert isinstance(ex, EngineExample)
    assert ex.batch == batch >= 2
    assert len(ex.params) >= 1
    for p in ex.params:
        assert p.dtype == dtype and p.shape[0] == batch
    m = ex.y.shape[0]
    assert ex.y.shape == (m,) and ex.y.dtype == dtype
    assert ex.engine.m == m
    return ex


def run(ex: EngineExample, params, loss):
    pred = ex.engine.predict(params)
    val, grads = ex.engine.loss_and_grad(params, loss)
    return pred, val, list(grads)


def reference(ex: EngineExample, loss):
    """Predictions, loss and gradients by definition, with autograd (float64)."""
    leaves = [p.detach().clone().requires_grad_(True) for p in ex.params]
    pred = ex.observe(ex.end_tensor(leaves))
    val = loss.pointwise(pred - ex.y)[0].mean(-1)
    grads = torch.autograd.grad(val.sum(), leaves)
    return pred.detach(), val.detach(), [g.detach() for g in grads]


def term_scale(ex: EngineExample, params) -> torch.Tensor:
    """``S_{b,i}``: sum of the magnitudes of the terms of prediction ``i`` (``(B, m)``)."""
    end = ex.end_tensor([p.abs() for p in params])
    batch, dims = end.shape[0], end.shape[1:]
    size = end[0].numel()
    basis = torch.eye(size, dtype=end.dtype).reshape(size, *dims)
    jac_t = ex.observe(basis)  # (P, m): observe is linear, row j is J[:, j]
    return end.reshape(batch, size) @ jac_t.abs()


def scales(ex: EngineExample, loss):
    """Term scales of the predictions ``(B, m)``, the loss values ``(B,)`` and the gradients."""
    pred = ex.observe(ex.end_tensor(ex.params))
    z = pred - ex.y
    val, dval = loss.pointwise(z)
    s_pred = term_scale(ex, ex.params)
    s_loss = (dval.abs() * (s_pred + ex.y.abs()) + val.abs()).mean(-1)
    weights = (dval.abs() + LIP * (s_pred + ex.y.abs())) / ex.y.shape[0]
    absolute = [p.detach().abs().requires_grad_(True) for p in ex.params]
    s_grads = torch.autograd.grad((weights * term_scale(ex, absolute)).sum(), absolute)
    return s_pred, s_loss, list(s_grads)


def assert_close(actual, expected, scale, rtol, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = (actual.double() - expected.double()).abs()
    bound = rtol * scale.double()
    bad = err > bound
    if bad.any():
        ratio = float((err / bound.clamp_min(1e-300)).max())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} entries off by more than {rtol:g} x "
            f"term scale (worst {ratio:.3g} x the bound, max error {float(err.max()):.3g})"
        )


def assert_results_close(got, ref, scale, rtol, label):
    (pred, val, grads), (r_pred, r_val, r_grads), (s_pred, s_loss, s_grads) = got, ref, scale
    assert_close(pred, r_pred, s_pred, rtol, f"{label} predictions")
    assert_close(val, r_val, s_loss, rtol, f"{label} loss")
    assert len(grads) == len(r_grads)
    for n, (g, r, s) in enumerate(zip(grads, r_grads, s_grads)):
        assert_close(g, r, s, rtol, f"{label} gradient {n}")


def make_loss(kind: str, ex: EngineExample):
    """L2, or Huber with ``delta`` between two residual magnitudes: both branches are used."""
    if kind == "l2":
        return L2Loss()
    residuals = ex.observe(ex.end_tensor(ex.params)) - ex.y
    mags = residuals.abs().reshape(-1).sort().values  # B * m >= 2 magnitudes
    k = mags.numel() // 2
    loss = HuberLoss(float(mags[k - 1] + mags[k]) / 2)
    quad = residuals.abs() < loss.delta
    assert quad.any() and (~quad).any(), "both branches of eq. (8) must be active"
    return loss


def slice_batch(results, rows):
    pred, val, grads = results
    return pred[rows], val[rows], [g[rows] for g in grads]


# ---------------------------------------------------------------- the registry


def engine_classes() -> dict[str, type]:
    """Engine classes (``predict`` and ``loss_and_grad``, concrete, public) of the package."""
    names = set(ENGINE_MODULES)
    for info in pkgutil.iter_modules(implreg.factorizations.__path__):
        names.add(f"implreg.factorizations.{info.name}")  # new engine modules too
    found = {}
    for module_name in sorted(names):
        module = importlib.import_module(module_name)
        for cls_name, cls in vars(module).items():
            if (
                inspect.isclass(cls)
                and cls.__module__ == module_name
                and not cls_name.startswith("_")
                and not inspect.isabstract(cls)
                and not getattr(cls, "_is_protocol", False)  # e.g. conformance.Engine
                and callable(getattr(cls, "predict", None))
                and callable(getattr(cls, "loss_and_grad", None))
            ):
                found[f"{module_name}.{cls_name}"] = cls
    return found


def test_every_engine_class_has_a_registered_example():
    classes = engine_classes()
    expected = {
        "implreg.factorizations.cp_engine." + n
        for n in ("DenseCompletion", "GatherCompletion", "DenseSensing", "RankOneSensing")
    } | {"implreg.factorizations.matrix." + n for n in ("MatrixCompletion", "MatrixSensing")}
    assert expected <= set(classes), "the engine scan missed a known engine"
    covered = set()
    for name in NAMES:
        covered.add(type(build(name, seed=0, batch=2).engine))  # exact type: no subclass credit
    missing = sorted(q for q, cls in classes.items() if cls not in covered)
    assert not missing, (
        f"engines without a conformance example: {missing}; register one with "
        "implreg.factorizations.conformance.register_example"
    )


@by_name
def test_factory_signature(name):
    params = inspect.signature(ENGINE_EXAMPLES[name]).parameters
    for arg in ("generator", "dtype", "batch"):
        assert arg in params and params[arg].kind is inspect.Parameter.KEYWORD_ONLY, arg
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())


def test_register_example_rejects_a_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        register_example(NAMES[0])(lambda **kwargs: None)
    assert sorted(ENGINE_EXAMPLES) == NAMES


# ---------------------------------------------------------------- conformance


@by_name
@given(seed=SEEDS, batch=BATCHES)
def test_predictions_match_the_definition(name, seed, batch):
    ex = build(name, seed, batch)
    pred = ex.engine.predict(ex.params)
    expected = ex.observe(ex.end_tensor(ex.params))
    assert pred.shape == (batch, ex.y.shape[0])
    assert_close(pred, expected, term_scale(ex, ex.params), RTOL64, f"{name} {ex.info}")


@by_name
@by_loss
@given(seed=SEEDS, batch=BATCHES)
def test_loss_and_gradients_match_autograd(name, loss_kind, seed, batch):
    ex = build(name, seed, batch)
    loss = make_loss(loss_kind, ex)
    val, grads = ex.engine.loss_and_grad(ex.params, loss)
    r_pred, r_val, r_grads = reference(ex, loss)
    s_pred, s_loss, s_grads = scales(ex, loss)
    label = f"{name} {loss_kind} {ex.info}"
    assert val.shape == (batch,)
    assert_close(val, r_val, s_loss, RTOL64, f"{label} loss")
    assert len(grads) == len(ex.params)
    for n, (g, r, s, p) in enumerate(zip(grads, r_grads, s_grads, ex.params)):
        assert g.shape == p.shape
        assert_close(g, r, s, RTOL64, f"{label} gradient {n}")


@by_name
@by_loss
@given(seed=SEEDS, batch=BATCHES)
def test_batch_entries_are_independent(name, loss_kind, seed, batch):
    ex = build(name, seed, batch)
    loss = make_loss(loss_kind, ex)
    full = run(ex, ex.params, loss)
    scale = scales(ex, loss)
    for b in range(batch):
        one = run(ex, [p[b : b + 1] for p in ex.params], loss)
        rows = slice(b, b + 1)
        assert_results_close(
            one, slice_batch(full, rows), slice_batch(scale, rows), RTOL64, f"{name} entry {b}"
        )
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    if torch.equal(perm, torch.arange(batch)):
        perm = perm.flip(0)
    permuted = run(ex, [p[perm] for p in ex.params], loss)
    assert_results_close(
        permuted, slice_batch(full, perm), slice_batch(scale, perm), RTOL64, f"{name} permuted"
    )


@by_name
@by_loss
@given(seed=SEEDS, batch=BATCHES)
def test_dtype_is_kept(name, loss_kind, seed, batch):
    ex64 = build(name, seed, batch)
    loss = make_loss(loss_kind, ex64)  # the same delta in both dtypes
    results = {}
    for dtype in (torch.float32, torch.float64):
        ex = build(name, seed, batch, dtype)
        pred, val, grads = results[dtype] = run(ex, ex.params, loss)
        assert pred.dtype == dtype and pred.shape == (batch, ex.y.shape[0])
        assert val.dtype == dtype and val.shape == (batch,)
        assert len(grads) == len(ex.params)
        for g, p in zip(grads, ex.params):
            assert g.dtype == dtype and g.shape == p.shape
    # the float32 problem is the float64 one rounded: the results agree to float32 accuracy
    assert_results_close(
        results[torch.float32],
        results[torch.float64],
        scales(ex64, loss),
        RTOL32,
        f"{name} {loss_kind} float32 vs float64 {ex64.info}",
    )


def _tensors(obj):
    """Tensor attributes of an engine (also inside lists and tuples), by name."""
    out = {}
    for key, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, (list, tuple)):
            for j, v in enumerate(value):
                if isinstance(v, torch.Tensor):
                    out[f"{key}[{j}]"] = v
    return out


@by_name
@given(seed=SEEDS, batch=BATCHES)
def test_inputs_are_not_modified(name, seed, batch):
    ex = build(name, seed, batch)
    loss = make_loss("huber", ex)
    params_before = [p.clone() for p in ex.params]
    y_before = ex.y.clone()
    state_before = {k: v.clone() for k, v in _tensors(ex.engine).items()}
    first = run(ex, ex.params, loss)
    for p, before in zip(ex.params, params_before):
        assert torch.equal(p, before), "params modified"
    assert torch.equal(ex.y, y_before), "targets modified"
    state_after = _tensors(ex.engine)
    assert state_after.keys() == state_before.keys()
    for key, before in state_before.items():
        assert torch.equal(state_after[key], before), f"engine state {key} modified"
    # gradients are fresh tensors, not views of the parameters
    for g in first[2]:
        for p in ex.params:
            assert g.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
    # no hidden state: a second call gives the same results, bit for bit
    second = run(ex, ex.params, loss)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2]))
