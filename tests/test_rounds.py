"""``hardmix sweep --until-resolved`` (tune.rounds): seeds in rounds, a look after each, the
looks kept in the sweep folder, resume, refusals, the dry run and the report's path table.

The round loop runs here against the real store and the real reading of results, with rounds
whose "trials" are rows written through the store (made-up errors the test knows); one test runs
the whole sweep on Ray with real trials and the real ``decide`` on their rows, killed between
rounds and resumed.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ablations.looks import LOOKS_FILE, path_table, read_looks, write_looks
from ablations.sequential import Design, decide
from ablations.store import ResultStore, read_results, trial_name
from hardmix.config import ConfigError, SweepConfig, flatten, load_config
from hardmix.config.rules import until_resolved_looks
from results_fixtures import write_run

ARMS = "arms=[{augment.method: none}, {augment.method: cutmix}, {augment.method: hardmix}]"
TINY = ["run.data.name=synthetic", "run.model.name=smallnet", "run.model.width=8",
        "run.optim.epochs=1", "run.data.batch_size=64", "run.device=cpu",
        "run.output.image_grid=false", "report=false", "max_failures=0",
        "max_concurrent_trials=2", "mode=grid", "analysis.until_resolved=true",
        "analysis.margin=0.5"]


def config(tmp_path: Path, *overrides: str, name: str = "ur") -> SweepConfig:
    return load_config(SweepConfig, None, None,
                       [f"storage={tmp_path}", f"name={name}", *TINY, *overrides])


# --------------------------------------------------------------------------------------------
# Seeds and looks
# --------------------------------------------------------------------------------------------


def test_budget_seeds_start_with_seeds_skip_avoided_ones_and_fill_from_the_smallest(tmp_path):
    from tune.rounds import budget_seeds

    rng = np.random.default_rng(3)
    for _ in range(200):
        budget = int(rng.integers(2, 30))
        seeds = [int(s) for s in rng.choice(40, size=int(rng.integers(1, budget + 1)),
                                            replace=False)]
        avoid = [int(s) for s in rng.choice(40, size=int(rng.integers(0, 10)), replace=False)
                 if s not in seeds]
        cfg = SweepConfig(seeds=seeds)
        cfg.analysis.avoid_seeds, cfg.analysis.max_seeds = avoid, budget
        got = budget_seeds(cfg)
        assert len(got) == budget == len(set(got))
        assert got[:len(seeds)] == seeds and not set(got) & set(avoid)
        fill = got[len(seeds):]
        free = [s for s in range(max(got) + 1) if s not in seeds and s not in avoid]
        assert fill == free[:len(fill)]  # the smallest unused seeds, in order


def test_looks_are_equal_rounds_up_to_the_budget():
    for budget in range(2, 60):
        for rounds in range(1, budget):
            looks = until_resolved_looks(budget, rounds)
            assert len(looks) == rounds and looks[-1] == budget and looks[0] >= 2
            steps = np.diff((0,) + looks)
            assert steps.min() >= 1 and set(steps) <= {budget // rounds, -(-budget // rounds)}
            Design(looks=looks)  # a valid design


# --------------------------------------------------------------------------------------------
# Refusals and the dry run: before anything runs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, field", [
    (["analysis.margin=null"], "analysis.margin"),
    (["mode=search", "arms=[]"], "mode"),
    (["arms=[{augment.method: cutmix, seeds: [0, 1]}, {augment.method: hardmix}]"],
     "arms[0].seeds"),
    (["analysis.max_seeds=6", "analysis.rounds=6"], "analysis.rounds"),
    (["analysis.max_seeds=3", "analysis.rounds=2", "seeds=[0, 1, 2, 3]"], "seeds"),
    (["analysis.max_seeds=1"], "analysis.max_seeds"),
])
def test_bad_combinations_are_refused_by_the_config(tmp_path, overrides, field):
    with pytest.raises(ConfigError) as err:
        config(tmp_path, ARMS, *overrides)
    assert err.value.field == field


@pytest.mark.parametrize("overrides, field, why", [
    (["arms=[{augment.method: cutmix}]"], "arms", "at least two"),      # nothing to compare
    (["arms=[{augment.method: cutmix, augment.alpha: 0.5}, {augment.method: hardmix}]"],
     "arms", "exactly one factor"),                                      # two factors apart
    ([ARMS, "analysis.family=[alpha]"], "analysis.family", "exactly one factor"),
])
def test_arms_without_a_primary_contrast_are_refused_before_ray(tmp_path, overrides, field,
                                                                 why):
    from tune.sweep import run_sweep

    cfg = config(tmp_path, *overrides)
    for dry_run in (True, False):
        with pytest.raises(ConfigError) as err:
            run_sweep(cfg, dry_run=dry_run, out=io.StringIO())
        assert err.value.field == field and why in str(err.value)
    assert not any(tmp_path.iterdir())  # refused before the sweep folder was made


def test_the_flag_sets_the_key_and_a_refusal_is_one_line(tmp_path, capsys):
    from hardmix.cli import main

    argv = ["sweep", "--until-resolved", "--set", f"storage={tmp_path}", "--set", "mode=grid",
            "--set", ARMS, "--set", "run.data.name=synthetic", "--set", "run.model.name=smallnet",
            "--dry-run"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hardmix: error: analysis.margin"), err
    assert main(argv + ["--set", "analysis.margin=0.5", "--set", "analysis.max_seeds=4",
                        "--set", "analysis.rounds=2"]) == 0
    assert "until resolved (analysis.until_resolved)" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


def test_dry_run_prints_the_looks_seeds_trials_per_round_and_the_worst_case(tmp_path):
    from tune.sweep import run_sweep

    cfg = config(tmp_path, ARMS, "seeds=[7]", "analysis.max_seeds=6", "analysis.rounds=3",
                 "analysis.avoid_seeds=[0, 2]")
    out = io.StringIO()
    run_sweep(cfg, dry_run=True, out=out)
    text = out.getvalue()
    assert "3 arms, 18 trials" in text and "compute: 18 trials" in text  # the worst case
    assert "3 looks at [2, 4, 6] seeds" in text and "3 contrasts" in text
    assert "[7, 1, 3, 4, 5, 6] (avoiding analysis.avoid_seeds [0, 2])" in text
    assert "round 1: seeds [7, 1] -> look 1 at 2 seeds per arm; 3 arms x 2 seeds = 6 trials" \
        in text
    assert "round 3: seeds [5, 6] -> look 3 at 6 seeds per arm; up to 3 arms x 2 seeds = 6" \
        in text
    assert "worst case: 18 trials" in text and "at least 6" in text
    for line in ("c000 -> c001  none → cutmix", "c000 -> c002  none → hardmix",
                 "c001 -> c002  cutmix → hardmix"):
        assert line in text
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# The looks file
# --------------------------------------------------------------------------------------------


def test_the_looks_file_is_written_atomically_and_read_back(tmp_path):
    from tune.rounds import load_record, new_record, plan_of

    cfg = config(tmp_path, ARMS, "analysis.max_seeds=4", "analysis.rounds=2")
    plan = plan_of(cfg)
    record = new_record(plan)
    verdicts = decide(plan.design, {c["key"]: [0.1, -0.3, float("nan")] if i else [1.0]
                                    for i, c in enumerate(plan.contrasts)}, 0)
    record["looks"].append({"look": 1, "seeds": 2, "time": "t", "contrasts": {
        k: {f: getattr(v, f) for f in ("verdict", "stop", "n", "delta", "sd", "low", "high",
                                       "eq_low", "eq_high", "reason")}
        for k, v in verdicts.items()}})
    write_looks(str(tmp_path), record)
    assert [p.name for p in tmp_path.iterdir()] == [LOOKS_FILE]  # no temporary left behind
    back = read_looks(str(tmp_path))
    assert back == json.loads(json.dumps(record).replace("NaN", "null"))  # NaN -> null
    assert load_record(plan, str(tmp_path)) == back
    table = path_table(back)
    assert list(table["contrast"]) == [c["label"] for c in plan.contrasts]
    assert list(table["decision"]) == [v.verdict for v in verdicts.values()]
    assert table["n"].tolist() == [1, 2, 2] and math.isnan(table["sd"][0])
    # Another design, or a damaged file: one line, nothing run.
    other = plan_of(config(tmp_path, ARMS, "analysis.max_seeds=6", "analysis.rounds=2"))
    with pytest.raises(ConfigError, match="another design"):
        load_record(other, str(tmp_path))
    (tmp_path / LOOKS_FILE).write_text("{not json")
    with pytest.raises(ConfigError) as err:
        load_record(plan, str(tmp_path))
    assert err.value.field == "--resume"


def test_an_arm_gets_seeds_while_a_contrast_it_is_in_runs():
    from tune.rounds import Plan, called_seeds, rounds_called

    # Arms 0..3; contrasts a: 0-1, b: 1-2; arm 3 is in none.
    contrasts = [{"key": "a", "reference_arms": [0], "variant_arms": [1]},
                 {"key": "b", "reference_arms": [1], "variant_arms": [2]}]
    plan = Plan(Design(looks=(2, 4, 6)), [10, 11, 12, 13, 14, 15], [{}] * 4, contrasts, "top1")
    look = lambda **stops: {"contrasts": {k: {"stop": v} for k, v in stops.items()}}
    assert called_seeds(plan, None) == [[10, 11]] * 4 and rounds_called(plan, None) == 1
    # a stopped at look 1: arm 0 stops; arm 1 goes on for b; arm 3 goes on while any runs.
    rec = {"looks": [look(a=True, b=False)]}
    assert called_seeds(plan, rec) == [[10, 11], [10, 11, 12, 13], [10, 11, 12, 13],
                                       [10, 11, 12, 13]]
    # b stopped at look 2: nothing left, no third round.
    rec["looks"].append(look(b=True))
    assert rounds_called(plan, rec) == 2
    assert called_seeds(plan, rec) == [[10, 11]] + [[10, 11, 12, 13]] * 3
    # nothing stops: every arm every round, and no round after the last look.
    rec = {"looks": [look(a=False, b=False), look(a=False, b=False), look(a=True, b=True)]}
    assert rounds_called(plan, rec) == 3 and called_seeds(plan, rec) == [plan.seeds] * 4


# --------------------------------------------------------------------------------------------
# The loop, with rounds whose trials are rows written through the store
# --------------------------------------------------------------------------------------------


class Rounds:
    """``run_round`` for :func:`tune.rounds.run_rounds`: writes, through the real store, the
    final rows of the cells not finished yet (what ``_grid_phase`` runs), with test error
    ``error(arm, seed)``; ``kill_at`` raises KeyboardInterrupt instead of running that round
    (a driver killed between rounds); ``partial`` leaves that round's last cell running."""

    def __init__(self, cfg: SweepConfig, error, kill_at: str = "", partial: str = ""):
        from tune.plan import sweep_dir_of
        from tune.space import grid_points, trial_config

        self.cfg, self.error, self.kill_at, self.partial = cfg, error, kill_at, partial
        self.dir = sweep_dir_of(cfg)
        self.store = ResultStore(self.dir)
        self.points = grid_points(cfg)
        self.row = lambda arm, seed: flatten(trial_config(cfg.run, self.points[arm], seed))
        self.calls: list[tuple[str, list[list[int]], list[str]]] = []

    def __call__(self, seeds: list[list[int]], name: str) -> None:
        from tune.resume import finished, trial_rows

        if name == self.kill_at:
            raise KeyboardInterrupt
        done = finished(trial_rows(self.dir))
        todo = [(arm, s) for arm, ss in enumerate(seeds) for s in ss
                if trial_name("c", arm, s) not in done]
        ran = []
        for i, (arm, s) in enumerate(todo):
            last = name == self.partial and i == len(todo) - 1
            write_run(self.store, trial_name("c", arm, s), self.row(arm, s),
                      top1=self.error(arm, s), status="running" if last else "completed")
            ran.append(trial_name("c", arm, s))
        self.calls.append((name, seeds, ran))


