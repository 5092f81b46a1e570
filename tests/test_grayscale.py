"""Pictures whose colour channels are equal (grayscale folders, scans, X-rays) train like any other.

airnet's stem whitens 2x2 patches; with equal channels 8 of the 12 patch directions carry no signal, and before the
fix their filters' biases drifted by hundreds at the BatchNorm learning rate until eval-mode BatchNorm sent every
image to one class (validation at chance while training accuracy rose). The run is forced to fp32: in bf16 the
dead filters' outputs are rounding noise and the failure was weaker, so fp32 shows it on every host class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from prepared_data import make_split
from repo_root import REPO_ROOT
from stages.model.nets import AirNet

CLASSES, SIZE = 4, 16


def gray(split: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    images = split["images"].float().mean(1, keepdim=True).round().to(torch.uint8).repeat(1, 3, 1, 1)
    return {"images": images, "labels": split["labels"]}


def write_gray_folder(root: Path) -> None:
    """A folder of 8-bit grayscale PNGs (mode L), train/ and test/ by class, as scans or MNIST-like sets come."""
    from PIL import Image

    for split, count, seed in (("train", 1000, 1), ("test", 200, 3)):
        data = gray(make_split(count, CLASSES, SIZE, seed))
        for index, (image, label) in enumerate(zip(data["images"], data["labels"].tolist())):
            folder = root / "data" / "sources" / "gray" / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy(), "L").save(folder / f"{index:04d}.png")


def default_airnet_params(root: Path, **data: object) -> None:
    """The default recipe (lr 1.5, bias_lr_scale 64, Muon, lookahead, whitening bias trained), small and in fp32."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"].update({"image_size": SIZE, "val_fraction": 0.2, **data})
    params["train"].update({"epochs": 3, "batch_size": 100, "precision": "fp32", "log_every": 100000})
    params["train"]["low_res"]["size"] = 0
    params["train"]["augment"]["cutout"] = 0
    params["train"]["airnet"]["widths"] = [32, 64, 64]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_a_grayscale_folder_trains_well_above_chance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """download -> normalize -> train -> evaluate on a folder of grayscale PNGs, in fp32."""
    from stages.base.config import load_params
    from stages.download import download
    from stages.evaluate import evaluate
    from stages.normalize import normalize
    from stages.train import train

    write_gray_folder(tmp_path)
    default_airnet_params(tmp_path, source="data/sources/gray")
    monkeypatch.chdir(tmp_path)  # the stages read and write relative to the repository root
    for stage in (download, normalize, train, evaluate):
        stage(load_params())
    history = (tmp_path / "metrics" / "history.csv").read_text().splitlines()
    val_acc = [float(row.split(",")[5]) for row in history[1:]]
    assert min(val_acc) > 0.6, history  # chance is 0.25; before the fix every epoch sat at 0.25
    assert "warnings" not in json.loads((tmp_path / "metrics" / "train.json").read_text())
    test = json.loads((tmp_path / "metrics" / "test.json").read_text())["test"]
    assert test["acc"] > 0.6 and "warnings" not in test


def test_the_whitening_stem_has_no_dead_filters_on_equal_channels() -> None:
    """Every stem filter carries signal: the directions equal channels leave empty are filled with copies of live
    ones, whose outputs vary (and so anchor their biases)."""
    torch.manual_seed(0)
    net = AirNet(CLASSES, SIZE, [8, 16, 16], whiten_bias_epochs=1)
    images = gray(make_split(200, CLASSES, SIZE, seed=1))["images"].float()
    normalized = (images - images.mean()) / images.std()
    assert net.init_from_data(normalized) == 4  # a grayscale 2x2 patch has 4 degrees of freedom, not 12
    outputs = net.whiten(normalized)
    assert outputs.std(dim=(0, 2, 3)).min() > 0.1


def test_rgb_patches_keep_every_whitening_direction() -> None:
    """Full-rank patches are whitened exactly as before: no filter is replaced (RGB runs keep their bytes)."""
    torch.manual_seed(0)
    net = AirNet(CLASSES, SIZE, [8, 16, 16], whiten_bias_epochs=1)
    images = make_split(200, CLASSES, SIZE, seed=1)["images"].float()
    normalized = (images - images.mean()) / images.std()
    assert net.init_from_data(normalized) == 12
    weights = net.whiten.weight.flatten(1)
    assert torch.linalg.matrix_rank(weights[:12].double()) == 12


REAL_ZIP = REPO_ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_ZIP.is_file(), reason=f"{REAL_ZIP} not present")
def test_real_cifar10_keeps_every_whitening_direction() -> None:
    """On the real CIFAR-10 JPEG copy (5,000 training images, as train.py's WHITENING_SAMPLE uses) all 12 patch
    directions carry signal, the weakest far above the cut: the default recipe's stem, and so its training, is
    exactly what it was before dead directions were filled."""
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    with zipfile.ZipFile(REAL_ZIP) as real:
        names = [n for n in real.namelist() if "/train/" in n and n.endswith(".jpg")][::10][:5000]
        pixels = np.stack([np.asarray(Image.open(io.BytesIO(real.read(n))).convert("RGB")) for n in names])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
    mean, std = images.mean(dim=(0, 2, 3), keepdim=True), images.std(dim=(0, 2, 3), keepdim=True)
    net = AirNet(10, 32, [8, 16, 16], whiten_bias_epochs=1)
    assert net.init_from_data((images - mean) / std) == 12
