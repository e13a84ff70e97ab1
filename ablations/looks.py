"""The path of an until-resolved sweep (``hardmix sweep --until-resolved``, :mod:`tune.rounds`):
every look of its group-sequential design (:mod:`ablations.sequential`), kept in the sweep
folder, and the report's table and section of it.

``<sweep>/looks.json`` (:data:`LOOKS_FILE`) is written by the sweep's driver, atomically through
:mod:`ablations.storage`, once before the first round and again after each look::

    {"version": 1,
     "design": {"name", "looks", "alpha", "margin", "contrasts", "futility", "description"},
     "primary": "top1", "seeds": [...],            # the budget's seeds, in the order rounds use them
     "contrasts": [{"key": "c000 -> c001", "label": "cutmix → hardmix", "factor", "change",
                    "reference_arms": [0], "variant_arms": [1]}, ...],
     "looks": [{"look": 1, "seeds": 5, "time": "2024-...Z",
                "contrasts": {"c000 -> c001": {"verdict", "stop", "n", "delta", "sd", "low",
                                                "high", "eq_low", "eq_high", "reason"}}}, ...]}

A look lists the contrasts decided at it (those still running); a contrast that stopped is not
decided again. NaN is stored as null.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

import pandas as pd

from ablations import storage

LOOKS_FILE = "looks.json"
VERSION = 1
#: Columns of ``looks.csv``: one row per contrast decided at a look.
PATH_COLUMNS = ["look", "seeds", "contrast", "n", "delta", "sd", "low", "high", "eq_low",
                "eq_high", "decision", "reason", "time"]


def _clean(value: Any) -> Any:
    """NaN and infinities as None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_looks(sweep_dir: str, record: dict) -> None:
    """Write ``record`` as the sweep's looks file, atomically (a reader sees the old file or
    the new one, never half of one)."""
    text = json.dumps(_clean(record), indent=1, ensure_ascii=False, allow_nan=False)
    storage.write_text(storage.join(sweep_dir, LOOKS_FILE), text + "\n")


def read_looks(sweep_dir: str) -> Optional[dict]:
    """The sweep's looks file, or None when it has none. A file that is not a looks record
    raises ValueError naming it."""
    path = storage.join(sweep_dir, LOOKS_FILE)
    if not storage.exists(path):
        return None
    return _parse(storage.read_text(path), path)


def _parse(text: str, path: str) -> dict:
    try:
        record = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path} is not readable JSON ({exc})") from None
    if not (isinstance(record, dict) and record.get("version") == VERSION
            and isinstance(record.get("looks"), list) and isinstance(record.get("design"), dict)
            and isinstance(record.get("contrasts"), list)):
        raise ValueError(f"{path} is not a looks record of version {VERSION}")
    return record


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def path_table(record: dict) -> pd.DataFrame:
    """One row per contrast decided at a look, in look order: the look, the seeds per arm it
    planned, the contrast, n pairs, Δ̂ and its SD, the repeated confidence interval that decides
    better / worse (``low``, ``high``), the one that decides equivalence, the decision
    (better / worse / equivalent / undetermined / continue), why, and when."""
    labels = {c["key"]: c.get("label", c["key"]) for c in record.get("contrasts", [])}
    rows = []
    for look in record.get("looks", []):
        for key, v in look.get("contrasts", {}).items():
            rows.append({"look": look.get("look"), "seeds": look.get("seeds"),
                         "contrast": labels.get(key, key), "n": v.get("n"),
                         **{k: _num(v.get(k)) for k in ("delta", "sd", "low", "high", "eq_low",
                                                        "eq_high")},
                         "decision": v.get("verdict"), "reason": v.get("reason", ""),
                         "time": look.get("time", "")})
    return pd.DataFrame(rows, columns=PATH_COLUMNS)


def looks_tables(path: str) -> dict[str, pd.DataFrame]:
    """``{"looks": table}`` for a report of ``path`` when it is (or holds) an until-resolved
    sweep, else {}. The table's ``attrs`` carry each sweep's design (name and description) and
    final verdicts; with several such sweeps a ``sweep`` column names each row's."""
    from ablations.store import sweep_roots

    try:
        fs, roots = sweep_roots(path)
    except Exception:  # noqa: BLE001 - no sweep here: the report says so elsewhere
        return {}
    frames, designs = [], []
    for root in roots:
        try:
            with fs.open_input_stream(f"{root}/{LOOKS_FILE}") as f:
                record = _parse(f.read().decode(), f"{root}/{LOOKS_FILE}")
        except (ValueError, OSError):  # none (a sweep of fixed seeds), or unreadable
            continue
        name = root.rstrip("/").rsplit("/", 1)[-1]
        table = path_table(record)
        table.insert(0, "sweep", name)
        frames.append(table)
        designs.append({"sweep": name, **record["design"], "final": final_verdicts(record)})
    if not frames:
        return {}
    table = pd.concat(frames, ignore_index=True)
    if table["sweep"].nunique() == 1:
        table = table.drop(columns="sweep")
    table.attrs["designs"] = designs
    return {"looks": table}


