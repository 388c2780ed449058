"""``implreg.allocator``: ``import implreg`` keeps freed memory in the process (glibc),
unless the environment opts out; the user's own malloc settings win."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
PROBE = "import implreg, implreg.allocator as a; print(a.retained())"


def _retained(**env_changes) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "IMPLREG_MALLOC"))}
    env.update(env_changes)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="mallopt thresholds are a glibc feature")
def test_import_applies_the_thresholds_on_glibc():
    assert _retained() == "True"


@pytest.mark.parametrize(
    "env",
    [
        {"IMPLREG_MALLOC": "system"},
        {"IMPLREG_MALLOC": " System "},
        {"IMPLREG_MALLOC": "sytem"},
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"MALLOC_MMAP_THRESHOLD_": "131072"},
        {"MALLOC_TOP_PAD_": "0"},
    ],
)
def test_the_environment_opts_out(env):
    assert _retained(**env) == "False"


def test_it_is_idempotent_and_reports_what_it_did():
    import implreg.allocator as a

    first = a.retain_freed_memory()
    assert a.retain_freed_memory() is first
    assert a.retained() is first


@pytest.mark.skipif(not GLIBC, reason="mallopt thresholds are a glibc feature")
def test_retain_is_the_explicit_default():
    assert _retained(IMPLREG_MALLOC="retain") == "True"


def test_the_command_line_refuses_a_bad_value_in_one_sentence(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMPLREG_MALLOC")}
    env["IMPLREG_MALLOC"] = "sytem"
    out = subprocess.run(
        [sys.executable, "-m", "implreg.cli", "run", "tf-dynamics", "--out", str(tmp_path / "r")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "implreg: error: IMPLREG_MALLOC must be one of retain, system, got 'sytem'"
    )
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()
