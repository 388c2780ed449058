"""Up-front memory estimates (``Experiment.memory_estimate``): defaults fit a laptop, the
configurations that used to end in "can't allocate memory" are refused naming the key to
lower, and the estimates follow the peak memory measured in real runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from implreg.config import with_overrides
from implreg.experiments import PRESETS

GB = 2**30


def _estimate(name: str, overrides: dict | None = None):
    preset = PRESETS[name]
    cfg = with_overrides(preset.config, overrides or {})
    return preset.experiment.memory_estimate(cfg)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_default_fits_a_laptop(name):
    est = _estimate(name)
    assert 0 < est.bytes < 4 * GB, (name, est)
    assert est.key and est.what


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_tiny_budget_is_small(name):
    preset = PRESETS[name]
    est = _estimate(name, dict(preset.tiny))
    assert 0 < est.bytes < GB, (name, est)


# (preset, overrides, expected key, at least this many GB): the audit's cases, each where its
# config passes validation (num_observations must fit the tensor; recon_sample is used only
# when prod(dims) > dense_max).
AUDIT = [
    ("tf-dynamics", {"dims": "1000000,1000000"}, "dims", 48),
    ("tf-dynamics", {"rank": "1e8"}, "rank", 1024),
    (
        "tf-dynamics",
        {"dims": "1000000,1000000", "num_observations": "1e12"},
        "num_observations",
        1024,
    ),
    (
        "tf-sensing",
        {"measurement": "rank_one", "num_observations": "1e12"},
        "num_observations",
        1024,
    ),
    ("mf-dynamics", {"shape": "10000000,10000000"}, "shape", 1024),
    ("mf-depth-vs-nuclear", {"shape": "10000000,10000000"}, "shape", 1024),
    ("tensor-rank-complexity", {"ranks": "100000"}, "ranks", 1024),
    ("tf-dynamics", {"dims": "100,100,100,100", "recon_sample": "2e9"}, "recon_sample", 128),
]


@pytest.mark.parametrize(("name", "overrides", "key", "gb"), AUDIT)
def test_audit_cases_are_refused_naming_the_key(name, overrides, key, gb):
    from implreg.config import check

    preset = PRESETS[name]
    cfg = with_overrides(preset.config, overrides)
    check(cfg)  # valid configurations: only their size is wrong
    start = time.perf_counter()
    est = preset.experiment.memory_estimate(cfg)
    assert time.perf_counter() - start < 1.0  # computed, never allocated
    assert est.bytes > gb * GB, (name, overrides, est)
    assert est.key == key, (name, overrides, est)


def test_refusal_names_the_key_in_one_sentence():
    from implreg.config import ConfigError
    from implreg.resources import check_memory

    with pytest.raises(ConfigError) as err:
        check_memory(_estimate("tf-dynamics", {"rank": "1e8"}), max_memory=16 * GB, name="x")
    text = str(err.value)
    assert "\n" not in text and text.endswith("lower rank")


def test_estimates_follow_the_config():
    """More of what a key sizes never needs less memory."""
    grow = [
        ("tf-dynamics", {}, "rank", 1000, 4000),
        ("tf-dynamics", {}, "dims", "10,10,10,10", "30,30,30,30"),
        ("tf-dynamics", {}, "num_observations", 2000, 9000),
        ("tf-dynamics", {"dims": "100,100,100,100"}, "recon_sample", 10**5, 10**7),
        ("tf-sensing", {}, "num_observations", 2000, 20000),
        ("mf-dynamics", {}, "shape", "100,100", "400,400"),
        ("mf-depth-vs-nuclear", {}, "shape", "100,100", "400,400"),
        ("mf-depth-vs-nuclear", {}, "workers", 1, 4),
        ("mf-det-sign", {}, "workers", 1, 4),
        ("tensor-rank-complexity", {"linear_baseline": False}, "ranks", "1,2", "1,100"),
        ("tensor-rank-complexity", {}, "train_samples", 1000, 30000),
    ]
    for name, base, key, small, big in grow:
        a = _estimate(name, {**base, key: small})
        b = _estimate(name, {**base, key: big})
        assert b.bytes > a.bytes, (name, key, a, b)
    clarabel = _estimate("mf-depth-vs-nuclear", {"solver": "CLARABEL"})
    assert clarabel.bytes > 8 * GB and "CLARABEL" in clarabel.what  # measured: 19 GB a solve


# ---------------------------------------------------------------------------------------
# Calibration: the estimate against the peak resident memory of a real run, measured in a
# fresh process above its resident memory after the imports, with the peak reset after the
# imports (grids fork their units: their peak is the children's).

_PROBE = r"""
import ctypes, json, resource, sys
# Transparent huge pages round resident memory up to 2 MB pages where the machine's policy is
# "always": the estimate is of what the code allocates, so the probe opts out
# (PR_SET_THP_DISABLE = 41).
ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0)
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
import torch
from implreg.api import run_preset
from implreg.config import with_overrides
from implreg.experiments import PRESETS

def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

