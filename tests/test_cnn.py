"""CNN models and the locality-countering penalty (Razin, Maman & Cohen, ICML 2022, Sec. 6)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from implreg.cnn import (
    Patch,
    ResNet18,
    SmallCNN,
    build_model,
    check_patch,
    count_parameters,
    input_gradients,
    locality_penalty,
    regularized_loss,
    sample_is_same_patches,
    sample_pathfinder_patches,
    shift_patch,
)
from implreg.config import ConfigError


def _one_sentence(exc: pytest.ExceptionInfo, word: str) -> None:
    msg = str(exc.value)
    assert word in msg
    assert ". " not in msg.rstrip(".") and "\n" not in msg


# ------------------------------------------------------------------------------ models


def resnet18_count(in_channels: int, width: int, outputs: int, stem: str) -> int:
    """Parameter count of the ResNet18 topology, by hand (convolutions, BatchNorm, head)."""
    k = 7 if stem == "imagenet" else 3
    total = k * k * in_channels * width + 2 * width  # stem conv + BN
    cin = width
    for i, mult in enumerate((1, 2, 4, 8)):
        c = width * mult
        # block 1: two 3x3 convs + two BNs (+ projection conv 1x1 + BN when shape changes)
        total += 9 * cin * c + 9 * c * c + 4 * c
        if i > 0 or cin != c:
            total += cin * c + 2 * c
        total += 2 * (9 * c * c) + 4 * c  # block 2
        cin = c
    return total + cin * outputs + outputs


def test_resnet18_imagenet_parameter_count():
    # torchvision's resnet18(): 11,689,512; the hand count agrees term by term.
    assert resnet18_count(3, 64, 1000, "imagenet") == 11_689_512
    model = ResNet18(in_channels=3, width=64, num_outputs=1000, stem="imagenet")
    assert count_parameters(model) == 11_689_512


@pytest.mark.parametrize("stem", ["small", "imagenet"])
@pytest.mark.parametrize("width,in_channels,outputs", [(4, 1, 1), (8, 3, 5), (5, 2, 1)])
def test_resnet18_shapes_and_count(stem, width, in_channels, outputs):
    model = ResNet18(in_channels, width, num_outputs=outputs, stem=stem)
    assert count_parameters(model) == resnet18_count(in_channels, width, outputs, stem)
    side = 32 if stem == "imagenet" else 12
    out = model(torch.randn(3, in_channels, side, side))
    assert out.shape == ((3,) if outputs == 1 else (3, outputs))
    if outputs == 1:  # batch of one keeps its batch axis
        assert model.eval()(torch.randn(1, in_channels, side, side)).shape == (1,)


def test_resnet18_imagenet_stem_downsamples():
    model = ResNet18(1, 4, stem="imagenet")
    assert model.stem(torch.randn(2, 1, 224, 224)).shape == (2, 4, 56, 56)
    assert ResNet18(1, 4).stem(torch.randn(2, 1, 32, 32)).shape == (2, 4, 32, 32)


@pytest.mark.parametrize(
    "width,depth,in_channels,outputs", [(8, 1, 1, 1), (6, 3, 3, 4), (32, 4, 1, 1)]
)
def test_small_cnn_shapes(width, depth, in_channels, outputs):
    model = SmallCNN(in_channels, width, depth, outputs)
    out = model(torch.randn(5, in_channels, 32, 32))
    assert out.shape == ((5,) if outputs == 1 else (5, outputs))
    expected = 9 * in_channels * width + 9 * width * width * (depth - 1)
    expected += 2 * width * depth + width * outputs + outputs
    assert count_parameters(model) == expected


def test_build_model_and_errors():
    assert isinstance(build_model("resnet18", 1, 4), ResNet18)
    assert build_model("resnet18", 1, 4, stem="imagenet").stem_kind == "imagenet"
    assert isinstance(build_model("cnn", 3, 8), SmallCNN)
    with pytest.raises(ConfigError) as exc:
        build_model("vgg", 1, 4)
    _one_sentence(exc, "name")
    with pytest.raises(ConfigError) as exc:
        build_model("resnet18", 1, 4, stem="big")
    _one_sentence(exc, "stem")
    for kwargs, word in (
        ({"width": 0}, "width"),
        ({"in_channels": 1.5}, "in_channels"),
        ({"num_outputs": True}, "num_outputs"),
    ):
        with pytest.raises(ConfigError) as exc:
            ResNet18(**kwargs)
        _one_sentence(exc, word)
    with pytest.raises(ConfigError) as exc:
        SmallCNN(depth=0)
    _one_sentence(exc, "depth")


# ------------------------------------------------------------------- penalty, reference


class TinyNet(nn.Module):
    """A BatchNorm-free net with smooth activations: conv, softplus, conv, tanh, linear."""

    def __init__(self, in_channels: int, height: int, width: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(in_channels, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(2 * height * width, 1)

    def forward(self, x):
        h = torch.tanh(self.conv2(F.softplus(self.conv1(x))))
        return self.fc(h.flatten(1)).squeeze(1)


def slow_penalty(model, x, patch_i: Patch, patch_j: Patch, eps: float = 1e-8) -> torch.Tensor:
    """Per sample: each gradient from that sample alone; x' built by explicit copying."""
    bsz = x.shape[0]
    ri, ci = patch_i.slices()
    rj, cj = patch_j.slices()
    terms = []
    for b in range(bsz):
        xs = x[b : b + 1].clone()
        xs_shift = xs.clone()
        xs_shift[0, :, rj, cj] = x[(b + 1) % bsz, :, rj, cj]
        units = []
        for inp in (xs, xs_shift):
            inp = inp.requires_grad_(True)
            (g,) = torch.autograd.grad(model(inp).sum(), inp, create_graph=True)
            v = g[0, :, ri, ci].reshape(-1)
            units.append(v / (v.norm() + eps))
        terms.append(torch.abs(torch.dot(units[0], units[1])))
    return torch.stack(terms).mean()


