"""Fetch torchvision's ImageNet weights for ResNet-18 into models/pretrained/, the explicit opt-in for
`train.pretrained` (the pipeline itself never downloads weights).

    python tools/get_pretrained.py                  # -> models/pretrained/resnet18.pth
    dvc add models/pretrained/resnet18.pth          # version it
    dvc exp run -S train.model=resnet18 -S train.pretrained=models/pretrained/resnet18.pth -S train.freeze_backbone=true \\
        -S train.optimizer=sgd -S train.low_res.size=0

The download goes through stages/dataset/fetch.py, as the pipeline's own: with progress, resumed and retried, capped at
--max-mb, and checked against a SHA-256 (--sha256, or the hash prefix torchvision puts in its file names, as
torch.hub checks it) before it is loaded, weights only. Needs network access to torchvision's weight host; offline
it stops with one message saying how to bring the file from another machine."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from stages.base.runtime import PipelineError, file_digest, run_stage  # noqa: E402
from stages.dataset.fetch import ByteLimit, fetch  # noqa: E402
from stages.model.tensors import save_torch  # noqa: E402

MAX_MB = 1000  # MB of 2**20 bytes, as the messages count; ResNet-18's weights are 44.7, so far more is not them
HASH_PREFIX = re.compile(r"-([0-9a-f]{8,64})\.[^.]+$")  # torchvision's resnet18-f37072fd.pth: sha256's first digits


def weights_url() -> str:
    from torchvision.models import ResNet18_Weights
    return ResNet18_Weights.IMAGENET1K_V1.url


def get_pretrained(url: str, output: Path, sha256: str | None = None, max_mb: float = MAX_MB) -> None:
    staged = output.with_name(output.name + ".download")
    offline_hint = (f"On a machine with network access run this tool there (or: python -c \"import torch, "
                    f"torchvision; torch.save(torchvision.models.resnet18(weights='IMAGENET1K_V1').state_dict(), "
                    f"'resnet18.pth')\") and copy the file to {output}")
    path = fetch(url, staged, ("sha256", sha256.lower()) if sha256 else None, offline_hint,
                 limit=ByteLimit(int(max_mb * 2**20), "--max-mb"))
    try:
        if not sha256:
            _check_hash_prefix(url, path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise PipelineError(f"{url}: the download is not a weights file ({type(error).__name__})") from None
        if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
            raise PipelineError(f"{url}: the download is not a state_dict (a mapping of names to tensors)")
        save_torch(state, output)
    finally:
        if path == staged:  # a file:// source is read in place and stays
            staged.unlink(missing_ok=True)
    print(f"saved {output} (sha256 {file_digest(output)})")


def _check_hash_prefix(url: str, path: Path) -> None:
    """torchvision names each weights file after the start of its SHA-256; a file that does not match it is not
    the one the URL promises (a broken mirror, a proxy's error page)."""
    match = HASH_PREFIX.search(PurePosixPath(urlparse(url).path).name)
    if match is None:
        return
    actual = file_digest(path)
    if not actual.startswith(match.group(1)):
        raise PipelineError(f"{url}: SHA-256 {actual} does not start with {match.group(1)}, the hash in the file "
                            f"name; the download is corrupt or not the expected file, and was not saved")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="download from this URL instead of torchvision's (a mirror, file://)")
    parser.add_argument("--output", type=Path, default=Path("models/pretrained/resnet18.pth"))
    parser.add_argument("--sha256", help="the SHA-256 the file must have (default: the prefix in its file name)")
    parser.add_argument("--max-mb", type=float, default=MAX_MB, help=f"refuse a download over this (default {MAX_MB})")
    args = parser.parse_args(argv)
    if args.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", args.sha256):
        parser.error(f"--sha256 {args.sha256!r}: expected 64 hex digits")
    if not args.max_mb > 0:
        parser.error(f"--max-mb {args.max_mb}: expected a size in MB above 0")
    run_stage(lambda: get_pretrained(args.url or weights_url(), args.output, args.sha256, args.max_mb))


if __name__ == "__main__":
    main()
