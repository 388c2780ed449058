"""The registry of experiments and presets, derived from the modules of this package.

Every module here that defines ``EXPERIMENT`` (an
:class:`~implreg.experiments.base.Experiment`) is one experiment; its
``presets`` are registered under their names.  Adding a preset touches only
its module; adding an experiment is adding a module.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from implreg.config import ConfigError
from implreg.experiments.base import Experiment, Preset

EXPERIMENTS: dict[str, Experiment] = {}
PRESETS: dict[str, Preset] = {}


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        exp = getattr(module, "EXPERIMENT", None)
        if exp is None:
            continue
        for name in (exp.name, *exp.aliases):
            if name in EXPERIMENTS:
                raise RuntimeError(f"two experiments are named {name!r}")
            EXPERIMENTS[name] = exp
        for preset in exp.presets:
            if preset.name in PRESETS:
                raise RuntimeError(f"two presets are named {preset.name!r}")
            PRESETS[preset.name] = dataclasses.replace(preset, experiment=exp)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def experiment_of(cfg: object) -> Experiment:
    """The experiment whose ``Config`` type ``cfg`` is."""
    for exp in EXPERIMENTS.values():
        if type(cfg) is exp.Config:
            return exp
    raise ConfigError(f"{type(cfg).__name__} is not the configuration of any experiment")


_discover()

__all__ = [
    "EXPERIMENTS",
    "PRESETS",
    "Experiment",
    "Preset",
    "experiment_of",
    "get_experiment",
    "get_preset",
]