def _errors(shift: dict[int, float], noise: float = 1.0):
    """Test error of (arm, seed): 20 + the arm's shift + seed noise shared by the arms (so the
    paired differences are the shifts plus a little arm-specific noise)."""
    def error(arm: int, seed: int) -> float:
        rng = np.random.default_rng(1000 * seed + arm)
        return 20.0 + shift[arm] + 3.0 * math.sin(seed) + noise * float(rng.normal())
    return error


def test_a_contrast_resolved_at_look_1_stops_its_arms_while_the_rest_run_to_the_last_look(
        tmp_path, monkeypatch):
    """A stub decides before the last look (resolved at look 1 for the contrasts of arm 0,
    continue otherwise), the real decision at the last; the paired differences decide is
    handed are the ones the rows give."""
    import tune.rounds as rounds
    from tune.outcome import planned_trials
    from tune.rounds import called_trials, run_rounds

    cfg = config(tmp_path, ARMS, "analysis.max_seeds=6", "analysis.rounds=3")
    error = _errors({0: 0.0, 1: -1.0, 2: -2.0}, noise=0.5)
    seen: list[tuple[int, dict]] = []

    def stub(design, diffs, look_index):
        seen.append((look_index, {k: list(v) for k, v in diffs.items()}))
        out = decide(design, diffs, look_index)
        if look_index == len(design.looks) - 1:
            return out  # the real decision at the last look
        return {k: replace(v, verdict="better", stop=True) if k.startswith("c000 ->")
                and look_index == 0 else replace(v, verdict="continue", stop=False)
                for k, v in out.items()}

    monkeypatch.setattr(rounds, "decide", stub)
    fake = Rounds(cfg, error)
    out = io.StringIO()
    run_rounds(cfg, fake.dir, fake, out)

    # Round 1: every arm, seeds 0, 1; rounds 2 and 3: arms 1 and 2 only.
    assert [(n, sorted(r)) for n, _, r in fake.calls] == [
        ("-round1", ["c000-s0", "c000-s1", "c001-s0", "c001-s1", "c002-s0", "c002-s1"]),
        ("-round2", ["c001-s2", "c001-s3", "c002-s2", "c002-s3"]),
        ("-round3", ["c001-s4", "c001-s5", "c002-s4", "c002-s5"])]
    # What decide was handed: every contrast at look 1, only cutmix -> hardmix later, each the
    # per-seed differences of the rows (variant - reference).
    assert [k for k, _ in seen] == [0, 1, 2]
    assert sorted(seen[0][1]) == ["c000 -> c001", "c000 -> c002", "c001 -> c002"]
    assert list(seen[1][1]) == list(seen[2][1]) == ["c001 -> c002"]
    assert seen[2][1]["c001 -> c002"] == pytest.approx(
        [error(2, s) - error(1, s) for s in range(6)])
    record = read_looks(fake.dir)
    assert [len(look["contrasts"]) for look in record["looks"]] == [3, 1, 1]
    assert [look["seeds"] for look in record["looks"]] == [2, 4, 6]
    final = record["looks"][-1]["contrasts"]["c001 -> c002"]
    assert final["stop"] and final["n"] == 6 and final["verdict"] != "continue"
    assert final["delta"] == pytest.approx(np.mean(seen[2][1]["c001 -> c002"]))
    # The sweep's planned trials are exactly those the looks called for: none "not started".
    trials, _ = read_results(fake.dir).to_pandas()
    assert sorted(called_trials(cfg)) == sorted(planned_trials(cfg)) == sorted(trials.trial_id)
    assert "look 3 (n=6): cutmix → hardmix" in out.getvalue()