name, overrides, out = json.loads(sys.argv[1])
preset = PRESETS[name]
cfg = with_overrides(preset.config, overrides)
estimate = preset.experiment.memory_estimate(cfg).bytes
torch.set_num_threads(2)
base = status("VmRSS")
imports_peak = status("VmHWM")
# The lifetime peak includes the imports (a fresh machine builds matplotlib's font cache
# there): reset it (Linux >= 4.0), so that it is the run's own.
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
run_preset(cfg, out=out, log=lambda *_: None)
own = status("VmHWM") - base
forked = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 - base
print(json.dumps({"estimate": estimate, "actual": max(own, forked), "base": base,
                  "imports_peak": imports_peak}))
"""


def _measure(name: str, overrides: dict, out) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps([name, overrides, str(out)])],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CALIBRATION = [
    # dense engine and dense reconstruction error: 3 x 2.6e6-entry tensors (measured 250 MB)
    (
        "tf-dynamics",
        {
            "dims": "40,40,40,40",
            "rank": 300,
            "num_observations": 20000,
            "method": "dense",
            "max_iterations": 2,
            "log_every": 1000,
        },
    ),
    # the same problem on the sampled engine (what auto picks there): no tensor of
    # prod(dims) entries in the step, the dense reconstruction error still builds one
    (
        "tf-dynamics",
        {
            "dims": "40,40,40,40",
            "rank": 300,
            "num_observations": 20000,
            "method": "sampled",
            "max_iterations": 2,
            "log_every": 1000,
        },
    ),
    # deep matrix factorization of a 15000 x 200 matrix (3e6 entries), as the fits of
    # mf-depth-vs-nuclear
    (
        "mf-dynamics",
        {
            "shape": "15000,200",
            "depths": "3",
            "num_observations": 20000,
            "max_iterations": 1,
            "log_every": 1000,
            "workers": 1,
        },
    ),
    # hierarchical tensor factorization, dense engine (order 4, widths 512; the figure peaks)
    ("htf-dynamics", {"max_iterations": 2, "log_every": 1000}),
    # hierarchical, gather engine over an order-8 tensor of 1e8 entries (never built)
    ("htf-large", {"max_iterations": 2, "log_every": 1000}),
    # gather engine, factors of 3 x 40000 x 200 entries, sampled reconstruction error
    # (about 700 MB: on demand)
    pytest.param(
        "tf-dynamics",
        {
            "dims": "20000,20000",
            "rank": 200,
            "num_observations": 5000,
            "max_iterations": 2,
            "log_every": 1000,
        },
        # slow: a 20000 x 20000 gather run peaks near 700 MB and takes longer than the rest of
        # this file; the two default calibrations above cover the same formula
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize(("name", "overrides"), CALIBRATION)
def test_estimate_follows_the_measured_peak(name, overrides, tmp_path):
    got = _measure(name, overrides, tmp_path / "run")
    estimate, actual = got["estimate"], got["actual"]
    assert actual > 64 * 2**20, got  # large enough to tell the run from the interpreter
    assert actual / 4 <= estimate <= actual * 4, got


# slow: cvxpy's import and SCS solve in a fresh interpreter; the baseline's estimate is
# also checked (not against a measurement) by the default-config tests above
@pytest.mark.slow
def test_nuclear_baseline_estimate_follows_the_measured_peak(tmp_path):
    """mf-depth-vs-nuclear: one fit and one SCS baseline of a 60 x 60 matrix (the baseline,
    cvxpy's import and compilation included, is the peak)."""
    overrides = {
        "shape": "60,60",
        "gt_rank": 2,
        "gt_norm": 60.0,
        "depths": "2",
        "init_scales": "1e-2",
        "observations": "1500",
        "sweep_observations": "1500",
        "sweep_depths": "2",
        "sweep_init_scale": 1e-2,
        "max_iterations": 50,
        "workers": 1,
    }
    got = _measure("mf-depth-vs-nuclear", overrides, tmp_path / "run")
    assert got["actual"] / 2 <= got["estimate"] <= got["actual"] * 2, got


# ---------------------------------------------------------------------------------------
# The command line: refused before anything is built or written.


@pytest.mark.parametrize(
    ("overrides", "extra", "key"),
    [
        (["dims=1000000,1000000"], ["--max-memory", "8G"], "dims"),
        (["rank=1e8"], [], "rank"),  # 17 TB: more than any machine's free memory
    ],
)
def test_cli_refuses_a_run_that_cannot_fit(overrides, extra, key, tmp_path, capsys):
    from implreg.cli import main

    out = tmp_path / "run"
    args = ["run", "tf-dynamics", "--no-progress", "--out", str(out), *extra]
    for pair in overrides:
        args += ["--set", pair]
    start = time.perf_counter()
    assert main(args) == 2
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("implreg: error:") and err[0].endswith(f"lower {key}"), err
    assert not out.exists()


def test_cli_max_memory_refuses_even_a_default_run(tmp_path, capsys):
    from implreg.cli import main

    out = tmp_path / "run"
    assert main(["run", "mf-depth-vs-nuclear", "--out", str(out), "--max-memory", "1M"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-memory" in err[0] and err[0].endswith("lower shape"), err
    assert not out.exists()
