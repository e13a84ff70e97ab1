"""How a search picks and stops trials: the Optuna sampler and searcher over the space of
:mod:`tune.space`, and the ASHA scheduler with the epochs where it decides.

Search and early stopping optimise the validation metric (``cfg.metric``); test error is
recorded, never optimised. Ray is imported only inside the factories.
"""

from __future__ import annotations

import math

from hardmix.config import SweepConfig


def make_sampler(cfg: SweepConfig):
    """The Optuna sampler named by ``cfg.sampler``; TPE is multivariate and grouped, which is
    how TPE models conditional spaces (parameters that exist only for some trials)."""
    import warnings

    import optuna

    seed = cfg.seeds[0]
    # TPE models the space only after its random start-up trials: a third of a small search.
    startup = min(10, max(2, cfg.num_samples // 3))
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed,
                                                  n_startup_trials=startup),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False),
    }
    with warnings.catch_warnings():  # `group` is marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return samplers[cfg.sampler]()


def make_searcher(cfg: SweepConfig, warm: tuple | None = None):
    """OptunaSearch over the define-by-run space, each suggestion repeated once per seed; Optuna
    is told the mean over the seeds. ``warm``: ``(storage, study_name)`` of a study that
    already holds the finished configurations (a resumed search)."""
    from ray.tune.search import Repeater
    from ray.tune.search.optuna import OptunaSearch

    from tune.space import ConditionalSpace

    storage, name = warm or (None, None)
    search = OptunaSearch(space=ConditionalSpace(cfg.space, cfg.run), metric=cfg.metric,
                          mode="min", sampler=make_sampler(cfg), storage=storage,
                          study_name=name)
    return Repeater(search, repeat=len(cfg.seeds), set_index=True)


def max_epochs(cfg: SweepConfig) -> int:
    """The longest trial's epochs (``optim.epochs`` may be searched): ASHA's top rung."""
    searched = cfg.space.get("optim.epochs")
    if searched is not None:
        return int(max(searched.values or [searched.high]))
    return cfg.run.optim.epochs


def scheduler_epochs(cfg: SweepConfig) -> list[int]:
    """The epochs at which the scheduler compares trials (ASHA's rungs, as Ray computes them:
    ``grace_period * reduction_factor**k`` below ``max_t``). Trials evaluate validation error
    there whatever ``eval.every`` says, so every decision sees a fresh value."""
    if cfg.scheduler.type != "asha":
        return []
    s, max_t = cfg.scheduler, max_epochs(cfg)
    rungs = int(math.log(max_t / s.grace_period) / math.log(s.reduction_factor) + 1)
    return sorted({math.ceil(s.grace_period * s.reduction_factor ** k - 1e-9)
                   for k in range(max(0, rungs))})


def make_scheduler(cfg: SweepConfig):
    """ASHA on ``cfg.metric`` (time unit: epochs), or None when the sweep stops no trial."""
    if cfg.scheduler.type != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    s = cfg.scheduler
    return ASHAScheduler(time_attr="epoch", metric=cfg.metric, mode="min",
                         max_t=max_epochs(cfg), grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)
