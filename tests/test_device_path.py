"""The CUDA path on the CPU: no host<->device traffic in the per-step path, and checkpoints that
restore on another device.

**Host traffic.** :class:`HostTraffic` runs code on the CPU as if the CPU were the accelerator.
Every tensor counts as a *device* tensor (the batch, the model's parameters and gradients,
everything computed from them, every factory called with ``device=``) except *host* tensors:
those a factory makes without ``device=`` (on a GPU run they really are CPU tensors: HardMix's
host-generator draws) and whatever is computed from host tensors alone. It records, with the
call site, every

* host->device copy: ``torch.tensor``/``as_tensor``/``asarray``/``new_tensor`` of Python data
  with a device, ``.to(device)``/``.cuda()``/``copy_`` of a host tensor;
* device->host read: ``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()``, ``bool()``,
  ``float()``, ``int()``, ``__index__``, printing; and the ops whose result shape or value the
  host must read: ``nonzero``/``argwhere``/one-argument ``where``, ``masked_select``,
  ``unique``, ``bincount``, ``equal``, ``allclose``, ``repeat_interleave`` without
  ``output_size``, boolean-mask indexing (``x[mask]``, ``x[mask] = v``);
* op that mixes a host tensor (not 0-d) with device tensors (a device-mismatch error on a GPU);

and, one level down (a dispatch mode), any ``aten._local_scalar_dense``/``nonzero``/... that a
library function runs inside on device data.

Allowed, and why: reads of host tensors (HardMix's host generator draws the coin, the batch box
and the batch λ on the CPU on purpose, so every data-parallel rank agrees without
communicating); Python numbers as kernel arguments (``torch.full(..., v, device=d)``,
``x * 0.5``) and 0-d host tensors next to device tensors (CUDA passes both by value, no copy);
shapes (host metadata); ``.to(device)`` of a device tensor (a no-op; on the CPU stand-in a
``.to("cpu")`` read of a device tensor looks the same and is not caught: the code spells host
reads ``.cpu()``); reads once per evaluation or epoch, outside the per-step path
(:func:`test_evaluation_reads_the_host_once_whatever_the_batch_count`); and
``augment.saliency=fine_grained``, OpenCV's detector, which runs on the host by declaration (the
method table allows it with one box per batch only).

The settings are the enumeration of the method table that tests/test_truth.py also runs
(tests/method_settings.py: every method, HardMix at every criterion x signal x fallback), each
also run at every other value of every choice field the config schema declares that acts for it
(box, bn_mode, saliency). tests/test_cuda.py runs the
same steps under ``torch.cuda.set_sync_debug_mode("error")`` on a GPU.

**Checkpoints.** A checkpoint restores on another device: generator states stay on the CPU,
tensors move where they live. The 'meta' device stands in for a GPU on the load path.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hardmix import HardMix
from hardmix.config import AugmentConfig
from hardmix.methods import active_fields, effective_augment
from method_settings import method_settings as truth_settings

REPO = Path(__file__).resolve().parents[1]
_TORCH = str(Path(torch.__file__).parent)
_HOST = "_hardmix_host"  # attribute that marks a host tensor

# ---- what counts as host traffic ---------------------------------------------------------------

_READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__",
          "__complex__", "__array__", "__repr__", "__str__", "__format__", "nonzero", "argwhere",
          "masked_select", "unique", "unique_consecutive", "bincount", "equal", "allclose",
          "is_nonzero"}
_DATA_FACTORIES = {"tensor", "as_tensor", "asarray", "new_tensor"}
_ATEN_READS = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique", "_unique",
               "_unique2", "unique_dim", "unique_consecutive", "equal", "is_nonzero"}
_MASK_DTYPES = (torch.bool, torch.uint8)
_MACHINERY = {"_call_site", "record", "__torch_function__", "__torch_dispatch__"}


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


def _is_host(t: torch.Tensor) -> bool:
    return getattr(t, _HOST, False)


def _call_site() -> str:
    """The innermost frame outside torch and this file: ``path:line in function: source``."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(_TORCH) or (frame.filename == __file__
                                                 and frame.name in _MACHINERY):
            continue
        path = Path(frame.filename)
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        return f"{shown}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
    return "<unknown>"


def _has_device_arg(args, kwargs) -> bool:
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (torch.device, str)) or isinstance(a, torch.Tensor) for a in args)