def final_verdicts(record: dict) -> dict[str, dict]:
    """Each contrast's last decision: ``{label: {"verdict", "look", "n", "stop", "delta",
    "low", "high"}}`` (Δ̂ and the repeated interval of that look); a design closed before its end
    (:func:`tune.rounds.close_design`) ends the contrasts it left running ``undetermined``,
    with ``closed`` (the reason) and ``projection``."""
    labels = {c["key"]: c.get("label", c["key"]) for c in record.get("contrasts", [])}
    out: dict[str, dict] = {}
    for look in record.get("looks", []):
        for key, v in look.get("contrasts", {}).items():
            out[labels.get(key, key)] = {"verdict": v.get("verdict"), "look": look.get("look"),
                                         "n": v.get("n"), "stop": bool(v.get("stop")),
                                         "delta": _num(v.get("delta")),
                                         "low": _num(v.get("low")), "high": _num(v.get("high"))}
    closed = record.get("closed") or {}
    for key, v in closed.get("contrasts", {}).items():
        label = labels.get(key, key)
        out[label] = {**out.get(label, {"look": closed.get("after_look"), "n": v.get("n"),
                                        "delta": math.nan, "low": math.nan, "high": math.nan}),
                      "verdict": "undetermined", "stop": True,
                      "closed": closed.get("reason", ""), "projection": v.get("projection") or {}}
    return out


def sequential_finals(tables: dict) -> dict[str, dict]:
    """``{"<reference> → <variant>": final}`` over every until-resolved sweep of a report's
    tables (:func:`final_verdicts`, with ``"text"``: the verdict in words): what the
    Comparisons section and the forest plot show beside the fixed-n verdicts."""
    table = tables.get("looks")
    out: dict[str, dict] = {}
    for d in (table.attrs.get("designs", []) if table is not None else []):
        last = (d.get("looks") or [0])[-1]
        for label, v in (d.get("final") or {}).items():
            out[label] = {**v, "text": _final_text(label, v, last)}
    return out


def _final_text(label: str, v: dict, last_seeds: int) -> str:
    """One contrast's final verdict in the Sequential section's words."""
    text = f"{label}: **{v['verdict']}** at look {v['look']} (n = {v['n']})"
    if "closed" in v:
        p = v.get("projection") or {}
        where = (f"at its estimate (Δ̂ and SD taken as the truth) the design would have ended "
                 f"**{p['verdict']}** at look {p['look']} ({p['seeds']} seeds per arm)"
                 if p.get("look") else f"at its estimate no bound is crossed by {last_seeds} "
                 "seeds per arm")
        reach = p.get("reach")
        if isinstance(reach, (int, float)) and math.isfinite(reach):
            where += f"; P(a verdict by {last_seeds} seeds) ≈ {reach:.2f}"
        return text + f", the design closed before its end ({v['closed']}): {where}"
    return text + ("" if v["stop"] else ": the design goes on with its next round")


def _interval(low: float, high: float) -> str:
    return "—" if not (math.isfinite(low) and math.isfinite(high)) else f"[{low:+.2f}, {high:+.2f}]"


def looks_section(ctx: Any) -> list[str]:
    """report.md's "Sequential seeds" section: the design by name, the path table (look, n, Δ̂,
    the two repeated intervals, the decision) and each contrast's final verdict. Empty for a
    sweep that ran a fixed list of seeds."""
    table = ctx.tables.get("looks")
    if table is None or table.empty and not table.attrs.get("designs"):
        return []
    lines = ["## Sequential seeds", ""]
    for d in table.attrs.get("designs", []):
        where = f" ({d['sweep']})" if "sweep" in table else ""
        name, text = d.get("name", "group-sequential"), d.get("description", "")
        text = f"**{name}**{text[len(name):]}" if text.startswith(name) else f"**{name}**. {text}"
        closed = [v["closed"] for v in (d.get("final") or {}).values() if "closed" in v]
        lines += [f"The sweep{where} added seeds in rounds and stopped each primary contrast "
                  "once it was resolved or futile"
                  + (f", until its design was closed before its end ({closed[0]})"
                     if closed else "") + f". The design: {text}", ""]
        if d.get("final"):
            last = (d.get("looks") or [0])[-1]
            lines += ["Final: " + "; ".join(_final_text(label, v, last)
                                            for label, v in d["final"].items()) + ".", ""]
    lines += ["Each row is one contrast at one look (`looks.csv`): n pairs of seeds, Δ̂ (after − "
              "before), the repeated confidence interval that decides better / worse (Δ̂ ± c·SE: "
              "better when it lies below 0, worse above), the one that decides equivalence "
              "(Δ̂ ± c_eq·SE within ±margin) and the decision. These verdicts keep their error "
              "rates under the repeated looks; the Comparisons above test the final seeds as if "
              "their number had been fixed in advance, which it was not (it depended on the "
              "data), so where the two differ the sequential verdict stands. See "
              "docs/reports.md.", ""]
    if table.empty:
        return lines + ["_No look yet._", ""]
    rows = pd.DataFrame({
        **({"sweep": table["sweep"]} if "sweep" in table else {}),
        "look": table["look"], "seeds": table["seeds"], "contrast": table["contrast"],
        "n": table["n"], "Δ̂": [f"{x:+.2f}" if math.isfinite(x) else "—" for x in table["delta"]],
        "interval (better / worse)": [_interval(a, b) for a, b in zip(table["low"],
                                                                      table["high"])],
        "interval (equivalence)": [_interval(a, b) for a, b in zip(table["eq_low"],
                                                                   table["eq_high"])],
        "decision": table["decision"]})
    from ablations.text import md_table

    return lines + [md_table(rows), ""]
