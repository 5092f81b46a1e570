"""Fetch torchvision's ImageNet weights for ResNet-18 into models/pretrained/, the explicit opt-in for
`train.pretrained` (the pipeline itself never downloads weights).

    python tools/get_pretrained.py                  # -> models/pretrained/resnet18.pth
    dvc add models/pretrained/resnet18.pth          # version it
    dvc exp run -S train.model=resnet18 -S train.pretrained=models/pretrained/resnet18.pth -S train.freeze_backbone=true \\
        -S train.optimizer=sgd -S train.low_res.size=0

Needs network access to torchvision's weight host; offline it stops with one message saying how to bring the file
from another machine."""

from __future__ import annotations

import argparse
import io
import sys
import urllib.error
import urllib.request
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from stages.common import PipelineError, file_digest, run_stage, save_torch  # noqa: E402


def weights_url() -> str:
    from torchvision.models import ResNet18_Weights
    return ResNet18_Weights.IMAGENET1K_V1.url


def fetch(url: str, output: Path, timeout: float = 30.0) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError) as error:
        raise PipelineError(
            f"cannot download {url} ({getattr(error, 'reason', error)}). On a machine with network access run "
            f"this tool there (or: python -c \"import torch, torchvision; torch.save(torchvision.models.resnet18("
            f"weights='IMAGENET1K_V1').state_dict(), 'resnet18.pth')\") and copy the file to {output}") from None
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as error:
        raise PipelineError(f"{url}: the download is not a weights file ({type(error).__name__})") from None
    save_torch(state, output)
    print(f"saved {output} (sha256 {file_digest(output)})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="download from this URL instead of torchvision's (a mirror, file://)")
    parser.add_argument("--output", type=Path, default=Path("models/pretrained/resnet18.pth"))
    args = parser.parse_args(argv)
    run_stage(lambda: fetch(args.url or weights_url(), args.output))


if __name__ == "__main__":
    main()
