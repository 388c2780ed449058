"""The ``implreg`` console script: Ctrl-C at any moment exits 130 without a traceback.

While the command line and its heavy libraries (numpy, torch) are imported,
SIGINT is only recorded, so it can never leave a library half-imported (seen:
a KeyboardInterrupt inside numpy's import, swallowed by a library, left a
numpy without ``numpy.matrix`` and a traceback later); a Ctrl-C recorded there
ends the command with 130 right after.  From then on Ctrl-C raises as usual,
a run turns it into a checkpoint (:class:`implreg.training.Interrupt`) and
anything else ends in ``implreg: interrupted`` with exit code 130.
"""

from __future__ import annotations

import signal
import sys


def main() -> int:
    pending: list[int] = []
    guarded = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if guarded:  # a SIGINT ignored by the parent (nohup, a script's &) stays ignored
        signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        import numpy  # noqa: F401
        import torch  # noqa: F401

        from implreg.cli import main as cli_main
    finally:
        if guarded:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if pending:
        return _interrupted()
    try:
        return cli_main()
    except KeyboardInterrupt:
        return _interrupted()


def _interrupted() -> int:
    try:
        print("implreg: interrupted", file=sys.stderr)
    except Exception:  # noqa: BLE001 - a closed stderr must not produce a traceback
        pass
    return 130


if __name__ == "__main__":
    sys.exit(main())
