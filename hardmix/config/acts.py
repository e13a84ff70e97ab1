"""Which run-config field acts for a run: the one rule the sweep space, the report and the
importance analysis share, derived from the registries that own each fact.

* ``augment.*``: the method table (:func:`hardmix.methods.active_fields`);
* a schedule's own ``optim.*`` fields (multistep's milestones and gamma): the schedule table
  (:data:`hardmix.config.schema.SCHEDULE_FIELDS`);
* a pipeline's own ``data.*`` fields (a folder's image_size): the data-set registry;
* an optimiser's own ``optim.*`` fields (SGD's momentum, AdamW's betas): the optimiser
  registry (:func:`hardmix.optimizers.optimizer_reads`);
* ``model.*`` fields other than the name (smallnet's width, a ResNet's stem, a timm model's
  kwargs and pretrained): the model registry (:func:`hardmix.architectures.model_reads`);
* every other field always.

A row whose switch is unknown (a method, schedule, optimiser, data set or model not registered,
or a row of an older version without the switch's column) keeps every field.
:func:`as_run` applies the rule to a row: every field that does not act is None, which is how
the Parquet rows, the trackers and TensorBoard's HParams hold it. Torch-free.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from hardmix.architectures import ARCHITECTURES, TIMM_PREFIX, TIMM_READS, model_reads
from hardmix.config.schema import SCHEDULE_FIELDS
from hardmix.datasets import DATASETS
from hardmix.errors import ConfigError
from hardmix.methods import SWITCHES, active_fields, effective_augment
from hardmix.optimizers import OPTIMIZERS, optimizer_reads

__all__ = ["field_acts", "as_run", "readable_name", "check_given_fields_act", "CONDITIONAL",
           "SWITCH_COLUMNS"]

_SCHEDULE_ONLY = {f"optim.{f}" for fields in SCHEDULE_FIELDS.values() for f in fields}
_OPTIMIZER_ONLY = {f"optim.{f}" for entry in OPTIMIZERS.values() for f in entry.reads}
_DATASET_ONLY = {f"data.{f}" for spec in DATASETS.values() for f in spec.reads}
_MODEL_ONLY = ({f"model.{f}" for arch in ARCHITECTURES.values() for f in arch.reads}
               | {f"model.{f}" for f in TIMM_READS})
#: Config columns outside ``augment.*`` that act only for some runs.
CONDITIONAL = frozenset(_SCHEDULE_ONLY | _OPTIMIZER_ONLY | _DATASET_ONLY | _MODEL_ONLY)
#: The columns that decide which others act: decided first in a conditional space.
SWITCH_COLUMNS = tuple(f"augment.{s}" for s in SWITCHES) + ("model.name", "data.name",
                                                            "optim.schedule", "optim.name")


def _suffix(column: str) -> str:
    return column.split(".", 1)[1]


def field_acts(column: str, row: Mapping) -> bool:
    """Does the value of ``column`` (a flattened run-config name) change what the run ``row``
    (a mapping of flattened fields; only the switches are read) does?"""
    if column in _SCHEDULE_ONLY:
        reads = SCHEDULE_FIELDS.get(row.get("optim.schedule"))
        return reads is None or _suffix(column) in reads
    if column in _OPTIMIZER_ONLY:
        reads = optimizer_reads(row.get("optim.name"))
        return reads is None or _suffix(column) in reads
    if column in _DATASET_ONLY:
        spec = DATASETS.get(row.get("data.name"))
        return spec is None or _suffix(column) in spec.reads
    if column in _MODEL_ONLY:
        reads = model_reads(row.get("model.name"))
        return reads is None or _suffix(column) in reads
    if not column.startswith("augment."):
        return True
    aug = {_suffix(k): v for k, v in row.items() if k.startswith("augment.")}
    try:
        return _suffix(column) in active_fields(aug)
    except ConfigError:
        return True


def _deciding(column: str, row: Mapping) -> str:
    """The switches that decide whether ``column`` acts, with their values in ``row``:
    ``model.name=smallnet``; for an augment field the method's switches that act."""
    if column in _SCHEDULE_ONLY:
        names = ["optim.schedule"]
    elif column in _OPTIMIZER_ONLY:
        names = ["optim.name"]
    elif column in _DATASET_ONLY:
        names = ["data.name"]
    elif column in _MODEL_ONLY:
        names = ["model.name"]
    else:
        names = [c for c in SWITCH_COLUMNS if c.startswith("augment.") and c in row
                 and (c == "augment.method" or field_acts(c, row))]
    return ", ".join(f"{c}={row.get(c)}" for c in names)