class _AtenReads(TorchDispatchMode):
    """One level down: syncs that a library function runs inside (on device data)."""

    def __init__(self, owner: "HostTraffic"):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.owner.quiet:
            name = func.__name__.split(".")[0]
            if name in _ATEN_READS:
                self.owner.record(f"device->host read (aten.{name})")
            elif name in ("index", "index_put", "index_put_") and any(
                    i is not None and i.dtype in _MASK_DTYPES for i in args[1]):
                self.owner.record(f"boolean-mask indexing (aten.{name})")
        return func(*args, **kwargs)


class HostTraffic(TorchFunctionMode):
    """Records every host<->device copy or read in the code run under it (see the module
    docstring for what counts and what is allowed). ``events``: (what, call site) pairs."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, str]] = []
        self.quiet = 0  # > 0 while a call already judged (allowed or recorded) runs
        self._aten = _AtenReads(self)

    def __enter__(self):
        super().__enter__()
        self._aten.__enter__()
        return self

    def __exit__(self, *exc):
        self._aten.__exit__(*exc)
        return super().__exit__(*exc)

    def record(self, what: str) -> None:
        self.events.append((what, _call_site()))

    def report(self) -> str:
        counts = Counter(self.events)
        return "\n".join(f"  {what} at {site}" + (f" ({n}x)" if n > 1 else "")
                         for (what, site), n in counts.items())

    def _judge(self, name: str, args, kwargs, tensors) -> str | None:
        host = [t for t in tensors if _is_host(t)]
        device = [t for t in tensors if not _is_host(t)]
        if name in _DATA_FACTORIES:
            data = args[1] if name == "new_tensor" else (args[0] if args else kwargs.get("data"))
            on_device = kwargs.get("device") is not None or (
                name == "new_tensor" and not _is_host(args[0]))
            if on_device and not isinstance(data, torch.Tensor):
                return f"host->device copy of Python data (torch.{name} with a device)"
            return None
        if name in ("to", "cuda") and host and tensors[0] is host[0] and (
                name == "cuda" or _has_device_arg(args[1:], kwargs)):
            return f"host->device copy (.{name} of a host tensor)"
        if not device:
            return None
        if name in _READS and (tensors[0] is device[0] or name in ("equal", "allclose")):
            return f"device->host read ({name})"
        if name == "where" and len(args) + len(kwargs) == 1:
            return "device->host read (one-argument where)"
        if name == "repeat_interleave" and isinstance(args[1] if len(args) > 1 else
                                                      kwargs.get("repeats"), torch.Tensor) \
                and kwargs.get("output_size") is None:
            return "device->host read (repeat_interleave without output_size)"
        if name in ("__getitem__", "__setitem__", "index_put", "index_put_"):
            index = args[1] if len(args) > 1 else None
            flat, _ = tree_flatten(index)
            if any(isinstance(i, torch.Tensor) and i.dtype in _MASK_DTYPES for i in flat):
                return f"boolean-mask indexing ({name})"
        if any(t.dim() > 0 for t in host):
            return f"host tensor mixed with device tensors ({name})"
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        problem = self._judge(name, args, kwargs, tensors)
        if problem:
            self.record(problem)
        all_host = all(_is_host(t) for t in tensors) and (
            bool(tensors) or kwargs.get("device") is None)
        moved = name in ("to", "cuda") and (name == "cuda" or _has_device_arg(args[1:], kwargs))
        self.quiet += bool(problem) or all_host
        try:
            out = func(*args, **kwargs)
        finally:
            self.quiet -= bool(problem) or all_host
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                if all_host and not moved:
                    setattr(t, _HOST, True)
                elif moved and _is_host(t):
                    delattr(t, _HOST)  # now a device tensor (on the CPU stand-in: the same one)
        return out


@contextlib.contextmanager
def no_host_traffic(where: str):
    """Run a block under :class:`HostTraffic`; fail listing every call site if it saw any."""
    mode = HostTraffic()
    with mode:
        yield mode
    assert not mode.events, f"host<->device traffic in {where}:\n{mode.report()}"


# ---- the settings: the method table and every choice field of the schema -------------------


#: Choice fields of the schema that run on the host by declaration (see the module docstring).
HOST_BY_DESIGN = {("saliency", "fine_grained")}


def _choice_fields() -> dict[str, tuple]:
    out = {}
    for f in dataclasses.fields(AugmentConfig):
        choices = f.metadata.get("choices")
        if choices is not None:
            out[f.name] = tuple(choices)
    return out


def settings() -> list[dict]:
    """The method table's settings (tests/method_settings.py: every method; HardMix at every
    criterion x signal x fallback), each also at every other value of each choice field that
    acts for it, one field at a time; settings that run identically (``box: auto`` = the
    paper's box) appear once."""
    enumerated = set().union(*truth_settings())  # the fields already enumerated there
    out, seen = [], set()
    for base in truth_settings():
        base = {"prob": 0.7, **base}
        variants = [base]
        active = active_fields(base)
        for name, choices in _choice_fields().items():
            if name in active and name not in enumerated:
                variants += [{**base, name: c} for c in choices
                             if (name, c) not in HOST_BY_DESIGN]
        for v in variants:
            full = {**dataclasses.asdict(AugmentConfig()), **v}
            key = tuple(sorted((k, str(x)) for k, x in effective_augment(full).items()))
            if key not in seen:
                seen.add(key)
                out.append(v)
    return out


SETTINGS = settings()


def setting_id(setting: dict) -> str:
    return "-".join(str(v) for k, v in setting.items() if k != "prob")


def test_the_settings_cover_every_value_of_every_choice_field():
    """Each choice of every schema field appears in some setting where it acts."""
    covered = {(k, str(v)) for s in SETTINGS for k, v in
               effective_augment({**dataclasses.asdict(AugmentConfig()), **s}).items()
               if v is not None}
    missing = [(name, c) for name, choices in _choice_fields().items() for c in choices
               if c != "auto" and (name, c) not in HOST_BY_DESIGN and (name, str(c)) not in covered]
    assert not missing, missing


# ---- the per-step path --------------------------------------------------------------------------


def per_step_run(setting: dict, device: torch.device, *, batch: int = 16, size: int = 16,
                 width: int = 8, classes: int = 5, dataset: int = 48, **step_kwargs):
    """A HardMix of ``setting`` with a SmallNet, optimiser and scheduler on ``device``, and a
    function that runs one training step the way the trainer does (mix, forward, loss,
    backward, clip, optimiser and lr step, the memory's observe, the step statistics;
    ``step_kwargs`` go to :func:`hardmix.train.training_step`, e.g. ``autocast``).
    Returns ``(step, data)``; ``step()`` returns the step's MixOutput."""
    from hardmix.models import SmallNet
    from hardmix.train import training_step

    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(dataset, 3, size, size, generator=g).to(device)
    y_all = torch.randint(0, classes, (dataset,), generator=g).to(device)
    torch.manual_seed(0)
    model = SmallNet(width, classes, image_size=size).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    mix = HardMix(num_classes=classes, dataset_size=dataset, seed=0, inplace=True, **setting)
    order = torch.Generator(device=device).manual_seed(1)
    sums = torch.zeros(3 + classes, dtype=torch.float64, device=device)

    def step():
        idx = torch.randperm(dataset, generator=order, device=device)[:batch]
        x, y = x_all.index_select(0, idx), y_all.index_select(0, idx)
        loss, out = training_step(model, model, mix, opt, x, y, idx, label_smoothing=0.1,
                                  grad_clip=5.0, scheduler=sched, **step_kwargs)
        st = out.stats  # what train_epoch sums every mixed step
        sums[:3] += torch.stack([st["hard_share"], st["fallback"], st["distinct_sources"]])
        sums[3:] += out.source_counts_by_class(classes).double()
        sums[0] += loss.double() * len(y)
        out.unmixed, out.target()
        return out

    return step, (x_all, y_all, model)


@pytest.mark.parametrize("setting", SETTINGS, ids=setting_id)
def test_training_steps_move_nothing_between_host_and_device(setting):
    """Five training steps of every setting (mixed and unmixed ones, the first call included:
    generators, memory and cached tables are created under the guard) make no host<->device
    copy or read."""
    import hardmix.hardness
    import hardmix.loss
    import hardmix.mix
    import hardmix.sources

    for module in (hardmix.mix, hardmix.hardness, hardmix.sources, hardmix.loss):
        for obj in vars(module).values():  # device tables are built on first use: rebuild them
            if hasattr(obj, "cache_clear"):
                obj.cache_clear()
    step, _ = per_step_run(setting, torch.device("cpu"))
    with no_host_traffic(f"the training step of {setting}"):
        mixed = [step().mixed for _ in range(5)]
    if effective_augment({**dataclasses.asdict(AugmentConfig()), **setting})["method"] != "none":
        assert True in mixed and False in mixed, mixed  # both paths ran


def evaluation_traffic(device: torch.device, counter_factory=None) -> tuple[Counter, Counter]:
    """Host traffic by call site of ``evaluate`` over one batch and over three, each counted by
    a fresh ``counter_factory()`` (default :class:`HostTraffic`)."""
    from hardmix.config import OptimConfig
    from hardmix.train import evaluate, precision_policy

    _, (x, y, model) = per_step_run({"method": "none"}, device)
    batches = [(x[i:i + 16], y[i:i + 16], None) for i in range(0, 48, 16)]
    precision = precision_policy(OptimConfig(), device)
    out = []
    for loader in (batches[:1], batches):
        counter = counter_factory() if counter_factory is not None else HostTraffic()
        with counter:
            evaluate(model, loader, 5, precision)
        out.append(Counter(counter.events))
    return out[0], out[1]


def test_evaluation_reads_the_host_once_whatever_the_batch_count():
    """``evaluate`` sums on the device and reads the sums once: evaluating three batches
    makes exactly the host traffic of evaluating one (none per batch)."""
    one, three = evaluation_traffic(torch.device("cpu"))
    assert not per_step_sites(one, three), "\n".join(per_step_sites(one, three))
    assert one  # the one read of the sums is seen: the guard is live here


def epoch_traffic(tmp_path: Path, subset: int, augment: list[str], device: str = "cpu",
                  counter=None) -> Counter:
    """Host traffic by call site of one whole ``train()`` run of one epoch on ``subset``
    training images (digits, batch 16), counted by ``counter`` (default :class:`HostTraffic`;
    tests/test_cuda.py counts CUDA's sync warnings)."""
    from hardmix.config import RunConfig, load_config
    from hardmix.train import train

    cfg = load_config(RunConfig, None, None, [
        "data.name=digits", f"data.subset={subset}", "data.batch_size=16", "model.name=smallnet",
        "model.width=8", "optim.epochs=1", "output.progress=false", "output.checkpoint_every=0",
        "output.image_grid=false", f"device={device}", f"output.dir={tmp_path}", *augment])
    counter = counter if counter is not None else HostTraffic()
    with counter:
        summary = train(cfg, [], tmp_path / f"r{subset}")
    assert summary["status"] == "completed", summary["error"]
    return Counter(counter.events)


def per_step_sites(small: Counter, large: Counter) -> list[str]:
    """Call sites whose traffic grows with the number of steps (or batches evaluated)."""
    return [f"{what} at {site}: {small[(what, site)]} -> {n}"
            for (what, site), n in large.items() if n > small[(what, site)]]


#: A whole run's switches for the epoch check: the memory, its masked observe and a fallback.
EPOCH_AUGMENT = ["augment.prob=0.7", "augment.signal=cached", "augment.criterion=history",
                 "augment.fallback=skip", "augment.box=sample"]


def test_a_whole_epoch_and_its_evaluation_read_the_host_a_fixed_number_of_times(tmp_path):
    """The trainer's own loop (loader, step, the sums of train_epoch, validation and test):
    twice the training images make no more host traffic -- every copy and read is setup or a
    once-per-epoch read. (The mixed-batch preview, a one-off read for TensorBoard, is off.)"""
    small = epoch_traffic(tmp_path, 64, EPOCH_AUGMENT)
    large = epoch_traffic(tmp_path, 160, EPOCH_AUGMENT)
    assert small, "the guard saw nothing: it is not live"
    assert not per_step_sites(small, large), "\n".join(per_step_sites(small, large))


def test_the_guard_sees_each_kind_of_traffic_and_allows_host_draws():
    """The guard itself: each kind of host traffic is recorded with its call site; host
    generator draws and Python numbers as kernel arguments are not."""
    x = torch.randn(4, 3)

    def caught(fn) -> list[str]:
        mode = HostTraffic()
        with mode:
            fn()
        return [what for what, _ in mode.events]

    assert caught(lambda: torch.tensor([1, 2], device=x.device))[0].startswith("host->device")
    assert caught(lambda: x.new_tensor([1.0]))[0].startswith("host->device")
    assert caught(lambda: torch.arange(3).to(x.device))[0].startswith("host->device")
    for fn in (lambda: x.sum().item(), lambda: x.tolist(), lambda: x.numpy(), lambda: x.cpu(),
               lambda: bool(x.sum() > 0), lambda: float(x[0, 0]), lambda: int(x.argmax()),
               lambda: x.nonzero(), lambda: torch.where(x > 0), lambda: x.unique(),
               lambda: torch.equal(x, x), lambda: x.long().flatten().abs().bincount()):
        assert caught(fn) and caught(fn)[0].startswith("device->host"), caught(fn)
    assert caught(lambda: x[x > 0])[0].startswith("boolean-mask")
    assert caught(lambda: x.__setitem__(x > 0, 0.0))[0].startswith("boolean-mask")
    assert caught(lambda: x + torch.ones(3))[0].startswith("host tensor mixed")
    mode = HostTraffic()
    with mode:
        x.sum().item()
    assert "test_device_path.py" in mode.report() and "x.sum().item()" in mode.report()
    g = torch.Generator().manual_seed(0)
    assert not caught(lambda: (torch.rand(3, generator=g, dtype=torch.float64).numpy(),
                               float(torch._standard_gamma(torch.full((2,), 0.5))[0]),
                               torch.full((4,), 0.5, device=x.device) * 2 + x[:, 0],
                               x * torch.tensor(2.0), x.to(x.device), len(x), x.shape))


# ---- checkpoints that restore on another device ------------------------------------------------


def _generator_states() -> dict:
    """Every global generator's state as plain comparable values."""
    import random

    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(), "numpy": (np_state[1].tolist(),
                                                              *np_state[2:]),
            "python": random.getstate()}


