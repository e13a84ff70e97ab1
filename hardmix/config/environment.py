"""Environment checks: what a valid config needs from this machine (data on disk, writable
folders, a GPU, optional packages), run once per entry point before any work starts.

``hardmix train`` and :func:`hardmix.train.train` call :func:`check_run_environment`; the sweep
driver calls :func:`check_sweep_environment` once before Ray starts; ``hardmix report --out``
calls :func:`check_writable`. Each raises a ConfigError (one line).

Two halves: what only the node a run trains on can tell (:func:`check_node_environment`: its
data, its CUDA device) and what any machine can (:func:`check_driver_environment`: required
fields, optional packages). A sweep on a local Ray instance checks both on the driver (its
machine is the trials' node); a sweep joining a cluster checks the second on the driver and
the first on a node where a trial can run (:func:`check_sweep_node`, called by ``tune.sweep``
in a Ray task with a trial's resource request); every trial repeats the whole check at its
start, in :func:`hardmix.train.train`.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from hardmix.architectures import TIMM_PREFIX
from hardmix.config.rules import with_overrides
from hardmix.config.schema import RunConfig, SweepConfig, to_dict
from hardmix.datasets import dataset, split_sizes
from hardmix.errors import ConfigError
from hardmix.methods import active_fields

#: Optional packages and the extra that installs them.
EXTRAS = {"cv2": "saliency", "wandb": "wandb", "mlflow": "mlflow", "timm": "timm"}


def check_writable(name: str, target: str) -> None:
    """``target`` is (or can be created as) a folder this process can write into. URIs are
    checked by the store when it opens them."""
    if "://" in target and not target.startswith("file://"):
        return
    p = Path(os.path.expanduser(target[len("file://"):] if target.startswith("file://")
                                else target))
    probe = p
    while not probe.exists():
        if probe.is_symlink():  # exists() follows links: a dangling one or a loop is no folder
            raise ConfigError(name, target, f"must be a writable folder ({probe} is a symbolic "
                                             f"link to a missing target or a loop)")
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(name, target, f"must be a writable folder ({probe} is a file)")
    try:  # a real write: permission bits say nothing for root or read-only mounts
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ConfigError(name, target, f"must be a writable folder ({exc.strerror} in "
                                         f"{probe})") from None


def require_package(module: str, field: str, value: object) -> None:
    """An optional dependency is importable, else one line saying which extra installs it."""
    if importlib.util.find_spec(module) is None:
        extra = EXTRAS.get(module, module)
        raise ConfigError(field, value, f"needs the optional package {module}: "
                                        f"pip install \"hardmix[{extra}]\"")


def check_data(cfg: RunConfig, prefix: str = "", absent_ok: bool = False) -> None:
    """The data exist and can be used, and ``subset``/``val_size`` fit their real size.

    ``absent_ok`` (a plan, ``hardmix sweep --dry-run``): data that are not here pass, and
    ``subset``/``val_size`` are checked against the sizes known without them (CIFAR's), if
    any; the run itself still refuses them."""
    d = cfg.data
    spec = dataset(d.name)
    try:
        if absent_ok and not spec.present(d):
            facts = spec.planned_facts(d)
            if facts is not None:
                split_sizes(d, facts.train)
            return
        spec.check(d)
        facts = spec.facts(d)
        if facts is not None:
            split_sizes(d, facts.train)
    except ConfigError as exc:
        raise ConfigError(prefix + exc.field, exc.value, exc.allowed) from None


def check_node_environment(cfg: RunConfig, prefix: str = "", absent_ok: bool = False) -> None:
    """What a run needs from the node it trains on: its data (``data.path`` and the sizes it
    implies; ``absent_ok``: see :func:`check_data`) and, with ``device=cuda``, a CUDA device."""
    check_data(cfg, prefix, absent_ok)
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{prefix}device", cfg.device,
                              "no CUDA device is available here; use auto or cpu")
    check_precision(cfg, prefix)


def check_precision(cfg: RunConfig, prefix: str = "") -> None:
    """A forced ``optim.amp`` (bf16, fp16) runs natively on the device this node would train
    on (under Ray Train, the GPU Ray assigns: the same kind on a node)."""
    if cfg.optim.amp not in ("bf16", "fp16"):
        return  # auto and fp32 run everywhere
    import torch

    from hardmix.device import precision_policy

    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    try:
        precision_policy(cfg.optim, device)
    except ConfigError as exc:
        raise ConfigError(prefix + exc.field, exc.value, exc.allowed) from None


def check_driver_environment(cfg: RunConfig, prefix: str = "") -> None:
    """What a run needs that any machine of the cluster can tell: a ``data.path`` where the
    data set needs one, and the optional packages its options use."""
    spec = dataset(cfg.data.name)
    if spec.needs_path and not cfg.data.path:
        raise ConfigError(f"{prefix}data.path", cfg.data.path,
                          f"is required for data.name={cfg.data.name}")
    check_packages(cfg, prefix)


def check_run_environment(cfg: RunConfig, prefix: str = "", outputs: bool = True,
                          absent_ok: bool = False) -> None:
    """Everything a run needs from this machine (``outputs``: the output folder too;
    ``absent_ok``: see :func:`check_data`)."""
    check_node_environment(cfg, prefix, absent_ok)
    check_packages(cfg, prefix)
    if outputs:
        check_writable(f"{prefix}output.dir", cfg.output.dir)


def check_timm_model(name: str, field: str) -> None:
    """``timm:<model>`` names a model timm can build (else every trial would fail at start)."""
    import difflib

    import timm

    model = name[len(TIMM_PREFIX):]
    if timm.is_model(model):
        return
    close = difflib.get_close_matches(model, timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
    raise ConfigError(field, name, f"is not a timm model (timm.list_models() lists "
                                   f"{len(timm.list_models())}){hint}")


def check_packages(cfg: RunConfig, prefix: str = "") -> None:
    """The optional packages the run's options use are importable."""
    aug = to_dict(cfg.augment)
    if "saliency" in active_fields(aug) and cfg.augment.saliency == "fine_grained":
        require_package("cv2", f"{prefix}augment.saliency", "fine_grained")
        import cv2

        if not hasattr(cv2, "saliency"):
            raise ConfigError(f"{prefix}augment.saliency", "fine_grained",
                              "needs OpenCV's contrib modules (cv2.saliency): pip install "
                              "\"hardmix[saliency]\" (opencv-contrib-python-headless)")
    if cfg.model.name.startswith(TIMM_PREFIX):
        require_package("timm", f"{prefix}model.name", cfg.model.name)
        check_timm_model(cfg.model.name, f"{prefix}model.name")
        if cfg.model.kwargs or cfg.model.pretrained:  # model.kwargs taken, weights at hand
            from hardmix.models import check_timm_options
            check_timm_options(cfg.model, prefix)
    for logger in cfg.output.loggers:
        require_package(logger, f"{prefix}output.loggers", logger)


def _each_run(cfg: SweepConfig, check) -> None:
    """``check(run, prefix)`` on the base run and on every arm that changes what the checks
    read; an arm's error names the arm (``arms[1].data.path``)."""
    check(cfg.run, "run.")
    for i, arm in enumerate(cfg.arms):
        params = {k: v for k, v in arm.items() if k != "seeds"}
        if any(k.startswith(("data.", "model.", "augment.", "output.", "device")) for k in params):
            try:
                check(with_overrides(cfg.run, params), "")
            except ConfigError as exc:
                raise ConfigError(f"arms[{i}].{exc.field}", exc.value, exc.allowed) from None


def check_sweep_environment(cfg: SweepConfig, node: bool = True, plan: bool = False) -> None:
    """Everything a sweep needs before Ray starts: its storage, and the base run's and every
    arm's environment (the trials write into the sweep folder, not ``run.output.dir``).

    ``node=False`` (a sweep joining a cluster, whose driver may run on a head that never reads
    the data and has no GPU): only the driver's half; :func:`check_sweep_node` is then run on a
    node where a trial can run. ``plan=True`` (``--dry-run``): data that are not here pass
    (:func:`check_data`'s ``absent_ok``); the plan says so."""
    check_writable("storage", cfg.storage)
    if node:
        _each_run(cfg, lambda run, prefix: check_run_environment(run, prefix, outputs=False,
                                                                 absent_ok=plan))
    else:
        _each_run(cfg, check_driver_environment)


def check_sweep_node(cfg: SweepConfig) -> None:
    """The node's half of :func:`check_sweep_environment` (data, device), run on a node where
    the sweep's trials run."""
    _each_run(cfg, check_node_environment)
