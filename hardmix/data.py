"""Data sets for one run: CIFAR-10/100, ``.npz`` arrays, image folders, scikit-learn's digits.

``build_data(cfg.data, seed, device)`` returns a :class:`Data` with three loaders (train, val,
test). Every training batch is ``(x, y, index)``: normalised float images on the device, labels
and each sample's index in the training split (0..n_train-1), which the ``cached`` hardness
signal uses as its memory address.

Two loader designs:

* In-memory sets (CIFAR, npz, digits, synthetic) use :class:`DeviceLoader`, after airbench: the
  whole split lives on the device as uint8; an epoch is a device ``randperm``; random crop with
  zero padding and horizontal flip are one ``gather`` per batch (the flip is folded into the
  column index), normalisation an in-place multiply and add. No DataLoader workers, no PIL, no Python
  loop over samples.
* ``folder`` data (ImageNet-style ``train/`` and ``val/``) uses torchvision's ``ImageFolder`` and
  a ``DataLoader`` with ``data.workers`` processes.

Splits are fixed by the data, not by the run seed (:data:`SPLIT_SEED`): the stratified subset and
the validation split carved from the training set are the same for every run of a sweep, so
validation errors of different seeds and configurations are comparable. The run seed fixes the
order of batches and the crops and flips (see :meth:`DeviceLoader.set_epoch`).

Under data-parallel training the order of an epoch is the same on every rank (each takes its
own disjoint slice of one permutation: :func:`epoch_seed`), while each rank's crops and flips,
and the seeds of a folder loader's workers, come from its own stream (:func:`stream_seed` of
seed, rank and epoch), so ranks never repeat each other's augmentation and a resumed run draws
what the uninterrupted run drew.

Data sets are entries of the registry in :mod:`hardmix.datasets` (load, checks, sizes); this
module only turns what they load into loaders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Optional, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from hardmix.config.schema import DataConfig
from hardmix.datasets import (DEFAULT_ROOT, SPLIT_SEED, Arrays, Folders, carve, dataset,
                              split_sizes, stratified_split)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

__all__ = ["Data", "DeviceLoader", "FolderLoader", "build_data", "crop_flip", "epoch_seed",
           "stream_seed", "STREAMS",
           "channel_stats", "carve", "split_sizes", "stratified_split", "Arrays", "Folders",
           "DEFAULT_ROOT", "SPLIT_SEED"]


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0-1 scale) of uint8 images ``(N, C, H, W)``, in float64."""
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk].to(torch.float64).div_(255.0)
        s += part.sum(dim=(0, 2, 3))
        s2 += part.square().sum(dim=(0, 2, 3))
    n = max(1, x.shape[0] * x.shape[2] * x.shape[3])
    mean = s / n
    std = (s2 / n - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


class Loader(Protocol):
    """What the training loop needs from a loader."""

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's data order and crops: a function of (run seed, epoch) only, so a
    resumed run draws exactly what the uninterrupted run drew."""
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2 ** 62)


#: The per-rank random streams of a run, each with its own key (:func:`stream_seed`): the global
#: torch generator (dropout, a folder loader's transforms without workers), the device loader's
#: crops and flips, a folder loader's worker seeds, and the mixer's device generator (sources,
#: per-sample λ and boxes).
STREAMS = {"global": 0, "crop": 1, "workers": 2, "mix": 3}


def stream_seed(seed: int, rank: int, epoch: int, stream: str) -> int:
    """The seed of one per-rank stream (:data:`STREAMS`) in one epoch: a function of (run seed,
    rank, epoch) only, so data-parallel ranks draw differently, a resumed run (on any number of
    ranks) draws exactly what the uninterrupted run drew, and the streams of one rank are
    independent of each other. A 63-bit int from numpy's ``SeedSequence`` (hashing, not
    arithmetic: no two (seed, rank, epoch) share a stream by accident)."""
    key = np.random.SeedSequence(int(seed), spawn_key=(int(rank), int(epoch), STREAMS[stream]))
    return int(key.generate_state(1, np.uint64)[0] >> np.uint64(1))


def crop_flip(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop with ``pad`` pixels of zero padding + random horizontal flip of a uint8 batch
    ``(B, C, H, W)``, as one gather: per-sample row/column offsets index the padded batch, and a
    flip reverses the column index."""
    b, c, h, w = x.shape
    dev = x.device
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
    hp, wp = x.shape[2], x.shape[3]
    rows = torch.arange(h, device=dev).expand(b, h)
    cols = torch.arange(w, device=dev).expand(b, w)
    if pad:
        rows = rows + torch.randint(0, 2 * pad + 1, (b, 1), generator=gen, device=dev)
        cols = cols + torch.randint(0, 2 * pad + 1, (b, 1), generator=gen, device=dev)
    if flip:
        flips = torch.rand(b, 1, generator=gen, device=dev) < 0.5
        cols = torch.where(flips, cols.flip(1), cols)
    lin = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, hp * wp).gather(2, lin).view(b, c, h, w)


