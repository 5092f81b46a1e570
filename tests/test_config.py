"""The params schema: the repo's own params.yaml is valid, and every kind of mistake gets a specific message."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from stages.base.config import load_params, set_dotted, validate
from stages.base.runtime import ParamsError

from repo_root import REPO_ROOT

REPO_PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def with_value(dotted: str, value: object) -> dict:
    """A copy of the repo's params with one existing key changed (REPO_PARAMS itself stays as read)."""
    params = copy.deepcopy(REPO_PARAMS)
    set_dotted(params, dotted, value)
    return params


def test_repo_params_are_valid() -> None:
    assert validate(copy.deepcopy(REPO_PARAMS))["train"]["model"] in ("mlp", "cnn", "airnet", "resnet18")


@pytest.mark.parametrize("dotted, value, message", [
    ("train.lr", -0.1, "train.lr: expected a value > 0, got -0.1"),
    ("train.lr", "1e-3", "YAML reads 1e-3 as text"),
    ("train.batch_size", 0, "train.batch_size: expected a value >= 1, got 0"),
    ("train.batch_size", 4.5, "train.batch_size: expected an integer, got 4.5"),
    ("train.batch_size", True, "train.batch_size: expected an integer, got True"),
    ("train.epochs", 0, "train.epochs: expected a value > 0, got 0"),
    ("data.val_fraction", 1.0, "data.val_fraction: expected a value < 1, got 1.0"),
    ("data.test_fraction", 0, "data.test_fraction: expected a value > 0, got 0"),
    ("train.model", "vgg", "train.model: expected one of mlp, cnn, airnet, resnet18, efficientnet_lite0; got 'vgg'"),
    ("train.nesterov", "yes", "train.nesterov: expected true or false, got 'yes'"),
    ("train.momentum", 1.0, "train.momentum: expected a value < 1, got 1.0"),
    ("data.source", "ftp://example.com/x.zip", "URL scheme 'ftp' is not supported"),
    ("data.source", "", "data.source: expected cifar10, synthetic"),
    ("data.url", "s3://bucket/cifar.tar.gz", "data.url: expected an http(s):// or file:// URL"),
    ("data.sha256", "abc", "data.sha256: expected null or 64 hex digits"),
    ("data.on_error", "ignore", "data.on_error: expected one of raise, skip"),
    ("normalize.stats", "imagenet", "normalize.stats: expected one of dataset, fixed"),
    ("evaluate.tta", 3, "evaluate.tta: expected one of 1, 2, 6; got 3"),
    ("train.mlp.hidden", [1024, -5], "train.mlp.hidden: expected a list of at least 0 integers >= 1"),
    ("train.pretrained", "weights.pth", "train.pretrained: ImageNet weights exist for resnet18 and efficientnet_lite0, not train.model"),
    ("train.lr", float("nan"), "train.lr: expected a finite number"),
    ("train.ensemble", 0, "train.ensemble: expected a value >= 1, got 0"),
])
def test_bad_values_are_named(dotted: str, value: object, message: str) -> None:
    with pytest.raises(ParamsError) as error:
        validate(with_value(dotted, value))
    assert message in str(error.value)


def test_unknown_key_names_key_and_valid_ones() -> None:
    params = copy.deepcopy(REPO_PARAMS)
    params["train"]["lrr"] = 0.1
    with pytest.raises(ParamsError) as error:
        validate(params)
    text = str(error.value)
    assert "unknown key 'train.lrr'" in text and "did you mean 'lr'" in text and "batch_size" in text


def test_unknown_section_and_missing_key() -> None:
    params = copy.deepcopy(REPO_PARAMS)
    params["trian"] = {}
    with pytest.raises(ParamsError, match="unknown key 'trian'.*did you mean 'train'"):
        validate(params)
    params = copy.deepcopy(REPO_PARAMS)
    del params["train"]["epochs"]
    with pytest.raises(ParamsError, match="missing key 'train.epochs'"):
        validate(params)


def test_load_params_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(empty)


PHASE_KEYS = ["train.averaging_start", "train.airnet.whiten_bias_epochs", "train.low_res.epochs"]


@pytest.mark.parametrize("dotted", PHASE_KEYS)
@pytest.mark.parametrize("value", [0, 2.7, 40, "0%", "30%", "12.5%", "100%"])
def test_phase_lengths_take_epochs_or_a_percentage_of_the_run(dotted: str, value: object) -> None:
    assert validate(with_value(dotted, value))