def test_the_real_decision_resolves_a_clear_effect_at_the_first_look(tmp_path):
    from tune.rounds import called_trials, run_rounds

    cfg = config(tmp_path, "arms=[{augment.method: cutmix}, {augment.method: hardmix}]",
                 "analysis.max_seeds=8", "analysis.rounds=4")
    fake = Rounds(cfg, _errors({0: 0.0, 1: -5.0}, noise=1e-7))
    run_rounds(cfg, fake.dir, fake, io.StringIO())
    assert [n for n, _, _ in fake.calls] == ["-round1"]  # resolved: no second round
    (look,) = read_looks(fake.dir)["looks"]
    v = look["contrasts"]["c000 -> c001"]
    assert (v["verdict"], v["stop"], v["n"]) == ("better", True, 2)
    assert v["delta"] == pytest.approx(-5.0, abs=1e-5) and v["high"] < 0
    assert sorted(called_trials(cfg)) == ["c000-s0", "c000-s1", "c001-s0", "c001-s1"]


def test_resume_keeps_the_looks_and_runs_only_what_is_missing(tmp_path, monkeypatch):
    """Killed between rounds 1 and 2, then mid-round 2: each resume runs only the missing
    trials, never decides a recorded look again, and looks once the round has ended."""
    import tune.rounds as rounds
    from tune.rounds import called_trials, run_rounds

    cfg = config(tmp_path, "arms=[{augment.method: cutmix}, {augment.method: hardmix}]",
                 "analysis.max_seeds=6", "analysis.rounds=3")
    error = _errors({0: 0.0, 1: -0.2})
    looked: list[int] = []

    def going_on(design, diffs, look_index):  # never resolved before the last look
        looked.append(look_index)
        out = decide(design, diffs, look_index)
        if look_index < len(design.looks) - 1:
            out = {k: replace(v, verdict="continue", stop=False) for k, v in out.items()}
        return out

    monkeypatch.setattr(rounds, "decide", going_on)
    # Killed in round 1: the design and the contrasts are on disk already, no look.
    with pytest.raises(KeyboardInterrupt):
        run_rounds(cfg, str(tmp_path / "ur"), Rounds(cfg, error, kill_at="-round1"))
    before = read_looks(str(tmp_path / "ur"))
    assert before["looks"] == [] and before["design"]["looks"] == [2, 4, 6]
    assert [c["key"] for c in before["contrasts"]] == ["c000 -> c001"]
    first = Rounds(cfg, error, kill_at="-round2")
    with pytest.raises(KeyboardInterrupt):
        run_rounds(cfg, first.dir, first, io.StringIO())
    look1 = (Path(first.dir) / LOOKS_FILE).read_text()
    assert looked == [0] and len(json.loads(look1)["looks"]) == 1
    assert "c000-s2" in called_trials(cfg)  # round 2 is planned: the outcome says interrupted

    # Resumed, killed again mid-round 2 (one trial still running): no look 2 yet.
    second = Rounds(cfg, error, partial="-round2")
    run_rounds(cfg, second.dir, second, io.StringIO())
    assert [(n, sorted(r)) for n, _, r in second.calls] == [
        ("-round2", ["c000-s2", "c000-s3", "c001-s2", "c001-s3"])]
    assert looked == [0] and (Path(first.dir) / LOOKS_FILE).read_text() == look1

    # Resumed again: the running trial, then looks 2 and 3.
    third = Rounds(cfg, error)
    run_rounds(cfg, third.dir, third, io.StringIO())
    assert [(n, sorted(r)) for n, _, r in third.calls] == [
        ("-round2", ["c001-s3"]), ("-round3", ["c000-s4", "c000-s5", "c001-s4", "c001-s5"])]
    assert looked == [0, 1, 2]
    record = read_looks(third.dir)
    assert record["looks"][0] == json.loads(look1)["looks"][0]  # look 1 as it was decided
    assert [look["contrasts"]["c000 -> c001"]["n"] for look in record["looks"]] == [2, 4, 6]


