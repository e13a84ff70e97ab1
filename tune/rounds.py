"""Sequential seeds: ``hardmix sweep --until-resolved`` (``analysis.until_resolved: true``).

A grid of arms runs its seeds in rounds instead of all at once. The rounds are the looks of a
group-sequential design (:class:`ablations.sequential.Design`): ``analysis.rounds`` looks,
equally spaced up to ``analysis.max_seeds`` seeds per arm
(:func:`hardmix.config.rules.until_resolved_looks`), every arm on the same seeds so that each
difference is paired. After each round the driver reads the completed trials' primary outcome
(``analysis.primary``) and pairs them exactly as ``hardmix report`` does (the per-trial table
of :mod:`ablations.trial_table` and the one-factor contrasts of :mod:`ablations.contrasts`
over ``analysis.family``), and :func:`ablations.sequential.decide` says, per primary contrast,
better / worse / equivalent (stop: resolved), undetermined (stop: futile, or the budget's last
look) or continue. A contrast that stopped is never decided again; an arm gets the next round's
seeds while a contrast it is in goes on (an arm in no primary contrast while any goes on).

Every look is appended to ``<sweep>/looks.json`` (:mod:`ablations.looks`, written atomically),
which also holds the design and the contrasts, fixed before the first round. A resumed sweep
reads the looks it has, never decides them again, and goes on from the round after the last:
a driver killed mid-round runs that round's missing trials, then looks. The report shows the
path (:func:`ablations.looks.looks_section`).

A design can be closed before its end (``hardmix sweep --resume SWEEP --close REASON``, e.g.
when a compute budget is spent): :func:`close_design` records, after the last look, that the
contrasts still running end ``undetermined`` with the reason and each one's projection (the
look its estimate would resolve at, :func:`ablations.sequential.projection`). Closing adds no
false verdict (no bound is crossed by it) and is final: a resume of a closed sweep runs nothing.

The seeds, in the order rounds take them: ``seeds`` first, then the smallest non-negative
integers not among them nor in ``analysis.avoid_seeds`` (:func:`budget_seeds`).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Optional, TextIO

from ablations.looks import LOOKS_FILE, VERSION, read_looks, write_looks
from ablations.sequential import ALPHA, Design, decide, projection
from hardmix.config import ConfigError, SweepConfig
from hardmix.config.rules import until_resolved_looks

#: Trial statuses that end a trial for this round (a failed one is retried by a later round or
#: a resume, as any failed trial is).
ENDED = ("completed", "pruned", "failed")


@dataclass
class Plan:
    """What an until-resolved sweep is before it runs: its design, its seeds in the order the
    rounds take them, its grid points (arms) and its primary contrasts (``key``, ``label``,
    ``factor``, ``change``, ``reference_arms``, ``variant_arms``)."""

    design: Design
    seeds: list[int]
    points: list[dict]
    contrasts: list[dict]
    primary: str

    def arms_of(self, contrast: dict) -> set[int]:
        return set(contrast["reference_arms"]) | set(contrast["variant_arms"])


def budget_seeds(cfg: SweepConfig) -> list[int]:
    """The ``analysis.max_seeds`` seeds every arm may take, in the order rounds use them:
    ``seeds``, then the smallest non-negative integers not among them nor in
    ``analysis.avoid_seeds``."""
    taken = set(cfg.seeds) | set(cfg.analysis.avoid_seeds)
    out = list(cfg.seeds)[:cfg.analysis.max_seeds]
    candidate = 0
    while len(out) < cfg.analysis.max_seeds:
        if candidate not in taken:
            out.append(candidate)
        candidate += 1
    return out


def _arms_text(arms: list[int]) -> str:
    from ablations.store import MAIN_PREFIX

    return "+".join(f"{MAIN_PREFIX}{i:03d}" for i in arms)


def primary_contrasts(used, factors: list[str], cfg: SweepConfig) -> dict:
    """The primary family's contrasts among the per-trial table ``used`` (as ``hardmix report``
    finds them: :func:`ablations.contrasts.one_factor_contrasts` over ``analysis.family`` on
    ``analysis.primary``, identical variants left out), keyed ``"c000 -> c001"`` by the arms
    (grid points) on each side, as ``{key: (Contrast, reference arms, variant arms)}``. A
    contrast left out of the family for a reason other than the family (identical variants)
    is kept with its reason in ``Contrast.excluded``."""
    from ablations.contrasts import one_factor_contrasts
    from ablations.store import parse_trial_id
    from ablations.tables import identical_variants

    if used.empty:
        return {}
    a = cfg.analysis
    same = identical_variants(used)
    found = one_factor_contrasts(used, factors, same, a.family or None, "bonferroni", a.margin,
                                 a.primary)
    arms: dict[str, set[int]] = {}
    for variant, trial in zip(used["variant"], used["trial_id"]):
        parsed = parse_trial_id(trial)
        if parsed is not None:
            arms.setdefault(variant, set()).add(parsed[1])
    out = {}
    for c in found:
        if c.excluded == "outside the family":
            continue
        ref = sorted(arms.get(c.difference.baseline, ()))
        var = sorted(arms.get(c.difference.variant, ()))
        out[f"{_arms_text(ref)} -> {_arms_text(var)}"] = (c, ref, var)
    return out


def plan_of(cfg: SweepConfig) -> Plan:
    """The design, seeds and primary contrasts of an until-resolved sweep, known before any
    trial runs: the contrasts are those the report would test, found by its own functions on
    the planned trials (two seeds per arm, stand-in outcomes: only which pairs of arms form
    contrasts is read). Raises ConfigError (one line) when there are fewer than two arms or
    no primary contrast among them."""
    import numpy as np
    import pandas as pd

    from ablations.store import MAIN_PREFIX, as_run, trial_name
    from ablations.trial_table import trial_table
    from hardmix.config import flatten
    from hardmix.metrics import OUTCOMES
    from tune.space import grid_points, trial_config

    a = cfg.analysis
    points = grid_points(cfg)
    if len(points) < 2:
        raise ConfigError("arms", f"{len(points)} configuration(s)", "analysis.until_resolved "
                          "compares arms: give the grid at least two (arms or space values)")
    rng = np.random.default_rng(0)
    rows = []
    for i, point in enumerate(points):
        for seed in (0, 1):
            row = as_run(flatten(trial_config(cfg.run, point, seed)))
            row.update(sweep=cfg.name, trial_id=trial_name(MAIN_PREFIX, i, seed), seed=seed,
                       status="completed")
            row[OUTCOMES[a.primary].column] = float(rng.normal())
            rows.append(row)
    used, factors = trial_table(pd.DataFrame(rows), pd.DataFrame(columns=["sweep", "trial_id"]))
    found = primary_contrasts(used, factors, cfg)
    contrasts = [{"key": key, "label": f"{c.difference.baseline} → {c.difference.variant}",
                  "factor": c.factor, "change": c.change, "reference_arms": ref,
                  "variant_arms": var}
                 for key, (c, ref, var) in found.items() if not c.excluded]
    if not contrasts:
        field, value = (("analysis.family", a.family) if a.family
                        else ("arms", f"{len(points)} arms"))
        raise ConfigError(field, value, "no two arms differ in exactly one factor (of "
                          "analysis.family, when given): analysis.until_resolved has no "
                          "contrast to decide")
    design = Design(looks=until_resolved_looks(a.max_seeds, a.rounds), alpha=ALPHA,
                    margin=a.margin, contrasts=len(contrasts))
    return Plan(design, budget_seeds(cfg), points, contrasts, a.primary)


# --------------------------------------------------------------------------------------------
# The looks so far, and the seeds they call for
# --------------------------------------------------------------------------------------------


def new_record(plan: Plan) -> dict:
    d = plan.design
    return {"version": VERSION,
            "design": {"name": d.name, "looks": list(d.looks), "alpha": d.alpha,
                       "margin": d.margin, "contrasts": d.contrasts, "futility": d.futility,
                       "description": d.describe()},
            "primary": plan.primary, "seeds": list(plan.seeds), "contrasts": plan.contrasts,
            "looks": []}


def load_record(plan: Plan, sweep_dir: str) -> Optional[dict]:
    """The sweep's looks so far (None before the first round), checked to belong to this
    design: a resume continues the same design or is refused (one line)."""
    from ablations import storage

    where = storage.join(sweep_dir, LOOKS_FILE)
    try:
        record = read_looks(sweep_dir)
    except ValueError as exc:
        raise ConfigError("--resume", where, str(exc)) from None
    if record is None:
        return None
    d = plan.design
    mine = {"looks": list(d.looks), "margin": d.margin, "contrasts": d.contrasts,
            "seeds": list(plan.seeds), "keys": [c["key"] for c in plan.contrasts]}
    theirs = {"looks": record["design"].get("looks"), "margin": record["design"].get("margin"),
              "contrasts": record["design"].get("contrasts"), "seeds": record.get("seeds"),
              "keys": [c.get("key") for c in record["contrasts"]]}
    for k in mine:
        if mine[k] != theirs[k]:
            raise ConfigError("--resume", where, f"was written by another design ({k} "
                              f"{theirs[k]!r}, this sweep plans {mine[k]!r}); start a new sweep")
    return record


def stopped_at(record: dict) -> dict[str, int]:
    """``{contrast key: index of the look that stopped it}`` for the contrasts that stopped."""
    out: dict[str, int] = {}
    for k, look in enumerate(record["looks"]):
        for key, v in look["contrasts"].items():
            if v.get("stop") and key not in out:
                out[key] = k
    return out


def live_after(plan: Plan, record: dict, k: int) -> list[dict]:
    """The contrasts still running after the first ``k`` looks."""
    stops = stopped_at(record)
    return [c for c in plan.contrasts if not (c["key"] in stops and stops[c["key"]] < k)]


def rounds_called(plan: Plan, record: Optional[dict]) -> int:
    """How many rounds the looks so far call for: one more than the looks recorded, unless
    every contrast stopped or the last look is behind."""
    if record is None:
        return 1
    done = len(record["looks"])
    if record.get("closed") or done >= len(plan.design.looks) \
            or not live_after(plan, record, done):
        return done
    return done + 1


def called_seeds(plan: Plan, record: Optional[dict]) -> list[list[int]]:
    """Each arm's seeds that the looks so far call for: every round while the arm is live
    (a contrast it is in still runs; an arm in no primary contrast while any runs)."""
    looks = plan.design.looks
    out = []
    record = record or {"looks": []}
    in_some = {i for c in plan.contrasts for i in plan.arms_of(c)}
    for arm in range(len(plan.points)):
        n = 0
        for r in range(rounds_called(plan, record)):
            live = live_after(plan, record, r)
            if arm in {i for c in live for i in plan.arms_of(c)} or arm not in in_some:
                n = looks[r]  # (every round called has a live contrast)
        out.append(plan.seeds[:n])
    return out


def called_trials(cfg: SweepConfig, sweep_dir: Optional[str] = None) -> list[str]:
    """The trial ids an until-resolved sweep plans so far: the rounds its recorded looks call
    for (:func:`called_seeds`). The sweep's outcome counts these (a round not run because its
    contrasts resolved is not "not started")."""
    from ablations.store import MAIN_PREFIX, trial_name
    from tune.plan import sweep_dir_of

    plan = plan_of(cfg)
    record = load_record(plan, sweep_dir or sweep_dir_of(cfg))
    return [trial_name(MAIN_PREFIX, arm, s)
            for arm, seeds in enumerate(called_seeds(plan, record)) for s in seeds]


# --------------------------------------------------------------------------------------------
# The plan in words (--dry-run)
# --------------------------------------------------------------------------------------------


def plan_text(cfg: SweepConfig, **options) -> str:
    """``--dry-run`` of an until-resolved sweep: the trials, resources and compute of its worst
    case (every arm runs every seed of the budget; ``options`` as :func:`tune.plan.plan_text`
    takes them), then the design, the seeds, the primary contrasts and the trials per round."""
    from hardmix.metrics import OUTCOMES
    from tune.plan import plan_text as base_text

    plan = plan_of(cfg)
    d = plan.design
    worst = dataclasses.replace(cfg, seeds=list(plan.seeds))
    arms = len(plan.points)
    lines = [base_text(worst, **options), "",
             f"until resolved (analysis.until_resolved): {d.describe()}",
             f"  seeds per arm, in the order the rounds take them: {plan.seeds}"
             + (f" (avoiding analysis.avoid_seeds {sorted(cfg.analysis.avoid_seeds)})"
                if cfg.analysis.avoid_seeds else ""),
             f"  primary contrasts on {OUTCOMES[plan.primary].title} ({len(plan.contrasts)}, "
             "each stopped once resolved or futile):"]
    lines += [f"    {c['key']}  {c['label']}" for c in plan.contrasts]
    prev = 0
    for k, n in enumerate(d.looks):
        lines.append(f"  round {k + 1}: seeds {plan.seeds[prev:n]} -> look {k + 1} at {n} seeds "
                     f"per arm; {'' if k == 0 else 'up to '}{arms} arms x {n - prev} seeds = "
                     f"{arms * (n - prev)} trials")
        prev = n
    lines.append(f"  worst case: {arms * d.looks[-1]} trials (no contrast resolved before the "
                 f"last look; the compute above); at least {arms * d.looks[0]} (all resolved "
                 "at the first look)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The rounds
# --------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def look_at(cfg: SweepConfig, plan: Plan, record: dict, sweep_dir: str, k: int) -> dict:
    """Look ``k`` (0-based): the paired differences of every contrast still running, read from
    the store as the report reads them, and :func:`ablations.sequential.decide`'s verdicts, as
    the look's entry of the looks file."""
    from ablations.store import read_results
    from ablations.trial_table import split_trials, trial_table

    trials, epochs = read_results(sweep_dir, on_corrupt="skip").to_pandas()
    used, _, _ = split_trials(trials)
    used, factors = trial_table(used, epochs)
    found = primary_contrasts(used, factors, cfg)
    live = live_after(plan, record, k)
    diffs, left_out = {}, {}
    for c in live:
        got = found.get(c["key"])
        if got is not None and got[0].excluded:
            left_out[c["key"]] = got[0].excluded
        d = got[0].difference if got is not None else None
        diffs[c["key"]] = list(d.values) if d is not None and d.kind == "paired" else []
    verdicts = decide(plan.design, diffs, k)
    entry = {"look": k + 1, "seeds": plan.design.looks[k], "time": _now(), "contrasts": {}}
    for key, v in verdicts.items():
        row = dataclasses.asdict(v)
        row.pop("look")
        if key in left_out:  # identical arms: more seeds cannot tell them apart
            row.update(verdict="undetermined", stop=True,
                       reason=f"left out as the report leaves it out: {left_out[key]}")
        entry["contrasts"][key] = row
    return entry


