"""The dataset registry: every ``data.name`` as one entry (load, pre-flight check, sizes,
description). Nothing else branches on a data set's name.

A :class:`DatasetSpec` says how to load a data set into memory (:class:`Arrays`) or as an image
folder (:class:`Folders`), how to check before any work that it is there and usable
(``check``: files exist, archives are readable and hold what they must), and what its sizes are
without loading it (``facts``: for ``data.subset`` checks and the sweep's compute estimate).
Add one with :func:`register_dataset`. Loaders import torch or torchvision inside their body, so
importing this module (config validation, ``--help``) stays torch-free.
"""

from __future__ import annotations

import functools
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from hardmix.errors import ConfigError

#: A :class:`hardmix.config.DataConfig`: the registry reads its fields but does not import the
#: config, which imports this registry (its choices, a data set's own fields).
DataConfig = Any

__all__ = ["Arrays", "Folders", "Facts", "DatasetSpec", "DATASETS", "register_dataset",
           "dataset", "DEFAULT_ROOT", "NPZ_KEYS", "SPLIT_SEED", "stratified_split",
           "split_sizes", "carve", "named_after"]

DEFAULT_ROOT = "~/.cache/hardmix/data"
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
#: Splits are fixed by the data, not the run seed: every run of a sweep sees the same ones.
SPLIT_SEED = 0
#: digits are 8x8; upsampled to this side so the networks' pooling stages have room.
DIGITS_SIZE = 16
#: synthetic data: a learnable toy problem for tests (class prototypes + noise).
SYNTHETIC = {"train": 512, "test": 128, "classes": 10, "size": 16}