# --------------------------------------------------------------------------------------------
# On Ray: real trials, the real decision on their rows, killed between rounds and resumed
# --------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_until_resolved_sweep_on_ray_resumes_between_rounds_and_reports_its_path(
        tmp_path, ray_local, monkeypatch):
    import tune.rounds as rounds
    import tune.sweep as sweep
    from ablations.report import build_report
    from ablations.stats import difference
    from tune.rounds import plan_of
    from tune.sweep import resolve_config, run_sweep

    cfg = config(tmp_path, "arms=[{augment.method: cutmix}, {augment.method: hardmix}]",
                 "analysis.max_seeds=4", "analysis.rounds=2", "analysis.avoid_seeds=[1]")
    folder = tmp_path / "ur"

    # Look 1 goes on whatever the rows say (2 seeds rarely resolve anything); the driver is
    # then killed before round 2 starts.
    def going_on(design, diffs, look_index):
        assert look_index == 0
        return {k: replace(v, verdict="continue", stop=False)
                for k, v in decide(design, diffs, look_index).items()}

    grid_phase = sweep._grid_phase

    def killed_before_round_2(*args, **kwargs):
        if args[4].endswith("-round2"):
            raise KeyboardInterrupt
        return grid_phase(*args, **kwargs)

    monkeypatch.setattr(rounds, "decide", going_on)
    monkeypatch.setattr(sweep, "_grid_phase", killed_before_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, out=io.StringIO())
    look1 = read_looks(str(folder))["looks"]
    trials, _ = read_results(str(folder)).to_pandas()
    assert sorted(trials.trial_id) == ["c000-s0", "c000-s2", "c001-s0", "c001-s2"]  # 1 avoided

    # Resume with the real decision; record which cells Tune is given.
    monkeypatch.setattr(rounds, "decide", decide)
    monkeypatch.setattr(sweep, "_grid_phase", grid_phase)
    given: list[str] = []
    tuner = sweep._tuner

    def spy(cfg_, ctx, phase, label, cells=None, **kw):
        given.extend(trial_name("c", c["index"], c["seed"]) for c in cells or [])
        return tuner(cfg_, ctx, phase, label, cells=cells, **kw)

    monkeypatch.setattr(sweep, "_tuner", spy)
    resumed, _ = resolve_config(None, None, [], str(folder))
    outcome = run_sweep(resumed, resume=True, out=io.StringIO())
    assert sorted(given) == ["c000-s3", "c000-s4", "c001-s3", "c001-s4"]  # round 2 only
    assert not outcome.interrupted and outcome.counts == {"completed": 8}

    record = read_looks(str(folder))
    assert record["looks"][0] == look1[0]
    # Look 2 is the real decision on the rows: recomputed here from the store.
    trials, _ = read_results(str(folder)).to_pandas()
    cut, hard = (trials[trials["augment.method"] == m] for m in ("cutmix", "hardmix"))
    d = difference("hardmix", hard.final_top1_err.tolist(), hard.seed.tolist(),
                   "cutmix", cut.final_top1_err.tolist(), cut.seed.tolist())
    assert d.kind == "paired" and d.n == 4
    expected = decide(plan_of(resumed).design, {"c000 -> c001": list(d.values)}, 1)
    got = record["looks"][1]["contrasts"]["c000 -> c001"]
    want = expected["c000 -> c001"]
    assert (got["verdict"], got["n"], got["stop"]) == (want.verdict, 4, True)
    assert got["delta"] == pytest.approx(want.delta) and got["low"] == pytest.approx(want.low)

    # The report names the design and shows the path.
    rep = build_report(str(folder))
    assert "## Sequential seeds" in rep.text and record["design"]["name"] in rep.text
    looks = rep.tables["looks"]
    assert looks["look"].tolist() == [1, 2] and looks["n"].tolist() == [2, 4]
    assert looks["decision"].tolist() == ["continue", want.verdict]
    assert (folder / "report" / "looks.csv").is_file()


