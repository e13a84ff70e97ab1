"""The ``hardmix`` command: train, eval, sweep, report, export, compact, presets.

Parsing and config validation happen here, before any work starts: a bad value prints one line
(field, value, what is allowed) and exits 2. The heavy modules (torch training, Ray, analysis)
are imported only by the subcommand that needs them, so ``hardmix --help`` is instant and
importing :mod:`hardmix` never imports Ray.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a small shared machine (a laptop, CI, several
# trials per node) spinning threads starve the busy ones (measured here: 260 -> 1,009 img/s under
# load). Must be set before torch loads; a value the user set wins. Ray workers inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys
import textwrap
from typing import Callable, Sequence

from hardmix import __version__
from hardmix.config import (RunConfig, SweepConfig, describe_fields, load_config, preset_kind,
                            preset_names, read_preset)
from hardmix.errors import HardmixError, fail


def _fields_epilog(cls: type, title: str) -> str:
    from hardmix.datasets import DATASETS
    from hardmix.methods import describe_methods

    rows = describe_fields(cls)
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{title} (YAML keys, and --set KEY=VALUE):"]
    for name, default, text in rows:
        wrapped = textwrap.wrap(f"{text} [default: {default}]", 100 - width - 4) or [""]
        lines.append(f"  {name:<{width}}  {wrapped[0]}")
        lines += [f"  {'':<{width}}  {more}" for more in wrapped[1:]]
    lines += ["", describe_methods(), "", "Data sets (data.name):"]
    lines += [f"  {d.name:<17} {d.description}" for d in DATASETS.values()]
    return "\n".join(lines)


def _paragraphs(*texts: str) -> str:
    """Help text of wrapped paragraphs (lines starting with spaces are kept as they are)."""
    return "\n\n".join(t if t.startswith(" ") else textwrap.fill(t, 100) for t in texts)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", metavar="NAME",
                   help="start from a named preset shipped with hardmix (`hardmix presets` lists them)")
    p.add_argument("--config", metavar="FILE", help="YAML file of config keys, applied after the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set augment.alpha=0.5 (repeatable; "
                        "applied last)")


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="let the trackers (W&B, MLflow) print their own banners and log lines "
                        "on the console (default: only hardmix's lines)")


def _apply_verbose(args: argparse.Namespace) -> None:
    if getattr(args, "verbose", False):
        from hardmix.trackers import VERBOSE_ENV
        os.environ[VERBOSE_ENV] = "1"  # read by the trackers, here and in Ray's processes


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too (and exit code 2), like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"hardmix: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="hardmix", formatter_class=fmt,
        description="HardMix (CutMix with sources cut from the batch's hard samples) and its "
                    "baselines: train one run, sweep and ablate on Ray, report from Parquet.")
    parser.add_argument("--version", action="version", version=f"hardmix {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", formatter_class=fmt, help="train one run (no Ray)",
                       description="Train one model with one augmentation; writes metrics to "
                                   "Parquet, TensorBoard logs and checkpoints into the run folder.",
                       epilog=_fields_epilog(RunConfig, "Run config fields"))
    _add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in output.dir/output.name from its last checkpoint")
    _add_verbose(p)
    p.set_defaults(handler=_train)

    p = sub.add_parser("eval", formatter_class=fmt, help="test error of a saved checkpoint",
                       description="Evaluate a checkpoint written by `hardmix train` on its test set.")
    p.add_argument("checkpoint", help="checkpoint file (.pt) written by a run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the stored run config (e.g. data.path=...)")
    p.set_defaults(handler=_eval)

    p = sub.add_parser("sweep", formatter_class=fmt, help="sweep or ablate many runs on Ray Tune",
                       description="Run a search (Optuna) or a grid of training runs on a local Ray "
                                   "instance or a cluster; every trial and epoch lands in Parquet "
                                   "under storage/name, with TensorBoard logs and a report.",
                       epilog=_fields_epilog(SweepConfig, "Sweep config fields (run.* are the run "
                                                          "fields of `hardmix train --help`)"))
    _add_config_args(p)
    p.add_argument("--resume", metavar="SWEEP", nargs="?", const="",
                   help="resume an interrupted sweep: its folder (or name under storage)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the trials, resources, compute (FLOPs), time (per trial, in all "
                        "and wall-clock) and whether a trial fits, then stop; data that are "
                        "not here are noted, not refused")
    p.add_argument("--device-type", metavar="GPU",
                   help="with --dry-run, for trials that ask for GPUs: estimate their time on "
                        "this GPU from its peak at a stated utilisation (h100-sxm, a100, a10g, "
                        "l4, ...: hardmix.throughput.ACCELERATORS, or a name as "
                        "torch.cuda.get_device_name() gives it)")
    p.add_argument("--cluster", metavar="FILE",
                   help="with --dry-run: check that the node types of this Ray cluster file "
                        "(cluster.yaml) can hold one trial, and how many at once")
    p.add_argument("--address", help="Ray address (auto, ray://host:port); same as --set address=")
    p.add_argument("--storage", help="results folder or URI (s3://, gs://); same as --set storage=")
    p.add_argument("--until-resolved", action="store_true",
                   help="a grid of arms: run the seeds in rounds (analysis.rounds looks up to "
                        "analysis.max_seeds per arm) and stop each primary contrast once its "
                        "verdict is resolved; needs analysis.margin; same as --set "
                        "analysis.until_resolved=true")
    p.add_argument("--close", metavar="REASON",
                   help="with --resume, for an until-resolved sweep: end its design after the "
                        "last look (e.g. 'the 6 h compute budget is spent'); the contrasts "
                        "still running end undetermined, with the look their estimate would "
                        "resolve at; runs nothing, and a later --resume runs nothing either")
    _add_verbose(p)
    p.set_defaults(handler=_sweep)

    p = sub.add_parser("report", formatter_class=fmt, help="tables and plots of a sweep",
                       description="Read a sweep's Parquet results and write a Markdown report, CSV "
                                   "tables and PNG plots into it; prints the main table.")
    p.add_argument("path", help="sweep folder or URI (or a folder of sweeps)")
    p.add_argument("--out", help="where to write the report (default: <path>/report)")
    p.add_argument("--baseline", default="cutmix",
                   help="method every variant is compared against (its matched variant)")
    p.add_argument("--family", metavar="FACTOR[,FACTOR]",
                   help="the primary family: the one-factor contrasts over these factors (e.g. "
                        "method); default: the sweep's analysis.family, else every contrast")
    p.add_argument("--correction", default="bonferroni",
                   help="bonferroni: every contrast of a family at alpha/m, simultaneous 95%% "
                        "intervals; none: each a per-comparison 95%% interval, labelled so")
    p.add_argument("--margin", type=float, metavar="POINTS",
                   help="smallest effect of interest on the primary outcome (e.g. 0.2 points of "
                        "top-1 error): adds the equivalence test (TOST) and the verdict "
                        "'equivalent within ±margin'; default: the sweep's analysis.margin")
    p.set_defaults(handler=_report)

    p = sub.add_parser(
        "export", formatter_class=fmt, help="a sweep's deduplicated results as Parquet or DuckDB",
        description=_paragraphs(
            "Write the latest row of every trial and of every trial's epoch (the rows `hardmix "
            "report` reads; NULL where a field or metric does not apply to a trial's method) "
            "with `sweep` as a plain column, for sharing or for tools that should not "
            "deduplicate themselves. The shape follows --out:",
            "  --out DIR            DIR/trials.parquet and DIR/epochs.parquet\n"
            "  --out NAME.parquet   NAME.trials.parquet and NAME.epochs.parquet side by side\n"
            "  --out NAME.duckdb    one DuckDB file with the tables trials and epochs (needs "
            "duckdb)",
            "Files appear only once every table is written; existing files are replaced only "
            "with --force."),
        epilog="example:  hardmix export sweeps/quickstart --out quickstart.duckdb\n"
               "then, in Python:  duckdb.connect(\"quickstart.duckdb\").sql(\"FROM trials\")")
    p.add_argument("path", help="sweep folder or URI (or a folder of sweeps)")
    p.add_argument("--out", required=True, metavar="FILE_OR_DIR",
                   help="a folder, NAME.parquet or NAME.duckdb (local path)")
    p.add_argument("--force", action="store_true", help="replace existing export files")
    p.set_defaults(handler=_export)

    p = sub.add_parser(
        "compact", formatter_class=fmt, help="merge a sweep's small Parquet files into a few",
        description=_paragraphs(
            "Merge the many small Parquet files a sweep writes (one per trial update and epoch) "
            "into a few large ones, in place. No row is lost and rows keep their time stamps, "
            "so the latest row of a trial stays the one readers keep.",
            "Safe while the sweep is still writing: files that appear meanwhile are left for the "
            "next compaction, and a merged file is deleted only after the file holding its rows "
            "is published. Files of older hardmix versions are rewritten in the current layout, "
            "which pandas, polars and DuckDB read directly."))
    p.add_argument("path", help="sweep folder or URI (or a folder of sweeps)")
    p.add_argument("--max-rows", type=int, default=None, metavar="N",
                   help="rows per compacted file (default 500,000); files that size are left "
                        "as they are")
    p.set_defaults(handler=_compact)

    p = sub.add_parser("presets", help="list the shipped presets",
                       description="List the presets shipped with hardmix, or print one.")
    p.add_argument("name", nargs="?", help="print this preset's YAML")
    p.set_defaults(handler=_presets)
    return parser


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(RunConfig, args.preset, args.config, args.overrides)
    from hardmix.commands import train_from_cli
    return train_from_cli(cfg, resume=args.resume)


def _eval(args: argparse.Namespace) -> int:
    from hardmix.commands import evaluate_checkpoint_cli
    return evaluate_checkpoint_cli(args.checkpoint, args.overrides)


def _sweep(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"address={args.address}")
    if args.storage:
        overrides.append(f"storage={args.storage}")
    if args.until_resolved:
        overrides.append("analysis.until_resolved=true")
    from tune.sweep import sweep_from_cli  # Ray is imported only here
    return sweep_from_cli(args.preset, args.config, overrides, resume=args.resume,
                          dry_run=args.dry_run, device_type=args.device_type,
                          cluster=args.cluster, close=args.close)


def _report(args: argparse.Namespace) -> int:
    from ablations.report import report_from_cli
    return report_from_cli(args.path, out=args.out, baseline=args.baseline, family=args.family,
                           correction=args.correction, margin=args.margin)


def _export(args: argparse.Namespace) -> int:
    from ablations.export import export_from_cli
    return export_from_cli(args.path, args.out, force=args.force)


def _compact(args: argparse.Namespace) -> int:
    from hardmix.errors import ConfigError
    if args.max_rows is not None and args.max_rows < 1:
        raise ConfigError("--max-rows", args.max_rows, "must be a whole number >= 1")
    from ablations.export import compact_from_cli
    return compact_from_cli(args.path, args.max_rows)


def _presets(args: argparse.Namespace) -> int:
    if args.name:
        from importlib import resources
        if args.name not in preset_names():
            read_preset(args.name)  # raises the ConfigError with the list of names
        print(resources.files("hardmix.presets").joinpath(f"{args.name}.yaml").read_text(), end="")
        return 0
    for name in preset_names():
        raw = read_preset(name)
        print(f"{name:<28} {preset_kind(raw):<6} {raw.get('description', '')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        _apply_verbose(args)
        return int(handler(args) or 0)
    except HardmixError as exc:
        return fail(exc)
    except KeyboardInterrupt:
        print("hardmix: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `hardmix report ... | head`: the reader left, not an error
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
