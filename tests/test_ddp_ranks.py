"""Data-parallel ranks stay distinct: each rank's mixing and augmentation streams derive from
(seed, rank, epoch) and survive a resume, while what must agree (the mix coin, the order)
agrees; a trial cannot put two NCCL ranks on one GPU; the device is the one the launcher
assigned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hardmix.cli import main
from hardmix.config import ConfigError, RunConfig, SweepConfig, load_config
from hardmix.data import STREAMS, DeviceLoader, FolderLoader, stream_seed
from hardmix.train import resolve_device

# ---- two gloo ranks on the CPU: train, stop, resume --------------------------------------------

RUN = ["data.name=synthetic", "model.name=smallnet", "model.width=8", "model.dropout=0.2",
       "data.batch_size=64", "optim.epochs=3", "output.progress=false", "optim.lr=0.05",
       "output.checkpoint_every=1", "output.tensorboard=false", "output.image_grid=false",
       # per-sample λ and sources from the rank's device stream; a coin that sometimes says no
       "augment.method=hardmix", "augment.signal=forward", "augment.bn_mode=train",
       "augment.box=sample", "augment.prob=0.5", "eval.every=3", "eval.test_every=3"]


def _ddp_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import torch.distributed as dist

    import hardmix.augment
    from hardmix.metrics import timings
    from hardmix.train import Callback, StopRun, train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    draws: list[dict] = []
    call = hardmix.augment.HardMix.__call__

    def recording_call(self, x, y, **kw):
        out = call(self, x, y, **kw)
        draws.append({"mixed": bool(out.mixed), "sources": out.source_index.tolist(),
                      "lam": out.lam.tolist()})
        return out

    hardmix.augment.HardMix.__call__ = recording_call

    class Stop(Callback):
        def __init__(self, at=None):
            self.at, self.metrics = at, []

        def on_epoch_end(self, metrics, checkpoint=None):
            self.metrics.append({k: v for k, v in metrics.items()
                                 if k not in timings()})
            if metrics["epoch"] == self.at:
                raise StopRun()

    try:
        cfg = load_config(RunConfig, None, None, RUN + [f"output.dir={out_dir}"])
        result = {}
        for name, run_dir, stop, resume in (("full", "full", None, False),
                                             ("cut", "cut", 1, False),
                                             ("resumed", "cut", None, True)):
            draws.clear()
            cb = Stop(stop)
            train(cfg, [cb], Path(out_dir) / run_dir, resume=resume)
            result[name] = {"draws": list(draws), "metrics": cb.metrics}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp / 'rendezvous'}", str(tmp)), nprocs=2,
             join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_ranks_draw_distinct_sources_and_lambda_before_and_after_a_resume(ranks):
    r0, r1 = ranks
    steps = len(r0["full"]["draws"]) // 3  # per epoch
    for run in ("full", "cut", "resumed"):
        a, b = r0[run]["draws"], r1[run]["draws"]
        assert [d["mixed"] for d in a] == [d["mixed"] for d in b]  # one coin for all ranks
        mixed = [(x, y) for x, y in zip(a, b) if x["mixed"]]
        assert mixed, run
        for x, y in mixed:  # every mixed step: each rank its own sources and λ
            assert x["sources"] != y["sources"] and x["lam"] != y["lam"], run
    # The resumed epochs draw what the uninterrupted run drew there, on every rank.
    for r in (r0, r1):
        assert r["cut"]["draws"] == r["full"]["draws"][:steps]
        assert r["resumed"]["draws"] == r["full"]["draws"][steps:]
        assert any(d["mixed"] for d in r["resumed"]["draws"])
        assert [d["mixed"] for d in r["full"]["draws"]] != [True] * 3 * steps  # a real coin
    assert r0["cut"]["metrics"] + r0["resumed"]["metrics"] == r0["full"]["metrics"]


# ---- the streams themselves ------------------------------------------------------------------


def test_stream_seeds_are_distinct_and_a_function_of_seed_rank_epoch():
    keys = [(s, r, e, n) for s in (0, 1) for r in range(4) for e in range(1, 4) for n in STREAMS]
    seeds = [stream_seed(*k) for k in keys]
    assert len(set(seeds)) == len(keys)
    assert seeds == [stream_seed(*k) for k in keys]
    assert all(0 <= s < 2 ** 63 for s in seeds)


def test_device_loader_crops_and_flips_differ_across_ranks_and_repeat_per_epoch():
    # Every image the same: two ranks' batches differ only through their crops and flips.
    image = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    x, y = image.expand(64, -1, -1, -1).contiguous(), torch.zeros(64, dtype=torch.long)

    def epoch(rank: int, e: int) -> torch.Tensor:
        loader = DeviceLoader(x, y, 16, (0.5,) * 3, (0.25,) * 3, train=True, pad=2, seed=3,
                              rank=rank, world_size=2)
        loader.set_epoch(e)
        return torch.cat([b[0] for b in loader])

    assert_streams_by_rank_and_epoch(epoch)


def assert_streams_by_rank_and_epoch(epoch) -> None:
    """``epoch(rank, e)``: ranks differ, an epoch repeats exactly, epochs differ."""
    assert not torch.equal(epoch(0, 1), epoch(1, 1))
    assert torch.equal(epoch(1, 1), epoch(1, 1))
    assert not torch.equal(epoch(1, 1), epoch(1, 2))


class _Draws(torch.utils.data.Dataset):
    """A random draw per item, from the worker's global generator (as a random crop would)."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int):
        return torch.rand(1), 0, i


