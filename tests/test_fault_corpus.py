"""The fault corpus: bad input, damaged run folders and faults, each with a clear outcome.

Every case asserts the exit code, one sentence on stderr (``implreg: error: ...``) and
no traceback, and that nothing was lost or half-written: a refused command creates no
folder and leaves an existing one byte for byte as it was (``.lock`` aside: it holds the
pid of the last process that locked the folder).  A few cases may either be refused or
complete; completing then means the results equal those of an undisturbed run.

Faults covered: kill -9 then ``--resume`` (bit-identical), kill -9 of a grid driver
(no worker survives), two processes on one folder, Ctrl-C at several moments, a full
disk (simulated ENOSPC, and a real small tmpfs where this process may mount one),
runs that diverge.  Most cases call :func:`implreg.cli.main` in this process; signals
and kill -9 use subprocesses, always with timeouts.
"""

from __future__ import annotations

import builtins
import csv
import dataclasses
import errno
import gzip
import io
import json
import math
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import StopAfter, run_config

import implreg
from implreg.api import run_preset
from implreg.cli import main
from implreg.config import ConfigError, with_overrides
from implreg.experiments import PRESETS

# ----------------------------------------------------------------------------- helpers

LOCK = ".lock"
GRIDS = ("mf-dynamics", "mf-det-sign", "mf-depth-vs-nuclear")


