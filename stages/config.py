"""The one params schema. Every stage loads params.yaml through `load_params`, which checks the whole file
before any expensive work: unknown keys (typos), missing keys, wrong types and out-of-range values all get a
message that names the key, the value and what was expected."""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import yaml

from stages.common import PipelineError

PARAMS_FILE = "params.yaml"
MODELS = ("mlp", "cnn", "airnet", "resnet18")
RESOLUTION_FREE = ("cnn", "airnet")  # end in global pooling, so train.low_res can shrink their input
URL_SCHEMES = ("http", "https", "file")
# the train params that are phase lengths: a number of epochs, or "N%" of train.epochs (see Phase, phase_epochs)
PHASE_KEYS = ("averaging_start", "airnet.whiten_bias_epochs", "low_res.epochs")
PERCENTAGE = re.compile(r"(\d+(?:\.\d+)?)%")


class ParamsError(PipelineError):
    pass


@dataclass(frozen=True)
class Num:
    """A number (int or float). Bounds: ge/gt/le/lt."""
    integer: bool = False
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def check(self, key: str, value: Any) -> Any:
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = ""
            if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value.strip()):
                hint = f" (YAML reads {value} as text: write it with a dot and a signed exponent, e.g. 1.0e-3)"
            raise ParamsError(f"{key}: expected {kind}, got {value!r}{hint}")
        if self.integer and isinstance(value, float):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ParamsError(f"{key}: expected a finite number, got {value!r}")
        for bound, ok, word in ((self.ge, lambda b: value >= b, ">="), (self.gt, lambda b: value > b, ">"),
                                (self.le, lambda b: value <= b, "<="), (self.lt, lambda b: value < b, "<")):
            if bound is not None and not ok(bound):
                raise ParamsError(f"{key}: expected a value {word} {bound:g}, got {value!r}")
        return value


@dataclass(frozen=True)
class Choice:
    options: tuple[Any, ...]

    def check(self, key: str, value: Any) -> Any:
        if isinstance(value, bool) or value not in self.options:
            raise ParamsError(f"{key}: expected one of {', '.join(map(str, self.options))}; got {value!r}")
        return value


@dataclass(frozen=True)
class Bool:
    def check(self, key: str, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {value!r}")
        return value


@dataclass(frozen=True)
class Text:
    pattern: str | None = None
    describe: str = "text"
    optional: bool = False  # null (YAML `null`/`~`) allowed

    def check(self, key: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        if not isinstance(value, str) or not value or (self.pattern and not re.fullmatch(self.pattern, value)):
            raise ParamsError(f"{key}: expected {self.describe}, got {value!r}")
        return value


@dataclass(frozen=True)
class IntList:
    min_len: int = 1
    ge: int = 1

    def check(self, key: str, value: Any) -> Any:
        if (not isinstance(value, list) or len(value) < self.min_len
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= self.ge for v in value)):
            raise ParamsError(f"{key}: expected a list of at least {self.min_len} integers >= {self.ge}, got {value!r}")
        return value


@dataclass(frozen=True)
class Phase:
    """The length of a training phase: a number of epochs >= 0, or a string "N%" (0 <= N <= 100) for N percent of
    train.epochs, so a preset's phases scale with its run length."""

    def check(self, key: str, value: Any) -> Any:
        if isinstance(value, str):
            match = PERCENTAGE.fullmatch(value)
            valid = match is not None and float(match[1]) <= 100
        else:
            valid = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                     and value >= 0)
        if not valid:
            raise ParamsError(f"{key}: {value!r}: expected a number of epochs >= 0 or a percentage of train.epochs "
                              "such as '30%'")
        return value


SCHEMA: dict[str, Any] = {
    "data": {
        "source": Text(describe="cifar10, synthetic, a path under data/sources/ or an http(s)/file URL"),
        "url": Text(describe="an http(s):// or file:// URL"),
        "sha256": Text(pattern=r"[0-9a-fA-F]{64}", describe="null or 64 hex digits", optional=True),
        "synthetic": {"train_size": Num(integer=True, ge=20), "test_size": Num(integer=True, ge=10)},
        "image_size": Num(integer=True, ge=8, le=1024),
        "on_error": Choice(("raise", "skip")),
        "test_fraction": Num(gt=0, lt=1),
        "val_fraction": Num(ge=0, lt=1),
        "seed": Num(integer=True, ge=0),
    },
    "normalize": {"stats": Choice(("dataset", "fixed"))},
    "train": {
        "model": Choice(MODELS),
        "mlp": {"hidden": IntList(min_len=0)},
        "cnn": {"channels": IntList(min_len=3)},
        "airnet": {"widths": IntList(min_len=3), "whiten_bias_epochs": Phase()},
        "resnet18": {"input_size": Num(integer=True, ge=32, le=1024)},
        "pretrained": Text(describe="none or a path to a torchvision state_dict file"),
        "freeze_backbone": Bool(),
        "epochs": Num(gt=0),  # fractions allowed: short benchmark runs and schedules in epochs
        "batch_size": Num(integer=True, ge=1),
        "optimizer": Choice(("sgd", "muon")),
        "muon": {"lr": Num(gt=0), "momentum": Num(ge=0, lt=1)},
        "lr": Num(gt=0),
        "momentum": Num(ge=0, lt=1),
        "nesterov": Bool(),
        "weight_decay": Num(ge=0),
        "decoupled_weight_decay": Bool(),
        "bias_lr_scale": Num(gt=0),
        "schedule": Choice(("constant", "linear", "cosine")),
        "warmup_epochs": Num(ge=0),
        "label_smoothing": Num(ge=0, lt=1),
        "averaging": Choice(("none", "ema", "lookahead")),
        "averaging_decay": Num(ge=0, lt=1),
        "averaging_start": Phase(),
        "augment": {"flip": Choice(("none", "random", "alternate")), "translate": Num(integer=True, ge=0, le=16),
                    "cutout": Num(integer=True, ge=0)},
        "low_res": {"size": Num(integer=True, ge=0), "epochs": Phase()},
        "precision": Choice(("auto", "bf16", "fp32")),
        "channels_last": Bool(),
        "deterministic": Bool(),
        "log_every": Num(integer=True, ge=1),
        "seed": Num(integer=True, ge=0),
        "ensemble": Num(integer=True, ge=1),
        "nproc": Num(integer=True, ge=1),
    },
    "evaluate": {"batch_size": Num(integer=True, ge=1), "tta": Choice((1, 2, 6))},
    "report": {"samples": Num(integer=True, ge=0, le=100), "baseline": Text(describe="a git revision", optional=True)},
}