def _round_ended(sweep_dir: str, seeds: list[list[int]]) -> bool:
    from ablations.store import MAIN_PREFIX, trial_name
    from tune.resume import trial_rows

    rows = trial_rows(sweep_dir)
    return all(rows.get(trial_name(MAIN_PREFIX, arm, s), {}).get("status") in ENDED
               for arm, arm_seeds in enumerate(seeds) for s in arm_seeds)


def run_rounds(cfg: SweepConfig, sweep_dir: str, run_round: Callable[[list[list[int]], str], None],
               out: Optional[TextIO] = None) -> None:
    """The round loop. ``run_round(point_seeds, name)`` runs every grid cell of
    ``point_seeds`` (each arm's seeds so far) that the store has not finished, as the Tune
    phase ``<main phase><name>``. Returns when every contrast stopped, after the last look,
    or when a round did not end (interrupted: the look waits for a resume)."""
    out = out or sys.stdout
    plan = plan_of(cfg)
    record = load_record(plan, sweep_dir)
    if record is None:
        record = new_record(plan)
        write_looks(sweep_dir, record)
    looks = plan.design.looks
    if record.get("closed"):
        closed = record["closed"]
        print(f"until resolved: the design was closed after look {closed['after_look']} "
              f"({closed['reason']}); nothing left to run", file=out)
        return
    if record["looks"]:
        print(f"until resolved: {len(record['looks'])} look(s) recorded; "
              + ("going on from round " f"{len(record['looks']) + 1}"
                 if rounds_called(plan, record) > len(record["looks"]) else "nothing left"),
              file=out)
    while rounds_called(plan, record) > len(record["looks"]):
        k = len(record["looks"])
        seeds = called_seeds(plan, record)
        live_arms = sum(1 for s in seeds if len(s) == looks[k])
        print(f"until resolved: round {k + 1}/{len(looks)}: {live_arms} arm(s) up to "
              f"{looks[k]} seeds each ({len(live_after(plan, record, k))} contrast(s) running)",
              file=out)
        run_round(seeds, f"-round{k + 1}")
        if not _round_ended(sweep_dir, seeds):
            return  # interrupted: this round resumes, then looks
        entry = look_at(cfg, plan, record, sweep_dir, k)
        record["looks"].append(entry)
        write_looks(sweep_dir, record)
        labels = {c["key"]: c["label"] for c in plan.contrasts}
        for key, v in entry["contrasts"].items():
            print(f"  look {k + 1} (n={v['n']}): {labels[key]}: {v['verdict']}, Δ̂ "
                  f"{v['delta']:+.3f}, interval [{v['low']:+.3f}, {v['high']:+.3f}] "
                  f"({v['reason']})", file=out)


