"""Run folders: ``config.json``, metrics, ``summary.json``, checkpoints; atomic writes.

A run folder is created only after the configuration has been validated and
the problem built, so bad input never leaves a folder behind.  Every file is
written to a temporary name in the same folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

CONFIG = "config.json"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"


def versions() -> dict[str, str]:
    """Versions of implreg, torch, numpy and Python, recorded in every ``config.json``."""
    import numpy

    from implreg import __version__

    return {
        "implreg": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_checkpoint(run_dir: Path, state: dict) -> None:
    with atomic_path(Path(run_dir) / CHECKPOINT) as tmp:
        torch.save(state, tmp)


def load_checkpoint(run_dir: Path) -> dict:
    return torch.load(Path(run_dir) / CHECKPOINT, weights_only=False)


def create_run_dir(path: Path) -> Path:
    """Create an empty run folder; refuse one that exists and is not empty."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(
            f"the run folder {path} already exists and is not empty; "
            "choose another --out or resume it with --resume"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (figures are files; no screen is needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, *, dpi: int = 110) -> Path:
    """Lay out, write and close a matplotlib figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)