@st.composite
def penalty_cases(draw):
    bsz = draw(st.integers(1, 4))
    chans = draw(st.integers(1, 2))
    h, w = draw(st.integers(3, 8)), draw(st.integers(3, 8))

    def patch():
        ph, pw = draw(st.integers(1, h)), draw(st.integers(1, w))
        return Patch(draw(st.integers(0, h - ph)), draw(st.integers(0, w - pw)), ph, pw)

    return bsz, chans, h, w, patch(), patch(), draw(st.integers(0, 2**16))


@settings(max_examples=12)
@given(penalty_cases())
def test_penalty_matches_per_sample_reference(case):
    bsz, chans, h, w, pi, pj, seed = case
    x = torch.randn(bsz, chans, h, w, generator=torch.Generator().manual_seed(seed))
    x = x.double()
    tiny = TinyNet(chans, h, w, seed).double()  # no BatchNorm: samples do not couple
    cnn = SmallCNN(chans, width=4, depth=2).double()
    torch.manual_seed(seed)
    with torch.no_grad():  # non-trivial running statistics, then eval mode
        cnn(torch.randn(8, chans, h, w, dtype=torch.float64) * 2 + 1)
    cnn.eval()
    for model in (tiny, cnn):
        got = locality_penalty(model, x, pi, pj)
        want = slow_penalty(model, x, pi, pj)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert got.requires_grad


def test_input_gradients_eval_per_sample_and_train_coupling():
    torch.manual_seed(0)
    model = SmallCNN(1, width=4, depth=2).double()
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    model.eval()
    g = input_gradients(model, x, create_graph=False)
    for b in range(3):
        torch.testing.assert_close(g[b : b + 1], input_gradients(model, x[b : b + 1]))
    # Train mode: the batch statistics make sample 0's gradient depend on sample 1.
    model.train()
    g0 = input_gradients(model, x)[0]
    x2 = x.clone()
    x2[1] += 1.0
    assert not torch.allclose(g0, input_gradients(model, x2)[0])