class DeviceLoader:
    """Batches of an in-memory uint8 split kept on ``device`` (airbench's design).

    Training: each epoch a ``randperm`` from a generator seeded by :func:`epoch_seed`; under
    data-parallel training every rank draws the same permutation and takes the disjoint slice
    ``perm[rank::world_size]`` of equal length, so all ranks run the same number of steps.
    Crops and flips come from the rank's own generator (:func:`stream_seed`, ``crop``).
    Partial last batches are dropped (BatchNorm and the source batch want full batches) unless
    the shard is smaller than one batch. Evaluation: the rank's shard in order, no augmentation.
    Yields ``(x, y, index)``: normalised float images, labels, and indices into the split.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...], *, train: bool,
                 crop_flip: bool = True, pad: int = 4, flip: bool = True, seed: int = 0,
                 device: torch.device | str = "cpu", storage: torch.device | str | None = None,
                 rank: int = 0, world_size: int = 1,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.device = torch.device(device)
        self.storage = torch.device(storage) if storage is not None else self.device
        self.x = x.to(self.storage)
        self.y = y.to(self.storage)
        self.batch_size, self.train = batch_size, train
        self.crop_flip, self.pad, self.flip = crop_flip, pad, flip
        self.seed, self.epoch = seed, 0
        self.rank, self.world_size = rank, world_size
        self.memory_format = memory_format
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.neg_shift = -mean_t / std_t
        self.gen = torch.Generator(device=self.storage)  # the order: the same on every rank
        self.aug_gen = torch.Generator(device=self.storage)  # crops and flips: the rank's own
        n = len(self.x)
        self.shard_size = n // world_size if train else len(range(rank, n, world_size))

    def set_epoch(self, epoch: int) -> None:
        """Fix this epoch's order and augmentation (epochs are 1-based)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.train:
            return max(1, self.shard_size // self.batch_size) if self.shard_size else 0
        return math.ceil(self.shard_size / self.batch_size)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> float in the model's memory format, per-channel normalised: x / (255 std) -
        mean / std, in place on the new float tensor (3x faster on a CPU than ``addcmul``,
        which broadcasts two operands)."""
        x = x.to(self.device, non_blocking=True)
        return x.to(torch.float32, memory_format=self.memory_format).mul_(self.scale) \
            .add_(self.neg_shift)

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.x)
        if self.train:
            self.gen.manual_seed(epoch_seed(self.seed, self.epoch))
            perm = torch.randperm(n, generator=self.gen, device=self.storage)
            self.aug_gen.manual_seed(stream_seed(self.seed, self.rank, self.epoch, "crop"))
            order = perm[self.rank:self.shard_size * self.world_size:self.world_size]
            bs = self.batch_size if self.shard_size >= self.batch_size else self.shard_size
        else:
            order = torch.arange(self.rank, n, self.world_size, device=self.storage)
            bs = self.batch_size
        for i in range(len(self)):
            idx = order[i * bs:(i + 1) * bs]
            xb = self.x.index_select(0, idx)  # ~10x faster than x[idx] on a CPU
            if self.train and self.crop_flip:
                xb = crop_flip(xb, self.pad, self.flip, self.aug_gen)
            yield (self.normalize(xb),
                   self.y.index_select(0, idx).to(self.device, non_blocking=True),
                   idx.to(self.device, non_blocking=True))


class _Indexed(torch.utils.data.Dataset):
    """``(image, label, position)`` over a subset of a folder data set."""

    def __init__(self, base, indices: np.ndarray, transform):
        self.base, self.indices, self.transform = base, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, label = self.base[int(self.indices[i])]
        return self.transform(img), label, i


class FolderLoader:
    """A DataLoader over image files with ``workers`` processes; same interface as
    :class:`DeviceLoader`. Training shards with a seeded ``DistributedSampler`` under DDP (the
    same order on every rank, disjoint shards); the workers' seeds, and with them the random
    crops and flips, are the rank's own (:func:`stream_seed`, ``workers``)."""

    def __init__(self, dataset: torch.utils.data.Dataset, batch_size: int, *, train: bool,
                 workers: int, seed: int, device: torch.device | str, rank: int = 0,
                 world_size: int = 1):
        from torch.utils.data import DataLoader, DistributedSampler

        self.device = torch.device(device)
        self.train, self.seed, self.epoch, self.rank = train, seed, 0, rank
        # Evaluation reads every image exactly once across ranks (DistributedSampler would pad).
        self.sampler = (DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                           shuffle=True, seed=seed, drop_last=True)
                        if train else list(range(rank, len(dataset), world_size)))
        self.gen = torch.Generator()
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler,
                                 num_workers=workers, drop_last=train and len(dataset) >= batch_size,
                                 pin_memory=self.device.type == "cuda", generator=self.gen,
                                 persistent_workers=False)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        # Worker seeds (random crops) derive from this generator: (seed, rank, epoch).
        self.gen.manual_seed(stream_seed(self.seed, self.rank, epoch, "workers"))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for x, y, idx in self.loader:
            yield (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                   idx.to(self.device, non_blocking=True))