@dataclass
class Arrays:
    """A whole in-memory data set: uint8 images ``(N, C, H, W)`` and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    source: str = ""  # where the arrays came from, for the logs
    #: horizontal flips are part of ``crop_flip`` only where they keep the label (not digits).
    flip: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Folders:
    """An ImageNet-style folder: ``root/train/<class>/*`` and ``root/val/<class>/*``."""

    root: Path
    classes: list[str]
    train_targets: np.ndarray
    test_size: int


@dataclass(frozen=True)
class Facts:
    """Sizes of a data set known before loading it: training images (before ``subset`` and the
    validation split), test images, channels, image side, classes (None when unknown)."""

    train: int
    test: int
    channels: int
    size: int
    classes: Optional[int]


def _no_check(cfg: "DataConfig") -> None:
    return None


def _no_facts(cfg: "DataConfig") -> Optional[Facts]:
    return None


def _always_present(cfg: "DataConfig") -> bool:
    return True


#: ``data`` fields only one kind of pipeline reads: arrays go through the device-resident
#: loader (padding for the crop, where the arrays live), folders through torchvision transforms
#: and a DataLoader (resize, worker processes). Every other ``data`` field is read by both.
ARRAY_FIELDS = ("pad", "device_loader")
FOLDER_FIELDS = ("image_size", "workers")


@dataclass(frozen=True)
class DatasetSpec:
    """One value of ``data.name``. ``load(cfg) -> Arrays | Folders``; ``check(cfg)`` raises a
    ConfigError before any work when the data cannot be used; ``facts(cfg)`` the sizes (or
    None when they are unknown without reading every file); ``needs_path``: ``data.path`` is
    required; ``label``: how the logs name it; ``reads``: the pipeline-specific ``data`` fields
    it uses (:data:`ARRAY_FIELDS` for arrays, plus ``download`` where it can fetch).

    For a plan made where the data are not (``hardmix sweep --dry-run``): ``present(cfg)``
    says whether they are here (or will be fetched); ``shape``: the sizes every copy of the
    data set has, where they are fixed (CIFAR-10/100); ``absent_facts(cfg)``: the sizes known
    while the files are absent (by default ``shape``)."""

    name: str
    description: str
    load: Callable[["DataConfig"], "Arrays | Folders"]
    check: Callable[["DataConfig"], None] = _no_check
    facts: Callable[["DataConfig"], Optional[Facts]] = _no_facts
    needs_path: bool = False
    label: Optional[Callable[["DataConfig"], str]] = None
    reads: tuple[str, ...] = ARRAY_FIELDS
    present: Callable[["DataConfig"], bool] = _always_present
    shape: Optional[Facts] = None
    absent_facts: Optional[Callable[["DataConfig"], Optional[Facts]]] = None

    def describe(self, cfg: "DataConfig") -> str:
        return self.label(cfg) if self.label else f"{self.name} ({cfg.path})"

    def planned_facts(self, cfg: "DataConfig") -> Optional[Facts]:
        """The sizes a plan uses: the files' where they are here, else the ones known without
        them (:attr:`shape`, :attr:`absent_facts`); None when neither tells."""
        if self.present(cfg):
            return self.facts(cfg)
        return self.absent_facts(cfg) if self.absent_facts else self.shape


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Make a data set available as ``data.name``."""
    DATASETS[spec.name] = spec
    return spec


def dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ConfigError("data.name", name, f"must be one of {', '.join(DATASETS)}")
    return DATASETS[name]


# --------------------------------------------------------------------------------------------
# Splits (pure NumPy)
# --------------------------------------------------------------------------------------------


def stratified_split(y: np.ndarray, n_take: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(take, rest)``: ``take`` has exactly ``n_take`` samples with class shares as in
    ``y`` (largest remainder), both sorted."""
    y = np.asarray(y)
    n_take = int(min(max(n_take, 0), len(y)))
    rng = np.random.RandomState(seed)
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * n_take / len(y) if len(y) else counts * 0.0
    take_n = np.floor(quota).astype(int)
    short = n_take - int(take_n.sum())
    if short > 0:  # largest remainders first; ties broken by the seeded order
        order = np.lexsort((rng.permutation(len(classes)), -(quota - take_n)))
        take_n[order[:short]] += 1
    take, rest = [], []
    for cls, k in zip(classes, take_n):
        members = np.flatnonzero(y == cls)
        members = members[rng.permutation(len(members))]
        take.append(members[:k])
        rest.append(members[k:])
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    return cat(take), cat(rest)


def split_sizes(cfg: "DataConfig", n_train_total: int) -> tuple[int, int]:
    """``(n_used, n_val)``: training images after ``subset``, and how many of them are held out."""
    if cfg.subset and cfg.subset > n_train_total:
        raise ConfigError("data.subset", cfg.subset, f"must be <= {n_train_total} (the training "
                                                     f"images of data.name={cfg.name})")
    n = cfg.subset or n_train_total
    n_val = int(round(cfg.val_size * n)) if cfg.val_size < 1 else int(cfg.val_size)
    if n_val >= n:
        raise ConfigError("data.val_size", cfg.val_size,
                          f"leaves no training images ({n} available after data.subset)")
    if cfg.batch_size > n - n_val:  # one short step per epoch would train at chance, silently
        raise ConfigError("data.batch_size", cfg.batch_size,
                          f"must be <= the {n - n_val} training images left after data.subset "
                          f"and data.val_size")
    return n, n_val


def carve(cfg: "DataConfig", y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)`` into the full training set: stratified subset, then a
    stratified validation split of it (both fixed by the data: :data:`SPLIT_SEED`)."""
    n, n_val = split_sizes(cfg, len(y))
    used = np.arange(len(y)) if n == len(y) else stratified_split(y, n, SPLIT_SEED)[0]
    val, train = stratified_split(y[used], n_val, SPLIT_SEED + 1)
    return used[train], used[val]


# --------------------------------------------------------------------------------------------
# npz: arrays x_train, y_train, x_test, y_test (+ label_names)
# --------------------------------------------------------------------------------------------


#: The smallest image side the models and the crop take (scikit-learn's digits are 8x8).
MIN_IMAGE_SIDE = 8


def _npz_path(cfg: "DataConfig") -> Path:
    return Path(os.path.expanduser(cfg.path or ""))


def _image_layout(shape: tuple, name: str, path: str) -> tuple[int, int, int]:
    """``(channels, height, width)`` of an image array shape (N, H, W), (N, H, W, C) or
    (N, C, H, W) with 1 or 3 channels."""
    if len(shape) == 3:
        return 1, shape[1], shape[2]
    if len(shape) != 4:
        raise ConfigError("data.path", path, f"{name} must be images (N, H, W), (N, H, W, C) or "
                                             f"(N, C, H, W); it has shape {tuple(shape)}")
    if shape[-1] in (1, 3) and shape[1] not in (1, 3):
        return shape[-1], shape[1], shape[2]
    if shape[1] in (1, 3):
        return shape[1], shape[2], shape[3]
    raise ConfigError("data.path", path, f"{name} must have 1 or 3 channels (first or last "
                                         f"axis); it has shape {tuple(shape)}")


def _npz_headers(path: Path) -> dict[str, tuple[tuple, np.dtype]]:
    """``{array: (shape, dtype)}`` from the archive's .npy headers, without reading the data."""
    out = {}
    with zipfile.ZipFile(path) as z:
        for member in z.namelist():
            with z.open(member) as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(f)
            out[member[:-4] if member.endswith(".npy") else member] = (tuple(shape), dtype)
    return out


@functools.lru_cache(maxsize=8)
def _npz_facts_cached(path: str, mtime: float, size: int) -> tuple[Facts, tuple[str, ...]]:
    p = Path(path)
    try:
        headers = _npz_headers(p)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ConfigError("data.path", path, f"is not a readable .npz archive ({exc})") from None
    missing = [k for k in NPZ_KEYS if k not in headers]
    if missing:
        raise ConfigError("data.path", path, f"must hold arrays {', '.join(NPZ_KEYS)} "
                                             f"(missing: {', '.join(missing)})")
    layouts = {}
    for name in ("x_train", "x_test"):
        shape, dtype = headers[name]
        if dtype.kind not in "uif" or dtype.kind == "c":
            raise ConfigError("data.path", path, f"{name} must hold numbers (uint8 0-255 or "
                                                 f"float 0-1), not {dtype}")
        layouts[name] = _image_layout(shape, name, path)
        if shape[0] < 1:
            raise ConfigError("data.path", path, f"{name} holds no images")
    if layouts["x_train"] != layouts["x_test"]:
        raise ConfigError("data.path", path, f"x_train and x_test images differ in shape "
                                             f"({layouts['x_train']} vs {layouts['x_test']})")
    try:
        with np.load(p, allow_pickle=False) as f:
            labels = {k: np.asarray(f[k]) for k in ("y_train", "y_test")}
            names = ([str(n) for n in np.asarray(f["label_names"]).reshape(-1)]
                     if "label_names" in f.files else None)
    except Exception as exc:  # noqa: BLE001 - any unreadable member is the user's input
        raise ConfigError("data.path", path, f"is not a readable .npz archive ({exc})") from None
    for k, y in labels.items():
        x_name = "x" + k[1:]
        if y.ndim != 1 and not (y.ndim == 2 and y.shape[1] == 1):
            raise ConfigError("data.path", path, f"{k} must be a vector of labels, has shape "
                                                 f"{y.shape}")
        if y.dtype.kind not in "iu":
            raise ConfigError("data.path", path, f"{k} must hold integer labels, not {y.dtype}")
        if len(y) != headers[x_name][0][0]:
            raise ConfigError("data.path", path, f"{k} has {len(y)} labels for "
                                                 f"{headers[x_name][0][0]} images in {x_name}")
        if len(y) and int(y.min()) < 0:
            raise ConfigError("data.path", path, f"{k} holds a negative label ({int(y.min())})")
    top = max(int(labels["y_train"].max(initial=0)), int(labels["y_test"].max(initial=0)))
    classes = len(names) if names else top + 1
    if top >= classes:
        raise ConfigError("data.path", path, f"labels go up to {top} but label_names lists "
                                             f"{classes} classes")
    if classes < 2:
        raise ConfigError("data.path", path, "must hold at least 2 classes")
    n_train = len(labels["y_train"])
    if classes > n_train:
        raise ConfigError("data.path", path, f"implies {classes} classes for {n_train} "
                                             f"training images (a head wider than the data)")
    used = len(np.unique(labels["y_train"]))
    if not names and used < classes / 2:  # ids are the class count: a sparse id is a bug
        raise ConfigError("data.path", path, f"y_train uses {used} distinct labels but its "
                                             f"largest id implies {classes} classes: number the "
                                             f"classes 0..n-1 or give label_names")
    c, h, w = layouts["x_train"]
    if h != w:
        raise ConfigError("data.path", path, f"images must be square, are {h}x{w}")
    if h < MIN_IMAGE_SIDE:
        raise ConfigError("data.path", path, f"images must be at least {MIN_IMAGE_SIDE}x"
                                             f"{MIN_IMAGE_SIDE} pixels (the models' stems and "
                                             f"the crop), are {h}x{w}")
    return (Facts(len(labels["y_train"]), len(labels["y_test"]), c, h, classes),
            tuple(names or [str(i) for i in range(classes)]))


def _npz_facts(cfg: "DataConfig") -> Facts:
    return _npz_read_facts(cfg)[0]


def _npz_read_facts(cfg: "DataConfig") -> tuple[Facts, tuple[str, ...]]:
    p = _npz_path(cfg)
    if not cfg.path:
        raise ConfigError("data.path", cfg.path, "is required for data.name=npz")
    if not p.is_file():
        raise ConfigError("data.path", cfg.path, "must be an existing .npz file")
    st = p.stat()
    return _npz_facts_cached(str(p), st.st_mtime, st.st_size)


def _check_npz(cfg: "DataConfig") -> None:
    _npz_read_facts(cfg)


def _npz_present(cfg: "DataConfig") -> bool:
    return bool(cfg.path) and _npz_path(cfg).is_file()


def named_after(path: Optional[str]) -> Optional["DatasetSpec"]:
    """The registered data set of fixed sizes a file is named after (``cifar10.npz``,
    ``CIFAR-100.npz``: its name without the extension and punctuation), if any."""
    if not path:
        return None
    spec = DATASETS.get(re.sub(r"[^a-z0-9]", "", Path(str(path)).stem.lower()))
    return spec if spec is not None and spec.shape is not None else None


def _npz_named_shape(cfg: "DataConfig") -> Optional[Facts]:
    """A missing file named after a data set of fixed sizes stands for that data set's
    :attr:`DatasetSpec.shape` (:func:`named_after`); any other name for nothing."""
    spec = named_after(cfg.path)
    return spec.shape if spec is not None else None


def _to_nchw_uint8(x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:  # grey images without a channel axis
        x = x[:, None]
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.floating) and float(np.nanmax(x, initial=0)) <= 1.0:
            x = x * 255.0
        x = np.clip(np.nan_to_num(np.rint(x)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x)


def load_npz(cfg: "DataConfig") -> Arrays:
    """Arrays ``x_train, y_train, x_test, y_test`` (+ optional ``label_names``) from a .npz file
    (checked first: keys, shapes, channels, lengths, label range)."""
    facts, names = _npz_read_facts(cfg)
    path = str(_npz_path(cfg))
    with np.load(path, allow_pickle=False) as f:
        x_train, x_test = _to_nchw_uint8(f["x_train"]), _to_nchw_uint8(f["x_test"])
        y_train = np.asarray(f["y_train"]).astype(np.int64).reshape(-1)
        y_test = np.asarray(f["y_test"]).astype(np.int64).reshape(-1)
    return Arrays(x_train, y_train, x_test, y_test, list(names), source=path)


register_dataset(DatasetSpec(
    "npz", "arrays file: x_train, y_train, x_test, y_test (+ label_names), HWC or CHW, uint8",
    load_npz, _check_npz, _npz_facts, needs_path=True, present=_npz_present,
    absent_facts=_npz_named_shape))


# --------------------------------------------------------------------------------------------
# CIFAR-10/100 from torchvision's folder
# --------------------------------------------------------------------------------------------

#: torchvision's class, its folder, and the sizes of every copy (50,000 / 10,000 32x32 RGB).
_CIFAR = {"cifar10": ("CIFAR10", "cifar-10-batches-py", Facts(50000, 10000, 3, 32, 10)),
          "cifar100": ("CIFAR100", "cifar-100-python", Facts(50000, 10000, 3, 32, 100))}


def cifar_root(cfg: "DataConfig") -> Path:
    return Path(os.path.expanduser(cfg.path or DEFAULT_ROOT))


def _cifar_check(cfg: "DataConfig") -> None:
    _, sub, _ = _CIFAR[cfg.name]
    root = cifar_root(cfg)
    if cfg.download:
        return
    if not (root / sub).is_dir():
        raise ConfigError("data.path", str(root), f"holds no {cfg.name} ({root / sub} is "
                          "missing): set data.download=true, point data.path at a torchvision "
                          "CIFAR folder, or use data.name=npz with a .npz file")


def _cifar_present(cfg: "DataConfig") -> bool:
    return bool(cfg.download) or (cifar_root(cfg) / _CIFAR[cfg.name][1]).is_dir()


def _cifar_facts(cfg: "DataConfig") -> Facts:
    return _CIFAR[cfg.name][2]


def _cifar_load(cfg: "DataConfig") -> Arrays:
    import torchvision.datasets as tvd

    cls_name = _CIFAR[cfg.name][0]
    cls = getattr(tvd, cls_name)
    root = cifar_root(cfg)
    sets = []
    for train in (True, False):
        try:
            sets.append(cls(str(root), train=train, download=cfg.download))
        except RuntimeError as exc:
            raise ConfigError("data.path", str(root), f"holds no {cls_name} ({exc}); set "
                              "data.download=true, or point data.path at a torchvision CIFAR "
                              "folder, or use data.name=npz with a .npz file") from None
        except OSError as exc:  # download failed: offline, no permission
            raise ConfigError("data.download", True, f"could not download {cls_name} into "
                              f"{root} ({exc}); place the torchvision folder there by hand "
                              "or use data.name=npz") from None
    tr, te = sets
    return Arrays(np.ascontiguousarray(tr.data.transpose(0, 3, 1, 2)),
                  np.asarray(tr.targets, np.int64),
                  np.ascontiguousarray(te.data.transpose(0, 3, 1, 2)),
                  np.asarray(te.targets, np.int64), list(tr.classes), source=str(root))


for _name in _CIFAR:
    register_dataset(DatasetSpec(
        _name, f"{_name.upper().replace('CIFAR', 'CIFAR-')} from torchvision's folder "
               f"(data.path, default {DEFAULT_ROOT}; data.download=true fetches it)",
        _cifar_load, _cifar_check, _cifar_facts, reads=ARRAY_FIELDS + ("download",),
        present=_cifar_present, shape=_CIFAR[_name][2],
        label=lambda cfg: f"{cfg.name} ({cfg.path or 'torchvision folder ' + DEFAULT_ROOT})"))


# --------------------------------------------------------------------------------------------
# scikit-learn's bundled digits (offline) and synthetic images (tests)
# --------------------------------------------------------------------------------------------


def load_digits(cfg: "DataConfig") -> Arrays:
    """scikit-learn's bundled 8x8 digits (1,797 real images, offline), upsampled to
    ``DIGITS_SIZE`` px; a fixed stratified 20% is the test set (the set has no official split).
    ``crop_flip`` crops but never flips them: a mirrored digit is not the same digit."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    y = d.target.astype(np.int64)
    test, train = stratified_split(y, round(0.2 * len(y)), SPLIT_SEED)
    return Arrays(x[train], y[train], x[test], y[test], [str(i) for i in range(10)],
                  source="sklearn.datasets.load_digits", flip=False)


register_dataset(DatasetSpec(
    "digits", "scikit-learn's bundled 1,797 real 8x8 digits, upsampled to 16x16 (offline)",
    load_digits, facts=lambda cfg: Facts(1438, 359, 1, DIGITS_SIZE, 10),
    label=lambda cfg: "digits (scikit-learn's bundled 8x8 digit images, offline)"))


def load_synthetic(cfg: "DataConfig") -> Arrays:
    """Tiny random images for tests: each class is a fixed random low-frequency pattern plus
    noise, so a network can learn it in a few steps."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1234)
    c, s = SYNTHETIC["classes"], SYNTHETIC["size"]
    protos = F.interpolate(torch.rand(c, 3, 4, 4, generator=g), size=(s, s), mode="bilinear",
                           align_corners=False)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = torch.arange(n) % c
        x = protos[y] * 0.6 + torch.rand(n, 3, s, s, generator=g) * 0.4
        return (x * 255).round().to(torch.uint8).numpy(), y.numpy().astype(np.int64)

    xtr, ytr = make(SYNTHETIC["train"])
    xte, yte = make(SYNTHETIC["test"])
    return Arrays(xtr, ytr, xte, yte, [f"class{i}" for i in range(c)], source="synthetic")


register_dataset(DatasetSpec(
    "synthetic", "random class-pattern images (tests only)", load_synthetic,
    facts=lambda cfg: Facts(SYNTHETIC["train"], SYNTHETIC["test"], 3, SYNTHETIC["size"],
                            SYNTHETIC["classes"]),
    label=lambda cfg: "synthetic images (tests only)"))


# --------------------------------------------------------------------------------------------
# ImageNet-style folders
# --------------------------------------------------------------------------------------------


def _folder_check(cfg: "DataConfig") -> None:
    if not cfg.path:
        raise ConfigError("data.path", cfg.path, "is required for data.name=folder")
    root = Path(os.path.expanduser(cfg.path))
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise ConfigError("data.path", cfg.path, f"must hold {sub}/<class>/ image folders "
                                                     f"(no {root / sub})")


def _folder_present(cfg: "DataConfig") -> bool:
    root = Path(os.path.expanduser(cfg.path or ""))
    return bool(cfg.path) and all((root / sub).is_dir() for sub in ("train", "val"))


def load_folder(cfg: "DataConfig") -> Folders:
    """An ImageNet-style folder with ``train/`` and ``val/`` class sub-folders (val = test)."""
    import torchvision.datasets as tvd

    _folder_check(cfg)
    root = Path(os.path.expanduser(cfg.path or ""))
    try:
        train = tvd.ImageFolder(str(root / "train"))
        test = tvd.ImageFolder(str(root / "val"))
    except (FileNotFoundError, RuntimeError) as exc:
        raise ConfigError("data.path", cfg.path, f"is not an image folder ({exc})") from None
    if train.classes != test.classes:
        raise ConfigError("data.path", cfg.path, "train/ and val/ must have the same classes")
    return Folders(root, list(train.classes), np.asarray(train.targets, np.int64), len(test))


register_dataset(DatasetSpec(
    "folder", "ImageNet-style image folder with train/ and val/ class sub-folders "
              "(torchvision ImageFolder + DataLoader)", load_folder, _folder_check,
    needs_path=True, reads=FOLDER_FIELDS, present=_folder_present))
