"""The tensor-rank-complexity preset (Razin et al. 2021, Figure 4), reduced.

Most tests use a small synthetic data folder in the IDX format (so they run
wherever the package is installed); the last ones use the real MNIST /
Fashion-MNIST from ../shared/data and skip without it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import run_config

from implreg.api import run_preset
from implreg.cli import main
from implreg.config import with_overrides
from implreg.experiments import tensor_rank_complexity as tensor_rank
from implreg.experiments.image_tasks import task_data

DATA = Path(
    os.environ.get("IMPLREG_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
needs_data = pytest.mark.skipif(
    not (DATA / "mnist").is_dir(),
    reason="no MNIST: ../shared/data and $IMPLREG_DATA_DIR are absent",
)


SMALL = ["--set", "ranks=1,2", "--set", "classes=0,5", "--set", "iterations=40", "--no-progress"]


def _rows(run_dir: Path) -> list[dict]:
    with (run_dir / "results.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_cli_run_writes_csv_figure_and_summary(tmp_path, fake_data, capsys):
    out = tmp_path / "run"
    code = main(
        ["run", "tensor-rank-complexity", "--data-dir", str(fake_data), "--out", str(out), *SMALL]
    )
    assert code == 0
    assert (out / "figure.png").stat().st_size > 0
    rows = _rows(out)
    # 2 datasets x 3 variants x 2 classes x (2 ranks + linear)
    assert len(rows) == 2 * 3 * 2 * 3
    assert {r["variant"] for r in rows} == {"original", "rand_image", "rand_label"}
    summary = json.loads((out / "summary.json").read_text())
    means = {(m["dataset"], m["variant"], m["predictor"], m["rank"]): m for m in summary["means"]}
    for ds in ("mnist", "fashion-mnist"):
        for rank in (1, 2):
            orig = means[(ds, "original", "cp", rank)]["train_mean"]
            for v in ("rand_image", "rand_label"):
                assert orig < means[(ds, v, "cp", rank)]["train_mean"]
        # the structured fake classes are easy for a rank-1 predictor
        assert means[(ds, "original", "cp", 1)]["test_mean"] < 0.5 * summary["variance"][ds]
    text = capsys.readouterr().out
    assert "variance p(1-p)" in text and "linear" in text


def test_csv_values_match_units_and_aggregates(tmp_path, fake_data):
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "tensor-rank-complexity",
                "--data-dir",
                str(fake_data),
                "--out",
                str(out),
                *SMALL,
                "--set",
                "datasets=mnist",
            ]
        )
        == 0
    )
    rows = _rows(out)
    unit = json.loads((out / "units" / "fit-mnist-images-r2.json").read_text())["result"]
    row = next(
        r for r in rows if r["variant"] == "rand_label" and r["rank"] == "2" and r["class"] == "5"
    )
    assert float(row["train_mse"]) == pytest.approx(unit["train_mse"]["rand_label"][1], rel=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    m = next(m for m in summary["means"] if m["variant"] == "original" and m["rank"] == 1)
    vals = [float(r["test_mse"]) for r in rows if r["variant"] == "original" and r["rank"] == "1"]
    assert m["test_mean"] == pytest.approx(np.mean(vals), rel=1e-5)
    assert m["test_std"] == pytest.approx(np.std(vals), rel=1e-4, abs=1e-9)


def test_interrupted_grid_resumes_to_the_same_results(tmp_path, fake_data):
    cfg = with_overrides(
        tensor_rank.TensorRankConfig(),
        [f"data_dir={fake_data}", "datasets=mnist", "ranks=1,2", "classes=3", "iterations=30"],
    )

    class UnitsWritten:
        """Looks set once ``n`` units have been written."""

        def __init__(self, folder: Path, n: int):
            self.folder, self.n = folder, n

        def is_set(self) -> bool:
            return len(list((self.folder / "units").glob("*.json"))) >= self.n

    part = tmp_path / "part"
    first = run_config(cfg, part, interrupt=UnitsWritten(part, 2))
    assert first.interrupted and not (part / "summary.json").exists()
    assert len(list((part / "units").glob("*.json"))) == 2
    done = run_preset(out=part, resume=True, log=lambda *_: None)
    whole = run_config(cfg, tmp_path / "whole")
    assert not done.interrupted
    assert _rows(part) == _rows(tmp_path / "whole")
    assert whole.summary["means"] == done.summary["means"]


def test_rank_order_and_class_subsets_are_independent(tmp_path, fake_data):
    """A fit does not depend on which other ranks or classes are in the grid."""
    base = [f"data_dir={fake_data}", "datasets=mnist", "variants=original", "iterations=25"]
    a = run_config(
        with_overrides(tensor_rank.TensorRankConfig(), [*base, "ranks=2", "classes=4"]),
        tmp_path / "a",
    )
    b = run_config(
        with_overrides(tensor_rank.TensorRankConfig(), [*base, "ranks=1,2", "classes=4"]),
        tmp_path / "b",
    )
    pick = lambda res: next(m for m in res.summary["means"] if m["rank"] == 2)  # noqa: E731
    assert pick(a)["train_mean"] == pick(b)["train_mean"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "classes=3,10"], "every value of classes must be in [0, 9]"),
        (["--set", "classes=3,3"], "classes repeats a value"),
        (["--set", "ranks=0,2"], "every value of ranks must be >= 1"),
        (["--set", "datasets=cifar"], "datasets must be one of 'mnist', 'fashion-mnist'"),
        (["--set", "variants=shuffled"], "variants must be one of"),
        (["--set", "workers=0"], "workers must be >= 1"),
        (["--set", "engine=sparse"], "engine must be one of"),
    ],
)
def test_bad_settings_are_one_sentence_and_no_folder(tmp_path, fake_data, capsys, extra, message):
    out = tmp_path / "run"
    code = main(
        ["run", "tensor-rank-complexity", "--data-dir", str(fake_data), "--out", str(out), *extra]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("implreg: error:") and message in err
    assert not out.exists()


def test_wrong_or_missing_data_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("IMPLREG_DATA_DIR", raising=False)
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "tensor-rank-complexity",
                "--data-dir",
                str(tmp_path / "nope"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "tensor-rank-complexity", "--out", str(out)]) == 2
    assert "--data-dir" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert (
        main(
            [
                "run",
                "tensor-rank-complexity",
                "--data-dir",
                str(tmp_path / "empty"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "no mnist/ folder" in capsys.readouterr().err
    assert not out.exists()


def test_corrupt_data_file_is_refused_before_any_folder(tmp_path, fake_data, capsys):
    bad = tmp_path / "data"
    for name in ("mnist", "fashion-mnist"):
        (bad / name).mkdir(parents=True)
        for f in (fake_data / name).iterdir():
            (bad / name / f.name).write_bytes(f.read_bytes())
    lab = bad / "mnist" / "train-labels-idx1-ubyte"
    lab.write_bytes(lab.read_bytes()[:-7])
    out = tmp_path / "run"
    assert main(["run", "tensor-rank-complexity", "--data-dir", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "train-labels-idx1-ubyte" in err and "truncated" in err
    assert not out.exists()


def test_data_dir_flag_is_refused_by_presets_without_data(tmp_path, capsys):
    assert (
        main(["run", "tf-dynamics", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    )
    assert "reads no data" in capsys.readouterr().err


def test_engines_give_the_same_fits(tmp_path, fake_data):
    """The table look-up products and the dense GEMMs take the same objective: the runs agree
    to float32 rounding of a short fit."""
    values = {}
    for engine in ("dense", "packed"):
        out = tmp_path / engine
        args = ["--set", "datasets=mnist", "--set", f"engine={engine}"]
        code = main(
            ["run", "tensor-rank-complexity", "--data-dir", str(fake_data), "--out", str(out)]
            + SMALL
            + args
        )
        assert code == 0
        values[engine] = {
            (r["variant"], r["class"], r["predictor"], r["rank"]): float(r["train_mse"])
            for r in _rows(out)
        }
    assert values["dense"].keys() == values["packed"].keys()
    for key, dense in values["dense"].items():
        assert values["packed"][key] == pytest.approx(dense, rel=2e-2, abs=1e-4), key


def test_rand_label_and_rand_image_are_seeded_and_shared_across_ranks(fake_data):
    cfg = with_overrides(
        tensor_rank.TensorRankConfig(),
        [f"data_dir={fake_data}", "datasets=mnist", "classes=1,2", "ranks=1"],
    )
    units = {u.name: u for u in tensor_rank.EXPERIMENT.units(cfg)}
    unit = units["fit-mnist-images-r1"]
    a, b = task_data(unit), task_data(unit)
    assert np.array_equal(a["y_train"]["rand_label"], b["y_train"]["rand_label"])
    # a permutation: the class counts are kept, the assignment is not
    assert a["y_train"]["rand_label"].sum(0).tolist() == a["y_train"]["original"].sum(0).tolist()
    assert not np.array_equal(a["y_train"]["rand_label"], a["y_train"]["original"])
    r = task_data(units["fit-mnist-rand_image-r1"])
    assert set(np.unique(r["x_train"]).tolist()) == {0, 1}
    assert abs(r["x_train"].mean() - 0.5) < 0.02
    assert np.array_equal(r["y_train"]["rand_image"], a["y_train"]["original"])
    c = task_data(dataclasses.replace(unit, seed=1))
    assert not np.array_equal(a["y_train"]["rand_label"], c["y_train"]["rand_label"])


def test_patch_centroid_inputs(tmp_path, fake_data):
    """Footnote 10: 2x2 patches of the 8x8 fake images become 16 indices into 4 centroids."""
    cfg = with_overrides(
        tensor_rank.TensorRankConfig(),
        [
            f"data_dir={fake_data}",
            "datasets=mnist",
            "classes=0",
            "ranks=1",
            "iterations=30",
            "representation=patches",
            "patch_size=2",
            "centroids=4",
        ],
    )
    tensor_rank.EXPERIMENT.prepare(cfg)
    unit = tensor_rank.EXPERIMENT.units(cfg)[1]
    data = task_data(unit)
    assert data["levels"] == 4 and data["x_train"].shape == (600, 16)
    assert int(data["x_train"].max()) <= 3
    res = run_config(cfg, tmp_path / "run")
    means = {(m["variant"], m["predictor"]): m for m in res.summary["means"]}
    assert means[("original", "cp")]["train_mean"] < means[("rand_label", "cp")]["train_mean"]
    bad = with_overrides(cfg, ["patch_size=9"])
    with pytest.raises(ValueError, match="does not fit"):
        tensor_rank.EXPERIMENT.prepare(bad)


@needs_data
def test_reduced_figure4_on_real_mnist(tmp_path):
    """A few thousand real images: original fit far better than both random variants."""
    cfg = with_overrides(
        tensor_rank.TensorRankConfig(),
        [
            f"data_dir={DATA}",
            "datasets=mnist",
            "classes=6,9",
            "ranks=1,3",
            "train_samples=4000",
            "test_samples=1000",
            "iterations=60",
        ],
    )
    res = run_config(cfg, tmp_path / "run")
    means = {(m["variant"], m["predictor"], m["rank"]): m for m in res.summary["means"]}
    var = res.summary["variance"]["mnist"]
    for rank in (1, 3):
        orig = means[("original", "cp", rank)]
        for v in ("rand_image", "rand_label"):
            rnd = means[(v, "cp", rank)]
            assert orig["train_mean"] < 0.5 * rnd["train_mean"]
            assert rnd["test_mean"] > var
        assert orig["test_mean"] < var
    # the linear predictor fits the original worse than rank 3 CP
    assert (
        means[("original", "linear", "")]["train_mean"] > means[("original", "cp", 3)]["train_mean"]
    )