def _saved_generator_states(state: dict) -> dict:
    n, p = state["rng"]["numpy"], state["rng"]["python"]
    return {"torch": state["rng"]["torch"].tolist(),
            "numpy": (n["keys"].tolist(), n["pos"], n["has_gauss"], n["gauss"]),
            "python": (p["version"], tuple(p["state"]), p["gauss"])}


#: The two hardness signals of the resume checks: the forward signal with per-sample boxes (the
#: device generator draws them), the cached signal with the history memory.
RESUME_AUGMENT = {
    "forward": ["augment.signal=forward", "augment.box=sample", "augment.prob=0.7"],
    "cached": ["augment.signal=cached", "augment.prob=0.5", "augment.criterion=history"],
}


def resume_round_trip(tmp_path: Path, monkeypatch, augment: list[str], device: str = "cpu",
                      stand_in: str | None = "meta") -> dict:
    """train (2 epochs, a checkpoint each) uninterrupted; train again, stopped after epoch 1;
    resume it. With ``stand_in`` the resumed run's device is that device while it restores
    (on the CPU, 'meta' stands in for a GPU: whatever the load path maps to the trainer's
    device has no host data, as a CUDA tensor has none a CPU generator could take). Returns
    the rows of both runs, the saved checkpoint and what every generator held right after the
    restore."""
    from hardmix.checkpoint import checkpoint_path, load_checkpoint
    from hardmix.config import RunConfig, load_config
    from hardmix.train import Callback, StopRun, _Run, train

    cfg = load_config(RunConfig, None, None, [
        "data.name=synthetic", "data.subset=256", "model.name=smallnet", "model.width=8",
        "data.batch_size=64", "optim.epochs=2", "output.checkpoint_every=1",
        "output.progress=false", "optim.lr=0.05", f"device={device}", f"output.dir={tmp_path}",
        *augment])

    class Rows(Callback):
        def __init__(self, stop_at=None):
            self.rows, self.stop_at = [], stop_at

        def on_epoch_end(self, metrics, checkpoint):
            self.rows.append(metrics)
            if metrics["epoch"] == self.stop_at:
                raise StopRun()

    full = Rows()
    train(cfg, [full], tmp_path / "full")
    first = Rows(stop_at=1)
    assert train(cfg, [first], tmp_path / "cut")["status"] == "pruned"
    saved = load_checkpoint(checkpoint_path(tmp_path / "cut"))
    restored = {}
    real_restore = _Run.restore

    def restore(self, path):
        home = self.device
        if stand_in is not None:
            self.device = torch.device(stand_in)
        try:
            real_restore(self, path)
        finally:
            self.device = home
        mix = copy.deepcopy(self.mix.state_dict())  # training goes on writing into them
        restored.update(globals=_generator_states(), host=mix["host_generator"],
                        devices=mix["device_generators"], signal=mix["signal"],
                        model_device=next(self.raw_model.parameters()).device)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            restored["cuda"] = torch.cuda.get_rng_state()

    monkeypatch.setattr(_Run, "restore", restore)
    second = Rows()
    train(cfg, [second], tmp_path / "cut", resume=True)
    return {"full": full.rows, "resumed": first.rows + second.rows, "saved": saved,
            "restored": restored}