def _text(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def sets(preset: str, **over) -> list[str]:
    """``--set`` options of the tiny budget of ``preset``, ``over`` replacing (None: dropping)."""
    values = {k: _text(v) for k, v in PRESETS[preset].tiny.items()}
    for k, v in over.items():
        if v is None:
            values.pop(k, None)
        else:
            values[k] = _text(v)
    out: list[str] = []
    for k, v in values.items():
        out += ["--set", f"{k}={v}"]
    return [*out, "--no-progress"]


def tiny(preset: str, **over) -> list[str]:
    return ["run", preset, *sets(preset, **over)]


def tiny_config(preset: str, data_dir=None):
    p = PRESETS[preset]
    cfg = with_overrides(p.config, dict(p.tiny))
    if data_dir is not None and "data_dir" in {f.name for f in dataclasses.fields(cfg)}:
        cfg = dataclasses.replace(cfg, data_dir=str(data_dir))
    return cfg


def call(argv, capsys) -> tuple[int, str, str]:
    """``main(argv)`` in this process: (exit code, stdout, stderr); an escaping exception fails."""
    capsys.readouterr()
    try:
        with warnings.catch_warnings(record=True) as caught:  # a user sees them on stderr
            warnings.simplefilter("always")
            code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Hang:
        capsys.readouterr()
        pytest.fail("hang: no answer before the deadline", pytrace=False)
    except Exception as exc:  # noqa: BLE001 - an escaping exception is a traceback for a user
        capsys.readouterr()
        first = (str(exc).splitlines() or [""])[0][:300]
        pytest.fail(f"traceback: {type(exc).__name__}: {first}", pytrace=False)
    cap = capsys.readouterr()
    shown = "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
    return code, cap.out, cap.err + shown


class Hang(Exception):  # noqa: N818 - not an OSError, so that no handler turns it into a message
    """Raised in a case that runs past its deadline."""


def refused(code: int, err: str, *, want: int | tuple = 2, names=()) -> None:
    """Exit ``want``; stderr exactly one line ``implreg: error: ...`` (naming one of ``names``)."""
    wants = want if isinstance(want, tuple) else (want,)
    problems = []
    if code not in wants:
        problems.append(f"exit {code} (want {' or '.join(map(str, wants))})")
    if "Traceback" in err:
        problems.append("a traceback on stderr")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr (want 1)")
    elif not lines[0].startswith("implreg: error: "):
        problems.append("stderr does not start with 'implreg: error: '")
    if names and not any(str(n) in err for n in names):
        problems.append(f"the message names none of {[str(n) for n in names]}")
    tail = lines[-1][:400] if lines else ""
    assert not problems, "; ".join(problems) + f" | last stderr line: {tail!r}"


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (files with their bytes), ``.lock`` files left out."""
    root = Path(root)
    if not root.exists():
        return {}
    if root.is_file():
        return {".": root.read_bytes()}
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        if p.name == LOCK:
            continue
        rel = p.relative_to(root).as_posix()
        out[rel] = None if p.is_dir() else p.read_bytes()
    return out


def unchanged(before: dict, after: dict, what: str = "the folder") -> None:
    if before == after:
        return
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    pytest.fail(
        f"{what} changed: added {added[:6]}, removed {removed[:6]}, rewritten {changed[:6]}",
        pytrace=False,
    )


def untimed(obj):
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if "second" not in k}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def table(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return untimed(list(csv.DictReader(fh)))


def same_results(a: Path, b: Path) -> None:
    """Folders ``a`` and ``b`` hold the same summary, table and trajectories (timings aside)."""
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    assert untimed(sa) == untimed(sb), "summary.json differs from the undisturbed run"
    assert table(a / "metrics.csv") == table(b / "metrics.csv"), "metrics.csv differs"
    for npz in a.glob("*.npz"):
        with np.load(npz) as x, np.load(b / npz.name) as y:
            assert sorted(x.files) == sorted(y.files)
            for k in x.files:
                assert np.array_equal(x[k], y[k], equal_nan=True), f"{npz.name}:{k} differs"


def no_temp_files(folder: Path) -> None:
    left = [p.relative_to(folder).as_posix() for p in folder.rglob("*.tmp")]
    assert not left, f"half-written temporary files left: {left}"


def complete_pngs(folder: Path) -> None:
    for p in folder.rglob("*.png"):
        data = p.read_bytes()
        assert data.startswith(b"\x89PNG") and data.rstrip(b"\0").endswith(b"IEND\xaeB`\x82"), (
            f"{p.name} is a half-written figure ({len(data)} bytes)"
        )


QUICK = 20  # seconds within which bad input must be refused
REFUSALS = {
    "test_bad_input_is_refused_in_one_sentence",
    "test_api_bad_arguments_raise_config_error",
}


@pytest.fixture
def inproc(tmp_path, monkeypatch, request):
    """In-process cases: cwd in tmp_path, no data folder from the environment, a memory cap
    (a case that tries to allocate terabytes fails instead of waking the OOM killer) and
    a deadline: a refusal is due within 20 s, a case that may run within 120 s."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IMPLREG_DATA_DIR", raising=False)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as fh:
        vm = next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("VmSize:"))
    cap = vm + 8 * 2**30
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))

    seconds = QUICK if request.function.__name__ in REFUSALS else 120

    def on_alarm(signum, frame):  # noqa: ARG001
        raise Hang(f"the case ran for more than {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield tmp_path
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ----------------------------------------------------------------- reference run folders


@pytest.fixture(scope="session")
def refs(tmp_path_factory, fake_data):
    """Reference run folders, each built once when first asked for: ``tf_done``,
    ``tf_cut`` (interrupted, with a checkpoint), ``<grid>_done`` and ``<grid>_cut`` (a
    grid stopped with its last unit missing)."""
    root = tmp_path_factory.mktemp("refs")
    built: dict[str, Path] = {}
    quiet = {"log": lambda *_: None}

    def get(name: str) -> Path:
        if name in built:
            return built[name]
        path = root / name
        if name == "tf_done":
            run_config(tiny_config("tf-dynamics"), path)
        elif name == "tf_cut":
            run = run_config(tiny_config("tf-dynamics"), path, interrupt=StopAfter(100))
            assert run.interrupted and (path / "checkpoint.pt").is_file()
        elif name.endswith("_done"):
            preset = name[: -len("_done")]
            run = run_preset(tiny_config(preset, fake_data), out=path, **quiet)
            assert run.exit_code == 0
        elif name.endswith("_cut"):
            done = get(name[: -len("_cut")] + "_done")
            shutil.copytree(done, path)
            for p in [path / "summary.json", path / "metrics.csv", *path.glob("*.png")]:
                p.unlink(missing_ok=True)
            units = sorted((path / "units").glob("*.json"))
            assert len(units) >= 2
            units[-1].unlink()
        else:
            raise KeyError(name)
        built[name] = path
        return path

    return get


def first_unit(folder: Path) -> Path:
    return sorted((folder / "units").glob("*.json"))[0]


# ------------------------------------------------------------------------ bad input (CLI)

OUT = "{out}"
TF = "tf-dynamics"


def _bad(preset: str, key: str, value: str, **extra):
    return pytest.param(tiny(preset, **{key: value}), extra, id=f"{preset} {key}={value}")


BAD_VALUES = {
    TF: [
        # wrong types
        ("rank", "abc"),
        ("rank", "2.5"),
        ("rank", ""),
        ("rank", "0x10"),
        ("rank", "20.000000000000001"),
        ("rank", "1e-3"),
        ("num_observations", "40.5"),
        ("dims", "a,b,c"),
        ("dims", "4,4,x"),
        ("dims", "4.5,4,4"),
        ("dims", ",,,"),
        ("init_stds", "x"),
        ("init_stds", "0.1,,abc"),
        ("optimizer", "sgd"),
        ("loss", "l1"),
        ("dtype", "float16"),
        ("method", "sparse"),
        ("task", "regression"),
        ("measurement", "bernoulli"),
        ("patience", "1.5"),
        ("check_every", "abc"),
        ("learned_fraction", "half"),
        ("seed", "abc"),
        ("seed", "3.0000000000000001"),
        # out of range
        ("rank", "0"),
        ("rank", "-1"),
        ("gt_rank", "0"),
        ("dims", "0,4,4"),
        ("dims", "-4,4,4"),
        ("dims", "4"),
        ("num_observations", "0"),
        ("num_observations", "-5"),
        ("num_observations", "1000"),
        ("lr", "0"),
        ("lr", "-0.1"),
        ("eps", "0"),
        ("tol", "-1"),
        ("huber_delta", "-1"),
        ("patience", "0"),
        ("check_every", "0"),
        ("max_iterations", "0"),
        ("log_every", "0"),
        ("max_records", "3"),
        ("top_k", "0"),
        ("learned_fraction", "0"),
        ("learned_fraction", "1"),
        ("learned_fraction", "1.5"),
        ("gt_norm", "0"),
        ("init_stds", "0"),
        ("init_stds", "0.1,-0.1"),
        ("recon_sample", "0"),
        ("dense_max", "0"),
        ("seed", "-1"),
        ("seed", "18446744073709551616"),
        # not finite
        ("lr", "nan"),
        ("lr", "inf"),
        ("lr", "-inf"),
        ("gt_norm", "inf"),
        ("init_stds", "nan"),
        ("init_mean", "nan"),
        ("init_mean", "inf"),
        ("eps", "nan"),
        ("tol", "inf"),
        ("huber_delta", "nan"),
        ("learned_fraction", "nan"),
        # sizes that cannot fit in memory or in an integer
        ("rank", "100000000"),
        ("rank", "9007199254740993.0"),
        ("rank", "1e300"),
        ("num_observations", "1e12"),
        ("num_observations", "99999999999999999999999"),
        ("max_iterations", "1e300"),
        ("rank", "9223372036854775808"),
    ],
    "mf-dynamics": [
        ("shape", "0,12"),
        ("shape", "12"),
        ("shape", "1000000,1000000"),
        ("depths", "0"),
        ("depths", "x"),
        ("init", "zeros"),
        ("workers", "0"),
        ("workers", "-1"),
        ("num_observations", "1000"),
        ("num_observations", "1e12"),
        ("init_scale", "0"),
        ("lr", "nan"),
    ],
    "mf-det-sign": [
        ("modes", "euler"),
        ("inits", "zeros"),
        ("flow_c", "1"),
        ("record_ratio", "0"),
        ("depths", "0"),
        ("loss_tol", "0"),
        ("max_steps_gd", "0"),
        ("lr", "inf"),
        ("end_std", "-1"),
    ],
    "mf-depth-vs-nuclear": [
        ("observations", "0"),
        ("observations", "100000"),
        ("init_scales", "-1"),
        ("depths", "0"),
        ("shape", "100000,100000"),
    ],
    "tensor-rank-complexity": [
        ("classes", "10"),
        ("ranks", "0"),
        ("ranks", "100000000"),
        ("centroids", "1"),
        ("representation", "rgb"),
        ("iterations", "0"),
        ("datasets", "cifar"),
        ("variants", "shuffled"),
        ("threads", "-1"),
        ("train_samples", "-1"),
    ],
}

BAD_INPUT = [_bad(p, k, v) for p, pairs in BAD_VALUES.items() for k, v in pairs]
for _p in ("tf-huber", "tf-sensing", "tf-order"):
    BAD_INPUT.append(_bad(_p, "rank", "0"))
BAD_INPUT += [
    # CP factors of the default rank 1000 over modes of 10^6 need tens of GB
    pytest.param(
        tiny(TF, dims="1000000,1000000", rank=None), {}, id="tf-dynamics dims=1000000,1000000"
    ),
    pytest.param(
        tiny(TF, dims="1000000,1000000,1000000", rank=None),
        {},
        id="tf-dynamics dims=1000000,1000000,1000000",
    ),
    pytest.param(tiny(TF, huber_delta="0") + ["--set", "loss=huber"], {}, id="huber delta 0"),
    pytest.param(tiny(TF) + ["--set", "rank=5"], {}, id="a key set twice"),
    pytest.param(tiny(TF) + ["--set", "bogus=1"], {}, id="unknown key"),
    pytest.param(tiny(TF) + ["--set", "RANK=5"], {}, id="unknown key RANK"),
    pytest.param(tiny(TF) + ["--set", "rank"], {}, id="set without ="),
    pytest.param(tiny(TF) + ["--set", "=5"], {}, id="set with empty key"),
    pytest.param(["run", "no-such-preset", "--no-progress"], {}, id="unknown preset"),
    pytest.param(["run", "tf_dynamics", "--no-progress"], {}, id="preset misspelt"),
    pytest.param(["run", "--no-progress"], {}, id="no preset"),
    pytest.param(["show", "no-such-preset"], {}, id="show unknown preset"),
    pytest.param(["frobnicate"], {}, id="unknown command"),
    pytest.param([], {}, id="no command"),
    pytest.param(tiny(TF) + ["--bogus-option"], {}, id="unknown option"),
    pytest.param(tiny(TF) + ["--backend", "dask"], {}, id="backend dask"),
    pytest.param(tiny(TF) + ["--backend", ""], {}, id="backend empty"),
    pytest.param(tiny(TF) + ["--device", "tpu"], {}, id="device tpu"),
    pytest.param(tiny(TF) + ["--device", "cuda:7"], {}, id="device cuda:7"),
    pytest.param(tiny(TF) + ["--device", ""], {}, id="device empty"),
    pytest.param(tiny(TF) + ["--seed", "-1"], {}, id="seed -1"),
    pytest.param(tiny(TF) + ["--seed", "18446744073709551616"], {}, id="seed 2**64"),
    pytest.param(tiny(TF) + ["--seed", "9" * 30], {}, id="seed 30 digits"),
    pytest.param(tiny(TF) + ["--seed", "abc"], {}, id="seed abc"),
    pytest.param(tiny(TF) + ["--seed", "1.5"], {}, id="seed 1.5"),
    pytest.param(tiny(TF) + ["--out", ""], {}, id="out empty"),
    pytest.param(tiny(TF) + ["--out", "  "], {}, id="out blank"),
    pytest.param(tiny(TF) + ["--out", "{afile}/x"], {}, id="out under a file"),
    pytest.param(tiny(TF) + ["--out", "{afile}"], {}, id="out is a file"),
    pytest.param(tiny(TF) + ["--out", "{full}"], {}, id="out is a non-empty folder"),
    pytest.param(tiny(TF) + ["--out", "/proc/implreg-x"], {}, id="out in proc"),
    pytest.param(tiny(TF) + ["--out", "/dev/null"], {}, id="out is dev-null"),
    pytest.param(tiny(TF) + ["--max-memory", "lots"], {}, id="max-memory lots"),
    pytest.param(tiny(TF) + ["--threads", "0"], {}, id="threads 0"),
    pytest.param(tiny(TF) + ["--checkpoint-every", "-1"], {}, id="checkpoint-every -1"),
    pytest.param(tiny(TF) + ["--checkpoint-seconds", "nan"], {}, id="checkpoint-seconds nan"),
    pytest.param(tiny(TF) + ["--data-dir", "{emptydir}"], {}, id="data-dir for tf-dynamics"),
    # data folders
    pytest.param(tiny("tensor-rank-complexity"), {}, id="trc without data-dir"),
    pytest.param(
        tiny("tensor-rank-complexity") + ["--data-dir", "{afile}"],
        {"names": ["{afile}"]},
        id="trc data-dir is a file",
    ),
    pytest.param(
        tiny("tensor-rank-complexity") + ["--data-dir", "{tmp}/missing"],
        {"names": ["missing"]},
        id="trc data-dir missing",
    ),
    pytest.param(
        tiny("tensor-rank-complexity") + ["--data-dir", "{emptydir}"], {}, id="trc data-dir empty"
    ),
    # --resume / --config with other options
    pytest.param(["run", "--resume", "{cut}", TF], {}, id="resume with a preset"),
    pytest.param(["run", "--resume", "{cut}", "--set", "rank=5"], {}, id="resume with --set"),
    pytest.param(["run", "--resume", "{cut}", "--seed", "1"], {}, id="resume with --seed"),
    pytest.param(
        ["run", "--resume", "{cut}", "--config", "{cut}/config.json"], {}, id="resume with --config"
    ),
    pytest.param(
        ["run", "--resume", "{cut}", "--data-dir", "{emptydir}"], {}, id="resume with --data-dir"
    ),
    pytest.param(["run", "--resume", "{cut}", "--out", "{out}"], {}, id="resume with --out"),
    pytest.param(["run", "--resume", ""], {}, id="resume empty path"),
    pytest.param(["run", TF, "--config", "{cut}/config.json"], {}, id="config with a preset"),
    # sweep
    pytest.param(["sweep", TF, "--seeds", "x", *sets(TF)], {}, id="sweep seeds x"),
    pytest.param(["sweep", TF, "--seeds", "5-1", *sets(TF)], {}, id="sweep seeds 5-1"),
    pytest.param(["sweep", TF, "--seeds", "", *sets(TF)], {}, id="sweep seeds empty"),
    pytest.param(["sweep", TF, "--seeds", "-1", *sets(TF)], {}, id="sweep seeds -1"),
    pytest.param(["sweep", TF, "--seeds", "0-99999999", *sets(TF)], {}, id="sweep 1e8 seeds"),
    pytest.param(["sweep", "no-such", "--seeds", "0"], {}, id="sweep unknown preset"),
    pytest.param(["sweep", TF, "--seeds", "0", *sets(TF, rank=0)], {}, id="sweep rank=0"),
]

# IDX data folders for tensor-rank-complexity (one damaged thing each)


def _idx(array: np.ndarray, code: int = 0x08) -> bytes:
    head = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return head + array.tobytes()


def _images(n: int, side: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = ((rng.random((n, side, side)) < 0.3) * 255).astype(np.uint8)
    return images, labels


def _write_mnist(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def _good_files(train_side=8, test_side=8, n_train=600, n_test=200) -> dict[str, bytes]:
    tr, trl = _images(n_train, train_side, 1)
    te, tel = _images(n_test, test_side, 2)
    return {
        "train-images-idx3-ubyte.gz": gzip.compress(_idx(tr)),
        "train-labels-idx1-ubyte": _idx(trl),
        "t10k-images-idx3-ubyte.gz": gzip.compress(_idx(te)),
        "t10k-labels-idx1-ubyte": _idx(tel),
    }


def _data_variants() -> dict[str, dict[str, bytes] | None]:
    v: dict[str, dict[str, bytes] | None] = {}
    v["train 8x8, test 10x10"] = _good_files(8, 10)
    v["zero train images"] = _good_files(n_train=0)
    v["zero test images"] = _good_files(n_test=0)
    v["zero-pixel images"] = _good_files(0, 0)
    f = _good_files()
    f["train-labels-idx1-ubyte"] = _idx(_images(599, 8)[1])
    v["599 labels for 600 images"] = f
    f = _good_files()
    f["train-images-idx3-ubyte.gz"] = gzip.compress(_idx(_images(600, 8)[0])[:-100])
    v["truncated images"] = f
    f = _good_files()
    f["t10k-labels-idx1-ubyte"] = b"\x12\x34" + _idx(_images(200, 8)[1])[2:]
    v["bad magic"] = f
    f = _good_files()
    f["train-images-idx3-ubyte.gz"] = b"\x1f\x8b" + b"not gzip at all" * 10
    v["corrupt gzip"] = f
    f = _good_files()
    del f["train-labels-idx1-ubyte"]
    v["missing labels"] = f
    f = _good_files()
    f["train-images-idx3-ubyte.gz"] = gzip.compress(_idx(_images(600, 8)[0].reshape(600, 64)))
    v["2-d images"] = f
    f = _good_files()
    bad = _images(200, 8)[1].copy()
    bad[5] = 12
    f["t10k-labels-idx1-ubyte"] = _idx(bad)
    v["label 12"] = f
    f = _good_files()
    f["train-images-idx3-ubyte.gz"] = gzip.compress(
        _idx(_images(600, 8)[0].astype(">f4"), code=0x0D)
    )
    v["float images"] = f
    f = _good_files()
    f["train-images-idx3-ubyte.gz"] = b""
    v["empty image file"] = f
    v["no mnist folder"] = None
    v["empty mnist folder"] = {}
    return v


DATA_VARIANTS = _data_variants()


@pytest.fixture(scope="session")
def bad_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-data")
    out = {}
    for i, (name, files) in enumerate(DATA_VARIANTS.items()):
        base = root / f"v{i}"
        base.mkdir()
        if files is not None:
            _write_mnist(base / "mnist", files)
        out[name] = base
    return out


BAD_INPUT += [
    pytest.param(
        tiny("tensor-rank-complexity") + ["--data-dir", "{data:" + name + "}"],
        {},
        id=f"trc data {name}",
    )
    for name in DATA_VARIANTS
]


def _fill(argv, places: dict) -> list[str]:
    out = []
    for a in argv:
        if a.startswith("{data:"):
            out.append(str(places["data"][a[6:-1]]))
        else:
            out.append(a.format_map(places) if "{" in a else a)
    return out


@pytest.mark.parametrize(("argv", "extra"), BAD_INPUT)
def test_bad_input_is_refused_in_one_sentence(argv, extra, inproc, capsys, refs, bad_data):
    tmp = inproc
    (tmp / "afile").write_text("x")
    (tmp / "emptydir").mkdir()
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("keep")
    places = {
        "tmp": tmp,
        "out": tmp / "run",
        "afile": tmp / "afile",
        "emptydir": tmp / "emptydir",
        "full": tmp / "full",
        "cut": tmp / "cut",
        "data": bad_data,
    }
    if any("{cut}" in a for a in argv):
        shutil.copytree(refs("tf_cut"), tmp / "cut")
    argv = _fill(argv, places)
    if argv and argv[0] in ("run", "sweep") and "--out" not in argv and "--resume" not in argv:
        argv += ["--out", str(places["out"])]
    before = snapshot(tmp)
    code, _, err = call(argv, capsys)
    refused(code, err, names=[_fill([n], places)[0] for n in extra.get("names", ())])
    unchanged(before, snapshot(tmp), "the working folder")


# ------------------------------------------------------------------ damaged run folders


def _random_bytes(n: int = 600) -> bytes:
    return np.random.default_rng(7).integers(0, 256, n, dtype=np.uint8).tobytes()


def truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def empty(p: Path) -> None:
    p.write_bytes(b"")


def garbage(p: Path) -> None:
    p.write_bytes(_random_bytes())


def remove(p: Path) -> None:
    shutil.rmtree(p) if p.is_dir() else p.unlink()


def to_dir(p: Path) -> None:
    remove(p)
    p.mkdir()
    (p / "x").write_text("x")


def to_file(p: Path) -> None:
    remove(p)
    p.write_text("not a folder")


def text(s: str):
    def damage(p: Path) -> None:
        p.write_text(s)

    return damage


def torch_other(p: Path) -> None:
    torch.save({"hello": torch.zeros(2)}, p)


def edit(fn):
    """Damage a JSON file by editing its parsed content with ``fn(obj)``."""

    def damage(p: Path) -> None:
        obj = json.loads(p.read_text())
        fn(obj)
        p.write_text(json.dumps(obj))

    return damage


def setcfg(key, value):
    return edit(lambda d: d["config"].__setitem__(key, value))


def setunit(key, value):
    return edit(lambda d: d.__setitem__(key, value))


def _unit_field(d):
    spec = d["unit"]
    k = next(k for k, v in spec.items() if isinstance(v, int) and not isinstance(v, bool))
    spec[k] = spec[k] + 1


CONFIG_DAMAGE = {
    "truncated": truncate,
    "empty": empty,
    "random bytes": garbage,
    "{bad": text("{bad"),
    "[1,2]": text("[1,2]"),
    '"hello"': text('"hello"'),
    "null": text("null"),
    "no config key": edit(lambda d: d.pop("config")),
    "config is a list": edit(lambda d: d.__setitem__("config", [1])),
    "unknown experiment": edit(lambda d: d.__setitem__("experiment", "no_such_experiment")),
    "experiment not a string": edit(lambda d: d.__setitem__("experiment", 5)),
    "rank of wrong type": setcfg("rank", "abc"),
    "rank a float": setcfg("rank", 2.5),
    "rank a bool": setcfg("rank", True),
    "rank out of range": setcfg("rank", 0),
    "rank huge": setcfg("rank", 10**12),
    "lr NaN": setcfg("lr", float("nan")),
    "dims with a string": setcfg("dims", [4, "x", 4]),
    "unknown config key": setcfg("bogus", 1),
    "missing": remove,
    "a folder": to_dir,
}

RESUME_ONLY = {
    "device tpu": edit(lambda d: d.__setitem__("device", "tpu")),
    "rank edited": setcfg("rank", 21),
    "dims edited": setcfg("dims", [4, 4, 5]),
    "init_stds edited": setcfg("init_stds", [0.1]),
}

CKPT_DAMAGE = {
    "truncated": truncate,
    "empty": empty,
    "random bytes": garbage,
    "json text": text('{"iteration": 3}'),
    "another torch file": torch_other,
    "a folder": to_dir,
}

UNIT_DAMAGE = {
    "truncated": truncate,
    "empty": empty,
    "random bytes": garbage,
    "[1,2]": text("[1,2]"),
    "no unit key": edit(lambda d: d.pop("unit")),
    "result a string": setunit("result", "x"),
    "result null": setunit("result", None),
    "other settings": edit(_unit_field),
}

TABLE_DAMAGE = {
    "truncated": truncate,
    "empty": empty,
    "random bytes": garbage,
    "header only": lambda p: p.write_text(p.read_text().splitlines()[0] + "\n"),
    "a word for a number": lambda p: p.write_text(
        p.read_text().replace("\n0,0,", "\nabc,0,", 1).replace("\n1,0,", "\nabc,0,", 1)
    ),
    "missing": remove,
}

NPZ_DAMAGE = {
    "truncated": truncate,
    "empty": empty,
    "random bytes": garbage,
    "missing": remove,
    "other arrays": lambda p: np.savez(str(p), x=np.zeros(3)),
}


@dataclasses.dataclass(frozen=True)
class Damaged:
    ref: str  # reference folder (see ``refs``)
    command: str  # resume | config | plot
    target: str  # file inside the folder; "@unit": the first unit file
    damage: object
    expect: str = "refused"  # refused | either (refused, or completes with equal results)


DAMAGED: list = []


def _add(id_: str, case: Damaged) -> None:
    DAMAGED.append(pytest.param(case, id=id_))


for _name, _fn in {**CONFIG_DAMAGE, **RESUME_ONLY}.items():
    _add(f"resume tf config.json {_name}", Damaged("tf_cut", "resume", "config.json", _fn))
for _name, _fn in CKPT_DAMAGE.items():
    _add(f"resume tf checkpoint.pt {_name}", Damaged("tf_cut", "resume", "checkpoint.pt", _fn))
for _name, _fn in CONFIG_DAMAGE.items():
    _add(f"redo tf config.json {_name}", Damaged("tf_done", "config", "config.json", _fn))
for _name in ("{bad", "no config key", "unknown experiment", "missing", "rank of wrong type"):
    _add(
        f"plot tf config.json {_name}",
        Damaged("tf_done", "plot", "config.json", CONFIG_DAMAGE[_name]),
    )
for _name, _fn in TABLE_DAMAGE.items():
    _add(f"plot tf metrics.csv {_name}", Damaged("tf_done", "plot", "metrics.csv", _fn))
for _name, _fn in NPZ_DAMAGE.items():
    _add(
        f"plot tf component_norms.npz {_name}",
        Damaged("tf_done", "plot", "component_norms.npz", _fn),
    )
_add("plot tf summary.json missing", Damaged("tf_done", "plot", "summary.json", remove))
_add("resume tf summary.json truncated", Damaged("tf_cut", "resume", "summary.json", text("{")))
_add(
    "resume tf metrics.csv truncated",
    Damaged("tf_cut", "resume", "metrics.csv", truncate, "either"),
)
_add(
    "resume tf npz random bytes",
    Damaged("tf_cut", "resume", "component_norms.npz", garbage, "either"),
)
_add(
    "resume tf stale lock of a dead pid",
    Damaged("tf_cut", "resume", LOCK, text("999999"), "either"),
)
_add(
    "resume tf leftover checkpoint temp file",
    Damaged("tf_cut", "resume", ".checkpoint.pt.x1.tmp", text("half"), "either"),
)
_add(
    "resume tf only config.json",
    Damaged("tf_cut", "resume", "@only-config", None, "either"),
)
for _grid in GRIDS:
    for _name, _fn in UNIT_DAMAGE.items():
        _add(f"resume {_grid} unit {_name}", Damaged(f"{_grid}_cut", "resume", "@unit", _fn))
    _add(f"resume {_grid} units is a file", Damaged(f"{_grid}_cut", "resume", "units", to_file))
    # the figure of mf-depth-vs-nuclear is drawn from summary.json: its units may be damaged
    how = "either" if _grid == "mf-depth-vs-nuclear" else "refused"
    ref = f"{_grid}_done"
    _add(f"plot {_grid} unit truncated", Damaged(ref, "plot", "@unit", truncate, how))
    _add(
        f"plot {_grid} unit other settings",
        Damaged(ref, "plot", "@unit", UNIT_DAMAGE["other settings"], how),
    )
    _add(f"plot {_grid} units is a file", Damaged(ref, "plot", "units", to_file, how))
    _add(f"plot {_grid} unit missing", Damaged(ref, "plot", "@unit", remove, how))
for _name, _fn in {"truncated": truncate, "{}": text("{}"), "[1,2]": text("[1,2]")}.items():
    _add(
        f"plot mf-depth-vs-nuclear summary.json {_name}",
        Damaged("mf-depth-vs-nuclear_done", "plot", "summary.json", _fn),
    )
_GRID_CFG = {
    "{bad": text("{bad"),
    "workers 0": setcfg("workers", 0),
    "unknown config key": setcfg("bogus", 1),
    "seed edited": setcfg("seed", 5),
}
for _name, _fn in _GRID_CFG.items():
    _add(
        f"resume mf-dynamics config.json {_name}",
        Damaged("mf-dynamics_cut", "resume", "config.json", _fn),
    )
_add(
    "redo mf-dynamics config.json depths a word",
    Damaged("mf-dynamics_done", "config", "config.json", setcfg("depths", "abc")),
)
_add(
    "resume mf-dynamics only config.json",
    Damaged("mf-dynamics_cut", "resume", "@only-config", None, "either"),
)


@pytest.mark.parametrize("case", DAMAGED)
def test_damaged_run_folder_is_refused_and_left_alone(case, inproc, capsys, refs):
    tmp = inproc
    folder = tmp / "run"
    shutil.copytree(refs(case.ref), folder)
    if case.target == "@only-config":
        for p in list(folder.iterdir()):
            if p.name not in ("config.json", LOCK):
                remove(p)
        target = folder / "config.json"
    else:
        target = first_unit(folder) if case.target == "@unit" else folder / case.target
        case.damage(target)
    new = tmp / "new"
    argv = {
        "resume": ["run", "--resume", folder, "--no-progress"],
        "config": ["run", "--config", folder / "config.json", "--out", new, "--no-progress"],
        "plot": ["plot", folder],
    }[case.command]
    before = snapshot(folder)
    code, _, err = call(argv, capsys)
    if case.expect == "either" and code == 0 and case.command == "resume":
        no_temp_files(folder)
        same_results(refs(case.ref.replace("_cut", "_done")), folder)
        return
    if case.expect == "either" and code == 0 and case.command == "plot":
        data = {k: v for k, v in before.items() if not k.endswith(".png")}
        unchanged(data, {k: v for k, v in snapshot(folder).items() if not k.endswith(".png")})
        assert (folder / "figure.png").is_file()
        complete_pngs(folder)
        return
    names = [target.name, str(folder)]
    refused(code, err, names=names)
    unchanged(before, snapshot(folder))
    assert not new.exists(), "a new run folder was created"


MISSING = [
    ("resume", "missing folder"),
    ("resume", "a file"),
    ("resume", "empty folder"),
    ("plot", "missing folder"),
    ("plot", "a file"),
    ("plot", "empty folder"),
    ("config", "missing file"),
    ("config", "a folder"),
    ("config", "the run folder"),
]


@pytest.mark.parametrize(("command", "what"), MISSING, ids=[" ".join(m) for m in MISSING])
def test_missing_or_wrong_kind_of_path(command, what, inproc, capsys, refs):
    tmp = inproc
    (tmp / "afile").write_text("x")
    (tmp / "emptydir").mkdir()
    path = {
        "missing folder": tmp / "nope",
        "a file": tmp / "afile",
        "empty folder": tmp / "emptydir",
        "missing file": tmp / "nope" / "config.json",
        "a folder": tmp / "emptydir",
        "the run folder": tmp / "done",
    }[what]
    if what == "the run folder":
        shutil.copytree(refs("tf_done"), path)
    argv = {
        "resume": ["run", "--resume", path, "--no-progress"],
        "plot": ["plot", path],
        "config": ["run", "--config", path, "--out", tmp / "new", "--no-progress"],
    }[command]
    before = snapshot(tmp)
    code, _, err = call(argv, capsys)
    refused(code, err, names=[path.name])
    unchanged(before, snapshot(tmp), "the working folder")


# --------------------------------------------------------------------------- the Python API

TF_TINY = dict(PRESETS[TF].tiny)
DROP = object()


def _api_run(**kw):
    def go(t: dict):
        args = {**TF_TINY, **kw}
        preset = args.pop("preset", TF)
        out = args.pop("out", t["out"])
        return implreg.run(preset, out=out, **{k: v for k, v in args.items() if v is not DROP})

    return go


API = {
    "run unknown preset": _api_run(preset="no-such-preset"),
    "run unknown key": _api_run(bogus=1),
    "run rank abc": _api_run(rank="abc"),
    "run rank 2.5": _api_run(rank=2.5),
    "run rank True": _api_run(rank=True),
    "run rank -3": _api_run(rank=-3),
    "run rank 10**30": _api_run(rank=10**30),
    "run rank a list": _api_run(rank=[1, 2]),
    "run lr nan": _api_run(lr=float("nan")),
    "run lr inf": _api_run(lr=math.inf),
    "run dims with a string": _api_run(dims=(4, "x", 4)),
    "run dims one value": _api_run(dims=(4,)),
    "run dims huge": _api_run(dims=(10**6, 10**6), rank=1000),
    "run init_stds empty": _api_run(init_stds=()),
    "run seed -1": _api_run(seed=-1),
    "run seed 2**70": _api_run(seed=2**70),
    "run seed 1.5": _api_run(seed=1.5),
    "run device tpu": _api_run(device="tpu"),
    "run backend dask": _api_run(backend="dask"),
    "run out empty": _api_run(out=""),
    "run out under a file": lambda t: _api_run(out=t["afile"] / "x")(t),
    "run data_dir for tf": lambda t: _api_run(data_dir=t["tmp"])(t),
    "run resume without out": lambda t: implreg.run(TF, resume=True),
    "run_preset resume missing folder": lambda t: run_preset(out=t["tmp"] / "nope", resume=True),
    "run_preset an int": lambda t: run_preset(123, out=t["out"]),
    "run_preset None": lambda t: run_preset(None, out=t["out"]),
    "run_preset missing json": lambda t: run_preset(t["tmp"] / "none.json", out=t["out"]),
    "run_preset overrides without =": lambda t: run_preset(TF, overrides=["rank"], out=t["out"]),
    "run_preset overrides a dict value": lambda t: run_preset(
        TF, overrides={"rank": {"a": 1}}, out=t["out"]
    ),
    "run_preset checkpoint_every -1": lambda t: run_preset(
        TF, overrides=TF_TINY, out=t["out"], checkpoint_every=-1
    ),
    "load missing folder": lambda t: implreg.load(t["tmp"] / "nope"),
    "load a file": lambda t: implreg.load(t["afile"]),
    "load empty folder": lambda t: implreg.load(t["tmp"] / "emptydir"),
    "load bad config": lambda t: implreg.load(t["badcfg"]),
    "load None": lambda t: implreg.load(None),
    "seed_sweep unknown preset": lambda t: implreg.seed_sweep("no-such", [0], out=t["out"]),
    "seed_sweep no seeds": lambda t: implreg.seed_sweep(TF, [], out=t["out"]),
    "seed_sweep seed -1": lambda t: implreg.seed_sweep(TF, [-1], out=t["out"]),
}


@pytest.mark.parametrize("name", list(API))
def test_api_bad_arguments_raise_config_error(name, inproc):
    tmp = inproc
    (tmp / "afile").write_text("x")
    (tmp / "emptydir").mkdir()
    (tmp / "badcfg").mkdir()
    (tmp / "badcfg" / "config.json").write_text("{bad")
    t = {"tmp": tmp, "out": tmp / "run", "afile": tmp / "afile", "badcfg": tmp / "badcfg"}
    before = snapshot(tmp)
    try:
        API[name](t)
    except Hang:
        pytest.fail("hang: no answer before the deadline", pytrace=False)
    except ConfigError as exc:
        msg = str(exc)
        assert msg.strip() and "\n" not in msg.strip() and "Traceback" not in msg, repr(msg)
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).splitlines() or [""])[0][:300]
        pytest.fail(f"{type(exc).__name__} (not ConfigError): {first}", pytrace=False)
    else:
        pytest.fail("no error was raised", pytrace=False)
    unchanged(before, snapshot(tmp), "the working folder")


# ------------------------------------------------------------------------- honest outcomes

DIVERGE = [
    pytest.param(tiny(TF, optimizer="gd", lr="1e6"), True, id="tf-dynamics gd lr=1e6"),
    pytest.param(tiny("tf-sensing", optimizer="gd", lr="1e6"), True, id="tf-sensing gd lr=1e6"),
    pytest.param(tiny("tf-huber", optimizer="gd", lr="1e6"), True, id="tf-huber gd lr=1e6"),
    pytest.param(tiny("mf-det-sign", lr="1e6"), False, id="mf-det-sign lr=1e6"),
]


@pytest.mark.parametrize(("argv", "dynamics"), DIVERGE)
def test_a_diverged_run_exits_1_and_says_so(argv, dynamics, inproc, capsys):
    out = inproc / "run"
    code, _, err = call([*argv, "--out", out], capsys)
    problems = []
    if code != 1:
        problems.append(f"exit {code} (want 1)")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if "Traceback" in err or len(lines) > 1 or any(not ln.startswith("implreg: ") for ln in lines):
        problems.append(f"stderr is not one implreg line: {' | '.join(lines)[:300]!r}")
    if not ((out / "metrics.csv").is_file() and (out / "config.json").is_file()):
        problems.append("metrics.csv or config.json missing")
    if dynamics:
        summary = json.loads((out / "summary.json").read_text())
        for r in summary["runs"]:
            if r["status"] != "diverged":
                problems.append(f"status {r['status']!r}")
            if r.get("n_learned") is not None:
                problems.append(f"n_learned={r['n_learned']} reported for a diverged run")
    assert not problems, "; ".join(dict.fromkeys(problems))


@pytest.mark.parametrize("preset", [TF, "mf-dynamics", "mf-det-sign"])
def test_an_interrupt_message_claims_only_what_was_written(preset, inproc):
    out = inproc / "run"
    run = run_preset(tiny_config(preset), out=out, interrupt=StopAfter(3), log=lambda *_: None)
    assert run.interrupted and run.exit_code == 130
    if "checkpoint written" in run.outcome.where:
        assert (out / "checkpoint.pt").is_file(), "says 'checkpoint written' but wrote none"
    if preset in GRIDS:
        assert "checkpoint written" not in run.outcome.where, run.outcome.where


# ------------------------------------------------------------------------------ full disk


class _FullFile:
    """A file opened for writing on a full disk: every write raises ENOSPC."""

    def __init__(self, fh, path: str):
        self._fh, self._path = fh, path

    def write(self, data):  # noqa: ARG002
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)

    writelines = write

    def fileno(self):
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()

    def __iter__(self):
        return iter(self._fh)


