"""Terse terminal progress for sweeps, and a quiet Ray.

Ray's own console output is a wall of tables, deprecation notes and worker logs. A sweep here
prints one line per trial that ends and a status: trials running / done / pruned / failed, the
best validation result so far, how many of all trials have ended (done/total), the elapsed time
and an ETA from the mean trial time. On a terminal the status is one live bar redrawn in place
(every second); piped, in CI (``CI`` set) or with ``TERM=dumb`` it is a plain line printed when
a trial ends and once a minute. Everything else Ray would say stays in its logs
(``/tmp/ray/session_latest/logs``); every result is in Parquet anyway.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from typing import Any, Sequence, TextIO

from ray.tune import ProgressReporter

#: Environment Ray reads at import or start-up; set before ``ray`` is imported where possible.
QUIET_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",           # the classic reporter path, so ours is used
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # no CSV/JSON/TensorBoard copy from Tune itself
    "RAY_DEDUP_LOGS": "0",
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "0",
    # Epochs without a validation evaluation (eval.every > 1) report no validation metric;
    # ASHA skips such results and every rung epoch and the last epoch carry one.
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "1000000",
    "TUNE_WARN_INSUFFICENT_RESOURCE_THRESHOLD_S": "1000000",
    "TUNE_WARN_INSUFFICENT_RESOURCE_THRESHOLD_S_AUTOSCALER": "1000000",
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
}


def quiet_ray() -> None:
    """Silence Ray's console chatter in this process (and, through the environment, in the
    processes of a local Ray instance it starts). Errors are still logged."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in ("ray", "ray.tune", "ray.train", "ray.data", "ray.air"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Tune logs each retried or failed trial with a full traceback at ERROR; the sweep prints its
    # own one-line version and the traceback stays in the trial's error file.
    # "Trials did not complete: [...]" repeats what the sweep has already printed.
    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    for category in (DeprecationWarning, FutureWarning, UserWarning, RuntimeWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(ray|optuna|pyarrow)(\.|$)")
    warnings.filterwarnings("ignore", message=r".*ExperimentalWarning.*")
    try:
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    except ImportError:  # pragma: no cover - optuna is a dependency
        pass


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def eta_seconds(ended: Sequence[float], running: Sequence[float], pending: int,
                slots: int) -> float | None:
    """Seconds until every trial has ended, from the mean time of the trials that ended.

    ``ended``: durations of ended trials; ``running``: how long each running trial has run;
    ``pending``: trials not started; ``slots``: trials that run at once. The work left is the
    mean time for each pending trial plus what each running trial still lacks of the mean
    (none once it has run longer), shared over the slots. None before any trial has ended.
    """
    if not ended:
        return None
    mean = sum(ended) / len(ended)
    left = pending * mean + sum(max(0.0, mean - r) for r in running)
    return left / max(1, slots)


def seconds_from_start(result: dict) -> float | None:
    """Tune's ``time_total_s`` of a trial, as if this attempt had run every epoch the trial
    reached. A trial resumed from a checkpoint at epoch 50 of 60 reports only the epochs of its
    new attempt: its time is scaled by ``epoch / training_iteration`` (each report is one
    epoch), so that a resumed sweep's few quick endings do not promise an early finish."""
    spent = result.get("time_total_s")
    if not isinstance(spent, (int, float)):
        return None
    epoch, reports = result.get("epoch"), result.get("training_iteration")
    if isinstance(epoch, (int, float)) and isinstance(reports, (int, float)) and 0 < reports < epoch:
        return float(spent) * float(epoch) / float(reports)
    return float(spent)


def progress_bar(done: int, total: int, width: int = 20) -> str:
    """``█████░░░░░`` with ``done / total`` of ``width`` cells filled."""
    filled = 0 if total <= 0 else min(width, round(width * done / total))
    return "█" * filled + "░" * (width - filled)


def is_live(stream: TextIO) -> bool:
    """A live (redrawn) status on a terminal; plain lines when piped, in CI or on a dumb
    terminal."""
    if os.environ.get("CI") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def ran_every_epoch(result: dict | None, epochs: int) -> bool:
    """Whether a trial's last result is its planned last epoch. The trial's own planned epochs
    (reported as ``epochs_planned``) win over the sweep's ``epochs``, which may be searched."""
    result = result or {}
    return (result.get("epoch", 0) or 0) >= (result.get("epochs_planned") or epochs)


def trial_state(trial: Any, epochs: int) -> str:
    """``pending``, ``running``, ``done``, ``pruned`` or ``failed`` for a Tune trial.

    A trial Tune terminated before its last epoch was stopped by the scheduler: pruned.
    """
    status = getattr(trial, "status", "PENDING")
    if status == "ERROR":
        return "failed"
    if status == "TERMINATED":
        return "done" if ran_every_epoch(getattr(trial, "last_result", None), epochs) else "pruned"
    if status in ("RUNNING", "PAUSED"):
        return "running"
    return "pending"


def last_error_line(text: str | None) -> str:
    """The line of a traceback that says what went wrong (its last non-empty line)."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if not ln.startswith(("File ", "^", "~", "Traceback", "Failure #")):
            return ln[:300]
    return lines[-1][:300] if lines else "unknown error"


class SweepProgress(ProgressReporter):
    """A :class:`ray.tune.ProgressReporter` that prints a few lines instead of tables.

    A trial's display name is ``names(trial)`` (the sweep passes its trial id and readable
    name, ``c003-s0 hardmix-topk_loss-s0``), else its sweep trial id (``str(trial)``). A status
    line is printed when a trial ends and every ``every_s`` seconds while trials run; each
    ending trial gets one line of its own (with the error's last line when it failed).
    Picklable: Tune saves it with
    the experiment for ``--resume``.
    """

    def __init__(self, metric: str, epochs: int, total: int, label: str = "sweep",
                 out: TextIO | None = None, every_s: float = 60.0, live: bool | None = None,
                 refresh_s: float = 1.0, clock=time.time, names: Any = None):
        self.metric, self.epochs, self.total, self.label = metric, epochs, total, label
        self.names = names          # trial -> display name (picklable), or None
        self._names: dict[Any, str] = {}
        self.out = out
        self.every_s = every_s
        self.live = live            # None: decided by the stream (is_live)
        self.refresh_s = refresh_s  # how often a live bar is redrawn
        self.clock = clock
        self.start = clock()
        self._seen: dict[str, str] = {}
        self._running_since: dict[Any, float] = {}
        self._slots = 1
        self._last_line = ""
        self._last_time = 0.0
        self._drawn = False         # a live bar is on the screen (no newline after it yet)

    # Tune calls setup() before the first report; the sweep already knows what it needs.
    def setup(self, start_time: float | None = None, total_samples: int | None = None,
              metric: str | None = None, mode: str | None = None, **kwargs: Any) -> None:
        self.start = start_time or self.start
        if total_samples and total_samples > 0 and not self.total:
            self.total = total_samples

    def _stream(self) -> TextIO:
        return self.out or sys.stdout

    def _is_live(self) -> bool:
        return is_live(self._stream()) if self.live is None else self.live

    def _timing(self, trials: Sequence[Any]) -> tuple[int, int, float, float | None]:
        """``(ended, total, elapsed seconds, ETA seconds or None)``. A trial's time is
        :func:`seconds_from_start`; a running trial without a report yet counts from when this
        reporter first saw it running."""
        now = self.clock()
        ended, running, pending = [], [], 0
        for t in trials:
            state = trial_state(t, self.epochs)
            key = getattr(t, "trial_id", id(t))
            spent = seconds_from_start(getattr(t, "last_result", None) or {})
            if state == "running":
                since = self._running_since.setdefault(key, now)
                running.append(spent if spent is not None else now - since)
            elif state == "pending":
                pending += 1
            elif spent is not None:
                ended.append(spent)
        n_ended = sum(1 for t in trials
                      if trial_state(t, self.epochs) in ("done", "pruned", "failed"))
        total = max(self.total or 0, len(trials))
        pending += max(0, total - len(trials))  # trials the searcher has not created yet
        self._slots = max(self._slots, len(running))
        eta = eta_seconds(ended, running, pending, self._slots)
        return n_ended, total, now - self.start, eta

    @staticmethod
    def timing_text(timing: tuple[int, int, float, float | None]) -> str:
        """``3/5 ended, elapsed 1m02s, ETA 0m40s`` of a :meth:`_timing` tuple."""
        ended, total, elapsed, eta = timing
        left = "ETA —" if eta is None else f"ETA {_fmt_seconds(eta)}"
        return f"{ended}/{total} ended, elapsed {_fmt_seconds(elapsed)}, {left}"

    def name_of(self, trial: Any) -> str:
        if self.names is None:
            return str(trial)
        key = getattr(trial, "trial_id", id(trial))
        if key not in self._names:
            self._names[key] = self.names(trial)
        return self._names[key]

    @staticmethod
    def error_of(trial: Any) -> str | None:
        return trial.get_error() if hasattr(trial, "get_error") else None

    def _best(self, trials: Sequence[Any]) -> tuple[float, str] | None:
        """Lowest final value among trials that ran every epoch (what the sweep would pick)."""
        best = None
        for t in trials:
            if trial_state(t, self.epochs) != "done":
                continue
            value = (getattr(t, "last_result", None) or {}).get(self.metric)
            if isinstance(value, (int, float)) and not math.isnan(value):
                if best is None or value < best[0]:
                    best = (float(value), self.name_of(t))
        return best

    def _status_line(self, trials: Sequence[Any]) -> str:
        counts = {"pending": 0, "running": 0, "done": 0, "pruned": 0, "failed": 0}
        for t in trials:
            counts[trial_state(t, self.epochs)] += 1
        total = max(self.total or 0, len(trials))
        parts = [f"{counts['running']} running", f"{counts['done']} done"]
        if counts["pruned"]:
            parts.append(f"{counts['pruned']} pruned")
        parts.append(f"{counts['failed']} failed")
        text = f"[{self.label}] " + ", ".join(parts) + f" of {total}"
        best = self._best(trials)
        if best:
            text += f" | best {self.metric} {best[0]:.2f} ({best[1]})"
        return text

    def _events(self, trials: Sequence[Any]) -> list[str]:
        lines = []
        for t in trials:
            state = trial_state(t, self.epochs)
            key = getattr(t, "trial_id", id(t))
            if self._seen.get(key) == state:
                continue
            self._seen[key] = state
            name = self.name_of(t)
            result = getattr(t, "last_result", None) or {}
            value = result.get(self.metric)
            shown = f"{self.metric} {value:.2f}" if isinstance(value, (int, float)) else ""
            if state == "done":
                lines.append(f"  done    {name}  {shown}")
            elif state == "pruned":
                lines.append(f"  pruned  {name}  at epoch {result.get('epoch', 0)}  {shown}")
            elif state == "failed":
                lines.append(f"  FAILED  {name}  {last_error_line(self.error_of(t))}")
        return lines

    def _ended(self, trials: Sequence[Any]) -> bool:
        """Whether a trial ended since the last report."""
        for t in trials:
            state = trial_state(t, self.epochs)
            if state in ("done", "pruned", "failed") and \
                    self._seen.get(getattr(t, "trial_id", id(t))) != state:
                return True
        return False

    def should_report(self, trials: Sequence[Any], done: bool = False) -> bool:
        # Starts and stops of running trials alone are not news; ends are, and a heartbeat
        # (a live bar's clock ticks every refresh_s).
        every = self.refresh_s if self._is_live() else self.every_s
        return (done or not self._last_time or self._ended(trials)
                or self.clock() - self._last_time >= every)

    def report(self, trials: Sequence[Any], done: bool, *sys_info: str) -> None:
        out = self._stream()
        live = self._is_live()
        if not self._last_time:
            # Trials that ended before a resumed sweep started are counted, not listed again.
            self._events(trials)
        events = self._events(trials)
        line = self._status_line(trials)
        timing = self._timing(trials)
        self._last_time = self.clock()
        if live:
            self._draw(out, events, line, timing, done)
            return
        for event in events:
            print(event, file=out)
        if done and line == self._last_line:
            return  # the final call repeats the last status
        print(f"{line} | {self.timing_text(timing)}", file=out)
        self._last_line = line
        out.flush()

    def _draw(self, out: TextIO, events: list[str], line: str,
              timing: tuple[int, int, float, float | None], done: bool) -> None:
        """Event lines above, the status bar redrawn in place on the last line."""
        import shutil

        clear = "\r\x1b[K" if self._drawn else ""
        for event in events:
            out.write(f"{clear}{event}\n")
            clear = ""
        prefix = f"[{self.label}] "
        bar = (f"{prefix}{progress_bar(timing[0], timing[1])} {self.timing_text(timing)} | "
               f"{line[len(prefix):]}")
        width = shutil.get_terminal_size((100, 20)).columns
        out.write("\r\x1b[K" + (bar if len(bar) < width else bar[:max(10, width - 2)] + "…"))
        self._drawn = True
        if done:
            out.write("\n")
            self._drawn = False
        out.flush()
        self._last_line = line
