"""Declarative configuration checks: types, Literal choices, bounds, lengths, overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from implreg.config import (
    ConfigError,
    check,
    describe,
    from_mapping,
    param,
    require,
    to_mapping,
    with_overrides,
)


@dataclass(frozen=True)
class Demo:
    rank: int = param(3, ge=1, doc="components")
    frac: float = param(0.5, gt=0, lt=1)
    stds: tuple[float, ...] = param((0.1, 0.2), gt=0)
    shape: tuple[int, ...] = param((2, 2), ge=1, min_len=2, max_len=2)
    classes: tuple[int, ...] = param((0, 1), ge=0, le=9, unique=True)
    loss: Literal["l2", "huber"] = "l2"
    modes: tuple[Literal["gd", "flow"], ...] = ("gd",)
    data_dir: str | None = None
    flag: bool = False

    def check(self) -> None:
        require(self.rank <= 100, f"rank must be at most 100, got {self.rank}")


def _obviously_valid(d: Demo) -> bool:
    """The same rules, written out by hand."""
    return (
        d.rank >= 1
        and 0 < d.frac < 1
        and len(d.stds) >= 1
        and all(s > 0 for s in d.stds)
        and len(d.shape) == 2
        and all(s >= 1 for s in d.shape)
        and len(d.classes) >= 1
        and len(set(d.classes)) == len(d.classes)
        and all(0 <= c <= 9 for c in d.classes)
        and d.loss in ("l2", "huber")
        and len(d.modes) >= 1
        and all(m in ("gd", "flow") for m in d.modes)
        and d.rank <= 100
    )


@given(
    rank=st.integers(-3, 150),
    frac=st.floats(-0.5, 1.5, allow_nan=False),
    stds=st.lists(st.floats(-1, 1, allow_nan=False), min_size=0, max_size=3),
    shape=st.lists(st.integers(-1, 3), min_size=0, max_size=3),
    classes=st.lists(st.integers(-1, 11), min_size=0, max_size=4),
    loss=st.sampled_from(["l2", "huber", "l1"]),
    modes=st.lists(st.sampled_from(["gd", "flow", "exact"]), min_size=0, max_size=3),
)
def test_check_agrees_with_the_rules_written_out(rank, frac, stds, shape, classes, loss, modes):
    d = Demo(rank, frac, tuple(stds), tuple(shape), tuple(classes), loss, tuple(modes))
    if _obviously_valid(d):
        check(d)
    else:
        with pytest.raises(ConfigError) as info:
            check(d)
        assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["rank=0"], "rank must be >= 1, got 0"),
        (["frac=1"], "frac must be in (0, 1), got 1.0"),
        (["stds=0.1,-1"], "every value of stds must be positive"),
        (["shape=2"], "shape needs at least 2 values"),
        (["shape=2,2,2"], "shape takes at most 2 values"),
        (["classes=1,1"], "classes repeats a value"),
        (["classes=1,10"], "every value of classes must be in [0, 9]"),
        (["loss=l1"], "loss must be one of 'l2', 'huber', got 'l1'"),
        (["modes=gd,exact"], "modes must be one of 'gd', 'flow', got 'exact'"),
        (["rank=101"], "rank must be at most 100"),
    ],
)
def test_messages_name_the_key(pairs, message):
    with pytest.raises(
        ConfigError,
        match="^"
        + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]"),
    ):
        check(with_overrides(Demo(), pairs))


def test_overrides_parse_types_and_refuse_bad_keys():
    d = with_overrides(Demo(), ["rank=7", "stds=0.3", "data_dir=/x", "flag=yes", "frac=2.5e-1"])
    assert (d.rank, d.stds, d.data_dir, d.flag, d.frac) == (7, (0.3,), "/x", True, 0.25)
    assert with_overrides(Demo(), {"rank": 4, "stds": [0.5, 0.6]}).stds == (0.5, 0.6)
    assert with_overrides(Demo(), ["data_dir=none"]).data_dir is None
    assert with_overrides(Demo(), ["rank=1e3"]).rank == 1000
    for pairs, message in [
        (["nope=1"], "unknown key 'nope'"),
        (["rank"], "expects key=value"),
        (["rank=2.5"], "rank must be an integer"),
        (["rank=1", "rank=2"], "'rank' is set twice"),
        (["frac=nan"], "frac must be a finite number"),
        (["flag=maybe"], "flag must be true or false"),
        ({"rank": 2.5}, "rank must be of type int"),
        ({"rank": 1e300}, "rank must be of type int"),
    ]:
        with pytest.raises(ConfigError, match=message):
            with_overrides(Demo(), pairs)


def test_mapping_round_trip_and_describe():
    d = with_overrides(Demo(), ["rank=9", "modes=flow,gd"])
    assert from_mapping(Demo, to_mapping(d)) == d
    with pytest.raises(ConfigError, match="unknown key 'x'"):
        from_mapping(Demo, {**to_mapping(d), "x": 1})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        from_mapping(Demo, [1, 2])
    rows = {r["key"]: r for r in describe(d)}
    assert set(rows) == {f.name for f in dataclasses.fields(Demo)}
    assert rows["rank"] == {
        "key": "rank",
        "type": "int",
        "value": "9",
        "allowed": "",
        "bounds": ">= 1",
        "doc": "components",
    }
    assert rows["modes"]["allowed"] == "gd, flow" and rows["modes"]["value"] == "flow,gd"
    assert rows["frac"]["bounds"] == "in (0, 1)" and rows["stds"]["bounds"] == "positive"
    assert rows["data_dir"]["type"] == "str | None"