def test_penalty_gradient_matches_finite_differences():
    h = w = 5
    model = TinyNet(2, h, w, seed=3).double()
    x = torch.randn(3, 2, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    pi, pj = Patch(0, 0, 2, 2), Patch(3, 2, 2, 3)
    lam = 0.7

    def objective() -> torch.Tensor:
        return regularized_loss(model, x, y, lam, pi, pj)[0]

    # keep away from the kink of |.|: every per-sample inner product clearly non-zero
    with torch.no_grad():
        ri, ci = pi.slices()
        gs = [input_gradients(model, v, create_graph=False) for v in (x, shift_patch(x, pj))]
        u, v = (g[:, :, ri, ci].flatten(1) for g in gs)
        cos = (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))
    assert cos.abs().min() > 1e-2
    model.zero_grad()
    objective().backward()
    params = list(model.parameters())
    auto = torch.cat([p.grad.reshape(-1) for p in params])
    fd, step = [], 1e-6
    with torch.no_grad():
        for p in params:
            flat = p.view(-1)
            for k in range(flat.numel()):
                old = float(flat[k])
                flat[k] = old + step
                up = float(objective().detach())
                flat[k] = old - step
                down = float(objective().detach())
                flat[k] = old
                fd.append((up - down) / (2 * step))
    torch.testing.assert_close(auto, torch.tensor(fd, dtype=torch.float64), rtol=1e-5, atol=1e-8)
    # the penalty alone reaches every parameter but the output bias (g does not see it)
    model.zero_grad()
    locality_penalty(model, x, pi, pj).backward()
    for name, p in model.named_parameters():
        if name == "fc.bias":
            assert p.grad is None or not p.grad.any()
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------- regularized loss


def _batch(seed: int, bsz: int = 6, side: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, 1, side, side, generator=g)
    y = torch.randint(0, 2, (bsz,), generator=g)
    return x, y


def test_lam_zero_is_exactly_the_plain_step():
    torch.manual_seed(0)
    model = SmallCNN(1, width=4, depth=3)
    twin = copy.deepcopy(model)
    x, y = _batch(1)
    loss, bce, penalty, logits = regularized_loss(model, x, y, 0.0, Patch(0, 0, 2, 2), None)
    loss.backward()
    plain_logits = twin(x)
    plain = F.binary_cross_entropy_with_logits(plain_logits, y.float())
    plain.backward()
    assert torch.equal(loss, plain) and torch.equal(bce, plain)
    assert torch.equal(logits, plain_logits)
    assert float(penalty) == 0.0 and penalty.grad_fn is None
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for a, b in zip(model.buffers(), twin.buffers()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("lam", [0.1, 3.0])
def test_positive_lam_adds_the_penalty(lam):
    torch.manual_seed(0)
    model = ResNet18(1, width=2)
    twin = copy.deepcopy(model)
    x, y = _batch(2)
    pi, pj = Patch(1, 1, 2, 2), Patch(5, 4, 2, 2)
    loss, bce, penalty, logits = regularized_loss(model, x, y, lam, pi, pj)
    assert torch.equal(loss, bce + lam * penalty)
    torch.testing.assert_close(bce, F.binary_cross_entropy_with_logits(logits, y.float()))
    torch.testing.assert_close(penalty, locality_penalty(twin, x, pi, pj))
    assert 0.0 <= float(penalty.detach()) <= 1.0 + 1e-6
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_regularized_loss_errors():
    model = SmallCNN(1, width=2, depth=1)
    x, y = _batch(0)
    p = Patch(0, 0, 2, 2)
    for lam in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ConfigError) as exc:
            regularized_loss(model, x, y, lam, p, p)
        _one_sentence(exc, "lam")
    with pytest.raises(ConfigError) as exc:
        regularized_loss(model, x, y, 1.0, None, p)
    _one_sentence(exc, "patch_i")
    with pytest.raises(ConfigError) as exc:
        regularized_loss(model, x, y, 1.0, p, None)
    _one_sentence(exc, "patch_j")
    with pytest.raises(ConfigError) as exc:
        regularized_loss(model, x, y, 1.0, p, Patch(7, 7, 2, 2))
    _one_sentence(exc, "patch_j")
    with pytest.raises(ConfigError) as exc:
        locality_penalty(model, x, Patch(0, 0, 0, 2), p)
    _one_sentence(exc, "patch_i")
    with pytest.raises(ConfigError) as exc:
        locality_penalty(model, x[0], p, p)
    _one_sentence(exc, "x")


