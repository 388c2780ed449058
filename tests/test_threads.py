"""The thread policy (implreg.threads): a pure function of the configuration and core count."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from implreg import threads as th
from implreg.experiments import get_preset


def test_small_work_gets_one_thread():
    for cores in (1, 2, 8, 64):
        assert th.choose_threads(0.0, cores=cores) == 1
        assert th.choose_threads(th.MIN_WORK_PER_THREAD, cores=cores) == 1
        assert th.choose_threads(2 * th.MIN_WORK_PER_THREAD - 1, cores=cores) == 1


def test_large_work_gets_all_cores_and_never_more():
    for cores in (1, 2, 8):
        assert th.choose_threads(1e30, cores=cores) == cores
        assert th.choose_threads(float("inf"), cores=cores) == cores
    assert th.choose_threads(2 * th.MIN_WORK_PER_THREAD, cores=2) == 2
    assert th.choose_threads(3.5 * th.MIN_WORK_PER_THREAD, cores=8) == 3


def test_monotone_in_work_and_cores():
    works = (
        [0.0] + [10.0**k for k in range(4, 14)] + [k * th.MIN_WORK_PER_THREAD for k in (1, 2, 3)]
    )
    works.sort()
    for cores in (1, 2, 4, 16):
        counts = [th.choose_threads(w, cores=cores) for w in works]
        assert counts == sorted(counts)
        assert all(1 <= c <= cores for c in counts)
    for w in works:
        per_cores = [th.choose_threads(w, cores=c) for c in (1, 2, 4, 16)]
        assert per_cores == sorted(per_cores)


def test_deterministic():
    for w in (1e6, 3e9, 5e9, 1e12):
        assert len({th.choose_threads(w, cores=2) for _ in range(5)}) == 1
    assert th.choose_threads(1e12) == th.choose_threads(1e12, cores=th.available_cores())


def test_requested_overrides():
    assert th.choose_threads(0.0, requested=2, cores=2) == 2
    assert th.choose_threads(1e30, requested=1, cores=2) == 1
    assert th.choose_threads(1e30, requested=4, cores=2) == 4  # an explicit request is obeyed
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            th.choose_threads(0.0, requested=bad)


def test_bad_arguments():
    with pytest.raises(ValueError):
        th.choose_threads(-1.0, cores=2)
    with pytest.raises(ValueError):
        th.choose_threads(float("nan"), cores=2)
    with pytest.raises(ValueError):
        th.choose_threads(1.0, cores=0)


def test_available_cores():
    assert 1 <= th.available_cores() <= (__import__("os").cpu_count() or 1)


def test_use_threads_restores():
    before = torch.get_num_threads()
    with th.use_threads(1) as n:
        assert n == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), th.use_threads(2):
        assert torch.get_num_threads() == 2
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError), th.use_threads(0):
        pass
    assert torch.get_num_threads() == before


def test_cp_flops_formula():
    # dense completion: three P x R GEMMs per run
    assert th.cp_step_flops([10] * 4, 1000, 2000, 3, method="dense") == 6 * 3 * 10**4 * 1000
    # sampled completion: the same products at the m observed entries only
    assert th.cp_step_flops([10] * 4, 1000, 2000, 3, method="sampled") == 6 * 3 * 2000 * 1000
    assert th.cp_step_flops([10] * 4, 1000, 2000, 3) == th.cp_step_flops(
        [10] * 4, 1000, 2000, 3, method="sampled"
    )  # auto picks sampled for Figure 3 (density 0.2) on the CPU
    dense = th.cp_step_flops([10] * 4, 10, 50, 1, task="sensing")
    assert dense == 6 * 10**4 * 10 + 4 * 50 * 10**4
    # gather: elementwise work is not counted, only the tables' contractions (groups of
    # three modes of 10, three of them, and one of a single mode)
    g = th.cp_step_flops([10] * 10, 100, 100_000, 1)
    assert g == 2 * 100 * (3 * 3 * 1000 + 10)
    assert th.cp_step_flops([10] * 10, 100, 500_000, 1) == g  # not in m
    assert th.cp_step_flops([10] * 4, 10, 50, 2, task="sensing", measurement="rank_one") == (
        4 * 2 * 50 * 10 * 40
    )
    with pytest.raises(ValueError):
        th.cp_step_flops([10] * 4, 10, 10, task="nope")
    with pytest.raises(ValueError):
        th.cp_step_flops([10] * 4, 10, 10, method="nope")


def test_flops_monotone_in_size():
    base = th.cp_step_flops([10] * 4, 100, 2000, 1)
    assert th.cp_step_flops([10] * 4, 200, 2000, 1) > base
    assert th.cp_step_flops([10] * 4, 100, 2000, 2) > base
    mf = th.mf_step_flops((100, 100), 3, 2000)
    assert mf == 6 * 100 * (100 * 100 + 100 * 100)
    assert th.mf_step_flops((100, 100), 1, 2000) == 0
    assert th.mf_step_flops((100, 100), 4, 2000) > mf
    assert th.mf_step_flops((100, 100), 3, 2000, task="sensing") > mf


def test_presets_choose_one_thread_on_two_cores():
    """The measured policy: every CP dynamics preset runs on one thread of a 2-core machine."""
    for name in ("tf-dynamics", "tf-huber", "tf-sensing", "tf-order"):
        cfg = get_preset(name).config
        assert th.threads_for_config(cfg, cores=2) == 1, name
        assert th.threads_for_config(cfg, requested=2, cores=2) == 2
    big = dataclasses.replace(get_preset("tf-dynamics").config, rank=100_000, method="dense")
    assert th.threads_for_config(big, cores=2) == 2
    # the sampled engine's products are 5x fewer (and its kernels run on one thread)
    assert th.threads_for_config(dataclasses.replace(big, method="auto"), cores=2) == 1
    assert th.threads_for_config(object(), cores=2) == 1  # unknown work: one thread
    mf = get_preset("mf-dynamics").config
    assert th.threads_for_config(mf, cores=2) == 1
    unit = get_preset("mf-dynamics").experiment.units(mf)[0]  # grid units name it ``m``
    assert th.config_step_flops(unit) == th.mf_step_flops(unit.shape, unit.depth, unit.m)


def test_prefer_passive_wait_only_before_torch():
    assert th.prefer_passive_wait() is False  # torch is loaded in this process
    code = (
        "import os, sys; os.environ.pop('OMP_WAIT_POLICY', None)\n"
        "from implreg.threads import prefer_passive_wait\n"
        "assert 'torch' not in sys.modules\n"
        "assert prefer_passive_wait() is True\n"
        "print(os.environ['OMP_WAIT_POLICY'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"


def test_measured_sizes_on_two_cores():
    """Where bench_threads.py --sweep placed the threshold (2 cores)."""
    dense = th.cp_step_flops  # dims 10^4, m=2000, dense engine

    assert th.choose_threads(dense([10] * 4, 16000, 2000, 1, method="dense"), cores=2) == 1
    assert th.choose_threads(dense([20] * 4, 1000, 2000, 1, method="dense"), cores=2) == 1
    assert th.choose_threads(dense([10] * 4, 16000, 2000, 5, method="dense"), cores=2) == 2
    assert th.choose_threads(dense([10] * 4, 16000, 2000, 20, method="dense"), cores=2) == 2
    for m in (100_000, 500_000, 10**8):  # the gather engine: one thread at any m
        assert th.choose_threads(dense([10] * 10, 100, m, 1), cores=2) == 1
