"""The sweep's search space: conditional parameters, the grid, seeds, and config checks.

No Ray cluster is started here: Optuna and Ray Tune's searcher objects run in-process.
"""

from __future__ import annotations

import random

import optuna
import pytest

from hardmix.config import ConfigError, ParamSpec, RunConfig, SweepConfig, load_config
from tune.space import (ConditionalSpace, check_space, default_space, grid_points, param_order,
                        trial_config, with_default_space)

optuna.logging.set_verbosity(optuna.logging.WARNING)
# TPE's `group` option (how it models conditional spaces) is flagged experimental by Optuna.
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

# No `when` needed: the method table says where criterion, fallback and k act.
QUICK_SPACE = (
    "space={augment.method: {type: choice, values: [cutmix, hardmix]},"
    " augment.criterion: {type: choice, values: [misclassified, topk_loss]},"
    " augment.fallback: {type: choice, values: [random, skip, topk_loss]},"
    " augment.k: {type: choice, values: [0.25, 0.5]}}")


def sweep(*overrides: str) -> SweepConfig:
    return load_config(SweepConfig, None, None, ["storage=/tmp", *overrides])


def check_conditions(params: dict) -> None:
    """The fallback exists exactly for the thresholded criteria (misclassified, history); k
    exactly for a top-k criterion or the topk_loss fallback (written out here, independently
    of the method table)."""
    crit = params["augment.criterion"]
    thresholded = crit in ("misclassified", "history")
    assert ("augment.fallback" in params) == thresholded, params
    k_acts = crit in ("topk_loss", "low_margin") or (
        thresholded and params.get("augment.fallback") == "topk_loss")
    assert ("augment.k" in params) == k_acts, params


@pytest.mark.parametrize("sampler", [
    lambda: optuna.samplers.TPESampler(multivariate=True, group=True, seed=0,
                                       n_startup_trials=5),
    lambda: optuna.samplers.RandomSampler(seed=0),
])
def test_define_by_run_space_samples_conditionals_only_where_they_exist(sampler):
    space = ConditionalSpace(default_space(), RunConfig())
    study = optuna.create_study(direction="minimize", sampler=sampler())
    rng = random.Random(0)
    seen = set()
    for _ in range(40):
        trial = study.ask()
        space(trial)
        check_conditions(trial.params)
        seen.add(trial.params["augment.criterion"])
        if "augment.fallback" in trial.params:
            seen.add(trial.params["augment.fallback"])
        assert 0.1 <= trial.params["augment.alpha"] <= 2.0
        study.tell(trial, rng.uniform(5, 50))
    assert {"misclassified", "topk_loss"} <= seen
    assert len(seen & {"random", "skip", "topk_loss"}) >= 2


def test_ray_searcher_repeats_each_configuration_once_per_seed():
    from ray.tune.search.repeater import TRIAL_INDEX

    from tune.search import make_searcher

    cfg = with_default_space(sweep("seeds=[3, 7]", "num_samples=12"))
    searcher = make_searcher(cfg)
    configs = []
    for i in range(24):
        config = searcher.suggest(f"trial{i}")
        configs.append(config)
        params = {k: v for k, v in config.items() if k != TRIAL_INDEX}
        check_conditions(params)
        searcher.on_trial_complete(f"trial{i}", result={cfg.metric: float(i % 5)})
    for a, b in zip(configs[0::2], configs[1::2]):  # the two seeds of one configuration
        assert (a[TRIAL_INDEX], b[TRIAL_INDEX]) == (0, 1)
        assert {k: v for k, v in a.items() if k != TRIAL_INDEX} == \
               {k: v for k, v in b.items() if k != TRIAL_INDEX}


def test_grid_has_every_valid_combination_and_no_meaningless_one():
    cfg = sweep("mode=grid", QUICK_SPACE)
    points = grid_points(cfg)
    # cutmix; misclassified x (random, skip, topk_loss x 2 k); topk_loss x 2 k
    assert len(points) == 1 + (2 + 2) + 2
    assert len({tuple(sorted(p.items())) for p in points}) == len(points)
    for p in points:
        if p["augment.method"] == "cutmix":
            assert set(p) == {"augment.method"}
        else:
            check_conditions(p)
    fallbacks = {p.get("augment.fallback") for p in points} - {None}
    assert fallbacks == {"random", "skip", "topk_loss"}


def test_grid_without_space_is_the_base_run_and_search_gets_the_default_space():
    assert grid_points(with_default_space(sweep("mode=grid"))) == [{}]
    cfg = with_default_space(sweep())
    assert set(cfg.space) == {"augment.alpha", "augment.criterion", "augment.k",
                              "augment.fallback"}