# --------------------------------------------------------------------------------------------
# Closing a design before its end (--close): the running contrasts end undetermined
# --------------------------------------------------------------------------------------------


def test_projection_is_the_first_later_look_whose_bounds_the_estimate_crosses():
    """Checked against the bounds themselves: the projected look is the first later look where
    Δ̂ ± c·SE excludes 0 (or Δ̂ ± c_eq·SE lies within ±margin) at the planned n."""
    from ablations.sequential import projection

    design = Design(looks=(6, 12, 18, 24, 30), margin=0.5, contrasts=2)

    def by_hand(k, mean, sd):
        for j in range(k + 1, len(design.looks)):
            n = design.looks[j]
            c, ce = design.bounds(j, n)
            se = sd / math.sqrt(n)
            if abs(mean) - c * se > 0:
                return j + 1, "worse" if mean > 0 else "better"
            if mean - ce * se > -0.5 and mean + ce * se < 0.5:
                return j + 1, "equivalent"
        return None, None

    cases = [(0, 0.41, 0.455), (1, 0.41, 0.455), (1, -0.3, 0.5), (1, 0.05, 0.8),
             (0, 0.0, 0.3), (3, 0.05, 3.0), (1, 0.36, 0.114)]
    for k, mean, sd in cases:
        got = projection(design, k, mean, sd)
        assert (got["look"], got["verdict"]) == by_hand(k, mean, sd), (k, mean, sd)
        assert got["look"] is None or got["seeds"] == design.looks[got["look"] - 1]
        assert 0.0 <= got["reach"] <= 1.0
    # A contrast far from any bound (huge SD) is projected nowhere, with a small reach.
    far = projection(design, 1, 0.05, 3.0)
    assert far["look"] is None and far["reach"] < 0.5
    assert math.isnan(projection(design, 0, math.nan, 1.0)["reach"])


