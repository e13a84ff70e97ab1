"""What a sweep's rows say, read back from its store: the trials it plans (those of an
until-resolved sweep depend on its recorded looks), the searched metric of a trial, the best
configurations of a search (its follow-up runs them again), and the outcome of the whole sweep
(counts over every planned trial, the best trial, the report) with the summary it prints.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Optional, TextIO

from ablations import storage
from hardmix.config import ConfigError, SweepConfig, to_dict
from ablations.store import FOLLOWUP_PREFIX, MAIN_PREFIX, trial_name
from tune.plan import FOLLOWUP_FILE, MAIN_PHASE, describe_data, varying_fields
from tune.resume import stored_configurations, trial_rows
from tune.rounds import called_trials
from tune.space import grid_points, point_seeds


@dataclass
class SweepOutcome:
    """What a sweep left behind (returned by :func:`tune.sweep.run_sweep`)."""

    sweep_dir: str
    counts: dict[str, int] = field(default_factory=dict)  # completed / pruned / failed / unfinished
    best: Optional[dict] = None                           # trial, value, params of the best trial
    report: Optional[str] = None
    interrupted: bool = False
    wall_seconds: float = 0.0
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.interrupted and (self.dry_run or self.counts.get("completed", 0) > 0)


def planned_trials(cfg: SweepConfig, followup: list[dict] | None = None) -> list[str]:
    """Every trial id the sweep will have once it ends (main phase, then follow-up); for an
    until-resolved sweep, the rounds its recorded looks call for (:mod:`tune.rounds`)."""
    if cfg.analysis.until_resolved and cfg.mode == "grid":
        return called_trials(cfg)
    if cfg.mode == "grid":
        ids = [trial_name(MAIN_PREFIX, i, s) for i, (_, seeds) in enumerate(zip(grid_points(cfg),
                                                                         point_seeds(cfg)))
               for s in seeds]
    else:
        ids = [trial_name(MAIN_PREFIX, i, s) for i in range(cfg.num_samples) for s in cfg.seeds]
    if followup:
        ids += [trial_name(FOLLOWUP_PREFIX, i, s) for i in range(len(followup)) for s in cfg.followup.seeds]
    return ids


def metric_of(cfg: SweepConfig):
    """The searched metric of a trial row: the run's last validation value (the trials table
    carries top-1; other metrics come from the trial's last epoch row)."""
    def get(row: dict) -> float | None:
        value = row.get("final_val_top1_err") if cfg.metric == "val_top1_err" else \
            row.get(f"_last_{cfg.metric}")
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    return get


def rows_with_metric(cfg: SweepConfig, sweep_dir: str) -> dict[str, dict]:
    """Latest trial rows, with the last epoch's ``cfg.metric`` attached when it is not the
    trials table's own validation column."""
    rows = trial_rows(sweep_dir)
    if cfg.metric != "val_top1_err" and rows:
        from ablations.store import read_results

        epochs = read_results(sweep_dir, on_corrupt="skip").epochs.to_pylist()
        last: dict[str, tuple] = {}
        for e in epochs:
            if e.get(cfg.metric) is not None and e["epoch"] >= last.get(e["trial_id"], (0,))[0]:
                last[e["trial_id"]] = (e["epoch"], e[cfg.metric])
        for t, (_, v) in last.items():
            if t in rows:
                rows[t][f"_last_{cfg.metric}"] = v
    return rows


def best_configurations(cfg: SweepConfig, rows: dict[str, dict], top: int) -> list[dict]:
    """The ``top`` configurations of the search with the lowest mean validation value over
    their seeds, from trials that completed every epoch (early values of pruned trials would
    flatter them)."""
    metric = metric_of(cfg)
    ranked = []
    for entry in stored_configurations(rows, cfg.space).values():
        values = [metric(r) for r in entry["rows"].values() if r.get("status") == "completed"]
        values = [v for v in values if v is not None]
        if values:
            ranked.append((sum(values) / len(values), entry["params"]))
    ranked.sort(key=lambda kv: kv[0])
    return [params for _, params in ranked[:top]]


def matched_baseline(cfg: SweepConfig, point: dict) -> dict:
    """``followup.baseline`` matched to a configuration: the baseline method with the
    configuration's value of every augment field the baseline reads too (α, prob, box, ...),
    and every other run field as in the configuration."""
    from hardmix.methods import active_fields

    aug = {**to_dict(cfg.run.augment), "method": cfg.followup.baseline}
    acts = active_fields(aug)
    out = {"augment.method": cfg.followup.baseline}
    for k, v in point.items():
        if not k.startswith("augment.") or k[len("augment."):] in acts:
            out.setdefault(k, v)
    return out


