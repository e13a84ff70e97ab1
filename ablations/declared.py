"""What a sweep declared before it ran, read from its saved ``sweep.yaml``: its design (grid or
search) and its ``analysis`` section."""

from __future__ import annotations

from typing import Any

from ablations.store import _resolve, sweep_roots
from hardmix.errors import ConfigError


def sweep_mode(path: str) -> str:
    """``search`` or ``grid`` from the sweep's saved ``sweep.yaml`` (grid when unknown)."""
    import yaml

    try:
        fs, root = _resolve(path)
        with fs.open_input_stream(f"{root}/sweep.yaml") as f:
            raw = yaml.safe_load(f.read().decode()) or {}
        return "search" if isinstance(raw, dict) and raw.get("mode") == "search" else "grid"
    except Exception:  # noqa: BLE001 - a folder of runs, or no sweep.yaml
        return "grid"


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