def simulate_full_disk(monkeypatch, match) -> None:
    """Writes to files whose path ``match``es fail with ENOSPC (open itself succeeds)."""
    real = builtins.open

    def fake(file, mode="r", *args, **kwargs):
        fh = real(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            path = os.fspath(file)
            if match(os.path.basename(path), path):
                return _FullFile(fh, path)
        return fh

    monkeypatch.setattr(builtins, "open", fake)
    monkeypatch.setattr(io, "open", fake)


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (root only); ``fill(leave)`` leaves ``leave`` bytes free."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        timeout=20,
    )
    if done.returncode != 0:
        # the simulated-ENOSPC twin of every tmpfs case runs everywhere
        pytest.skip("cannot mount a small tmpfs here (needs root)")

    def fill(leave: int) -> None:
        st = os.statvfs(mnt)
        free = st.f_bavail * st.f_frsize
        with open(mnt / "filler", "wb") as fh:
            fh.write(b"\0" * max(0, free - leave))

    try:
        yield mnt, fill
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=20)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=20)


SHORT = {"init_stds": "0.1", "max_iterations": "30"}


@pytest.mark.parametrize("disk", ["simulated", "tmpfs"])
def test_full_disk_at_the_figures_keeps_metrics_and_summary(
    disk, inproc, capsys, monkeypatch, request
):
    if disk == "tmpfs":
        mnt, fill = request.getfixturevalue("small_fs")
        fill(40 * 1024)
        out = mnt / "run"
    else:
        simulate_full_disk(monkeypatch, lambda name, path: ".png" in name)
        out = inproc / "run"
    code, _, err = call([*tiny(TF, **SHORT), "--out", out], capsys)
    monkeypatch.undo()
    refused(code, err, want=1, names=[".png"])
    for name in ("config.json", "metrics.csv", "summary.json", "component_norms.npz"):
        assert (out / name).is_file(), f"{name} was lost"
    json.loads((out / "summary.json").read_text())
    no_temp_files(out)
    complete_pngs(out)