def check_generators_restored(trip: dict) -> None:
    """Every generator -- torch, NumPy, Python, HardMix's host and device generators -- holds
    exactly the checkpoint's state after the restore; states stay host ByteTensors; the
    hardness memory lives where the model does."""
    saved, restored = trip["saved"], trip["restored"]
    assert saved["mix"]["device_generators"], "the mixer keeps no device generator"
    assert restored["globals"] == _saved_generator_states(saved)
    assert torch.equal(restored["host"], saved["mix"]["host_generator"])
    assert restored["devices"].keys() == saved["mix"]["device_generators"].keys()
    for key, gen_state in restored["devices"].items():
        assert gen_state.device.type == "cpu" and gen_state.dtype == torch.uint8
        assert torch.equal(gen_state, saved["mix"]["device_generators"][key])
    if "cuda" in restored and "cuda" in saved["rng"]:
        assert torch.equal(restored["cuda"], saved["rng"]["cuda"][0])
    for name, value in restored["signal"].items():
        if isinstance(value, torch.Tensor):
            assert value.device == restored["model_device"], name  # not on the stand-in
            assert torch.equal(value.cpu(), saved["mix"]["signal"][name]), name


@pytest.mark.parametrize("signal", RESUME_AUGMENT)
def test_resume_on_another_device_restores_every_generator_bit_exactly(tmp_path, monkeypatch,
                                                                        signal):
    """train -> stop -> resume with a 'meta' stand-in for the GPU on the load path: every
    generator comes back bit-exactly and the resumed rows equal the uninterrupted run's, for
    the forward and the cached signal."""
    from hardmix.metrics import EPOCH_METRICS, timings

    trip = resume_round_trip(tmp_path, monkeypatch, RESUME_AUGMENT[signal])
    check_generators_restored(trip)
    wall = set(timings())
    for a, b in zip(trip["full"], trip["resumed"], strict=True):
        for key in ("epoch", *EPOCH_METRICS):
            if key not in wall:
                assert a[key] == b[key] or (a[key] != a[key] and b[key] != b[key]), key


