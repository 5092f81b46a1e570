"""Loop ratio: in ONE run, the seed tutorial's training loop and our train stage's loop for the same FC net
(3072-1024-512-10, SGD lr 0.001, cross-entropy), each for the same number of training images of the real
CIFAR-10 JPEG copy; prints images/s of each and the ratio.

    python bench/loop_ratio.py [SAMPLES]     # default 20000

The seed's loop: torchvision ImageFolder over the JPEG files + ToTensor/Normalize(0.5) + DataLoader(batch 4,
shuffle, 2 workers), as in the tutorial. Ours: `python -m stages.train` on the tensors normalize wrote, at the
seed's batch 4 (same hyperparameters: the loop's own overhead) and at our FC preset's batch 512."""

from __future__ import annotations

import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from time_to_accuracy import PRESETS
from torch import nn

from workspace import CIFAR_JPEG_ZIP, header, make_workspace, read_metrics, run_stage


class SeedNet(nn.Module):  # the tutorial's fully connected network
    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.layers = nn.Sequential(nn.Linear(3 * 32 * 32, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(),
                                    nn.Linear(512, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.flatten(x))


def seed_loop(train_dir: Path, samples: int) -> float:
    import torchvision
    import torchvision.transforms as transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    dataset = torchvision.datasets.ImageFolder(str(train_dir), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, num_workers=2)
    net, criterion = SeedNet(), nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001)
    seen, start = 0, time.perf_counter()
    for inputs, labels in loader:
        optimizer.zero_grad()
        loss = criterion(net(inputs), labels)
        loss.backward()
        optimizer.step()
        seen += labels.shape[0]
        if seen >= samples:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    samples = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    header(f"loop ratio, {samples} training images each")
    with tempfile.TemporaryDirectory() as scratch:
        with zipfile.ZipFile(CIFAR_JPEG_ZIP) as archive:  # zipfile drops absolute paths and ".." from names
            archive.extractall(scratch, [m for m in archive.namelist() if "/train/" in m])
        train_dir = next(Path(scratch).glob("*/train"))
        seed_rate = seed_loop(train_dir, samples)
    print(f"seed tutorial loop (ImageFolder + DataLoader, batch 4): {seed_rate:8.0f} img/s", flush=True)

    root = make_workspace()
    run_stage(root, "download", quiet=True)
    results = {}
    for name, batch in (("seed", 4), ("fc", 512)):
        overrides = {**PRESETS[name], "data.val_fraction": 0.0, "normalize.stats": "fixed"}
        run_stage(root, "normalize", overrides, quiet=True)
        n_train = 50000
        overrides.update({"train.epochs": samples / n_train, "train.batch_size": batch})
        run_stage(root, "train", overrides, quiet=True)
        results[name] = read_metrics(root)["train_time"]["images_per_second"]
        print(f"our train stage, FC net, batch {batch:>3d}: {results[name]:8.0f} img/s "
              f"= {results[name] / seed_rate:5.1f}x the seed's loop", flush=True)
    print(f"\n| loop | images/s | ratio |\n|---|---|---|\n| seed tutorial (batch 4) | {seed_rate:.0f} | 1.0x |")
    for name, batch in (("seed", 4), ("fc", 512)):
        print(f"| train stage, batch {batch} | {results[name]:.0f} | {results[name] / seed_rate:.1f}x |")


if __name__ == "__main__":
    main()