@pytest.mark.parametrize("disk", ["simulated", "tmpfs"])
def test_full_disk_at_config_json_leaves_no_folder(disk, inproc, capsys, monkeypatch, request):
    if disk == "tmpfs":
        mnt, fill = request.getfixturevalue("small_fs")
        fill(0)
        out, where = mnt / "run", mnt
    else:
        simulate_full_disk(monkeypatch, lambda name, path: "config.json" in name)
        out, where = inproc / "run", inproc
    before = snapshot(where)
    code, _, err = call([*tiny(TF, **SHORT), "--out", out], capsys)
    monkeypatch.undo()
    refused(code, err, want=(1, 2))
    assert not out.exists(), f"a half-made run folder was left: {sorted(os.listdir(out))}"
    unchanged(before, snapshot(where), "the parent folder")


@pytest.mark.parametrize("disk", ["simulated", "tmpfs"])
def test_full_disk_while_plotting_changes_nothing(disk, inproc, capsys, monkeypatch, request, refs):
    if disk == "tmpfs":
        mnt, _ = request.getfixturevalue("small_fs")
        folder = mnt / "run"
    else:
        folder = inproc / "run"
    shutil.copytree(refs("tf_done"), folder)
    for p in folder.glob("*.png"):
        p.unlink()
    if disk == "tmpfs":
        st = os.statvfs(folder)
        with open(folder.parent / "filler", "wb") as fh:
            fh.write(b"\0" * (st.f_bavail * st.f_frsize))
    else:
        simulate_full_disk(monkeypatch, lambda name, path: ".png" in name)
    before = snapshot(folder)
    code, _, err = call(["plot", folder], capsys)
    monkeypatch.undo()
    refused(code, err, want=1, names=[".png"])
    unchanged(before, snapshot(folder))