def test_folder_loader_worker_seeds_differ_across_ranks_and_repeat_per_epoch():
    def epoch(rank: int, e: int) -> torch.Tensor:
        loader = FolderLoader(_Draws(), 4, train=True, workers=1, seed=3, device="cpu",
                              rank=rank, world_size=2)
        loader.set_epoch(e)
        return torch.cat([b[0] for b in loader])

    assert_streams_by_rank_and_epoch(epoch)


# ---- a GPU per rank; the device Ray assigns --------------------------------------------------


@pytest.mark.parametrize("gpus,ok", [(0.0, True), (0.5, False), (0.99, False), (1.0, True),
                                     (2.0, True)])
def test_fractional_gpus_with_several_workers_are_refused(gpus, ok, tmp_path):
    sets = [f"resources.gpus={gpus}", "resources.workers=2", "run.data.name=synthetic",
            f"storage={tmp_path}"]
    if ok:
        load_config(SweepConfig, overrides=sets)
        load_config(SweepConfig, overrides=sets[:1] + ["resources.workers=1"] + sets[2:])
        return
    with pytest.raises(ConfigError) as info:
        load_config(SweepConfig, overrides=sets)
    assert info.value.field == "resources.gpus" and "\n" not in str(info.value)
    load_config(SweepConfig, overrides=sets[:1] + ["resources.workers=1"] + sets[2:])  # packing


def test_fractional_gpus_with_workers_exit_2_before_work(tmp_path, capsys):
    code = main(["sweep", "--preset", "quickstart", "--set", "resources.gpus=0.5",
                 "--set", "resources.workers=2", "--set", f"storage={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "resources.gpus" in err[0]
    assert not any(tmp_path.iterdir())


@pytest.fixture
def four_gpus(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_the_assigned_device_wins_over_local_rank(four_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    # Ray gave this worker the GPU at index 2 of the visible ones (Ray's own example).
    assert resolve_device("auto", torch.device("cuda", 2)) == torch.device("cuda", 2)
    assert resolve_device("cuda", torch.device("cuda", 3)) == torch.device("cuda", 3)
    assert four_gpus == [2, 3]
    assert resolve_device("cuda") == torch.device("cuda", 0)  # no launcher: LOCAL_RANK
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    # A worker Ray gave no GPU trains on the CPU under auto; device=cuda says so.
    assert resolve_device("auto", torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match="given no GPU"):
        resolve_device("cuda", torch.device("cpu"))
