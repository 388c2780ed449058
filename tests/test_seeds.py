"""Seed sweeps: parsing, one run folder per seed equal to a plain run, the aggregate, resume."""

from __future__ import annotations

import json

import pytest
from conftest import run_config

from implreg.api import load
from implreg.cli import main
from implreg.config import ConfigError, with_overrides
from implreg.experiments import PRESETS
from implreg.seeds import parse_seeds, seed_sweep

TINY = [
    f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
    for k, v in PRESETS["tf-dynamics"].tiny.items()
]


@pytest.mark.parametrize(
    ("text", "seeds"),
    [("0-3", [0, 1, 2, 3]), ("4,1,1", [1, 4]), ("0-2,7", [0, 1, 2, 7]), ("5", [5])],
)
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "a", "3-1", "-1", "1.5", "0-100000"])
def test_parse_seeds_refuses(text):
    with pytest.raises(ConfigError):
        parse_seeds(text)


def test_sweep_folders_equal_plain_runs_and_aggregate(tmp_path):
    res = seed_sweep("tf-dynamics", [0, 2], out=tmp_path / "sw", overrides=TINY)
    assert not res.interrupted and res.seeds == [0, 2]
    agg = json.loads((tmp_path / "sw" / "aggregate.json").read_text())
    assert agg["seeds"] == [0, 2] and len(agg["runs"]) == 2
    first = agg["runs"][0]
    assert first["init_std"] == 0.1  # identical in every seed: kept as the run's label
    stats = first["final_reconstruction_error"]
    assert stats["n"] == 2 and stats["min"] <= stats["median"] <= stats["max"]
    assert 0 <= first["exactly_gt_rank_learned_fraction"] <= 1
    assert (tmp_path / "sw" / "aggregate.png").stat().st_size > 0
    # each seed's folder is an ordinary run folder, the same as running that seed alone
    cfg = with_overrides(PRESETS["tf-dynamics"].config, [*TINY, "seed=2"])
    alone = run_config(cfg, tmp_path / "alone")
    swept = load(tmp_path / "sw" / "seed-2")
    assert swept.finished and swept.config == alone.config
    assert (swept.path / "metrics.csv").read_text() == (alone.path / "metrics.csv").read_text()
    # the same command again reads the seeds back
    again = seed_sweep("tf-dynamics", [0, 2], out=tmp_path / "sw", overrides=TINY)
    assert again.aggregate["runs"] == agg["runs"]


def test_sweep_cli_and_bad_input(tmp_path, capsys):
    out = tmp_path / "sw"
    argv = ["sweep", "mf-det-sign", "--seeds", "0-1", "--out", str(out), "--no-progress"]
    tiny = [
        f"--set={k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
        for k, v in PRESETS["mf-det-sign"].tiny.items()
    ]
    assert main([*argv, *tiny]) == 0
    text = capsys.readouterr().out
    assert "mf-det-sign over seeds 0..1 (2)" in text and "final_abs_w11 median" in text
    for bad, message in [
        (["sweep", "tf-dynamics", "--seeds", "x"], "--seeds takes seeds like"),
        (["sweep", "nope", "--seeds", "0"], "unknown preset"),
        (["sweep", "tf-dynamics", "--seeds", "0", "--set", "seed=3"], "come from --seeds"),
        (["sweep", "tf-dynamics", "--seeds", "0", "--set", "rank=0"], "rank must be >= 1"),
    ]:
        assert main([*bad, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("implreg: error:") and message in err and len(err.splitlines()) == 1
        assert not (tmp_path / "bad").exists()