def test_full_disk_at_a_unit_file_keeps_finished_units_and_resumes(
    inproc, capsys, monkeypatch, refs
):
    out = inproc / "run"
    units = sorted(p.stem for p in (refs("mf-dynamics_done") / "units").glob("*.json"))
    last = units[-1] + ".json"
    simulate_full_disk(monkeypatch, lambda name, path: last in name)
    code, _, err = call([*tiny("mf-dynamics"), "--out", out], capsys)
    monkeypatch.undo()
    refused(code, err, want=1, names=[last])
    assert (out / "config.json").is_file()
    for u in units[:-1]:
        json.loads((out / "units" / f"{u}.json").read_text())
    no_temp_files(out)
    code, _, err = call(["run", "--resume", out, "--no-progress"], capsys)
    assert code == 0, err[-400:]
    same_results(refs("mf-dynamics_done"), out)


def test_full_disk_at_summary_json_keeps_the_metrics(inproc, capsys, monkeypatch):
    out = inproc / "run"
    simulate_full_disk(monkeypatch, lambda name, path: "summary.json" in name)
    code, _, err = call([*tiny(TF, **SHORT), "--out", out], capsys)
    monkeypatch.undo()
    refused(code, err, want=1, names=["summary.json"])
    for name in ("config.json", "metrics.csv", "component_norms.npz"):
        assert (out / name).is_file(), f"{name} was lost"
    no_temp_files(out)


