"""The settings of the method table that tests run everywhere (no torch, no Ray): one list,
read by tests/test_truth.py (every switch acts where the table says), tests/test_device_path.py
and tests/test_cuda.py (no host<->device traffic on any of them)."""

from __future__ import annotations


def method_settings() -> list[dict]:
    """Every method at the paper's switches, and HardMix at every criterion x signal (x fallback,
    for a thresholded criterion)."""
    from hardmix.methods import CRITERIA, FALLBACKS, METHODS, SIGNALS

    out = [{"method": m} for m in METHODS]
    for crit, spec in CRITERIA.items():
        for signal in SIGNALS:
            for fallback in (FALLBACKS if spec.thresholded else ["random"]):
                out.append({"method": "hardmix", "criterion": crit, "signal": signal,
                            "fallback": fallback})
    return out
