"""The params schema: the repo's own params.yaml is valid, and every kind of mistake gets a specific message."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from repo_root import REPO_ROOT
from stages.config import ParamsError, load_params, set_dotted, validate

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
    ("train.model", "vgg", "train.model: expected one of mlp, cnn, airnet, resnet18; got 'vgg'"),
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
    ("train.pretrained", "weights.pth", "train.pretrained: pretrained weights need train.model: resnet18"),
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
    from stages.config import phase_epochs, resolve_phases
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