def followup_configurations(cfg: SweepConfig, sweep_dir: str, rows: dict[str, dict]
                            ) -> list[dict]:
    """The configurations the follow-up runs: the ``followup.top`` best of the search, each
    followed by its matched baseline (once). Chosen once and kept in ``followup.json``, so a
    resumed follow-up runs the same ones."""
    points_file = storage.join(sweep_dir, FOLLOWUP_FILE)
    if storage.exists(points_file):
        top = json.loads(storage.read_text(points_file))
        if not isinstance(top, list) or not all(isinstance(p, dict) for p in top):
            raise ConfigError("--resume", points_file, "is not a list of configurations")
        return top
    top = best_configurations(cfg, rows, cfg.followup.top)
    if cfg.followup.baseline:  # the matched baseline of each, once
        for m in [matched_baseline(cfg, p) for p in top]:
            if m not in top:
                top.append(m)
    storage.write_text(points_file, json.dumps(top, indent=1))
    return top


def sweep_outcome(cfg: SweepConfig, sweep_dir: str, wall: float) -> SweepOutcome:
    """Counts over the whole sweep (every planned trial, including those not started) and the
    best trial by validation, read from the store."""
    rows = rows_with_metric(cfg, sweep_dir)
    followup = None
    if cfg.followup.top and storage.exists(storage.join(sweep_dir, FOLLOWUP_FILE)):
        followup = json.loads(storage.read_text(storage.join(sweep_dir, FOLLOWUP_FILE)))
    planned = planned_trials(cfg, followup)
    if cfg.followup.top and followup is None:
        n = cfg.followup.top * (2 if cfg.followup.baseline else 1) * len(cfg.followup.seeds)
        planned += [f"f-planned-{i}" for i in range(n)]
    outcome = SweepOutcome(sweep_dir, wall_seconds=wall)
    for t in planned:
        status = rows.get(t, {}).get("status", "not started")
        status = "unfinished" if status == "running" else status
        outcome.counts[status] = outcome.counts.get(status, 0) + 1
    outcome.interrupted = any(k in outcome.counts for k in ("unfinished", "not started"))
    metric = metric_of(cfg)
    done = [(metric(r), t, r) for t, r in rows.items()
            if r.get("status") == "completed" and metric(r) is not None]
    if done:
        value, trial, row = min(done, key=lambda x: x[0])
        params = {k: row.get(k) for k in (list(cfg.space) or varying_fields(cfg))
                  if row.get(k) is not None}
        outcome.best = {"trial": trial, "value": value, "params": params}
    return outcome


def print_outcome(cfg: SweepConfig, outcome: SweepOutcome, out: TextIO) -> None:
    d = outcome.sweep_dir
    c = outcome.counts
    print(f"\nsweep {cfg.name}: {sum(c.values())} trials: {c.get('completed', 0)} completed, "
          f"{c.get('pruned', 0)} pruned, {c.get('failed', 0)} failed"
          + (f", {c['unfinished']} unfinished" if c.get("unfinished") else "")
          + (f", {c['not started']} not started" if c.get("not started") else "")
          + f" ({outcome.wall_seconds / 60:.1f} min in all)", file=out)
    if outcome.best:
        b = outcome.best
        params = ", ".join(f"{k}={v}" for k, v in b["params"].items())
        print(f"  best         {b['trial']}  {cfg.metric} {b['value']:.2f}  ({params})", file=out)
    print(f"  data         {describe_data(cfg)}", file=out)
    print(f"  Parquet      {storage.join(d, 'trials')}  {storage.join(d, 'epochs')}", file=out)
    # A URI storage: Ray syncs a trial's run folder into its Tune trial folder, but a
    # data-parallel trial's rank 0 copies it into runs/ (tune.trainable.RunFolderSync).
    runs = (storage.join(d, "runs") if not storage.is_uri(d) or cfg.resources.workers > 1
            else storage.join(d, MAIN_PHASE))
    print(f"  TensorBoard  tensorboard --logdir {runs}", file=out)
    from tune.trackers import summary_lines  # W&B, MLflow: where they wrote, how to open it
    for line in summary_lines(cfg, d):
        print(line, file=out)
    if outcome.report:
        print(f"  report       {outcome.report}", file=out)
    if outcome.interrupted:
        print(f"  interrupted: continue with  hardmix sweep --resume {d}", file=out)


def build_report(sweep_dir: str, out: TextIO) -> str | None:
    """``hardmix report`` on the finished sweep: prints its main table, returns report.md."""
    try:
        from ablations.report import build_report
    except ImportError as exc:  # the analysis layer is optional at run time
        print(f"hardmix: report skipped: ablations.report is not available ({exc}); run "
              f"`hardmix report {sweep_dir}` once it is", file=sys.stderr)
        return None
    try:
        report = build_report(sweep_dir)
    except ConfigError as exc:
        print(f"hardmix: report skipped: {exc}", file=sys.stderr)
        return None
    print("\n" + report.terminal, file=out)
    return report.path