@pytest.mark.parametrize("dotted", PHASE_KEYS)
@pytest.mark.parametrize("value", ["130%", "-5%", "30", "30 %", "%", ".5%", "all", -1, float("nan"), True, None])
def test_bad_phase_lengths_are_named(dotted: str, value: object) -> None:
    with pytest.raises(ParamsError) as error:
        validate(with_value(dotted, value))
    assert str(error.value) == (f"{dotted}: {value!r}: expected a number of epochs >= 0 or a percentage of "
                                "train.epochs such as '30%'")


def test_phase_percentages_resolve_against_train_epochs() -> None:
    from stages.base.config import phase_epochs, resolve_phases
    assert phase_epochs("30%", 9) == 2.7  # exactly the float an epoch count of 2.7 is
    assert phase_epochs("100%", 22) == 22 and phase_epochs("12.5%", 8) == 1 and phase_epochs("0%", 5) == 0
    assert phase_epochs(6, 22) == 6 and type(phase_epochs(6, 22)) is int  # numbers stay as written
    train = with_value("train.epochs", 9)["train"]
    train["averaging_start"], train["airnet"]["whiten_bias_epochs"], train["low_res"]["epochs"] = "30%", "50%", 3
    resolved = resolve_phases(train)
    assert (resolved["averaging_start"], resolved["airnet"]["whiten_bias_epochs"], resolved["low_res"]["epochs"]) \
        == (2.7, 4.5, 3)
    assert train["averaging_start"] == "30%" and train["airnet"]["whiten_bias_epochs"] == "50%"  # not modified
    assert list(resolved) == list(train) and resolved["airnet"]["widths"] == train["airnet"]["widths"]


def test_low_res_relation_checks_the_resolved_length() -> None:
    params = with_value("train.model", "mlp")
    params["train"]["optimizer"] = "sgd"
    params["train"]["low_res"].update(size=16, epochs="0%")  # no low-resolution epochs: nothing to refuse
    assert validate(params)
    params["train"]["low_res"]["epochs"] = "50%"
    with pytest.raises(ParamsError, match="train.low_res: model 'mlp' takes one input size only"):
        validate(params)


# ---------------------------------------------------------------- relations that crashed a stage after the check


def with_values(**dotted: object) -> dict:
    """A copy of the repo's params with several keys changed; `__` in an argument name stands for a dot."""
    params = copy.deepcopy(REPO_PARAMS)
    for key, value in dotted.items():
        set_dotted(params, key.replace("__", "."), value)
    return params


CNN_SIX_BLOCKS = {"train__model": "cnn", "train__optimizer": "sgd", "train__cnn__channels": [8] * 6}


@pytest.mark.parametrize("changes, message", [
    # 64-bit overflow in torch.Generator.manual_seed(seed * 1_000_003 + epoch)
    ({"train__seed": 19_000_000_000_000}, "train.seed: expected a value <= 4294967295, got 19000000000000"),
    ({"data__seed": 2**32}, "data.seed: expected a value <= 4294967295, got 4294967296"),
    ({"train__seed": 2**32 - 2, "train__ensemble": 3},
     "train.seed: ensemble member 3 would train with seed 4294967296 (train.seed + member index); expected "
     "train.seed + train.ensemble - 1 <= 4294967295"),
    ({"data__seed": 10**5000}, "data.seed: expected a value <= 4294967295, got an integer of 16610 bits"),
    # "Output size is too small" in the first forward pass
    ({"data__image_size": 8, "train__augment__translate": 2, "train__augment__cutout": 8},
     "data.image_size: 8 px is too small for airnet, which needs at least 9 px (a 2x2 stem, then 3 blocks that "
     "halve the image: train.airnet.widths)"),
    ({"train__low_res__size": 8},
     "train.low_res.size: 8 px is too small for airnet, which needs at least 9 px (a 2x2 stem, then 3 blocks that "
     "halve the image: train.airnet.widths); expected 9 to 31, or 0 (off)"),
    ({**CNN_SIX_BLOCKS, "train__low_res__size": 24},
     "train.low_res.size: 24 px is too small for cnn, which needs at least 32 px (5 2x2 max-pools: "
     "train.cnn.channels); set it to 0 (off)"),
    # reflect padding maps an index once: shifts of image_size or more read wrong pixels or out of range
    ({"data__image_size": 12, "train__augment__translate": 12},
     "train.augment.translate: 12 px does not fit 12 px images (data.image_size); expected at most 11"),
    ({"data__image_size": 16, "train__augment__cutout": 17},
     "train.augment.cutout: a 17 px square is larger than the 16 px images (data.image_size); expected at most 16"),
    # sizes that would allocate tens of GB (or fail to) when the model is built
    ({"train__airnet__widths": [64, 256_000_000, 256]},
     "train.airnet.widths: [64, 256000000, 256] on 32 px images (data.image_size) gives airnet "),
    ({"train__model": "mlp", "train__optimizer": "sgd", "train__low_res__size": 0, "data__image_size": 1024},
     "train.mlp.hidden: [1024, 512] on 1024 px images (data.image_size) gives mlp 3,221,752,322 parameters; "
     "expected at most 1,000,000,000 in all"),
    ({"train__model": "resnet18", "train__optimizer": "sgd", "train__low_res__size": 0, "train__ensemble": 100},
     "train.ensemble: 100 members of resnet18 have 11,177,538 parameters per member, 1,117,753,800 for 100"),
    ({"train__cnn__channels": [4] * 65}, "train.cnn.channels: expected at most 64 entries, got 65"),
    ({"data__synthetic__train_size": 10**9}, "data.synthetic.train_size: expected a value <= 1000000"),
])
def test_relations_that_would_crash_later_are_named(changes: dict, message: str) -> None:
    with pytest.raises(ParamsError) as error:
        validate(with_values(**changes))
    assert str(error.value).startswith(message)


