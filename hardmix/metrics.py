"""The metrics schema and the run's callback protocol: what a run emits, defined once.

:data:`EPOCH_METRICS` lists every per-epoch metric and :data:`SUMMARY_FIELDS` every field of a
run's summary, as :class:`Metric` specs. Everything else derives from them: the training loop
fills them (NULL where a metric does not apply or was not evaluated that epoch), the Parquet
schema of the ``epochs`` and ``trials`` tables (:mod:`ablations.store`), what a sweep trial
reports to Ray Tune, the TensorBoard scalar groups, the diagnostic columns of the report's main
table and which metric shows whether a switch took effect. Adding a metric is one
:func:`register_epoch_metric` call; one that the loop does not compute itself carries a
``compute`` function of the running run.

Nothing here imports torch: the store and the analysis read this module too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from hardmix.methods import METHODS, active_fields, uses_memory

__all__ = ["Metric", "EPOCH_METRICS", "SUMMARY_FIELDS", "KINDS", "OUTCOMES", "Outcome",
           "register_epoch_metric", "applicable", "Callback", "StopRun", "reported",
           "timings", "diagnostics", "witness_of", "ECE_BINS", "evaluation_sums", "evaluation_details"]

#: Value kinds of a metric (each maps to one Arrow type in the store).
KINDS = ("float", "int", "str", "list_int", "list_float", "list_str")
#: Equal-width confidence bins of the expected calibration error.
ECE_BINS = 15


@dataclass(frozen=True)
class Metric:
    """One metric.

    ``split``: ``train`` (every epoch), ``val`` or ``test`` (only on the epochs that evaluate
    that split: ``eval.every`` / ``eval.test_every`` and the last; NULL elsewhere).
    ``applies``: predicate over the run's ``augment`` fields (a mapping without the prefix);
    where it is False the value is NULL. ``group``: TensorBoard scalar group (None: not
    logged as a scalar). ``diagnostic``: its mean over epochs is a column of the report's main
    table. ``witnesses``: augment fields whose effect this metric shows (a contrast over such a
    field whose witness is 0 on both sides never took effect). ``compute``: for metrics the
    loop does not fill itself, ``compute(run) -> value`` at the end of every epoch.
    """

    name: str
    kind: str
    help: str
    split: str = "train"
    applies: Optional[Callable[[Mapping[str, Any]], bool]] = None
    group: Optional[str] = None
    diagnostic: bool = False
    witnesses: tuple[str, ...] = ()
    compute: Optional[Callable[[Any], Any]] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"metric {self.name}: kind {self.kind!r} is not one of {KINDS}")


def _method(aug: Mapping[str, Any]):
    return METHODS.get(aug.get("method"))


def _hard(aug: Mapping[str, Any]) -> bool:
    m = _method(aug)
    return bool(m and m.hard)


def _has_sources(aug: Mapping[str, Any]) -> bool:
    m = _method(aug)
    return bool(m and m.source is not None)


def _mixes(aug: Mapping[str, Any]) -> bool:
    m = _method(aug)
    return bool(m and m.mixer != "none")


def _fallback_acts(aug: Mapping[str, Any]) -> bool:
    return _hard(aug) and "fallback" in active_fields(aug)


def _memory(aug: Mapping[str, Any]) -> bool:
    return _hard(aug) and uses_memory(aug)


EPOCH_METRICS: dict[str, Metric] = {}


def register_epoch_metric(metric: Metric) -> Metric:
    """Add a per-epoch metric: a column of ``epochs``, a Tune report key, a TensorBoard
    scalar (with a ``group``)."""
    EPOCH_METRICS[metric.name] = metric
    return metric


for _m in (
    Metric("train_loss", "float", "mean training loss (the mixed loss on mixed steps)", group="loss"),
    Metric("val_loss", "float", "validation loss", "val", group="loss"),
    Metric("val_top1_err", "float", "validation top-1 error (%)", "val", group="error"),
    Metric("val_top5_err", "float", "validation top-5 error (%)", "val", group="error"),
    Metric("test_loss", "float", "test loss", "test", group="loss"),
    Metric("test_top1_err", "float", "test top-1 error (%)", "test", group="error"),
    Metric("test_top5_err", "float", "test top-5 error (%)", "test", group="error"),
    Metric("lr", "float", "learning rate of the epoch's last step", group="lr"),
    Metric("images_per_s", "float", "training images per second", group="speed"),
    Metric("epoch_seconds", "float", "wall time of the epoch, evaluation included", group="speed"),
    Metric("flops_per_s", "float", "achieved training FLOP/s: the model's counted FLOPs of the "
           "epoch's training (3 forwards an image, plus the hardness forward where it runs) "
           "over its training seconds, all ranks together", group="speed"),
    Metric("mfu", "float", "model-FLOP utilisation: flops_per_s over the peak of the run's "
           "GPUs at its precision (hardmix.throughput's table); NULL on the CPU and on GPUs "
           "the table lacks", group="speed"),
    Metric("mixed_rate", "float", "share of steps that were mixed (the prob coin)",
           applies=_mixes, group="hardmix", witnesses=("prob",)),
    Metric("hard_share", "float", "share of the batch that was hard (mixed steps)",
           applies=_hard, group="hardmix", diagnostic=True),
    Metric("fallback_rate", "float", "share of mixed steps where the fallback fired",
           applies=_fallback_acts, group="hardmix", diagnostic=True,
           witnesses=("fallback", "min_hard")),
    Metric("distinct_sources", "float", "distinct source images per batch that received "
           "patches (steps a skip fallback left unmixed are excluded)",
           applies=_has_sources, group="hardmix", diagnostic=True),
    Metric("memory_seen", "float", "share of the training set the per-sample memory has "
           "observed (cached signal, history criterion)", applies=_memory, group="hardmix"),
    Metric("source_class_counts", "list_int", "how often each class served as a source",
           applies=_has_sources),
    Metric("val_ece", "float", f"validation expected calibration error (%, {ECE_BINS} "
           "equal-width confidence bins)", "val", group="calibration"),
    Metric("test_ece", "float", f"test expected calibration error (%, {ECE_BINS} equal-width "
           "confidence bins)", "test", group="calibration"),
    Metric("test_class_err", "list_float", "test top-1 error (%) of each class (the data set's "
           "class order)", "test"),
):
    register_epoch_metric(_m)

#: The run summary (the trial row's result columns), in order.
SUMMARY_FIELDS: dict[str, Metric] = {m.name: m for m in (
    Metric("status", "str", "running, completed, pruned (stopped early) or failed"),
    Metric("error", "str", "last line of the error of a failed run, else empty"),
    Metric("epochs_run", "int", "epochs finished"),
    Metric("wall_seconds", "float", "wall time of the run (all attempts)"),
    Metric("device", "str", "the device the run used"),
    Metric("threads", "int", "torch intra-op threads of the run"),
    Metric("precision", "str", "numeric policy: bf16 autocast or fp32, memory format, and why"),
    Metric("final_top1_err", "float", "test top-1 error (%) after the last epoch"),
    Metric("final_top5_err", "float", "test top-5 error (%) after the last epoch"),
    Metric("final_val_top1_err", "float", "validation top-1 error (%) after the last epoch"),
    Metric("best_val_top1_err", "float", "lowest validation top-1 error (%) over the epochs"),
    Metric("classes", "list_str", "class names of the data set"),
)}


@dataclass(frozen=True)
class Outcome:
    """A final result a report tests: ``column`` of the report's per-trial table, a summary
    field of the trials table or, with ``epoch_metric``, that metric at the trial's last epoch
    (the test NLL is the mean cross-entropy, ``test_loss``). Lower is better for all."""

    name: str
    title: str
    unit: str
    column: str
    epoch_metric: Optional[str] = None


#: The outcomes a sweep may declare as its primary or secondary families (``analysis.*``).
OUTCOMES: dict[str, Outcome] = {o.name: o for o in (
    Outcome("top1", "top-1 error", "points", "final_top1_err"),
    Outcome("top5", "top-5 error", "points", "final_top5_err"),
    Outcome("nll", "test NLL", "nats", "final_test_loss", "test_loss"),
    Outcome("ece", "test ECE", "points", "final_test_ece", "test_ece"),
)}


def evaluation_sums(logits: Any, labels: Any, num_classes: int) -> Any:
    """Per-batch sums for the calibration and per-class errors, on the logits' device with no
    host sync (add them up over batches and ranks, then :func:`evaluation_details`): a float64
    vector of ``3·ECE_BINS`` (per confidence bin: count, sum of confidences, correct) then
    ``2·num_classes`` (per true class: count, misclassified). Confidence = the top softmax
    probability; bin b holds confidences in (b/B, (b+1)/B]."""
    probs = logits.float().softmax(1)
    conf, pred = probs.max(1)
    ok = (pred == labels).double()
    one = ok.new_ones(ok.shape)
    bins = (conf * ECE_BINS).ceil().long().clamp_(1, ECE_BINS) - 1
    cal = ok.new_zeros((3, ECE_BINS))
    cal[0].index_add_(0, bins, one)
    cal[1].index_add_(0, bins, conf.double())
    cal[2].index_add_(0, bins, ok)
    cls = ok.new_zeros((2, num_classes))
    cls[0].index_add_(0, labels, one)
    cls[1].index_add_(0, labels, 1 - ok)
    return _cat(cal.flatten(), cls.flatten())


def _cat(a: Any, b: Any) -> Any:
    out = a.new_empty(a.numel() + b.numel())
    out[:a.numel()] = a
    out[a.numel():] = b
    return out


def evaluation_details(sums: Any, num_classes: int) -> dict:
    """``{"ece": %, "class_err": [% per class]}`` from summed :func:`evaluation_sums` (a list
    or a host tensor); ECE = Σ_b |Σ confidence − Σ correct| / n, in %; a class without test
    samples gets NaN."""
    v = [float(x) for x in sums]
    count, conf, ok = (v[i * ECE_BINS:(i + 1) * ECE_BINS] for i in range(3))
    n = sum(count)
    base = 3 * ECE_BINS
    seen, wrong = v[base:base + num_classes], v[base + num_classes:base + 2 * num_classes]
    return {"ece": 100.0 * sum(abs(c - o) for c, o in zip(conf, ok)) / n if n else None,
            "class_err": [100.0 * w / s if s else float("nan") for s, w in zip(seen, wrong)]}


def applicable(metric: Metric, aug: Mapping[str, Any]) -> bool:
    """Whether ``metric`` means something for a run with augment fields ``aug``."""
    try:
        return metric.applies is None or bool(metric.applies(aug))
    except Exception:  # noqa: BLE001 - an unknown method (old rows): keep the value
        return True


def reported(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar metrics of an epoch (what Ray Tune receives): numbers only, no NULLs."""
    return {k: v for k, v in metrics.items()
            if (k == "epoch" or (k in EPOCH_METRICS and EPOCH_METRICS[k].kind in ("float", "int")))
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def timings() -> list[str]:
    """The wall-clock metrics (group ``speed``): the ones a repeated or resumed run need not
    reproduce."""
    return [m.name for m in EPOCH_METRICS.values() if m.group == "speed"]


def diagnostics() -> list[str]:
    """Metrics whose per-trial mean over epochs the report's main table shows."""
    return [m.name for m in EPOCH_METRICS.values() if m.diagnostic]


def witness_of(field: str) -> Optional[str]:
    """The metric that shows whether ``augment.<field>`` took effect, if any."""
    return next((m.name for m in EPOCH_METRICS.values() if field in m.witnesses), None)


class StopRun(Exception):
    """Raise from a callback's ``on_epoch_end`` to end the run early (e.g. ASHA pruning): the
    run stops after that epoch and its summary has ``status == "pruned"``."""


class Callback:
    """Hooks of a run; every method is optional (the base class does nothing).

    Callbacks are called on every data-parallel rank with identical (all-reduced) metrics;
    ``info["rank"]`` in ``on_run_start`` says whether this is rank 0. ``on_mixed_preview`` is
    called on rank 0 only.
    """

    def on_run_start(self, cfg: Any, info: dict) -> None:
        """Before the first epoch. ``info``: run_dir, device, versions, git_commit,
        num_classes, classes, sizes (train/val/test), steps_per_epoch, start_epoch (last
        finished epoch when resumed, else 0), resumed_metrics (when resumed: the metrics of
        epoch start_epoch, whose checkpoint is written before that epoch's ``on_epoch_end``
        calls, so a writer killed in between records them here; else None), rank,
        world_size, threads, precision."""

    def on_epoch_end(self, metrics: dict, checkpoint: Optional[str]) -> None:
        """After each epoch: ``epoch`` and every :data:`EPOCH_METRICS` name (None where not
        applicable or not evaluated); ``checkpoint`` is the checkpoint written at this epoch
        (rank 0), else None."""

    def on_run_end(self, summary: dict) -> None:
        """Once at the end, whatever the outcome, with the :data:`SUMMARY_FIELDS` summary."""

    def on_mixed_preview(self, images: dict) -> None:
        """Once, at the first mixed batch of a fresh run: ``images``, ``sources`` (the source
        image of each), ``mixed`` (B, C, H, W in 0..1, on the CPU), ``lam``, ``labels``,
        ``source_labels``."""
