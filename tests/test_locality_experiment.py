"""The locality presets (Is-Same-Class, Pathfinder): scales, the grid, resumable training,
bad input before any folder, and the summary against the units."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import StopAfter, run_config

from implreg.api import run_preset
from implreg.cli import main
from implreg.cnn.models import build_model
from implreg.cnn.regularizer import sample_pathfinder_patches
from implreg.cnn.train import Splits, TrainSpec, init_model, train
from implreg.config import with_overrides
from implreg.experiments import PRESETS

TINY = {"n_train": 64, "n_test": 32, "epochs": 2, "width": 4, "seeds": 1, "workers": 1}


def _cfg(name: str, **over):
    return with_overrides(PRESETS[name].config, {**TINY, **over})


# ------------------------------------------------------------------------------ scales


def test_paper_scale_is_the_published_setting():
    isc = with_overrides(PRESETS["locality-is-same-class"].config, {"scale": "paper"})
    units = PRESETS["locality-is-same-class"].experiment.units(isc)
    assert sorted({u.distance for u in units}) == [0, 40, 80, 120, 160]
    assert sorted({u.lam for u in units}) == [0.0, 0.1, 1.0]
    u = units[0]
    assert (u.model, u.width, u.stem, u.canvas, u.image_size) == (
        "resnet18",
        64,
        "imagenet",
        224,
        32,
    )
    assert (u.n_train, u.n_test, u.epochs, u.batch_size, u.patience) == (5000, 10000, 150, 64, 20)
    assert (u.lr, u.momentum) == (0.01, 0.9)
    assert len(units) == 5 * 3 * 3
    pf = with_overrides(PRESETS["locality-pathfinder"].config, {"scale": "paper"})
    units = PRESETS["locality-pathfinder"].experiment.units(pf)
    assert sorted({u.distance for u in units}) == [3, 5, 7, 9]
    assert sorted({u.lam for u in units}) == [0.0, 3.0, 9.0]
    assert (units[0].generator, units[0].n_train, units[0].n_test) == ("paper", 10000, 10000)


def test_a_key_set_by_the_user_wins_over_the_scale():
    cfg = with_overrides(
        PRESETS["locality-pathfinder"].config, {"scale": "paper", "epochs": 3, "lambdas": "0,1"}
    )
    units = PRESETS["locality-pathfinder"].experiment.units(cfg)
    assert {u.epochs for u in units} == {3} and sorted({u.lam for u in units}) == [0.0, 1.0]


# ------------------------------------------------------------------------------ bad input

BAD = [
    ("locality-is-same-class", ["lambdas=0,-1"], "lambdas", "non-negative"),
    ("locality-is-same-class", ["distances=0,40"], "gap 40", "does not fit"),
    ("locality-is-same-class", ["image_size=40"], "image_size 40", "does not fit"),
    ("locality-is-same-class", ["source=nowhere.npz"], "nowhere.npz", ""),
    ("locality-is-same-class", ["source=cifar"], "source", ".npz"),
    ("locality-is-same-class", ["batch_size=1"], "batch_size", ">= 2"),
    ("locality-is-same-class", ["classes=3"], "classes", "at least 2"),
    ("locality-is-same-class", ["classes=3,11"], "class 11", "classes"),
    ("locality-pathfinder", ["distances=0,6"], "distances", ">= 1"),
    ("locality-pathfinder", ["lambdas=-3"], "lambdas", "non-negative"),
    ("locality-pathfinder", ["momentum=1"], "momentum", "[0, 1)"),
    ("locality-pathfinder", ["generator=huge"], "generator", "lra32"),
    ("locality-pathfinder", ["patch_size=12"], "patch_size 12", "32 wide"),
]


@pytest.mark.parametrize(("preset", "sets", "key", "message"), BAD)
def test_bad_input_is_one_sentence_exit_2_and_no_folder(
    tmp_path, capsys, fake_data, preset, sets, key, message
):
    out = tmp_path / "run"
    argv = ["run", preset, "--out", str(out), "--no-progress", "--data-dir", str(fake_data)]
    if preset == "locality-pathfinder":
        argv = argv[:-2]
    for s in sets:
        argv += ["--set", s]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("implreg: error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and key in err and message in err, err
    assert not out.exists()


def _npz(path, labels, channels_last=True):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(len(labels), 12, 12, 3), dtype=np.uint8)
    if not channels_last:
        images = images.transpose(0, 3, 1, 2)
    np.savez(path, images=images, labels=np.asarray(labels))
    return path


@pytest.mark.parametrize(
    ("labels", "message"),
    [([3] * 40, "single class"), ([0] * 39 + [1], "class 1")],
)
def test_an_image_set_unfit_for_pairs_is_refused_before_any_folder(
    tmp_path, capsys, labels, message
):
    src = _npz(tmp_path / "set.npz", labels)
    out = tmp_path / "run"
    code = main(["run", "locality-is-same-class", "--out", str(out), "--no-progress",
                 "--set", f"source={src}"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "set.npz" in err and message in err, err
    assert not out.exists()


def test_a_class_subset_draws_pairs_of_those_classes_only(fake_data):
    from implreg.problems.images import load_dataset
    from implreg.problems.is_same_class import IsSameGeometry, is_same_class_splits

    geometry = IsSameGeometry(32, 7, 18)
    d = is_same_class_splits("mnist", fake_data, 200, 50, geometry, 0, classes=(0, 1))
    labels = load_dataset("mnist", fake_data)["train"].labels
    kept = np.flatnonzero(np.isin(labels, (0, 1)))
    assert set(np.unique(labels[kept[d.train_indices]]).tolist()) == {0, 1}
    assert d.num_classes == 2


def test_an_npz_image_set_runs_without_a_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("IMPLREG_DATA_DIR", raising=False)
    src = _npz(tmp_path / "rgb.npz", np.arange(80) % 4)
    cfg = _cfg("locality-is-same-class", source=str(src), image_size=6, canvas=16,
               distances=(0, 4), lambdas=(0.0, 1.0))  # fmt: skip
    run = run_config(cfg, tmp_path / "run")
    assert run.exit_code == 0 and run.finished
    assert {r["gap"] for r in run.summary["table"]} == {0, 4}
    assert (run.path / "examples.png").stat().st_size > 0


# ------------------------------------------------------------------------------ training


def _splits(n=48, side=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 1, side, side), dtype=np.uint8)
    y = (x[:, 0, :6].mean(axis=(1, 2)) > x[:, 0, 6:].mean(axis=(1, 2))).astype(np.float32)
    return Splits.build(x[: n // 2 + 8], y[: n // 2 + 8], x[n // 2 :], y[n // 2 :])


def _model():
    return init_model(lambda: build_model("cnn", 1, 4), seed=3)


def _patches(rng):
    return sample_pathfinder_patches(12, 12, rng, size=2)


def test_training_resumed_from_its_epoch_checkpoint_equals_an_uninterrupted_run(tmp_path):
    spec = TrainSpec(epochs=4, batch_size=8, lam=1.0, patience=10, seed=5)
    whole = _model()
    ref = train(whole, _splits(), spec, _patches)
    ckpt = tmp_path / "ckpt.pt"
    cut = _model()
    stop = StopAfter(7)  # mid second epoch (4 batches an epoch)
    assert train(cut, _splits(), spec, _patches, checkpoint=ckpt, should_stop=stop.is_set) is None
    assert ckpt.exists()
    again = _model()
    res = train(again, _splits(), spec, _patches, checkpoint=ckpt)
    for key, values in ref["history"].items():
        if key != "seconds":
            assert res["history"][key] == values, key
    for a, b in zip(whole.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_of_other_settings_is_refused_by_name(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    train(_model(), _splits(), TrainSpec(epochs=1, batch_size=8), _patches, checkpoint=ckpt)
    with pytest.raises(ValueError, match="other training settings"):
        train(_model(), _splits(), TrainSpec(epochs=2, batch_size=8), _patches, checkpoint=ckpt)
    ckpt.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="ckpt.pt cannot be read"):
        train(_model(), _splits(), TrainSpec(epochs=1, batch_size=8), _patches, checkpoint=ckpt)


def test_stop_rule_trains_patience_epochs_after_perfect_train_accuracy():
    x = np.zeros((16, 1, 8, 8), np.uint8)
    x[8:] = 255
    y = np.r_[np.zeros(8), np.ones(8)].astype(np.float32)
    splits = Splits.build(x, y, x, y)
    spec = TrainSpec(epochs=60, batch_size=8, lr=0.05, patience=2, seed=0)
    res = train(_model(), splits, spec, lambda rng: _patches(rng))
    at = res["perfect_train_at_epoch"]
    assert at is not None and res["stop_reason"] == "perfect_train_accuracy"
    assert res["epochs_run"] == at + 2 and res["history"]["train_acc"][at - 1] == 1.0
    assert all(a < 1.0 for a in res["history"]["train_acc"][: at - 1])


def test_lambda_zero_trains_exactly_the_plain_recipe():
    """With lambda 0 the loop's loss is plain BCE: the same steps as a hand-written loop."""
    splits = _splits()
    spec = TrainSpec(epochs=2, batch_size=8, lam=0.0, seed=2)
    model = _model()
    train(model, splits, spec, _patches)
    ref = _model()
    opt = torch.optim.SGD(ref.parameters(), lr=spec.lr, momentum=spec.momentum)
    n = len(splits.y_train)
    for epoch in range(2):
        ref.train()
        order = np.random.default_rng([spec.seed, epoch, 0]).permutation(n)
        for s in range(0, n, spec.batch_size):
            idx = order[s : s + spec.batch_size]
            x = splits.batch(splits.x_train, idx, torch.device("cpu"))
            y = torch.from_numpy(splits.y_train[idx].astype(np.float32))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(ref(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ the grid


def test_summary_aggregates_the_units_over_seeds(tmp_path, fake_data):
    cfg = _cfg("locality-is-same-class", seeds=2, data_dir=str(fake_data))
    run = run_config(cfg, tmp_path / "run")
    rows = run.metrics()
    for row in run.summary["table"]:
        accs = [
            a
            for a, g, lam in zip(rows["final_test_acc"], rows["distance"], rows["lam"])
            if g == row["gap"] and lam == row["lam"]
        ]
        assert len(accs) == 2
        assert row["test_acc"]["mean"] == pytest.approx(np.mean(accs))
        assert row["test_acc"]["std"] == pytest.approx(np.std(accs, ddof=1))
    eff = run.summary["effect"]["longest"]
    assert eff["gap"] == 18 and eff["lam"] == 0.1
    assert not (run.path / "work").exists()  # the epoch checkpoints are gone once all finished


def test_an_interrupted_grid_keeps_its_epoch_checkpoints(tmp_path):
    cfg = _cfg("locality-pathfinder", distances=(6,), lambdas=(0.0,), epochs=3, batch_size=8)
    run = run_config(cfg, tmp_path / "run", interrupt=StopAfter(12))  # in the second epoch
    assert run.interrupted
    assert list((run.path / "work").glob("*/checkpoint.pt"))
    done = run_preset(out=run.path, resume=True, log=lambda *_: None)
    assert done.finished and not (run.path / "work").exists()
    fresh = run_config(cfg, tmp_path / "fresh")
    assert done.metrics()["final_test_acc"] == fresh.metrics()["final_test_acc"]


def test_kill_9_loses_at_most_one_epoch(tmp_path):
    """A run killed with SIGKILL after its first epoch checkpoint resumes from it."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "implreg.entry", "run", "locality-pathfinder", "--out", str(out),
            "--no-progress", "--threads", "1", "--set", "distances=6", "--set", "lambdas=0",
            "--set", "seeds=1", "--set", "n_train=256", "--set", "n_test=32",
            "--set", "width=4", "--set", "epochs=40"]  # fmt: skip
    log = open(tmp_path / "stderr.txt", "wb")  # noqa: SIM115
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log)
    ckpt = out / "work" / "d6-lam0-seed0" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert ckpt.exists(), (tmp_path / "stderr.txt").read_text()[-2000:]
    before = torch.load(ckpt, weights_only=False)["epoch"]
    assert 1 <= before < 40
    resumed = subprocess.run([*argv[:4], "--resume", str(out), "--no-progress", "--threads", "1"],
                             env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = json.loads((out / "units" / "d6-lam0-seed0.json").read_text())["result"]
    assert (
        result["epochs_run"] >= before
        and len(result["history"]["test_acc"]) == result["epochs_run"]
    )


def test_units_share_one_dataset_per_worker_and_change_only_lambda_and_seed():
    cfg = _cfg("locality-pathfinder", seeds=2)
    units = PRESETS["locality-pathfinder"].experiment.units(cfg)
    assert len(units) == 2 * 2 * 2 and len({u.name for u in units}) == 8
    differ = {
        f.name for f in dataclasses.fields(units[0]) if len({getattr(u, f.name) for u in units}) > 1
    }
    assert differ == {"name", "distance", "lam", "seed"}
    assert {u.patch_size for u in units} == {2}
