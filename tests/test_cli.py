"""The command line: list, run, plot, resume, and one clear error for each bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from implreg.cli import main
from implreg.experiments import PRESETS
from implreg.experiments import cp_dynamics as td

SMALL = [
    "--set",
    "dims=4,4,4",
    "--set",
    "rank=20",
    "--set",
    "gt_rank=2",
    "--set",
    "num_observations=40",
    "--set",
    "max_iterations=200",
    "--set",
    "init_stds=0.1,0.05",
    "--no-progress",
]


def test_list_names_every_preset(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("tf-dynamics", "tf-huber", "tf-sensing", "tf-order"):
        assert name in out
    assert set(PRESETS) >= {"tf-dynamics", "tf-huber", "tf-sensing", "tf-order"}


def test_run_writes_a_complete_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "tf-dynamics", *SMALL, "--out", str(out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "init std 0.1:" in printed and "final reconstruction error" in printed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["preset"] == "tf-dynamics" and cfg["seed"] == 3
    assert cfg["config"]["dims"] == [4, 4, 4] and cfg["config"]["seed"] == 3
    assert {"implreg", "torch", "numpy", "python"} <= set(cfg["versions"])
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 2
    for name in ("figure.png", "reconstruction_error.png", "metrics.csv", "component_norms.npz"):
        assert (out / name).stat().st_size > 0
    assert not (out / "checkpoint.pt").exists()
    # re-plot from the folder alone
    for p in out.glob("*.png"):
        p.unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "figure.png").exists()
    # redo from config.json gives the same numbers
    again = tmp_path / "again"
    assert (
        main(["run", "--config", str(out / "config.json"), "--out", str(again), "--no-progress"])
        == 0
    )
    assert (again / "metrics.csv").read_text() == (out / "metrics.csv").read_text()


BAD = [
    (["run", "no-such-preset"], "unknown preset"),
    (["run", "tf-dynamics", "--set", "bogus=1"], "unknown key 'bogus'"),
    (["run", "tf-dynamics", "--set", "rank=abc"], "rank must be an integer"),
    (["run", "tf-dynamics", "--set", "rank=2.5"], "rank must be an integer"),
    (["run", "tf-dynamics", "--set", "rank=0"], "rank must be >= 1, got 0"),
    (["run", "tf-dynamics", "--set", "dims=10,0,10"], "every value of dims must be >= 1"),
    (["run", "tf-dynamics", "--set", "dims=10"], "dims needs at least 2 values"),
    (["run", "tf-dynamics", "--set", "init_stds=0.01,-0.5"], "init_stds must be positive"),
    (["run", "tf-dynamics", "--set", "init_stds=0"], "every value of init_stds must be positive"),
    (["run", "tf-dynamics", "--set", "rank=5", "--set", "rank=6"], "'rank' is set twice"),
    (["run", "tf-dynamics", "--set", "max_iterations=1e300"], "max_iterations is too large"),
    (["run", "tf-dynamics", "--set", "learned_fraction=1"], "learned_fraction must be in (0, 1)"),
    (["run", "tf-dynamics", "--backend", "dask"], "backend must be one of local, ray, slurm"),
    (["run", "tf-dynamics", "--set", "rank=1e300"], "rank is too large, got 1e300"),
    (["run", "tf-dynamics", "--device", "tpu"], "device must be one of cpu, cuda"),
    (["run", "tf-dynamics", "--set", "num_observations=20000"], "larger than the tensor"),
    (["run", "tf-dynamics", "--set", "lr=nan"], "lr must be a finite number"),
    (["run", "tf-dynamics", "--set", "init_stds=0.01,inf"], "init_stds must be a finite number"),
    (["run", "tf-dynamics", "--set", "gt_norm=-1"], "gt_norm must be positive"),
    (["run", "tf-dynamics", "--set", "loss=l1"], "loss must be"),
    (["run", "tf-dynamics", "--set", "loss=huber"], "huber_delta > 0"),
    (["run", "tf-dynamics", "--set", "rank"], "expects key=value"),
    (["run", "tf-sensing", "--set", "dims=10,10,10,10,10,10"], "use measurement=rank_one"),
    (["run"], "name a preset"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a[1:]) for a, _ in BAD])
def test_bad_input_is_one_sentence_exit_2_and_no_folder(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    code = main([*argv, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("implreg: error: ") and message in err
    assert len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "command", [["run", "tf-dynamics"], ["sweep", "tf-dynamics", "--seeds", "0"]]
)
def test_out_that_cannot_be_a_folder(tmp_path, capsys, command):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, message in [("", "out must name a folder"), (str(afile / "x"), "is a file")]:
        assert main([*command, "--out", out, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("implreg: error:") and message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_refuses_a_non_empty_out_folder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["run", "tf-dynamics", *SMALL, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_resume_refuses_non_run_folders(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    done = tmp_path / "done"
    assert main(["run", "tf-dynamics", *SMALL, "--out", str(done)]) == 0
    capsys.readouterr()
    assert main(["run", "--resume", str(done)]) == 2
    assert "already finished" in capsys.readouterr().err


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "implreg.cli", *args]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_checkpoint_and_resume_is_bit_identical(tmp_path, sig):
    long = [
        "--set",
        "dims=6,6,6,6",
        "--set",
        "rank=60",
        "--set",
        "gt_rank=3",
        "--set",
        "num_observations=400",
        "--set",
        "max_iterations=6000",
        "--set",
        "tol=0",
        "--set",
        "init_stds=0.05,0.01",
        "--set",
        "log_every=10",
        "--no-progress",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ref = tmp_path / "ref"
    subprocess.run(
        _cli("run", "tf-dynamics", *long, "--out", str(ref)),
        check=True,
        env=env,
        capture_output=True,
    )
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        _cli("run", "tf-dynamics", *long, "--out", str(cut)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("run folder:")
    time.sleep(0.3)  # the handler is installed before the line is printed
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "Resume with: implreg run --resume" in err
    assert (cut / "checkpoint.pt").exists() and not (cut / "summary.json").exists()
    done = subprocess.run(
        _cli("run", "--resume", str(cut), "--no-progress"), env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert (cut / "metrics.csv").read_text() == (ref / "metrics.csv").read_text()
    a, b = td.EXPERIMENT.load_trajectories(ref), td.EXPERIMENT.load_trajectories(cut)
    assert np.array_equal(a["iterations"], b["iterations"])
    assert np.array_equal(a["norms"], b["norms"], equal_nan=True)
    assert not (cut / "checkpoint.pt").exists()
