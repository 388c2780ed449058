"""Grids of units: finished units are never recomputed; an interrupt stops submitting."""

from __future__ import annotations

import json

from implreg.sweep import Unit, load_results, run_units


def square(params: dict) -> dict:
    return {"value": params["x"] ** 2}


class _Flag:
    def __init__(self, after: int):
        self.after, self.calls = after, 0

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls > self.after


def test_units_run_once_and_resume(tmp_path):
    units = [Unit(f"u{i}", {"x": i}) for i in range(5)]
    results, interrupted = run_units(units[:3], square, tmp_path, workers=1)
    assert not interrupted and results == {f"u{i}": {"value": i * i} for i in range(3)}
    # tamper with a finished unit: it must be read back, not recomputed
    (tmp_path / "units" / "u1.json").write_text(json.dumps({"value": -1}))
    results, _ = run_units(units, square, tmp_path, workers=2)
    assert results["u1"] == {"value": -1}
    assert results["u4"] == {"value": 16}
    assert set(load_results(tmp_path, units)) == {f"u{i}" for i in range(5)}


def test_interrupt_keeps_finished_units(tmp_path):
    units = [Unit(f"u{i}", {"x": i}) for i in range(4)]
    results, interrupted = run_units(units, square, tmp_path, workers=1, interrupt=_Flag(2))
    assert interrupted and set(results) == {"u0", "u1"}
    results, interrupted = run_units(units, square, tmp_path, workers=1)
    assert not interrupted and len(results) == 4