# ------------------------------------------------------- signals, kill -9, two processes


def _implreg() -> list[str]:
    script = Path(sys.executable).parent / "implreg"
    return [str(script)] if script.exists() else [sys.executable, "-m", "implreg.cli"]


ENV = dict(os.environ, PYTHONUNBUFFERED="1")
ENV.pop("IMPLREG_DATA_DIR", None)

# Run the command as a terminal would: SIGINT at its default.  Under `nohup` or a shell's
# `&` the test process (and every child) inherits SIGINT *ignored*, and implreg rightly
# keeps an ignored SIGINT ignored, so a Ctrl-C test would see the run finish with 0.
# A signal set to its default survives exec (unlike a Python handler), hence this shim.
_DEFAULT_SIGINT = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])",
]


class Proc:
    """A command line in its own session, SIGINT at its default, its output collected by
    threads."""

    def __init__(self, args, cwd: Path):
        self.p = subprocess.Popen(
            [*_DEFAULT_SIGINT, *_implreg(), *map(str, args)],
            cwd=cwd,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(self.p.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.p.stderr, self.err), daemon=True),
        ]
        for r in self.readers:
            r.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def wait_until(self, ready, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ready():
                return True
            if self.p.poll() is not None:
                return ready()
            time.sleep(0.01)
        return False

    def finish(self, timeout: float) -> int:
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the process hung (more than {timeout} s)", pytrace=False)
        for r in self.readers:
            r.join(timeout=5)
        return rc

    def kill(self) -> None:
        if self.p.poll() is None:
            with _suppress():
                os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(timeout=10)

    def close(self) -> None:
        self.kill()
        for r in self.readers:
            r.join(timeout=5)
        for stream in (self.p.stdout, self.p.stderr):
            if stream is not None:
                stream.close()

    @property
    def stderr(self) -> str:
        return "".join(self.err)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, ProcessLookupError)


