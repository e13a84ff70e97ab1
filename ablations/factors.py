"""Which config columns are factors of a sweep, when a factor matters, and variant labels.

A *variant* is ``augment.method`` plus the config columns that vary within the sweep (seed and
run bookkeeping excluded). A factor only counts for the trials where it changes what the method
does: the criterion of a CutMix trial, or ``k`` of a ``misclassified`` HardMix trial without a
``topk_loss`` fallback, are inert config values, and so is smallnet's width for a ResNet.
:func:`is_relevant` holds those rules (:mod:`hardmix.config.acts`, derived from the
registries); they keep inert values from splitting a variant and give Optuna's importance
evaluator truly conditional parameters.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from hardmix.config import RunConfig, flatten
from hardmix.config.acts import CONDITIONAL, field_acts
from hardmix.methods import METHODS

#: Config columns that describe bookkeeping rather than a design choice, never factors.
NON_FACTORS = ("seed", "description", "device", "augment.method")
NON_FACTOR_PREFIXES = ("output.", "eval.")

#: Mixing methods whose sources are the batch's hard samples (from the method table).
HARD_SOURCE = tuple(name for name, spec in METHODS.items() if spec.hard)


#: Does this config value change what the run does? One rule for the sweep space, the report and
#: the importance analysis: the method, schedule, data-set and model registries say.
is_relevant = field_acts


INERT = "—"


def config_columns(df: pd.DataFrame) -> list[str]:
    """Config columns present in ``df``, in config order."""
    return [c for c in flatten(RunConfig()) if c in df.columns]


def hashable(value: Any) -> Any:
    """A value usable as a group key: lists become tuples, NaN/None become None."""
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist() if hasattr(value, "tolist") else value
        if isinstance(value, list):
            return tuple(hashable(v) for v in value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def relevance(df: pd.DataFrame, column: str) -> pd.Series:
    """Boolean Series: is ``column`` relevant for each row of ``df``."""
    if not column.startswith("augment.") and column not in CONDITIONAL:
        return pd.Series(True, index=df.index)
    return pd.Series([is_relevant(column, r) for r in df.to_dict("records")], index=df.index,
                     dtype=bool)


def varying_factors(df: pd.DataFrame) -> list[str]:
    """Config columns that take more than one value among the rows where they are relevant."""
    out = []
    for col in config_columns(df):
        if col in NON_FACTORS or col.startswith(NON_FACTOR_PREFIXES):
            continue
        rel = relevance(df, col)
        values = {hashable(v) for v in df.loc[rel, col]}
        if len(values) > 1:
            out.append(col)
    return out


#: The scope of a shared setting that only some of the trials read.
WHERE_IT_ACTS = "the trials that read it"


def fixed_settings(df: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    """What every trial of ``df`` shares and the variant labels therefore leave out: one row
    ``(scope, field, value)`` per config column that is not a factor, with one value where it
    acts. A method's own fields (the criterion of HardMix) are scoped to that method; the rest
    to all trials, or to the trials where they act (multistep's milestones beside a cosine
    arm). Fields that act nowhere, or are unset, are not listed."""
    rows = []
    methods = sorted(df["augment.method"].dropna().unique(), key=method_order)
    for col in config_columns(df):
        if col in factors or col in NON_FACTORS or col.startswith(NON_FACTOR_PREFIXES):
            continue
        scopes = ([(str(m), df[df["augment.method"] == m]) for m in methods]
                  if col.startswith("augment.") else [("all trials", df)])
        for scope, sub in scopes:
            acts = relevance(sub, col)
            values = {hashable(v) for v in sub.loc[acts, col]}
            if len(values) == 1 and None not in values:
                where = scope if acts.all() or scope != "all trials" else WHERE_IT_ACTS
                rows.append((where, col, fmt_value(values.pop())))
    order = {s: i for i, s in enumerate(["all trials", WHERE_IT_ACTS, *map(str, methods)])}
    out = pd.DataFrame(rows, columns=["scope", "field", "value"])
    return out.sort_values("scope", key=lambda s: s.map(order), kind="stable",
                           ignore_index=True)


def short_names(factors: list[str]) -> dict[str, str]:
    """``augment.alpha -> alpha`` unless two factors share the last part."""
    last = [f.rsplit(".", 1)[-1] for f in factors]
    return {f: (s if last.count(s) == 1 else f) for f, s in zip(factors, last)}


def fmt_value(value: Any) -> str:
    value = hashable(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ",".join(fmt_value(v) for v in value) + "]"
    return str(value)


def factor_frame(df: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    """One column per factor, holding the formatted value where relevant and ``—`` where inert."""
    out = pd.DataFrame(index=df.index)
    for col in factors:
        rel = relevance(df, col)
        out[col] = [fmt_value(v) if r else INERT for v, r in zip(df[col], rel)]
    return out


def variant_labels(df: pd.DataFrame, factors: list[str]) -> pd.Series:
    """``"hardmix (alpha=0.5, criterion=topk_loss)"`` per row: method + its relevant factors."""
    frame = factor_frame(df, factors)
    names = short_names(factors)
    labels = []
    for i, method in zip(df.index, df["augment.method"]):
        parts = [f"{names[c]}={frame.at[i, c]}" for c in factors if frame.at[i, c] != INERT]
        labels.append(f"{method} ({', '.join(parts)})" if parts else str(method))
    return pd.Series(labels, index=df.index, dtype=object)


def method_order(method: Any) -> int:
    names = list(METHODS)
    return names.index(method) if method in names else len(names)