def check_given_fields_act(given: Mapping[str, Any], rows: Sequence[Mapping], where: str = ""
                           ) -> None:
    """Refuse a field someone set explicitly (``given``: flattened name -> value, e.g. a
    ``--set`` or an arm's field) that acts in none of the runs ``rows`` (flattened configs):
    ``model.pretrained=true`` for smallnet, ``optim.betas`` with SGD, ``augment.min_hard`` with
    CutMix would otherwise be silently NULL and the user would believe it ran. A preset's or
    file's ``run`` section may hold inert fields (it is a base for several arms); a value set
    by hand may not. ``where``: prefix of the field in the error (``arms[2].``, ``run.``)."""
    for column, value in given.items():
        if rows and not any(field_acts(column, row) for row in rows):
            raise ConfigError(f"{where}{column}", value,
                              f"does not act with {_deciding(column, rows[0])} (nothing reads "
                              "it; `hardmix train --help` says which fields each method, "
                              "model, optimiser and schedule reads): drop it or set the switch "
                              "it needs")


def as_run(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` (flattened run fields, and possibly other columns) as the run uses it, in place:
    every config field that does not act None (NULL in Parquet), ``box: auto`` resolved
    (:func:`hardmix.methods.effective_augment`). Augment fields of an unknown method stay as
    they are."""
    aug = {_suffix(k): v for k, v in row.items() if k.startswith("augment.")}
    if "method" in aug:
        try:
            row.update({f"augment.{k}": v for k, v in effective_augment(aug).items()})
        except ConfigError:
            pass
    for column in CONDITIONAL & row.keys():
        if not field_acts(column, row):
            row[column] = None
    return row


#: Longest readable trial name (it names a TensorBoard run folder and tracker runs).
MAX_NAME = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+]+")


def _name_part(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "_".join(_name_part(v) for v in value)
    if isinstance(value, dict):
        return "_".join(f"{k}{_name_part(v)}" for k, v in sorted(value.items()))
    return str(value)


def readable_name(row: Mapping[str, Any], varying: Sequence[str]) -> str:
    """A short name people can read for a trial (``row``: its flattened run config): the method,
    then each field of ``varying`` (a sweep's factors) that acts for it, then ``s<seed>``:
    ``hardmix-topk_loss-s3``, ``cutmix-alpha0.5-s0``. A string value stands as it is
    (``timm:`` dropped), a number or list after its field's last name (``k0.25``), a boolean as
    the name or ``no_<name>``; other characters than letters, digits and ``_ . +`` become
    ``_``; at most :data:`MAX_NAME` characters. Not necessarily unique: the trial id is."""
    parts = [str(row.get("augment.method"))]
    for column in varying:
        if column in ("seed", "augment.method") or row.get(column) is None \
                or not field_acts(column, row):
            continue
        value, short = row[column], column.rsplit(".", 1)[-1]
        if isinstance(value, bool):
            part = short if value else f"no_{short}"
        elif isinstance(value, str):
            part = value[len(TIMM_PREFIX):] if value.startswith(TIMM_PREFIX) else value
        else:
            part = short + _name_part(value)
        parts.append(_UNSAFE.sub("_", part).strip("_") or short)
    seed = f"s{row.get('seed')}"
    return "-".join(parts)[:MAX_NAME - len(seed) - 1] + "-" + seed