def test_conditions_are_decided_before_the_parameter_they_guard():
    space = {"b": ParamSpec(values=[1], when={"a": ["x"]}), "a": ParamSpec(values=["x"])}
    assert param_order(space) == ["a", "b"]


def test_a_cycle_of_conditions_is_a_config_error():
    cfg = sweep("space={augment.criterion: {values: [misclassified], when: {augment.fallback: "
                "[random]}}, augment.fallback: {values: [random], when: {augment.criterion: "
                "[misclassified]}}}")
    with pytest.raises(ConfigError, match="cycle"):
        check_space(cfg)


def test_a_condition_that_can_never_hold_is_a_config_error():
    never = sweep("space={augment.k: {type: float, low: 0.1, high: 0.5, when: "
                  "{augment.criterion: [topk_loss]}}}")  # criterion is fixed at misclassified
    with pytest.raises(ConfigError, match="would never exist"):
        check_space(never)
    typo = sweep("space={augment.criterion: {values: [misclassified, topk_loss]}, augment.k: "
                 "{values: [4], when: {augment.criterion: [topk_los]}}}")
    with pytest.raises(ConfigError, match="none of these"):
        check_space(typo)


@pytest.mark.parametrize("overrides, field", [
    # k is read only by a top-k criterion or the topk_loss fallback: neither can happen here
    (["space={augment.k: {values: [0.1, 0.5]}}", "run.augment.criterion=misclassified",
      "run.augment.fallback=random"], "space.augment.k"),
    (["space={model.width: {values: [8, 16]}}", "run.model.name=resnet18"], "space.model.width"),
    (["mode=search", "space={model.stem: {type: choice, values: [cifar, imagenet]}}",
      "run.model.name=smallnet"], "space.model.stem"),
    (["space={optim.gamma: {values: [0.1, 0.2]}}", "run.optim.schedule=cosine"],
     "space.optim.gamma"),
])
def test_a_parameter_that_acts_in_no_trial_is_a_config_error(overrides, field):
    with pytest.raises(ConfigError) as err:
        check_space(sweep(*overrides))
    assert err.value.field == field and "acts in no trial" in str(err.value)


def test_the_default_search_space_over_a_cutmix_run_is_refused_not_shrunk_to_alpha():
    cfg = with_default_space(sweep("mode=search", "run.augment.method=cutmix"))
    with pytest.raises(ConfigError) as err:
        check_space(cfg)
    assert err.value.field == "space.augment.criterion"
    assert "default search space" in str(err.value) and "augment.method=cutmix" in str(err.value)
    check_space(with_default_space(sweep("mode=search")))  # HardMix, the default: every one acts


def test_model_fields_exist_only_for_the_models_that_read_them():
    cfg = sweep("space={model.name: {values: [resnet18, smallnet]}, model.width: {values: [8, "
                "16]}, model.stem: {values: [cifar, imagenet]}}")
    check_space(cfg)
    points = grid_points(cfg)
    assert sorted(map(str, points)) == sorted(map(str, [
        {"model.name": "resnet18", "model.stem": "cifar"},
        {"model.name": "resnet18", "model.stem": "imagenet"},
        {"model.name": "smallnet", "model.width": 8},
        {"model.name": "smallnet", "model.width": 16}]))


def test_every_grid_combination_must_give_a_valid_run():
    # Each value is valid on its own (k=40 with the default batch of 128, a batch of 32 with
    # the default k=0.25); k=40 with a batch of 32 is not.
    cfg = sweep("mode=grid", "space={augment.k: {values: [40]}, data.batch_size: "
                "{values: [32, 64]}}", "run.augment.criterion=topk_loss")
    with pytest.raises(ConfigError, match="augment.k"):
        check_space(cfg)


def test_trial_config_applies_parameters_and_seed_and_json_choices_round_trip():
    cfg = sweep("space={optim.milestones: {values: [[2, 4], [3]]}}")
    space = ConditionalSpace(cfg.space, cfg.run)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    space(trial)
    params = ConditionalSpace.params(trial.params)
    assert params["optim.milestones"] in ([2, 4], [3])
    run = trial_config(cfg.run, params, seed=5)
    assert run.seed == 5 and run.optim.milestones == params["optim.milestones"]
    assert cfg.run.seed == 0  # the sweep's base run is untouched


# --------------------------------------------------------------------------------------------
# Arms: a grid given as a list of configurations, each with its own seeds
# --------------------------------------------------------------------------------------------

