"""The slurm backend (submitit job arrays), run through submitit's local executor.

``IMPLREG_SLURM_CLUSTER=local`` makes submitit run the very jobs it would
submit to SLURM as local processes, so the backend's contract is tested here
without a cluster: the same numbers as the local pool, unit files written by
the driver, failures named with their log, interrupts cancel the jobs.
"""

from __future__ import annotations

import json

import pytest

from implreg.backends import map_items
from implreg.sweep import run_grid

submitit = pytest.importorskip(
    "submitit", reason="submitit is not installed: pip install '.[slurm]'"
)


@pytest.fixture(autouse=True)
def local_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("IMPLREG_SLURM_CLUSTER", "local")
    monkeypatch.setenv("IMPLREG_SLURM_FOLDER", str(tmp_path / "submitit"))
    monkeypatch.setenv("IMPLREG_SLURM", json.dumps({"timeout_min": 10}))


def test_a_preset_grid_on_slurm_equals_local(tmp_path):
    from conftest import run_config

    from implreg.config import with_overrides
    from implreg.experiments import PRESETS

    preset = PRESETS["mf-dynamics"]
    cfg = with_overrides(preset.config, {**preset.tiny, "depths": (1, 3), "workers": 2})
    local = run_config(cfg, tmp_path / "local")
    remote = run_config(cfg, tmp_path / "slurm", backend="slurm")
    for a, b in zip(local.summary["runs"], remote.summary["runs"]):
        a.pop("seconds"), b.pop("seconds")
        assert a == b
    assert list((tmp_path / "submitit").iterdir())  # the jobs' folders and logs


def test_a_failed_job_names_its_log(tmp_path):
    from test_sweep import Boom, Square

    with pytest.raises(RuntimeError, match=r"slurm job .* failed: .*its log is"):
        run_grid([Square("a", 2), Boom("b")], tmp_path / "run", workers=2, backend="slurm")


def test_interrupt_cancels_the_jobs(tmp_path):
    class Now:
        def is_set(self) -> bool:
            return True

    got = {}
    assert map_items(
        _slow, [1, 2], backend="slurm", workers=2, on_result=got.__setitem__, interrupt=Now()
    )
    assert got == {}


def _slow(x: int) -> int:
    import time

    time.sleep(30)
    return x


def test_bad_settings_are_one_sentence(monkeypatch):
    monkeypatch.setenv("IMPLREG_SLURM", "{bad")
    with pytest.raises(ValueError, match=r"\$IMPLREG_SLURM must be a JSON object"):
        map_items(_slow, [1], backend="slurm", workers=1, on_result=lambda i, v: None)