def _check_section(prefix: str, schema: dict[str, Any], values: Any) -> None:
    if not isinstance(values, dict):
        raise ParamsError(f"{prefix or 'params'}: expected a mapping of keys, got {values!r}")
    for key in values:
        if key not in schema:
            name = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ParamsError(f"unknown key {name!r} in {PARAMS_FILE}{hint}; valid keys"
                              f"{' in ' + prefix if prefix else ''}: {', '.join(schema)}")
    for key, rule in schema.items():
        name = f"{prefix}.{key}" if prefix else key
        if key not in values:
            raise ParamsError(f"missing key {name!r} in {PARAMS_FILE}")
        if isinstance(rule, dict):
            _check_section(name, rule, values[key])
        else:
            rule.check(name, values[key])


def _check_relations(params: dict[str, Any]) -> None:
    source = params["data"]["source"]
    scheme = urlparse(source).scheme if "://" in source else ""
    if scheme and scheme not in URL_SCHEMES:
        raise ParamsError(f"data.source: URL scheme {scheme!r} is not supported; use http, https or file")
    url_scheme = urlparse(params["data"]["url"]).scheme
    if url_scheme not in URL_SCHEMES:
        raise ParamsError(f"data.url: expected an http(s):// or file:// URL, got {params['data']['url']!r}")
    train = params["train"]
    if train["pretrained"] != "none" and train["model"] != "resnet18":
        raise ParamsError(f"train.pretrained: pretrained weights need train.model: resnet18, not {train['model']!r}")
    if train["freeze_backbone"] and train["pretrained"] == "none":
        raise ParamsError("train.freeze_backbone: freezing needs pretrained weights (train.pretrained); "
                          "a frozen random backbone would learn nothing")
    if train["optimizer"] == "muon" and (train["model"] == "mlp" or train["freeze_backbone"]):
        why = "the mlp has none" if train["model"] == "mlp" else "freeze_backbone freezes them all"
        raise ParamsError(f"train.optimizer: muon trains conv filters and {why}; set train.optimizer: sgd")
    low_res_epochs = phase_epochs(train["low_res"]["epochs"], train["epochs"])
    if train["low_res"]["size"] and low_res_epochs and train["model"] not in RESOLUTION_FREE:
        raise ParamsError(f"train.low_res: model {train['model']!r} takes one input size only; low-resolution "
                          f"epochs work with {', '.join(RESOLUTION_FREE)} (set train.low_res.size: 0)")
    pretrained = train["pretrained"]
    if pretrained != "none":
        parts = PurePosixPath(pretrained).parts
        if PurePosixPath(pretrained).is_absolute() or ".." in parts or parts[:2] != ("models", "pretrained"):
            raise ParamsError(f"train.pretrained: {pretrained!r} must be a file under models/pretrained/ (that "
                              "folder is a dependency of the train stage, so DVC retrains when the weights change)")


def phase_epochs(value: float | str, epochs: float) -> float:
    """A phase length (see Phase) in epochs: a number as it is (an int stays an int), "N%" as epochs * N / 100, so
    "30%" of 9 epochs is exactly the float 2.7."""
    if isinstance(value, str):
        return epochs * float(value.removesuffix("%")) / 100
    return value


def resolve_phases(train: dict[str, Any]) -> dict[str, Any]:
    """A copy of the train params with every phase length (PHASE_KEYS) in epochs; the params are not modified."""
    resolved = dict(train)
    for dotted in PHASE_KEYS:
        *parents, leaf = dotted.split(".")
        node = resolved
        for key in parents:
            node[key] = dict(node[key])
            node = node[key]
        node[leaf] = phase_epochs(node[leaf], train["epochs"])
    return resolved


def validate(params: Any) -> dict[str, Any]:
    _check_section("", SCHEMA, params)
    _check_relations(params)
    return params


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run the stages from the repository root")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {error}") from None
    return validate(params)


def set_dotted(params: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `section.key.subkey` in a params dict, as `dvc exp run -S` does; a key that params.yaml does not
    have is refused (a typo would otherwise be ignored)."""
    *parents, leaf = dotted.split(".")
    node: Any = params
    for depth, key in enumerate(parents):
        if not isinstance(node, dict) or key not in node:
            raise ParamsError(f"{'.'.join(parents[:depth + 1])}: no such section in {PARAMS_FILE} (setting {dotted})")
        node = node[key]
    if not isinstance(node, dict) or leaf not in node:
        raise ParamsError(f"{dotted}: no such key in {PARAMS_FILE}")
    node[leaf] = value