@pytest.fixture
def procs():
    started: list[Proc] = []

    def start(args, cwd: Path) -> Proc:
        started.append(Proc(args, cwd))
        return started[-1]

    yield start
    for p in started:
        p.close()


def no_traceback(err: str) -> None:
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-800:]


KILL_TF = {
    "dims": "6,6,6",
    "rank": "50",
    "gt_rank": "2",
    "num_observations": "100",
    "init_stds": "0.1,0.05",
    "max_iterations": "1200",
    "tol": "0",
    "log_every": "25",
}


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, procs):
    args = tiny(TF, **KILL_TF)
    ref = procs([*args, "--out", tmp_path / "ref"], tmp_path)
    cut_dir = tmp_path / "cut"
    cut = procs([*args, "--out", cut_dir, "--checkpoint-every", "100"], tmp_path)
    seen = cut.wait_until(lambda: (cut_dir / "checkpoint.pt").exists(), 120)
    assert seen, f"no checkpoint.pt appeared (exit {cut.p.poll()}): {cut.stderr[-400:]}"
    os.kill(cut.p.pid, signal.SIGKILL)
    assert cut.finish(30) == -signal.SIGKILL
    assert not (cut_dir / "summary.json").exists(), "the run finished before the kill"
    assert ref.finish(180) == 0, ref.stderr[-400:]
    done = procs(["run", "--resume", cut_dir, "--no-progress"], tmp_path)
    rc = done.finish(180)
    no_traceback(done.stderr)
    assert rc == 0, done.stderr[-400:]
    assert (cut_dir / "metrics.csv").read_text() == (tmp_path / "ref" / "metrics.csv").read_text()
    same_results(tmp_path / "ref", cut_dir)
    assert not (cut_dir / "checkpoint.pt").exists()
    no_temp_files(cut_dir)


GRID_KILL = {"depths": "1,2", "max_iterations": "3000", "log_every": "200", "tol": "0"}


