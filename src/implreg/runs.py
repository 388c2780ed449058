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

from implreg.config import ConfigError

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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def atomic_path(path: Path, *, durable: bool = False):
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    A reader sees the old file or the new one, never a half-written one; the
    temporary file is removed on any failure.  ``durable=True`` also flushes the
    file and the folder to the disk (``fsync``) before and after the rename, so
    a power cut or kill -9 right after it leaves the new file (checkpoints).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # as an ordinary file would be, not mkstemp's 0600
        yield Path(tmp)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent, directory=True)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync(path: str | Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some filesystems cannot fsync a folder; a file must be synced
            raise
    finally:
        os.close(fd)


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


class DamagedRunError(ConfigError):
    """A file of a run folder that cannot be read back, stated in one sentence."""


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write ``checkpoint.pt`` atomically and durably (the old one stays until the new is whole)."""
    with atomic_path(Path(run_dir) / CHECKPOINT, durable=True) as tmp:
        torch.save(state, tmp)


def load_checkpoint(run_dir: Path, keys: tuple[str, ...] = ()) -> dict:
    """Read ``checkpoint.pt``; a damaged file (or one lacking ``keys``) raises DamagedRunError.

    Checkpoints hold tensors, numbers, strings and containers only, so they are
    read with ``weights_only=True``: a checkpoint file cannot run code.
    """
    path = Path(run_dir) / CHECKPOINT
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise DamagedRunError(f"{path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - torch/pickle/zip raise many kinds
        raise DamagedRunError(
            f"{path} is damaged and cannot be read ({type(exc).__name__}); rerun into a new folder"
        ) from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise DamagedRunError(f"{path} is not an implreg checkpoint (no {missing[0]!r})")
    return state


def _numpy_globals() -> list:
    """What unpickling numpy arrays and scalars needs (recorded metrics are numpy)."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    codes = ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "?", "U1", "c8")
    return [np.dtype, np.ndarray, multiarray._reconstruct, multiarray.scalar] + [
        type(np.dtype(c)) for c in codes
    ]


@contextlib.contextmanager
def reading(path: Path, what: str = "run file"):
    """Read a file of a run folder: any failure becomes one DamagedRunError naming the file."""
    try:
        yield Path(path)
    except DamagedRunError:
        raise
    except FileNotFoundError:
        raise DamagedRunError(f"{path} is missing; the {what} cannot be read") from None
    except Exception as exc:  # noqa: BLE001 - csv/json/numpy/zip raise many kinds
        raise DamagedRunError(
            f"{path} is damaged ({type(exc).__name__}); the {what} cannot be read"
        ) from None


class RunLock:
    """An exclusive lock on a run folder (``.lock``, ``flock``), held while a process runs it.

    The lock dies with its process (kill -9 included), so a stale ``.lock``
    file never blocks a later run; the file records the holder's pid for the
    message a second process gets.
    """

    NAME = ".lock"

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / self.NAME
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunInUseError(
                f"the run folder {self.path.parent} is in use by process {holder}; "
                "wait for it to finish or stop it"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError:  # a full disk: the lock is held but cannot name its holder
            os.close(fd)
            raise
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunInUseError(ConfigError):
    """Another process holds the run folder's lock."""


def create_run_dir(path: Path) -> tuple[Path, RunLock]:
    """Create an empty run folder and lock it; refuse one that exists and is not empty.

    Returns the folder and its held :class:`RunLock`.  Raises FileExistsError
    for a non-empty folder (or a file at ``path``), RunInUseError when another
    process got there first, OSError when the folder cannot be made.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--out {path} is a file, not a folder")
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(
            f"the run folder {path} already exists and is not empty; "
            "choose another --out or resume it with --resume"
        )
    path.mkdir(parents=True, exist_ok=True)
    lock = RunLock(path).acquire()
    if any(p.name != RunLock.NAME for p in path.iterdir()):  # another process was faster
        lock.release()
        raise FileExistsError(f"the run folder {path} was filled by another process meanwhile")
    return path, lock


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (figures are files; no screen is needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, *, dpi: int = 110) -> Path:
    """Lay out, write and close a matplotlib figure; returns its path."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    except OSError as exc:  # out of space, no permission: name the figure, not a temp file
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    finally:
        plt.close(fig)
    return Path(path)
