"""Data sets, splits and the in-memory device loader (hardmix.data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hardmix.config import ConfigError, DataConfig
from hardmix.data import (DeviceLoader, build_data, carve, channel_stats, crop_flip,
                          stratified_split)
from hardmix.datasets import DATASETS, dataset


def preflight(cfg: DataConfig) -> None:
    """The registry entry's pre-flight check (what every entry point runs once)."""
    dataset(cfg.name).check(cfg)


def _labels(counts: list[int]) -> np.ndarray:
    return np.concatenate([np.full(c, i) for i, c in enumerate(counts)])


# ---- splits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_take", [0, 1, 7, 50, 99, 100])
def test_stratified_split_sizes_and_shares(n_take):
    y = _labels([40, 30, 20, 10])
    take, rest = stratified_split(y, n_take, seed=3)
    assert len(take) == n_take and len(rest) == len(y) - n_take
    assert set(take).isdisjoint(rest) and set(take) | set(rest) == set(range(len(y)))
    for cls, count in enumerate([40, 30, 20, 10]):  # each class within one of its quota
        assert abs((y[take] == cls).sum() - count * n_take / len(y)) < 1 + 1e-9
    again, _ = stratified_split(y, n_take, seed=3)
    np.testing.assert_array_equal(take, again)


def test_carve_subset_then_validation_disjoint_and_fixed():
    y = _labels([100] * 10)
    cfg = DataConfig(name="synthetic", subset=300, val_size=0.2)
    train, val = carve(cfg, y)
    assert len(train) == 240 and len(val) == 60
    assert set(train).isdisjoint(val)
    assert np.bincount(y[val], minlength=10).tolist() == [6] * 10
    # Fixed by the data, not by anything of the run: the same call gives the same split.
    train2, val2 = carve(cfg, y)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(val, val2)
    counted = DataConfig(name="synthetic", val_size=25)
    assert len(carve(counted, y)[1]) == 25


def test_split_errors_name_the_field():
    y = _labels([5, 5])
    with pytest.raises(ConfigError, match="data.subset"):
        carve(DataConfig(name="synthetic", subset=11), y)
    with pytest.raises(ConfigError, match="data.val_size"):
        carve(DataConfig(name="synthetic", val_size=10), y)


def test_channel_stats_match_numpy():
    x = torch.randint(0, 256, (50, 3, 5, 7), dtype=torch.uint8)
    mean, std = channel_stats(x, chunk=16)
    ref = x.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(std, ref.std(axis=(0, 2, 3)), rtol=1e-7)


# ---- crop + flip ----------------------------------------------------------------------------


def _matches_some_crop(out: torch.Tensor, img: torch.Tensor, pad: int, flip: bool) -> tuple:
    padded = F.pad(img, (pad,) * 4)
    h, w = img.shape[1:]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            if torch.equal(out, crop):
                return dy, dx, False
            if flip and torch.equal(out, crop.flip(2)):
                return dy, dx, True
    return None


def test_crop_flip_is_a_padded_crop_maybe_mirrored():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)  # no zeros: padding is visible
    out = crop_flip(x, pad=2, flip=True, gen=g)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    found = [_matches_some_crop(out[i], x[i], 2, True) for i in range(len(x))]
    assert all(f is not None for f in found)
    flips = sum(f[2] for f in found)
    offsets = {(f[0], f[1]) for f in found}
    assert 16 <= flips <= 48                    # about half are mirrored
    assert len(offsets) >= 12                   # offsets spread over the 5 x 5 possibilities


def test_crop_flip_without_padding_only_flips():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (32, 1, 6, 6), dtype=torch.uint8)
    out = crop_flip(x, pad=0, flip=True, gen=g)
    for i in range(len(x)):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(2))
    unflipped = crop_flip(x, pad=0, flip=False, gen=g)
    assert torch.equal(unflipped, x)


# ---- the device loader ----------------------------------------------------------------------


def _loader(n=100, bs=16, train=True, **kw) -> tuple[DeviceLoader, torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(n) % 10
    return DeviceLoader(x, y, bs, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), train=train, **kw), x, y


def test_device_loader_epoch_is_a_seeded_permutation():
    loader, x, y = _loader(crop_flip=False, seed=5)
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == len(loader) == 100 // 16
    idx = torch.cat([b[2] for b in batches])
    assert len(set(idx.tolist())) == len(idx)           # no repeats within an epoch
    for xb, yb, ib in batches:                          # every sample carries its index
        assert torch.equal(yb, y[ib])
        torch.testing.assert_close(xb, (x[ib].float() / 255 - 0.5) / 0.25)
    loader.set_epoch(1)
    assert torch.equal(torch.cat([b[2] for b in loader]), idx)      # (seed, epoch) fixes it
    loader.set_epoch(2)
    assert not torch.equal(torch.cat([b[2] for b in loader]), idx)
    other, _, _ = _loader(crop_flip=False, seed=6)
    other.set_epoch(1)
    assert not torch.equal(torch.cat([b[2] for b in other]), idx)