def test_kill_9_of_a_grid_then_resume_loses_no_unit(tmp_path, procs):
    args = tiny("mf-dynamics", **GRID_KILL)
    ref = procs([*args, "--out", tmp_path / "ref"], tmp_path)
    cut_dir = tmp_path / "cut"
    cut = procs([*args, "--out", cut_dir], tmp_path)
    seen = cut.wait_until(lambda: any((cut_dir / "units").glob("*.json")), 120)
    assert seen, f"no unit file appeared (exit {cut.p.poll()}): {cut.stderr[-400:]}"
    os.kill(cut.p.pid, signal.SIGKILL)
    cut.finish(30)
    assert not (cut_dir / "summary.json").exists(), "the grid finished before the kill"
    for p in (cut_dir / "units").glob("*.json"):
        json.loads(p.read_text())
    assert ref.finish(180) == 0, ref.stderr[-400:]
    done = procs(["run", "--resume", cut_dir, "--no-progress"], tmp_path)
    rc = done.finish(180)
    no_traceback(done.stderr)
    assert rc == 0, done.stderr[-400:]
    same_results(tmp_path / "ref", cut_dir)
    no_temp_files(cut_dir)


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with _suppress_os():
            out |= {int(c) for c in (task / "children").read_text().split()}
    for c in list(out):
        out |= _children(c)
    return out


class _suppress_os:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, OSError)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_kill_9_of_a_grid_driver_leaves_no_worker(tmp_path, procs):
    over = {"shape": "30,30", "depths": "1,2,3", "max_iterations": "1000000", "tol": "0"}
    driver = procs([*tiny("mf-dynamics", **over, workers="2"), "--out", tmp_path / "r"], tmp_path)
    left = _kill_9_once_two_children_run(driver, within=5)
    assert not left, f"workers {left} outlived their driver by 5 s"


def _kill_9_once_two_children_run(proc: Proc, within: float) -> list[int]:
    """kill -9 ``proc`` once two of its children run; the children alive ``within`` s later
    (killed then, so none is left running)."""
    found: set[int] = set()

    def two_children() -> bool:
        found.update(_children(proc.p.pid))
        return len([c for c in found if _alive(c)]) >= 2

    assert proc.wait_until(two_children, 120), f"no children started: {proc.stderr[-400:]}"
    os.kill(proc.p.pid, signal.SIGKILL)
    proc.finish(30)
    end = time.monotonic() + within
    while time.monotonic() < end and any(_alive(c) for c in found):
        time.sleep(0.05)
    left = sorted(c for c in found if _alive(c))
    for c in left:  # do not leave them running
        with _suppress():
            os.kill(c, signal.SIGKILL)
    return left


def test_kill_9_of_a_report_with_jobs_leaves_no_job(tmp_path, procs):
    # two one-thread presets side by side, each in its own process: a report killed outright
    # takes its jobs with it (they get SIGTERM, as a run killed by the system would)
    args = ["report", "--budget", "tiny", "--jobs", "2", "--only", "tf-dynamics,tf-huber"]
    report = procs([*args, "--out", tmp_path / "rep"], tmp_path)
    left = _kill_9_once_two_children_run(report, within=10)
    assert not left, f"jobs {left} outlived their report by 10 s"
    assert not list((tmp_path / "rep").glob("report.*"))  # no page from a report cut short


@pytest.mark.parametrize("when", ["started", "running"])
def test_ctrl_c_of_a_report_with_jobs_exits_130_without_traceback(when, tmp_path, procs):
    # Ctrl-C reaches the report and its jobs (one process group): while the jobs still import
    # ("started") and while their runs run; every job stops, none prints a traceback
    args = ["report", "--budget", "tiny", "--jobs", "2", "--only", "tf-dynamics,tf-huber"]
    report = procs([*args, "--out", tmp_path / "rep"], tmp_path)
    mark = "jobs running)" if when == "started" else "running (tiny budget)"
    found: set[int] = set()

    def both() -> bool:
        found.update(_children(report.p.pid))
        return sum(mark in line for line in report.out) >= 2

    assert report.wait_until(both, 120), f"no jobs started: {report.stderr[-400:]}"
    os.killpg(report.p.pid, signal.SIGINT)
    assert report.finish(60) == 130, report.stderr[-600:]
    no_traceback(report.stderr)
    assert "interrupted" in report.stderr and "the same command resumes" in report.stderr
    assert not [c for c in found if _alive(c)]
    assert not list((tmp_path / "rep").glob("report.*"))


def test_a_second_resume_of_a_folder_in_use_is_refused(tmp_path, procs, capsys):
    cut = tmp_path / "cut"
    cfg = with_overrides(tiny_config(TF), {**KILL_TF, "max_iterations": "1000"})
    run = run_config(cfg, cut, interrupt=StopAfter(5))
    assert run.interrupted
    first = procs(["run", "--resume", cut, "--no-progress"], tmp_path)
    assert first.wait_until(lambda: any("run folder" in ln for ln in first.out), 120), first.stderr[
        -400:
    ]
    assert first.p.poll() is None, "the first resume ended too early to test the lock"
    code, _, err = call(["run", "--resume", cut, "--no-progress"], capsys)
    refused(code, err, names=["in use", str(first.p.pid)])
    assert first.finish(180) == 0, first.stderr[-400:]
    assert (cut / "summary.json").is_file()


LONG_TF = {"max_iterations": "200000", "log_every": "25"}

SIGINT_CASES = [
    pytest.param(tiny(TF, **LONG_TF), 0.3, id="tf-dynamics at 0.3 s (imports)"),
    pytest.param(tiny(TF, **LONG_TF), 1.2, id="tf-dynamics at 1.2 s (imports, problem)"),
    pytest.param(tiny(TF, **LONG_TF), "run", id="tf-dynamics during the run"),
    pytest.param(
        # eight ranks on all 600 fake images: ~15 s of fits (the tiny grid's L-BFGS stops
        # within a second, so a Ctrl-C 0.5 s after "run folder" could come after the end)
        tiny(
            "tensor-rank-complexity",
            iterations="100000",
            rel_tol="0",
            ranks="1,2,3,4,5,6,7,8",
            train_samples="600",
        )
        + ["--data-dir", "{data}"],
        "run",
        id="tensor-rank-complexity during the run (data loading)",
    ),
    pytest.param(
        tiny("mf-dynamics", max_iterations="1000000", tol="0"),
        "run",
        id="mf-dynamics during the run",
    ),
    pytest.param(
        tiny("mf-dynamics", max_iterations="1000000", tol="0", workers="2"),
        "run",
        id="mf-dynamics workers=2 during the run",
    ),
]


@pytest.mark.parametrize(("args", "when"), SIGINT_CASES)
def test_ctrl_c_exits_130_without_traceback(args, when, tmp_path, procs, fake_data):
    out = tmp_path / "r"
    args = [a.replace("{data}", str(fake_data)) for a in args]
    p = procs([*args, "--out", out], tmp_path)
    if when == "run":
        ok = p.wait_until(lambda: any("run folder" in ln for ln in p.out), 120)
        assert ok, f"the run did not start: {p.stderr[-400:]}"
        time.sleep(0.5)
    else:
        time.sleep(when)
    assert p.p.poll() is None, f"ended before the Ctrl-C: {p.stderr[-400:]}"
    os.killpg(p.p.pid, signal.SIGINT)  # what a terminal sends to the whole process group
    rc = p.finish(60)
    no_traceback(p.stderr)
    # a process that re-raises SIGINT to die by it also shows 130 in a shell
    assert rc in (130, -signal.SIGINT), f"exit {rc}: {p.stderr[-400:]}"
    if "mf-dynamics" in args:
        assert "checkpoint written" not in p.stderr + "".join(p.out)
    if out.exists():
        json.loads((out / "config.json").read_text())
        no_temp_files(out)