# --------------------------------------------------------------------------- patches


@settings(max_examples=25)
@given(penalty_cases())
def test_shift_patch(case):
    bsz, chans, h, w, _, pj, seed = case
    x = torch.randn(bsz, chans, h, w, generator=torch.Generator().manual_seed(seed))
    before = x.clone()
    out = shift_patch(x, pj)
    assert torch.equal(x, before)  # the input is not modified
    assert out.data_ptr() != x.data_ptr()
    rows, cols = pj.slices()
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[rows, cols] = True
    for b in range(bsz):
        assert torch.equal(out[b][:, ~inside], x[b][:, ~inside])
        assert torch.equal(out[b][:, inside], x[(b + 1) % bsz][:, inside])


def test_check_patch():
    assert check_patch(Patch(0, 0, 4, 5), 4, 5) == Patch(0, 0, 4, 5)
    assert Patch(1, 2, 3, 4).slices() == (slice(1, 4), slice(2, 6))
    for bad in (Patch(3, 0, 2, 2), Patch(0, 4, 1, 2), Patch(-1, 0, 1, 1), Patch(0, 0, 0, 1)):
        with pytest.raises(ConfigError) as exc:
            check_patch(bad, 4, 5, "patch_x")
        _one_sentence(exc, "patch_x")
    with pytest.raises(ConfigError) as exc:
        check_patch((0, 0, 1, 1), 4, 5, "loc")
    _one_sentence(exc, "loc")


def test_is_same_sampler():
    a, b = Patch(96, 0, 32, 32), Patch(96, 112, 32, 32)
    rng = np.random.default_rng(0)
    draws = [sample_is_same_patches((a, b), rng) for _ in range(400)]
    assert all(set(d) == {a, b} for d in draws)
    firsts = sum(d[0] == a for d in draws)
    assert 150 < firsts < 250
    for locs, word in (([a], "locations"), ([a, (0, 0, 1, 1)], "locations[1]")):
        with pytest.raises(ConfigError) as exc:
            sample_is_same_patches(locs, rng)
        _one_sentence(exc, word)


def test_pathfinder_sampler_uniform_and_disjoint():
    h, w, s = 5, 5, 2
    rng = np.random.default_rng(1)
    counts_i: dict[tuple[int, int], int] = {}
    js_given_centre: set[tuple[int, int]] = set()
    for _ in range(4000):
        i, j = sample_pathfinder_patches(h, w, rng, size=s)
        for p in (i, j):
            check_patch(p, h, w)
            assert (p.height, p.width) == (s, s)
        assert not i.overlaps(j)
        counts_i[(i.top, i.left)] = counts_i.get((i.top, i.left), 0) + 1
        if (i.top, i.left) == (1, 1):
            js_given_centre.add((j.top, j.left))
    assert len(counts_i) == 16 and all(150 < c < 350 for c in counts_i.values())
    # every non-overlapping position of J occurs: 16 positions, 9 of them overlap I
    assert len(js_given_centre) == 7


@settings(max_examples=25)
@given(st.integers(1, 4), st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**16))
def test_pathfinder_sampler_random_sizes(size, h, w, seed):
    rng = np.random.default_rng(seed)
    if min(h, w) < size or max(h, w) < 3 * size - 1:
        with pytest.raises(ConfigError) as exc:
            sample_pathfinder_patches(h, w, rng, size=size)
        _one_sentence(exc, "image")
        return
    for _ in range(5):
        i, j = sample_pathfinder_patches(h, w, rng, size=size)
        check_patch(i, h, w)
        check_patch(j, h, w)
        assert not i.overlaps(j)


def test_pathfinder_sampler_argument_errors():
    rng = np.random.default_rng(0)
    for args, word in (((0, 8), "height"), ((8, 8.0), "width")):
        with pytest.raises(ConfigError) as exc:
            sample_pathfinder_patches(*args, rng)
        _one_sentence(exc, word)
    with pytest.raises(ConfigError) as exc:
        sample_pathfinder_patches(8, 8, rng, size=0)
    _one_sentence(exc, "size")
