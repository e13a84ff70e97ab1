"""``hardmix report``: turn a sweep's Parquet results into the tables and plots of a paper, and
say only what the data support.

This module is the orchestration: read the store, build the one per-trial table
(:mod:`ablations.trial_table`), compute the sections from it (:mod:`ablations.tables`,
:mod:`ablations.contrasts`, :mod:`ablations.importance`, :mod:`ablations.search_limits`,
:mod:`ablations.plots`), put them in
words (:mod:`ablations.document`) and write the files with their manifest.

:func:`build_report` reads a sweep folder (or a folder of sweeps, local or URI), keeps the
completed trials, groups them into variants (``augment.method`` + the config columns that vary
within the sweep and act for that variant, seed excluded; see :mod:`ablations.factors`) and
writes into ``<sweep>/report/`` (or ``out``):

* ``report.md`` -- everything below, with the verdicts in plain words;
* ``main_table.csv`` -- one row per variant: mean ± std final test top-1 / top-5 error over
  seeds, n, the diagnostics of :mod:`hardmix.metrics` (hard share, fallback rate, source
  diversity), and which variants trained *identically* to another (same result for every seed);
* ``trials.csv`` -- one row per trial used (sweep, trial id, arm, seed, every varying field,
  final outcomes, diagnostics' means, per-class errors and source shares): every number of the
  tables and verdicts derives from it (:func:`per_trial_table`);
* ``contrasts.csv`` -- the primary family: every pair of variants that differ in exactly one
  factor they share (the method counts as one; settings only one side has, such as HardMix's
  fallback against CutMix, belong to the changed switch and are named in the change), on the
  primary outcome, paired by seed, tested as one family (Bonferroni, or uncorrected) with a
  four-valued verdict, MDE and seeds each (:mod:`ablations.stats`). Pairs that cannot be told
  apart by construction are left out of the family and listed: identical results, or a switch
  whose witness metric shows it never acted (a fallback that fired on 0% of steps);
* ``contrasts_<outcome>.csv`` -- the secondary families (top-5 error, test NLL, ECE by
  default): the same contrasts on another outcome, each corrected on its own;
* ``class_errors.csv`` -- per-class test error of the primary method contrast, with the
  classes' share as HardMix sources;
* ``differences.csv`` -- the same comparisons seen from the baseline method (default CutMix):
  each variant against the CutMix variant that matches it on every shared factor (prob, α, box,
  ...), with the family's interval; a variant without such a match is listed as unmatched;
* ``settings.csv`` -- what every trial used shares (per method for a method's own fields):
  the configuration the variant names leave out;
* ``factor_<name>.csv`` -- marginal means per factor (descriptive, no test);
* ``search.csv`` -- a followed-up search's exploration (:func:`search_phase`): every
  configuration it tried, how far it ran and its validation error; the tables above use only
  the follow-up's re-runs, since the exploration chose them;
* ``importance.csv`` -- Optuna's factor importance over a search's exploration, only with
  enough full-length trials, with bootstrap intervals (:mod:`ablations.importance`);
  ``importance_early.csv`` where too few ran to the end: the same at the latest epoch enough
  trials reached (what early stopping decided on, labelled as such);
* ``left_out.csv`` / ``skipped_files.csv`` -- every trial not in the tables and why;
* PNG plots (:mod:`ablations.plots`), one colour per variant across all of them.

No number selected on the test set appears: tables use the last epoch's test error, and
choices (the best trial of a search) use validation error. A re-run replaces only the files a
report wrote before (listed in its manifest, ``.hardmix-report.json``); nothing else in
``out`` is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import pandas as pd

from ablations import plots
from ablations.contrasts import (CONTRAST_COLUMNS, Contrast, contrast_table,
                                 differences_from, one_factor_contrasts, retest)
from ablations.declared import declared_analysis, declared_search, sweep_mode
from ablations.document import Context, markdown, terminal
from ablations.factors import fixed_settings, short_names, varying_factors
from ablations.importance import factor_importance, rung_target
from ablations.looks import looks_tables, sequential_finals
from ablations.paths import data_labels, shown_path, shown_text
from ablations.search_limits import search_limits
from ablations.stats import CORRECTIONS
from ablations.store import _resolve, read_results
from ablations.tables import (class_table, factor_tables, identical_variants,
                              main_table, search_table)
from ablations.text import display_table, md_table
from ablations.trial_table import (LEFT_OUT_REASONS, per_trial_table, seed_notes,
                                   split_trials, trial_table)
from ablations.verdicts_text import family_text
from hardmix.config.environment import check_writable
from hardmix.errors import ConfigError
from hardmix.methods import METHODS
from hardmix.metrics import OUTCOMES

MANIFEST = ".hardmix-report.json"
#: The report's entry points, and the section functions it is made of (importable from here as
#: before the sections had modules of their own).
__all__ = ["build_report", "report_from_cli", "Report", "MANIFEST", "Contrast", "contrast_table",
           "CONTRAST_COLUMNS", "one_factor_contrasts", "retest", "differences_from",
           "main_table", "identical_variants", "factor_tables", "search_table", "class_table",
           "per_trial_table", "split_trials", "LEFT_OUT_REASONS", "md_table", "display_table"]


@dataclass
class Report:
    """What :func:`build_report` produced: ``path`` is report.md (file or URI) inside ``out``;
    ``text`` its Markdown."""

    out: str
    path: str
    text: str
    main_table: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)
    contrasts: list[Contrast] = field(default_factory=list)
    differences: list[Contrast] = field(default_factory=list)
    left_out: pd.DataFrame = field(default_factory=pd.DataFrame)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    factors: list[str] = field(default_factory=list)
    family: str = ""
    n_trials: int = 0
    n_used: int = 0
    terminal: str = ""
    secondary: dict[str, list[Contrast]] = field(default_factory=dict)
    margin: Optional[float] = None
    trials: pd.DataFrame = field(default_factory=pd.DataFrame)
    notes: list[str] = field(default_factory=list)


def build_report(path: str, out: str | None = None, baseline: str = "cutmix",
                 family: Optional[Sequence[str]] = None, correction: str = "bonferroni",
                 margin: Optional[float] = None) -> Report:
    """Read the sweep at ``path`` and write report.md, CSV tables and PNGs into ``out``
    (default ``<path>/report``). ``family``: factors whose contrasts form the primary family
    (default: the sweep's ``analysis.family``, else all); ``correction``: ``bonferroni``
    (default) or ``none``; ``margin``: the smallest effect of interest on the primary outcome
    (default: the sweep's ``analysis.margin``). Raises ConfigError on a missing or empty sweep,
    a bad option or an unwritable ``out``."""
    if baseline not in METHODS:
        raise ConfigError("--baseline", baseline, f"must be one of {', '.join(METHODS)}")
    if correction not in CORRECTIONS:
        raise ConfigError("--correction", correction, f"must be one of {', '.join(CORRECTIONS)}")
    if margin is not None and not (0 < margin <= 100):
        raise ConfigError("--margin", margin, "must be a number of points in (0, 100]")
    path = str(path)
    out = out or _default_out(path)
    check_writable("--out", out)
    res = read_results(path, on_corrupt="skip")
    trials, epochs = res.to_pandas()
    trials = data_labels(trials)  # a data file by its name and content hash, never its path
    if trials.empty:
        extra = ""
        if res.skipped:
            f, why = res.skipped[0]
            extra = f"; {len(res.skipped)} corrupt file(s), e.g. {f}: {why}"
        raise ConfigError("path", path, "holds no trial results yet (empty sweep)" + extra)

    # The one per-trial table, and what the sweep declared before it ran.
    declared, notes = declared_analysis(path)
    margin = margin if margin is not None else declared["margin"]
    primary = declared["primary"]
    secondary = [o for o in declared["secondary"] if o != primary]
    used, left, search = split_trials(trials)
    used, factors = trial_table(used, epochs)
    family = _family(family, declared["family"] or None, factors, notes)

    # The sections, each a function of that table.
    same = identical_variants(used) if not used.empty else {}
    table = main_table(used, factors, same)
    tables: dict[str, pd.DataFrame] = {
        "main_table": table,
        "trials": per_trial_table(used, factors) if not used.empty else pd.DataFrame()}
    if not used.empty:
        tables["settings"] = fixed_settings(used, factors)
    contrasts = one_factor_contrasts(used, factors, same, family, correction, margin, primary)
    tables["contrasts"] = contrast_table(contrasts)
    families = {name: retest(contrasts, used, name, correction) for name in secondary}
    for name, items in families.items():
        tables[f"contrasts_{name}"] = contrast_table(items)
    class_errors, class_note = class_table(contrasts, used, baseline) if not used.empty \
        else (pd.DataFrame(), "")
    if not class_errors.empty:
        tables["class_errors"] = class_errors
    notes += seed_notes(used, declared["avoid_seeds"])
    diffs, diff_notes = (differences_from(contrasts, used, baseline) if not used.empty
                         else ([], []))
    tables["differences"] = contrast_table(diffs)
    tables.update(factor_tables(used, factors) if not used.empty else {})
    if not search.empty:
        tables["search"] = search_table(search, trials.drop(index=search.index))
    rungs, limits, warning = search_limits(search if not search.empty else trials, search,
                                           used if not search.empty else used.iloc[:0], epochs,
                                           declared_search(path))
    if not rungs.empty:
        tables["rungs"] = rungs
    importance_note, early_note = _importance(path, trials, epochs, search, used, factors,
                                              tables)
    tables.update(looks_tables(path))  # an until-resolved sweep's path (looks.csv)
    left["error"] = [shown_text(e, out) for e in left["error"]]
    tables["left_out"] = left
    skipped = _skipped_files(res.skipped, path, out)
    if skipped:
        tables["skipped_files"] = pd.DataFrame(skipped, columns=["file", "reason"])

    # The files: figures, tables, report.md and the manifest, staged where ``out`` is a URI.
    remote = "://" in out and not out.startswith("file://")
    if out.startswith("file://"):
        out_dir = Path(_resolve(out)[1])
    else:
        out_dir = Path(tempfile.mkdtemp(prefix="hardmix-report-")) if remote else Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(out_dir)

    primary_text = family_text(contrasts, family, correction, margin, primary)
    secondary_text = {name: family_text(items, family, correction, None, name)
                      for name, items in families.items()}
    made = _figures(out_dir, used, epochs, table, [c for c in contrasts if not c.excluded],
                    primary_text, margin, primary, sequential_finals(tables))
    for name, df in tables.items():
        _atomic_write(out_dir / f"{name}.csv", lambda p, df=df: df.to_csv(p, index=False))

    ctx = Context(path=shown_path(path, out), sweeps=", ".join(res.sweeps), trials=trials,
                  used=used, left=left, skipped=skipped, factors=factors,
                  shown=display_table(table), same=same,
                  contrasts=contrasts, family_text=primary_text, diffs=diffs,
                  diff_notes=diff_notes, tables=tables, importance_note=importance_note,
                  early_note=early_note,
                  search_seeds=search["seed"] if not search.empty else pd.Series([]),
                  made=made, baseline=baseline, primary=primary, secondary=families,
                  secondary_text=secondary_text, class_note=class_note, notes=notes,
                  search_limits=limits, warnings=[warning] if warning else [])
    md = markdown(ctx)
    _atomic_write(out_dir / "report.md", lambda p: p.write_text(md))
    written = ["report.md"] + [f"{n}.csv" for n in tables] + [Path(p).name for p in made.values()]
    _atomic_write(out_dir / MANIFEST, lambda p: p.write_text(json.dumps({"files": written})))
    if remote:
        _publish(out_dir, out)
        shutil.rmtree(out_dir, ignore_errors=True)
        made = {k: f"{out.rstrip('/')}/{Path(v).name}" for k, v in made.items()}
    return Report(out=out, path=f"{out.rstrip('/')}/report.md", text=md, main_table=table,
                  tables=tables, plots=made, contrasts=contrasts, differences=diffs,
                  left_out=left, skipped_files=skipped, factors=factors, family=primary_text,
                  n_trials=len(trials), n_used=len(used), terminal=terminal(ctx, out, len(search)),
                  secondary=families, margin=margin, trials=tables["trials"], notes=notes)


def report_from_cli(path: str, out: str | None = None, baseline: str = "cutmix",
                    family: Optional[str] = None, correction: str = "bonferroni",
                    margin: Optional[float] = None) -> int:
    """``hardmix report``: build the report and print the main table. Exit code 0.

    A missing or empty sweep raises ConfigError (the CLI prints one line and exits 2).
    """
    fam = [f.strip() for f in family.split(",") if f.strip()] if family else None
    report = build_report(path, out=out, baseline=baseline, family=fam, correction=correction,
                          margin=margin)
    print(report.terminal)
    return 0


def _family(family: Optional[Sequence[str]], declared: Optional[Sequence[str]],
            factors: list[str], notes: list[str]) -> Optional[Sequence[str]]:
    """The primary family's factors: ``family`` from the command line (each must vary in the
    sweep), else the sweep's declared ``analysis.family`` (factors that do not vary among the
    trials used are left out, with a note), else None (all)."""
    from_cli = bool(family)
    family = family if family else declared
    if family:
        known = {f for f in factors} | {f.rsplit(".", 1)[-1] for f in factors} | {"method",
                                                                                  "augment.method"}
        bad = [f for f in family if f not in known]
        if bad and from_cli:
            raise ConfigError("--family", bad[0], "must name a factor that varies in this sweep: "
                              + ", ".join(["method", *[short_names(factors)[f] for f in factors]]))
        if bad:  # declared before the runs; not (yet) varying among the completed trials
            notes.append(f"analysis.family names {', '.join(bad)}, which does not vary among "
                         "the trials used: left out of the family.")
            family = [f for f in family if f in known] or None
    return family


def _importance(path: str, trials: pd.DataFrame, epochs: pd.DataFrame, search: pd.DataFrame,
                used: pd.DataFrame, factors: list[str], tables: dict[str, pd.DataFrame]
                ) -> tuple[str, str]:
    """Factor importance (``tables["importance"]``, and ``tables["importance_early"]`` where a
    search has too few full-length trials); returns the two notes."""
    # Importance explains the exploration: the follow-up's few configurations x seeds would
    # only restate how they differ.
    explored = search if not search.empty else trials
    imp_factors = (varying_factors(search) if not search.empty else
                   factors + (["augment.method"] if used["augment.method"].nunique() > 1 else []))
    mode = sweep_mode(path)
    importance, importance_note = factor_importance(explored, imp_factors, mode)
    tables["importance"] = importance
    early_note = ""
    if importance.empty and mode == "search":
        # Too few ran to the end: what early stopping decided on is still worth knowing.
        frame, reached, column, epoch = rung_target(explored, epochs)
        if epoch:
            early, early_note = factor_importance(
                frame, imp_factors, mode, target=column, rows=reached,
                population=f"trials that reached epoch {epoch}")
            if not early.empty:
                tables["importance_early"] = early
    return importance_note, early_note


def _figures(out_dir: Path, used: pd.DataFrame, epochs: pd.DataFrame, table: pd.DataFrame,
             members: list[Contrast], primary_text: str, margin: Optional[float],
             primary: str, sequential: Optional[dict] = None) -> dict[str, str]:
    """The PNGs (:mod:`ablations.plots`), one colour per variant across all of them, from the
    main table, the primary family's members and the epochs of the trials used; ``{name:
    path}`` of those drawn."""
    if used.empty:
        return {}
    epochs_used = epochs.merge(used[["sweep", "trial_id", "variant"]], on=["sweep", "trial_id"])
    colors = plots.variant_colors(list(table["variant"]) if not table.empty else [])
    made: dict[str, str] = {}
    for name, fn in (("error_by_variant", lambda p: plots.error_by_variant(table, colors, p)),
                     ("contrasts", lambda p: plots.contrast_forest(
                         members, primary_text, p, margin, OUTCOMES[primary], sequential)),
                     ("learning_curves", lambda p: plots.learning_curves(used, epochs_used,
                                                                         colors, p)),
                     ("hardness_over_epochs", lambda p: plots.hardness_dynamics(
                         used, epochs_used, colors, p)),
                     ("source_classes", lambda p: plots.source_classes(used, epochs_used, p))):
        target = out_dir / f"{name}.png"
        tmp = out_dir / f".{name}.tmp.png"
        if fn(tmp) is not None:
            os.replace(tmp, target)
            made[name] = str(target)
    return made


def _skipped_files(skipped: list[tuple[str, str]], path: str, out: str
                   ) -> list[tuple[str, str]]:
    """The corrupt files as the report names them: inside the sweep's folder as shown
    (:func:`ablations.paths.shown_path`), their reasons without machine paths."""
    root = _resolve(path)[1].rstrip("/")
    source = shown_path(path, out)
    return [(f"{source}/{f[len(root) + 1:]}" if f.startswith(root + "/") else shown_text(f, out),
             shown_text(why, out)) for f, why in skipped]


def _default_out(path: str) -> str:
    return path.rstrip("/") + "/report" if "://" in path else str(Path(path) / "report")


def _clear_previous(folder: Path) -> None:
    """Remove the files this report wrote last time (its manifest lists them), nothing else."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return
    try:
        names = json.loads(manifest.read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return
    for name in names:
        if isinstance(name, str) and "/" not in name and "\\" not in name and \
                name not in ("", ".", ".."):
            (folder / name).unlink(missing_ok=True)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _publish(staging: Path, out: str) -> None:
    """Upload a staged report to a URI destination, one object per file."""
    fs, root = _resolve(out)
    fs.create_dir(root, recursive=True)
    for p in sorted(staging.iterdir()):
        if p.is_file():
            with fs.open_output_stream(f"{root}/{p.name}") as stream:
                stream.write(p.read_bytes())