# --------------------------------------------------------------------------------------------
# Everything a run needs
# --------------------------------------------------------------------------------------------


@dataclass
class Data:
    """The three loaders of a run and what the model and the logs need to know."""

    train: Loader
    val: Optional[Loader]
    test: Loader
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    sizes: dict[str, int] = field(default_factory=dict)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images back to the 0-1 range (for image grids)."""
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x.float() * std + mean).clamp(0, 1)


def build_data(cfg: DataConfig, seed: int = 0, device: torch.device | str = "cpu",
               rank: int = 0, world_size: int = 1, *, test_only: bool = False,
               stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
               memory_format: torch.memory_format = torch.contiguous_format) -> Data:
    """Load ``cfg.name`` and build its loaders for ``device`` (rank ``rank`` of ``world_size``).

    ``stats`` (mean, std) replaces the per-channel statistics computed from the training split
    (evaluation of a checkpoint reuses the stored ones)."""
    raw = dataset(cfg.name).load(cfg)
    if isinstance(raw, Folders):
        return _folder_data(cfg, raw, seed, device, rank, world_size, stats)
    train_idx, val_idx = carve(cfg, raw.y_train)
    x_all = torch.from_numpy(raw.x_train)
    y_all = torch.from_numpy(raw.y_train)
    x_tr, y_tr = x_all[train_idx], y_all[train_idx]
    mean, std = stats or channel_stats(x_tr)
    storage = None if cfg.device_loader else "cpu"
    common = dict(mean=mean, std=std, device=device, storage=storage, rank=rank,
                  world_size=world_size, memory_format=memory_format)
    evaluate = lambda x, y: DeviceLoader(x, y, cfg.eval_batch_size, train=False, **common)
    train = None if test_only else DeviceLoader(
        x_tr, y_tr, cfg.batch_size, train=True, crop_flip=cfg.crop_flip, pad=cfg.pad,
        flip=raw.flip, seed=seed, **common)
    val = (evaluate(x_all[val_idx], y_all[val_idx]) if len(val_idx) and not test_only else None)
    test = evaluate(torch.from_numpy(raw.x_test), torch.from_numpy(raw.y_test))
    return Data(train=train, val=val, test=test, num_classes=raw.num_classes,
                in_channels=raw.x_train.shape[1], image_size=raw.x_train.shape[2], mean=mean,
                std=std, classes=raw.classes,
                sizes={"train": len(train_idx), "val": len(val_idx), "test": len(raw.x_test)})


def _folder_data(cfg: DataConfig, raw: Folders, seed: int, device, rank: int, world_size: int,
                 stats) -> Data:
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    mean, std = stats or (IMAGENET_MEAN, IMAGENET_STD)
    size = cfg.image_size
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    resize = [T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size)]
    train_tf = T.Compose(([T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
                          if cfg.crop_flip else resize) + norm)
    eval_tf = T.Compose(resize + norm)
    train_set = tvd.ImageFolder(str(raw.root / "train"))
    test_set = tvd.ImageFolder(str(raw.root / "val"))
    train_idx, val_idx = carve(cfg, raw.train_targets)
    kw = dict(workers=cfg.workers, seed=seed, device=device, rank=rank, world_size=world_size)
    train = FolderLoader(_Indexed(train_set, train_idx, train_tf), cfg.batch_size, train=True, **kw)
    val = (FolderLoader(_Indexed(train_set, val_idx, eval_tf), cfg.eval_batch_size, train=False,
                        **kw) if len(val_idx) else None)
    test = FolderLoader(_Indexed(test_set, np.arange(len(test_set)), eval_tf),
                        cfg.eval_batch_size, train=False, **kw)
    return Data(train=train, val=val, test=test, num_classes=len(raw.classes), in_channels=3,
                image_size=size, mean=tuple(mean), std=tuple(std), classes=raw.classes,
                sizes={"train": len(train_idx), "val": len(val_idx), "test": len(test_set)})
