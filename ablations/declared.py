"""What a sweep declared before it ran, read from its saved ``sweep.yaml``: its design (grid or
search), how a search chose and stopped (:func:`declared_search`) and its ``analysis``
section."""

from __future__ import annotations

from typing import Any

from ablations.store import _resolve, sweep_roots
from hardmix.config.schema import METRICS
from hardmix.errors import ConfigError


def _saved(path: str) -> dict:
    """The sweep's saved ``sweep.yaml`` as a mapping ({} for a folder of runs, or none)."""
    import yaml

    try:
        fs, root = _resolve(path)
        with fs.open_input_stream(f"{root}/sweep.yaml") as f:
            raw = yaml.safe_load(f.read().decode()) or {}
        return raw if isinstance(raw, dict) else {}
    except Exception:  # noqa: BLE001 - a folder of runs, or no sweep.yaml
        return {}


def sweep_mode(path: str) -> str:
    """``search`` or ``grid`` from the sweep's saved ``sweep.yaml`` (grid when unknown)."""
    return "search" if _saved(path).get("mode") == "search" else "grid"


def declared_search(path: str) -> dict:
    """How the sweep at ``path`` searched, from its saved sweep.yaml (the schema's defaults
    where absent or unreadable): ``mode``, ``metric`` (the validation metric it selected and
    early-stopped on), ``scheduler`` (type, grace_period, reduction_factor), ``seeds`` and
    ``followup`` (top, seeds, baseline)."""
    from dataclasses import asdict

    from hardmix.config import from_dict
    from hardmix.config.schema import FollowupConfig, SchedulerConfig, SweepConfig

    raw = _saved(path)
    out = {"mode": "search" if raw.get("mode") == "search" else "grid",
           "metric": SweepConfig.__dataclass_fields__["metric"].default}
    if raw.get("metric") in METRICS:
        out["metric"] = raw["metric"]
    for key, cls in (("scheduler", SchedulerConfig), ("followup", FollowupConfig)):
        try:
            out[key] = asdict(from_dict(cls, raw.get(key) or {}, f"{key}."))
        except Exception:  # noqa: BLE001 - an older sweep.yaml: the defaults
            out[key] = asdict(cls())
    seeds = raw.get("seeds")
    out["seeds"] = list(seeds) if isinstance(seeds, list) else [0]
    return out


def declared_analysis(path: str) -> tuple[dict, list[str]]:
    """The ``analysis`` section each sweep at ``path`` declared in its saved sweep.yaml (the
    defaults where absent), and notes: sweeps pooled here that declared different ones (the
    first sweep's stands)."""
    import yaml

    from hardmix.config import from_dict
    from hardmix.config.schema import AnalysisConfig

    found: list[tuple[str, dict]] = []
    try:
        fs, roots = sweep_roots(path)
    except ConfigError:
        return to_dict_analysis(AnalysisConfig()), []
    for root in roots:
        try:
            with fs.open_input_stream(f"{root}/sweep.yaml") as f:
                raw = yaml.safe_load(f.read().decode()) or {}
            section = raw.get("analysis") if isinstance(raw, dict) else None
            cfg = from_dict(AnalysisConfig, section or {}, "analysis.")
        except Exception:  # noqa: BLE001 - no sweep.yaml (a folder of runs), or an old one
            cfg = AnalysisConfig()
        found.append((root.rsplit("/", 1)[-1], to_dict_analysis(cfg)))
    if not found:
        return to_dict_analysis(AnalysisConfig()), []
    first = found[0][1]
    notes = [f"sweep {name} declared analysis {a}, not {first}; the report uses the first "
             f"sweep's ({found[0][0]})" for name, a in found[1:] if a != first]
    return first, notes


def to_dict_analysis(cfg: Any) -> dict:
    from dataclasses import asdict

    return asdict(cfg)