def _write_sweep_yaml(cfg: SweepConfig, folder: str) -> None:
    from hardmix.config import to_yaml

    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "sweep.yaml").write_text(to_yaml(cfg))


def test_close_ends_the_running_contrasts_undetermined_and_a_resume_runs_nothing(
        tmp_path, monkeypatch, capsys):
    """Look 1 recorded, then ``--resume SWEEP --close REASON`` (the CLI, no Ray): the
    contrasts still running end undetermined with the reason and the projection of their
    estimate; a contrast that stopped before keeps its verdict; the run loop runs nothing
    after; the report's Final line and its Comparisons say so."""
    import tune.rounds as rounds
    from ablations.looks import final_verdicts
    from ablations.sequential import projection
    from hardmix.cli import main
    from tune.rounds import called_trials, run_rounds

    cfg = config(tmp_path, ARMS, "analysis.max_seeds=6", "analysis.rounds=3")
    error = _errors({0: 0.0, 1: -1.0, 2: -1.2}, noise=0.5)

    def first_stops(design, diffs, look_index):  # none -> cutmix resolved, the rest go on
        out = decide(design, diffs, look_index)
        return {k: replace(v, verdict="better", stop=True) if k == "c000 -> c001"
                else replace(v, verdict="continue", stop=False) for k, v in out.items()}

    monkeypatch.setattr(rounds, "decide", first_stops)
    fake = Rounds(cfg, error, kill_at="-round2")
    _write_sweep_yaml(cfg, fake.dir)
    with pytest.raises(KeyboardInterrupt):
        run_rounds(cfg, fake.dir, fake, io.StringIO())
    look1 = read_looks(fake.dir)["looks"][0]["contrasts"]

    assert main(["sweep", "--resume", fake.dir, "--close", "  the  compute budget is spent "]) \
        == 0
    printed = capsys.readouterr().out
    assert "design closed after look 1 (the compute budget is spent)" in printed
    record = read_looks(fake.dir)
    closed = record["closed"]
    assert (closed["after_look"], closed["seeds"], closed["reason"]) == (
        1, 2, "the compute budget is spent")
    assert sorted(closed["contrasts"]) == ["c000 -> c002", "c001 -> c002"]  # not the stopped one
    design = rounds.plan_of(cfg).design
    for key, v in closed["contrasts"].items():
        assert v["verdict"] == "undetermined" and v["n"] == look1[key]["n"] == 2
        want = projection(design, 0, look1[key]["delta"], look1[key]["sd"])
        assert v["projection"]["look"] == want["look"]
        assert v["projection"]["reach"] == pytest.approx(want["reach"])
    final = final_verdicts(record)
    assert final["none → cutmix"]["verdict"] == "better"
    assert "closed" not in final["none → cutmix"]
    for label in ("none → hardmix", "cutmix → hardmix"):
        assert final[label]["verdict"] == "undetermined" and final[label]["stop"]
        assert final[label]["closed"] == "the compute budget is spent"

    # The report: the Final line and the list the Comparisons section leads with.
    from types import SimpleNamespace

    from ablations.looks import looks_section, looks_tables, sequential_finals

    tables = looks_tables(fake.dir)
    finals = sequential_finals(tables)
    text = finals["cutmix → hardmix"]["text"]
    assert text.startswith("cutmix → hardmix: **undetermined** at look 1 (n = 2), the design "
                           "closed before its end (the compute budget is spent)")
    proj = closed["contrasts"]["c001 -> c002"]["projection"]
    assert (f"would have ended **{proj['verdict']}** at look {proj['look']}" in text
            if proj["look"] else "no bound is crossed by 6 seeds per arm" in text)
    assert finals["none → cutmix"]["text"] == "none → cutmix: **better** at look 1 (n = 2)"
    section = "\n".join(looks_section(SimpleNamespace(tables=tables)))
    assert text in section
    assert "once it was resolved or futile, until its design was closed before its end (the " \
           "compute budget is spent)." in section

    # A resume runs nothing and says why; the looks file is left as it was.
    before = (Path(fake.dir) / LOOKS_FILE).read_text()
    after = Rounds(cfg, error)
    out = io.StringIO()
    run_rounds(cfg, after.dir, after, out)
    assert after.calls == [] and "closed after look 1" in out.getvalue()
    assert (Path(fake.dir) / LOOKS_FILE).read_text() == before
    # The sweep's planned trials are round 1's: round 2 is not "not started".
    assert sorted(called_trials(cfg, fake.dir)) == sorted(
        trial_name("c", arm, s) for arm in range(3) for s in (0, 1))

    # Closing again, or without --resume, is one line and exit 2.
    assert main(["sweep", "--resume", fake.dir, "--close", "again"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was closed already after look 1" in err[0]
    assert main(["sweep", "--close", "why"]) == 2
    assert "add --resume SWEEP" in capsys.readouterr().err
    assert main(["sweep", "--resume", fake.dir, "--close", "   "]) == 2
    assert "say why" in capsys.readouterr().err


def test_close_is_refused_before_any_look_and_for_a_sweep_of_fixed_seeds(tmp_path, capsys):
    from hardmix.cli import main
    from tune.rounds import run_rounds

    cfg = config(tmp_path, "arms=[{augment.method: cutmix}, {augment.method: hardmix}]",
                 "analysis.max_seeds=6", "analysis.rounds=3")
    fake = Rounds(cfg, _errors({0: 0.0, 1: 0.0}), kill_at="-round1")
    _write_sweep_yaml(cfg, fake.dir)
    with pytest.raises(KeyboardInterrupt):
        run_rounds(cfg, fake.dir, fake, io.StringIO())
    assert main(["sweep", "--resume", fake.dir, "--close", "budget"]) == 2
    assert "has no look yet" in capsys.readouterr().err
    assert "closed" not in read_looks(fake.dir)

    fixed = load_config(SweepConfig, None, None, [f"storage={tmp_path}", "name=fixed",
                                                  *TINY[:-2], "seeds=[0, 1]",
                                                  "arms=[{augment.method: cutmix}]"])
    _write_sweep_yaml(fixed, str(tmp_path / "fixed"))
    assert main(["sweep", "--resume", str(tmp_path / "fixed"), "--close", "budget"]) == 2
    assert "not an until-resolved sweep" in capsys.readouterr().err
