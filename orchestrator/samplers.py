"""The Optuna samplers ``search.sampler`` may name, as a registry a plugin can add to::

    @SAMPLERS.register("cmaes")
    def cmaes(seed: int):
        import optuna
        return optuna.samplers.CmaEsSampler(seed=seed)

A factory takes the sweep's ``search.seed`` (shifted by the trials already asked when a study resumes)
and returns an Optuna sampler. This module does not import Optuna, so the spec can check the name
(``fairsweep validate`` stays fast); each factory imports it when a study starts.
"""
from __future__ import annotations

from typing import Any, Callable

from trainables.registry import Registry

__all__ = ["SAMPLERS", "SamplerFactory"]

SamplerFactory = Callable[[int], Any]
"""``factory(seed) -> optuna.samplers.BaseSampler``."""

SAMPLERS: Registry[SamplerFactory] = Registry("sampler")


@SAMPLERS.register("tpe")
def _tpe(seed: int) -> Any:
    import optuna  # here, not at the top: the spec imports this module and must not load Optuna

    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


@SAMPLERS.register("nsga2")
def _nsga2(seed: int) -> Any:
    import optuna  # as in _tpe

    return optuna.samplers.NSGAIISampler(seed=seed)


@SAMPLERS.register("random")
def _random(seed: int) -> Any:
    import optuna  # as in _tpe

    return optuna.samplers.RandomSampler(seed=seed)