# --------------------------------------------------------------------------------------------
# Closing a design before its end
# --------------------------------------------------------------------------------------------


def close_design(cfg: SweepConfig, sweep_dir: str, reason: str,
                 out: Optional[TextIO] = None) -> dict:
    """Close the sweep's design after its last recorded look: every contrast still running
    ends ``undetermined`` (``reason`` says why, e.g. "the 6 h compute budget is spent"), with
    its estimate's projection (:func:`ablations.sequential.projection`). Written atomically to
    the looks file; returns the ``closed`` entry. Raises ConfigError (one line) for a sweep
    with no look yet, one already closed or with no contrast left running."""
    out = out or sys.stdout
    reason = " ".join(str(reason).split())
    if not reason:
        raise ConfigError("--close", repr(reason), "say why the design ends early (e.g. "
                          "'the 6 h compute budget is spent')")
    plan = plan_of(cfg)
    record = load_record(plan, sweep_dir)
    where = f"{sweep_dir}/{LOOKS_FILE}"
    if record is None or not record["looks"]:
        raise ConfigError("--close", where, "has no look yet: there is nothing to close (run "
                          "the first round, or start a sweep without --until-resolved)")
    if record.get("closed"):
        raise ConfigError("--close", where, f"was closed already after look "
                          f"{record['closed']['after_look']} ({record['closed']['reason']})")
    k = len(record["looks"])
    live = live_after(plan, record, k)
    if not live:
        raise ConfigError("--close", where, "has no contrast running: every one has its verdict")
    last = {key: v for look in record["looks"] for key, v in look["contrasts"].items()}
    closed = {"after_look": k, "seeds": plan.design.looks[k - 1], "reason": reason,
              "time": _now(), "contrasts": {}}
    labels = {c["key"]: c["label"] for c in plan.contrasts}
    for c in live:
        v = last.get(c["key"], {})
        delta = v.get("delta") if v.get("delta") is not None else float("nan")
        sd = v.get("sd") if v.get("sd") is not None else float("nan")
        proj = projection(plan.design, k - 1, float(delta), float(sd))
        closed["contrasts"][c["key"]] = {"verdict": "undetermined", "n": v.get("n"),
                                         "delta": delta, "sd": sd, "projection": proj}
        at = (f"{proj['verdict']} at look {proj['look']} ({proj['seeds']} seeds)"
              if proj["look"] else f"no verdict by {plan.design.looks[-1]} seeds")
        print(f"  {labels[c['key']]}: undetermined at look {k} (n={v.get('n')}); at its "
              f"estimate it would end {at}", file=out)
    record["closed"] = closed
    write_looks(sweep_dir, record)
    print(f"until resolved: design closed after look {k} ({reason})", file=out)
    return closed