def test_the_boundaries_of_the_relations_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The largest seeds, the smallest low-res size, the largest shift and cutout are accepted and train."""
    from stages.base.config import SEED_MAX
    from stages.train import train

    from prepared_data import tiny_params, write_prepared

    monkeypatch.chdir(tmp_path)
    write_prepared(tmp_path, n_train=64, n_val=16, n_test=16, size=12)
    tiny_params(tmp_path, **{
        "data.image_size": 12, "data.seed": SEED_MAX, "train.seed": SEED_MAX - 1, "train.ensemble": 2,
        "train.model": "airnet", "train.airnet.widths": [8, 8, 8], "train.low_res.size": 9,
        "train.low_res.epochs": 1, "train.augment.translate": 11, "train.augment.cutout": 12, "train.epochs": 2})
    train(load_params())
    assert (tmp_path / "models" / "model.pth").is_file()


@pytest.mark.parametrize("dotted, value, key", [
    ("train.seed", 19_000_000_000_000, "train.seed"),
    ("train.low_res.size", 4, "train.low_res.size"),
    ("train.augment.translate", 16, "train.augment.translate"),
    ("train.cnn.channels", [8, 2_000_000_000, 8], "train.cnn.channels"),
])
def test_the_train_stage_stops_with_one_line(tmp_path: Path, dotted: str, value: object, key: str) -> None:
    """As a process: one `error:` line naming the key, exit status 2, no traceback, the old model kept."""
    import os
    import subprocess
    import sys

    from prepared_data import tiny_params, write_prepared

    write_prepared(tmp_path, size=16 if dotted == "train.augment.translate" else 32)
    tiny_params(tmp_path, **{"data.image_size": 16 if dotted == "train.augment.translate" else 32,
                             "train.low_res.epochs": 1, dotted: value})
    model = tmp_path / "models" / "model.pth"
    model.parent.mkdir()
    model.write_bytes(b"the previous model")
    done = subprocess.run([sys.executable, "-m", "stages.train"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {key}: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert model.read_bytes() == b"the previous model"


def test_translate_bound_is_where_the_reflected_shift_stops_being_exact() -> None:
    """stages.dataset.augment.shift equals numpy's reflect padding for every shift below the image size (the most
    data.image_size - 1 allows for train.augment.translate), and not at the image size."""
    import numpy as np
    import torch

    from stages.dataset.augment import shift

    size = 8
    row = np.arange(size)
    images = torch.from_numpy(np.broadcast_to(row, (1, 1, size, size)).copy())

    def reference(dx: int) -> list[int]:  # content moved right by dx, the border mirrored without edge repeat
        padded = np.pad(row, abs(dx), mode="reflect")
        return padded[abs(dx) - dx:abs(dx) - dx + size].tolist()

    for dx in range(-(size - 1), size):
        assert shift(images, 0, dx)[0, 0, 0].tolist() == reference(dx), dx
    assert shift(images, 0, -size)[0, 0, 0].tolist() != reference(-size)
