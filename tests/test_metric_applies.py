"""Which metrics apply to which method, checked against what the method really does.

A per-epoch metric that does not apply to a run is NULL in the store and absent from the
report (:func:`hardmix.metrics.applicable`). Here every method of the method table, with each
criterion and signal where it has them, is run for a few steps through the public
:class:`~hardmix.HardMix` API, and the applicability of each method-specific metric is compared
with what it measures: ``mixed_rate`` applies where a step can be mixed, ``hard_share`` where
the method reads hardness, ``fallback_rate`` where a batch with no hard sample makes the
fallback fire, ``distinct_sources`` and ``source_class_counts`` where content comes from other
samples, ``memory_seen`` where there is a per-sample memory. Also: the metric that witnesses a
field applies wherever that field acts, and what a trial reports to Tune are numbers only.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from hardmix import HardMix
from hardmix.methods import CRITERIA, METHODS, active_fields
from hardmix.metrics import (EPOCH_METRICS, Metric, applicable, diagnostics,
                             register_epoch_metric, reported, witness_of)

B, C, N = 8, 4, 32


def settings() -> list[dict]:
    """Every method, with each criterion x signal for the hard ones (the table's names)."""
    out = []
    for method, spec in METHODS.items():
        if not spec.hard:
            out.append({"method": method})
            continue
        for criterion, signal in itertools.product(CRITERIA, ("forward", "cached")):
            out.append({"method": method, "criterion": criterion, "signal": signal})
    return out


def observe(aug: dict) -> dict[str, bool]:
    """What a few steps of the method show: can a step mix, does it read hardness, does the
    fallback fire on a batch without hard samples, do other samples give content, is there a
    memory."""
    mix = HardMix(**aug, k=2, min_hard=B, prob=0.5, seed=0, num_classes=C, dataset_size=N)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, 3, 8, 8, generator=g)
    y = torch.arange(B) % C
    index = torch.arange(B)
    correct = torch.nn.functional.one_hot(y, C).float() * 10  # nothing misclassified
    if mix.memory is not None:  # every sample observed and right: no hard sample
        mix.observe(correct, y, index)
    seen = {"mixes": False, "fires": False, "sources": False, "classes": False}
    for _ in range(12):
        out = mix(x, y, logits=correct, index=index)
        seen["mixes"] |= out.mixed
        seen["fires"] |= bool(out.stats["fallback"] > 0)
        seen["sources"] |= bool(out.stats["distinct_sources"] > 0)
        seen["classes"] |= bool(out.source_counts_by_class().sum() > 0)
    seen["hardness"] = mix.uses_hardness
    seen["memory"] = mix.memory_seen() is not None
    return seen


@pytest.mark.parametrize("aug", settings(), ids=lambda a: "-".join(a.values()))
def test_a_metric_applies_exactly_where_the_method_produces_it(aug):
    seen = observe(aug)
    full = {**aug, "fallback": "random"}
    expect = {
        "mixed_rate": seen["mixes"],
        "hard_share": seen["hardness"],
        "fallback_rate": seen["fires"],
        "distinct_sources": seen["sources"],
        "source_class_counts": seen["classes"],
        "memory_seen": seen["memory"],
    }
    got = {name: applicable(EPOCH_METRICS[name], full) for name in expect}
    assert got == expect, aug
    # the rest apply to every run
    for name, metric in EPOCH_METRICS.items():
        if name not in expect:
            assert applicable(metric, full), name


def test_the_fallback_metric_follows_the_fallback_field():
    # a thresholded criterion with the skip fallback: it fires, mixing nothing
    aug = {"method": "hardmix", "criterion": "misclassified", "fallback": "skip"}
    mix = HardMix(**aug, min_hard=B, seed=0, num_classes=C)
    y = torch.arange(B) % C
    out = mix(torch.rand(B, 3, 8, 8), y, logits=torch.nn.functional.one_hot(y, C).float() * 10)
    assert out.stats["fallback"] == 1 and out.stats["distinct_sources"] == 0
    assert applicable(EPOCH_METRICS["fallback_rate"], aug)


def test_each_witness_applies_wherever_its_field_acts():
    witnessed = {f for m in EPOCH_METRICS.values() for f in m.witnesses}
    assert witnessed  # the table names some
    for aug in settings():
        aug = {**aug, "fallback": "random"}
        for field in active_fields(aug):
            w = witness_of(field)
            if field in witnessed:
                assert w is not None and field in EPOCH_METRICS[w].witnesses
                assert applicable(EPOCH_METRICS[w], aug), (aug, field, w)
            else:
                assert w is None, (field, w)
    assert witness_of("no_such_field") is None


def test_unknown_methods_keep_their_values_and_bad_kinds_are_refused():
    # a setting the method table cannot read (a criterion this version does not know, in an
    # older store): the value is kept, not dropped
    old = {"method": "hardmix", "criterion": "gone", "signal": "forward"}
    assert applicable(EPOCH_METRICS["fallback_rate"], old)
    assert applicable(EPOCH_METRICS["memory_seen"], old)
    with pytest.raises(ValueError, match="kind"):
        Metric("x", "tensor", "not a kind")
    for kind in ("float", "int", "str", "list_int", "list_float", "list_str"):
        Metric("x", kind, "")


def test_tune_receives_the_scalar_metrics_only():
    values = {"epoch": 3, "train_loss": 1.5, "lr": 0.1, "val_top1_err": None,
              "source_class_counts": [1, 2], "hard_share": True, "not_a_metric": 2.0,
              "epoch_seconds": 7}
    assert reported(values) == {"epoch": 3, "train_loss": 1.5, "lr": 0.1, "epoch_seconds": 7}
    shown = diagnostics()
    assert shown and all(EPOCH_METRICS[n].diagnostic for n in shown)
    assert all(EPOCH_METRICS[n].kind in ("float", "int") for n in shown)


def test_registering_a_metric_adds_it_everywhere_it_is_read():
    m = Metric("probe_metric", "float", "a metric registered by a test", group="hardmix")
    try:
        assert register_epoch_metric(m) is m and EPOCH_METRICS["probe_metric"] is m
        assert reported({"probe_metric": 0.5}) == {"probe_metric": 0.5}
    finally:
        EPOCH_METRICS.pop("probe_metric", None)