ARMS = ("arms=[{augment.method: cutmix, seeds: [0, 1, 2, 3, 4]},"
        " {augment.method: hardmix, augment.criterion: topk_loss},"
        " {augment.method: hardmix, augment.fallback: skip, augment.min_hard: 40}]")


def test_arms_are_the_grid_with_their_own_seeds_run_seed_major():
    from tune.space import grid_trials, num_trials, point_seeds

    cfg = sweep("mode=grid", "seeds=[7, 8]", ARMS)
    check_space(cfg)
    points = grid_points(cfg)
    assert points == [{"augment.method": "cutmix"},
                      {"augment.method": "hardmix", "augment.criterion": "topk_loss"},
                      {"augment.method": "hardmix", "augment.fallback": "skip",
                       "augment.min_hard": 40}]
    assert point_seeds(cfg) == [[0, 1, 2, 3, 4], [7, 8], [7, 8]]  # default: the sweep's seeds
    trials = grid_trials(cfg)
    assert num_trials(cfg) == len(trials) == 5 + 2 + 2
    assert sorted((points.index(p), s) for p, s in trials) == sorted(
        [(0, s) for s in range(5)] + [(1, 7), (1, 8), (2, 7), (2, 8)])
    # Seed-major: every arm's first seed runs before any arm's second.
    assert [s for _, s in trials[:3]] == [0, 7, 7] and [s for _, s in trials[3:6]] == [1, 8, 8]
    run = trial_config(cfg.run, trials[-1][0], trials[-1][1])
    assert run.augment.method == "cutmix" and run.seed == 4


@pytest.mark.parametrize("overrides, field", [
    (("mode=search", ARMS), "arms"),
    (("mode=grid", ARMS, "space={optim.lr: {values: [0.1]}}"), "space"),
    (("mode=grid", "arms=[{augment.methd: cutmix}]"), "arms[0].augment.methd"),
    (("mode=grid", "arms=[{augment.method: cutmixx}]"), "arms[0].augment.method"),
    (("mode=grid", "arms=[{augment.method: cutmix}, {augment.alpha: -1}]"), "arms[1].augment.alpha"),
    (("mode=grid", "arms=[{augment.method: cutmix, seed: 3}]"), "arms[0].seed"),
    (("mode=grid", "arms=[{augment.method: cutmix, seeds: [1, 1]}]"), "arms[0].seeds"),
    (("mode=grid", "arms=[{augment.method: cutmix, seeds: []}]"), "arms[0].seeds"),
    (("mode=grid", "arms=[{augment.method: cutmix}, {augment.method: cutmix, seeds: [4]}]"),
     "arms[1]"),
    (("mode=grid", "arms=[{}]"), "arms[0]"),
])
def test_a_bad_arm_is_one_config_error_naming_its_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        sweep(*overrides)
    assert err.value.field == field, err.value


def test_a_resumed_search_tells_optuna_what_it_finished_without_any_pickle():
    """Configurations read back from the store (one per index, all seeds final) go into a
    fresh study as COMPLETE trials with the mean over seeds; the searcher loads that study."""
    from tune.resume import stored_configurations, warm_study
    from tune.search import make_searcher

    cfg = with_default_space(sweep("seeds=[0, 1]", "num_samples=6"))
    rows = {
        "c000-s0": {"status": "completed", "augment.alpha": 0.5, "augment.criterion": "topk_loss",
                    "augment.k": 0.2, "augment.fallback": None, "final_val_top1_err": 10.0},
        "c000-s1": {"status": "completed", "augment.alpha": 0.5, "augment.criterion": "topk_loss",
                    "augment.k": 0.2, "augment.fallback": None, "final_val_top1_err": 14.0},
        "c001-s0": {"status": "running", "augment.alpha": 1.5,
                    "augment.criterion": "misclassified", "augment.k": None,
                    "augment.fallback": "skip", "final_val_top1_err": None},
    }
    configs = stored_configurations(rows, cfg.space)
    assert configs[0]["params"] == {"augment.alpha": 0.5, "augment.criterion": "topk_loss",
                                    "augment.k": 0.2}
    assert set(configs[1]["rows"]) == {0}
    storage, name = warm_study(cfg, configs, lambda r: r["final_val_top1_err"])
    study = optuna.load_study(study_name=name, storage=storage)
    (t,) = study.trials  # the unfinished configuration is not told
    assert t.value == 12.0 and t.params["augment.k"] == 0.2
    searcher = make_searcher(cfg, (storage, name))
    assert len(searcher.searcher._ot_study.trials) == 1
