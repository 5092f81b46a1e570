"""Benchmark: an image-folder zip through download (canonical images.zip) and normalize (decode to tensors).

    .venv/bin/python bench/decode.py [--zip ../shared/datasets/cifar10-jpeg.zip] [--image-size 32]

Runs both stages in-process in a temporary project folder (the zip is linked into its data/sources/), prints the
machine, library versions, the command and the wall time and images per second of each stage. Nothing in the
repository is touched. A measurement, not a test: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import PIL  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
import yaml  # noqa: E402

from stages import download, normalize  # noqa: E402
from stages.base.runtime import decode_workers  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=REPO_ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip")
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    if not args.zip.is_file():
        sys.exit(f"error: {args.zip} not found (pass --zip PATH)")

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["data"] = {**params["data"], "source": f"data/sources/{args.zip.name}", "sha256": None,
                      "image_size": args.image_size}
    previous = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as work:
        os.chdir(work)
        try:
            Path("data/sources").mkdir(parents=True)
            Path(params["data"]["source"]).symlink_to(args.zip.resolve())
            started = time.perf_counter()
            info = download.download(params)
            copied = time.perf_counter()
            meta = normalize.normalize(params)
            finished = time.perf_counter()
        finally:
            os.chdir(previous)
    count = sum(info["images"].values())
    print()
    print(f"machine:  {cpu_name()}, {os.cpu_count()} CPUs ({decode_workers()} usable), {platform.system()} "
          f"{platform.release()}")
    print(f"software: Python {platform.python_version()}, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, Pillow {PIL.__version__}")
    print(f"command:  {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"input:    {args.zip} ({args.zip.stat().st_size / 2**20:.1f} MiB, {count} images, "
          f"{len(info['classes'])} classes) -> {meta['image_size']}x{meta['image_size']}")
    for name, seconds in (("download (canonical zip)", copied - started), ("normalize (decode, split, save)",
                                                                          finished - copied),
                          ("total", finished - started)):
        print(f"{name:32s} {seconds:6.2f} s  {count / seconds:8.0f} img/s")


if __name__ == "__main__":
    main()