def device_generator_round_trip(tmp_path: Path, device: torch.device) -> None:
    """HardMix's per-sample draws come from a generator on the batch's device: its state goes
    into the checkpoint as a host ByteTensor, survives the file, and a fresh HardMix continues
    the stream exactly -- also when the state was saved for another index of the same kind of
    device (a retried trial on another GPU)."""
    from hardmix.checkpoint import load_checkpoint, save_checkpoint

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)
    x, y, logits = x.to(device), y.to(device), torch.randn(16, 5, generator=g).to(device)
    make = lambda seed: HardMix(method="hardmix", box="sample", prob=0.8, seed=seed)
    mix = make(0)
    for _ in range(3):
        mix(x.clone(), y, logits=logits)
    state = mix.state_dict()
    assert set(state["device_generators"]) == {str(device)}
    assert all(s.device.type == "cpu" and s.dtype == torch.uint8
               for s in state["device_generators"].values())
    expected = [mix(x.clone(), y, logits=logits) for _ in range(4)]
    path = save_checkpoint(tmp_path / "c.pt", {"model": {}, "config": {}, "mix": state})
    loaded = load_checkpoint(path)["mix"]
    other = f"{device.type}:7"
    other_index = {**loaded, "device_generators": {other: loaded["device_generators"][str(device)]}}
    for st in (loaded, other_index):
        resumed = make(123)  # another seed: only the state can make the draws equal
        resumed.load_state_dict(st)
        for a in expected:
            b = resumed(x.clone(), y, logits=logits)
            assert torch.equal(a.lam, b.lam) and torch.equal(a.source_index, b.source_index)
            assert torch.equal(a.x, b.x)


def test_a_device_generator_state_round_trips_through_a_checkpoint_file(tmp_path):
    device_generator_round_trip(tmp_path, torch.device("cpu"))
