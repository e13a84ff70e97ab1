"""Images per second of the in-memory device loader against a torchvision DataLoader.

Both read the same uint8 arrays (the real CIFAR-10 file when present, else random images) and
produce the same thing: batches of 128 normalised float images after a random 32-px crop with
4 px of zero padding and a random horizontal flip, plus labels. The reference is the usual
torchvision pipeline: a Dataset yielding PIL images through ``RandomCrop(32, padding=4)``,
``RandomHorizontalFlip``, ``ToTensor`` and ``Normalize``, in a ``DataLoader`` with
``num_workers=2``. Rounds are interleaved; medians of wall-clock throughput are reported (the
reference runs in other processes, so thread CPU time would not compare). Worker start-up is
excluded (timing starts at the first batch). The main process uses one torch thread by default.

    python benchmarks/bench_loader.py [--npz PATH] [--images 10240] [--rounds 3] [--threads 1]

Last line: ``device_loader_speedup=<x>`` (target >= 10).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hardmix.data import DeviceLoader, channel_stats  # noqa: E402

BATCH = 128


class PilDataset(torch.utils.data.Dataset):
    """The torchvision-style reference: HWC uint8 arrays -> PIL -> transforms."""

    def __init__(self, x_hwc: np.ndarray, y: np.ndarray, mean, std):
        import torchvision.transforms as T

        self.x, self.y = x_hwc, y
        self.tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                             T.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.tf(Image.fromarray(self.x[i])), int(self.y[i])


def load(npz: str | None, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    path = Path(npz) if npz else REPO.parent / "shared/data/cifar10.npz"
    if path.is_file():
        with np.load(path) as f:
            x, y = f["x_train"], f["y_train"]
        pick = np.random.RandomState(0).permutation(len(x))[:n]
        return np.ascontiguousarray(x[pick]), y[pick].astype(np.int64), str(path)
    rng = np.random.RandomState(0)
    return (rng.randint(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            rng.randint(0, 10, n).astype(np.int64), "random images (no CIFAR-10 file found)")


def time_epoch(batches) -> float:
    """Images per second from the first batch to the end of the pass."""
    it = iter(batches)
    first = next(it)
    n = len(first[0])
    t0 = time.perf_counter()
    for x, y, *_ in it:
        n += len(x)
    return (n - len(first[0])) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--npz", help="arrays file (default: ../shared/data/cifar10.npz)")
    ap.add_argument("--images", type=int, default=10240, help="images per timed pass")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the main process (DataLoader workers use one each)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes: checks that the script runs and prints its last line (CI); not a measurement")
    args = ap.parse_args()
    if args.smoke:
        args.images, args.rounds = 512, 1
    # One thread: the per-batch ops are small, and on a shared machine OpenMP threads that spin
    # while waiting for a core cost more than they bring (see README, Benchmarks).
    torch.set_num_threads(args.threads)

    x_hwc, y, source = load(args.npz, args.images)
    x_nchw = torch.from_numpy(x_hwc).permute(0, 3, 1, 2).contiguous()
    mean, std = channel_stats(x_nchw)
    device_loader = DeviceLoader(x_nchw, torch.from_numpy(y), BATCH, mean, std, train=True,
                                 crop_flip=True, pad=4, seed=0, device=args.device)
    reference = torch.utils.data.DataLoader(PilDataset(x_hwc, y, mean, std), batch_size=BATCH,
                                            shuffle=True, num_workers=2, drop_last=True,
                                            persistent_workers=True)
    print(f"data: {source}, {len(y)} images, batch {BATCH}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    ours, theirs = [], []
    for r in range(args.rounds):
        device_loader.set_epoch(r + 1)
        ours.append(time_epoch(device_loader))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        theirs.append(time_epoch(reference))
        print(f"round {r + 1}: device loader {ours[-1]:,.0f} img/s, "
              f"DataLoader(num_workers=2) {theirs[-1]:,.0f} img/s")
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"median: device loader {a:,.0f} img/s, torchvision DataLoader {b:,.0f} img/s")
    print(f"device_loader_speedup={a / b:.1f}")


if __name__ == "__main__":
    main()