def test_device_loader_augmentation_is_reproducible():
    loader, _, _ = _loader(crop_flip=True, pad=4, seed=0)
    loader.set_epoch(3)
    first = [b[0] for b in loader]
    loader.set_epoch(3)
    second = [b[0] for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_device_loader_shards_ranks_disjoint_with_equal_steps():
    shards = []
    for rank in range(3):
        loader, _, _ = _loader(n=100, bs=8, seed=2, rank=rank, world_size=3, crop_flip=False)
        loader.set_epoch(1)
        shards.append(torch.cat([b[2] for b in loader]))
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == 32  # 33 // 8 * 8
    for a in range(3):
        for b in range(a + 1, 3):
            assert not set(shards[a].tolist()) & set(shards[b].tolist())


def test_eval_loader_reads_every_sample_once_across_ranks():
    seen = []
    for rank in range(2):
        loader, _, _ = _loader(n=37, bs=8, train=False, rank=rank, world_size=2)
        seen += torch.cat([b[2] for b in loader]).tolist()
    assert sorted(seen) == list(range(37))


def test_small_shard_gives_one_batch():
    loader, _, _ = _loader(n=10, bs=64, crop_flip=False)
    loader.set_epoch(1)
    (xb, yb, ib), = list(loader)
    assert len(ib) == 10


# ---- sources --------------------------------------------------------------------------------


def test_every_registered_dataset_is_a_valid_config_value():
    for name, spec in DATASETS.items():
        assert DataConfig(name=name).name == spec.name and spec.description
        facts = spec.facts(DataConfig(name=name)) if not spec.needs_path else None
        assert facts is None or (facts.train > 0 and facts.test > 0)


def test_synthetic_and_digits_build():
    syn = build_data(DataConfig(name="synthetic", batch_size=32, val_size=0.1))
    assert syn.sizes == {"train": 461, "val": 51, "test": 128}
    dig = build_data(DataConfig(name="digits", batch_size=64))
    assert sum(dig.sizes.values()) == 1797 and dig.num_classes == 10
    assert dig.in_channels == 1 and dig.image_size == 16
    dig.train.set_epoch(1)
    x, y, idx = next(iter(dig.train))
    assert x.shape == (64, 1, 16, 16) and x.dtype == torch.float32 and idx.max() < dig.sizes["train"]


def test_npz_roundtrip_hwc(tmp_path):
    rng = np.random.RandomState(0)
    path = tmp_path / "a.npz"
    np.savez(path, x_train=rng.randint(0, 256, (60, 8, 8, 3), dtype=np.uint8),
             y_train=np.arange(60) % 3, x_test=rng.randint(0, 256, (9, 8, 8, 3), dtype=np.uint8),
             y_test=np.arange(9) % 3, label_names=np.array(["a", "b", "c"]))
    d = build_data(DataConfig(name="npz", path=str(path), batch_size=10, val_size=0.2))
    assert d.sizes == {"train": 48, "val": 12, "test": 9}
    assert d.classes == ["a", "b", "c"] and d.in_channels == 3 and d.image_size == 8
    x, y, _ = next(iter(d.test))
    assert x.shape == (9, 3, 8, 8)


def test_npz_missing_arrays_is_a_config_error(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((2, 4, 4, 3), np.uint8), y_train=np.zeros(2))
    with pytest.raises(ConfigError, match=r"data.path.*missing: x_test, y_test"):
        preflight(DataConfig(name="npz", path=str(path)))


def test_cifar_missing_folder_names_it(tmp_path):
    with pytest.raises(ConfigError) as err:
        preflight(DataConfig(name="cifar10", path=str(tmp_path)))
    assert err.value.field == "data.path" and str(tmp_path) in str(err.value)
    assert "data.download=true" in str(err.value)


def test_folder_data(tmp_path):
    from PIL import Image

    rng = np.random.RandomState(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 256, (12, 12, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png")
    cfg = DataConfig(name="folder", path=str(tmp_path), image_size=8, batch_size=4, workers=0,
                     val_size=2)
    d = build_data(cfg)
    assert d.sizes == {"train": 10, "val": 2, "test": 4} and d.classes == ["cat", "dog"]
    d.train.set_epoch(1)
    batches = list(d.train)
    assert len(batches) == 2 and batches[0][0].shape == (4, 3, 8, 8)
    assert all(int(i) < 10 for b in batches for i in b[2])
    assert sum(len(b[1]) for b in d.test) == 4
