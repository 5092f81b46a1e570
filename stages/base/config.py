"""The params schema and its checks. Every stage loads params.yaml through `load_params` (read within a budget by
stages/base/yamlfile.py), which checks the whole file before any expensive work: unknown keys (typos), missing
keys, wrong types and out-of-range values all get a message that names the key, the value and what was expected.

Relations between keys that would otherwise crash a stage late are checked too: each model's smallest input
(`min_input_size`) against data.image_size and train.low_res.size, train.augment.translate and cutout against the
image size (a reflected shift is exact only for shifts below the image size), and the seeds (data.seed, and every
ensemble member's train.seed + index, at most SEED_MAX, so each generator seed derived from them fits 64 bits).
A model, all ensemble members together, may hold at most MAX_PARAMETERS parameters (`parameter_count`), and a
layer list at most MAX_LAYERS entries (stages/base/specs.py): a typo such as `widths: [64, 25600000]` is refused
before it allocates; data.synthetic sizes are at most a million images. stages/model/checkpoint.py checks a
checkpoint's fields with the same schema and limits, so a crafted checkpoint cannot make predict or evaluate build a
model beyond them, nor crash them with a missing or mistyped field."""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from stages.base.runtime import ParamsError, brief
from stages.base.specs import (EFFICIENTNET_TOTAL_STRIDE, IMAGE_SIZES, MAX_LAYERS, MODEL_CONFIG_EXTRAS, MODELS,
                               PARAMS_FIELDS, PRETRAINED_MODELS, RESOLUTION_FREE, check_model_fields,
                               input_size_reason, min_input_size, model_config_of)
from stages.base.yamlfile import read_yaml

PARAMS_FILE = "params.yaml"
SEED_MAX = 2**32 - 1  # NumPy's seed range; train derives generator seeds up to seed * 1_000_003 + epoch (< 2**64)
MONITORS = ("val_loss", "val_acc", "val_macro_f1")  # train.monitor: what model selection compares, per epoch
URL_SCHEMES = ("http", "https", "file")
# the train params that are phase lengths: a number of epochs, or "N%" of train.epochs (see Phase, phase_epochs)
PHASE_KEYS = ("averaging_start", "airnet.whiten_bias_epochs", "low_res.epochs", "fine_tune.frozen_epochs")
PERCENTAGE = re.compile(r"(\d+(?:\.\d+)?)%")


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
            raise ParamsError(f"{key}: expected {kind}, got {brief(value)}{hint}")
        if self.integer and isinstance(value, float):
            raise ParamsError(f"{key}: expected an integer, got {brief(value)}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ParamsError(f"{key}: expected a finite number, got {brief(value)}")
        for bound, ok, word in ((self.ge, lambda b: value >= b, ">="), (self.gt, lambda b: value > b, ">"),
                                (self.le, lambda b: value <= b, "<="), (self.lt, lambda b: value < b, "<")):
            if bound is not None and not ok(bound):
                shown = bound if isinstance(bound, int) else f"{bound:g}"
                raise ParamsError(f"{key}: expected a value {word} {shown}, got {brief(value)}")
        return value


@dataclass(frozen=True)
class Choice:
    options: tuple[Any, ...]

    def check(self, key: str, value: Any) -> Any:
        if isinstance(value, bool) or value not in self.options:
            raise ParamsError(f"{key}: expected one of {', '.join(map(str, self.options))}; got {brief(value)}")
        return value


@dataclass(frozen=True)
class Bool:
    def check(self, key: str, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {brief(value)}")
        return value


@dataclass(frozen=True)
class Text:
    pattern: str | None = None
    describe: str = "text"
    optional: bool = False  # null (YAML `null`/`~`) allowed
    max_length: int = 4096  # a path or URL; longer text is a mistake that would otherwise fill messages

    def check(self, key: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        if isinstance(value, str) and len(value) > self.max_length:
            raise ParamsError(f"{key}: expected {self.describe} of at most {self.max_length:,} characters, got "
                              f"{brief(value)}")
        if not isinstance(value, str) or not value or (self.pattern and not re.fullmatch(self.pattern, value)):
            raise ParamsError(f"{key}: expected {self.describe}, got {brief(value)}")
        return value


@dataclass(frozen=True)
class IntList:
    min_len: int = 1
    ge: int = 1
    max_len: int = MAX_LAYERS

    def check(self, key: str, value: Any) -> Any:
        if (not isinstance(value, list) or len(value) < self.min_len
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= self.ge for v in value)):
            raise ParamsError(f"{key}: expected a list of at least {self.min_len} integers >= {self.ge}, "
                              f"got {brief(value)}")
        if len(value) > self.max_len:
            raise ParamsError(f"{key}: expected at most {self.max_len} entries, got {len(value)}")
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
            valid = (isinstance(value, (int, float)) and not isinstance(value, bool)  # ints: isfinite overflows
                     and (isinstance(value, int) or math.isfinite(value)) and value >= 0)
        if not valid:
            raise ParamsError(f"{key}: {brief(value)}: expected a number of epochs >= 0 or a percentage of "
                              "train.epochs such as '30%'")
        return value


SCHEMA: dict[str, Any] = {
    "data": {
        "source": Text(describe="cifar10, synthetic, a path under data/sources/ or an http(s)/file URL"),
        "url": Text(describe="an http(s):// or file:// URL"),
        "sha256": Text(pattern=r"[0-9a-fA-F]{64}", describe="null or 64 hex digits", optional=True),
        "synthetic": {"train_size": Num(integer=True, ge=20, le=1_000_000),  # 3 GB of 32x32 images
                      "test_size": Num(integer=True, ge=10, le=1_000_000)},
        "image_size": Num(integer=True, ge=IMAGE_SIZES.start, le=IMAGE_SIZES.stop - 1),
        "on_error": Choice(("raise", "skip")),
        "test_fraction": Num(gt=0, lt=1),
        "val_fraction": Num(ge=0, lt=1),
        "seed": Num(integer=True, ge=0, le=SEED_MAX),
        "limits": {"image_megapixels": Num(gt=0), "image_mb": Num(gt=0), "archive_files": Num(integer=True, ge=1),
                   "archive_gb": Num(gt=0), "compression_ratio": Num(ge=1)},
    },
    "normalize": {"stats": Choice(("dataset", "fixed"))},
    "train": {
        "model": Choice(MODELS),
        "mlp": {"hidden": IntList(min_len=0)},
        "cnn": {"channels": IntList(min_len=3)},
        "airnet": {"widths": IntList(min_len=3), "whiten_bias_epochs": Phase()},
        "resnet18": {"input_size": Num(integer=True, ge=32, le=1024)},
        "efficientnet_lite0": {"input_size": Num(integer=True, ge=1, le=1024), "dropout": Num(ge=0, lt=1)},
        "pretrained": Text(describe="none or a path to an ImageNet state_dict file under models/pretrained/"),
        "init": Text(describe="none or a path to a checkpoint of this pipeline under models/pretrained/"),
        "freeze_backbone": Bool(),
        "fine_tune": {"frozen_epochs": Phase(), "lr_mult": Num(ge=1, le=1e6),
                      "batchnorm": Choice(("auto", "train", "frozen"))},
        "cache_features": Bool(),
        "epochs": Num(gt=0),  # fractions allowed: short benchmark runs and schedules in epochs
        "keep": Choice(("last", "best")),
        "monitor": Choice(MONITORS),
        "patience": Num(integer=True, ge=0),
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
        "class_weights": Choice(("none", "balanced")),
        "sampler": Choice(("shuffle", "balanced")),
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
        "seed": Num(integer=True, ge=0, le=SEED_MAX),
        "ensemble": Num(integer=True, ge=1),
        "nproc": Num(integer=True, ge=1),
    },
    "evaluate": {"batch_size": Num(integer=True, ge=1), "tta": Choice((1, 2, 6)), "top_k": Num(integer=True, ge=1)},
    # report.baseline: a revision as git names one, never an option (no leading '-'); a missing one is skipped
    "report": {"samples": Num(integer=True, ge=0, le=100),
               "baseline": Text(pattern=r"[\w./@{}~^:+][\w./@{}~^:+-]*", optional=True, max_length=255,
                                describe="null or a git revision (a branch, tag or commit)")},
    # opset 18 is the lowest torch's ONNX exporter writes; the tolerance is relative to 1 + |logit|
    "export": {"opset": Num(integer=True, ge=18, le=99), "check_images": Num(integer=True, ge=1, le=100_000),
               "tolerance": Num(gt=0, lt=1)},
}


def check_section(prefix: str, schema: dict[str, Any], values: Any, source: str = PARAMS_FILE) -> None:
    """Check `values` against `schema`; `source` names where they come from in the unknown/missing key messages."""
    if not isinstance(values, dict):
        raise ParamsError(f"{prefix or 'params'}: expected a mapping of keys, got {brief(values)}")
    for key in values:
        if key not in schema:
            name = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ParamsError(f"unknown key {brief(name)} in {source}{hint}; valid keys"
                              f"{' in ' + prefix if prefix else ''}: {', '.join(schema)}")
    for key, rule in schema.items():
        name = f"{prefix}.{key}" if prefix else key
        if key not in values:
            raise ParamsError(f"missing key {name!r} in {source}")
        if isinstance(rule, dict):
            check_section(name, rule, values[key], source)
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
    _check_weight_files(train)
    if train["optimizer"] == "muon" and (train["model"] == "mlp" or train["freeze_backbone"]):
        why = "the mlp has none" if train["model"] == "mlp" else "freeze_backbone freezes them all"
        raise ParamsError(f"train.optimizer: muon trains conv filters and {why}; set train.optimizer: sgd")
    low_res_epochs = phase_epochs(train["low_res"]["epochs"], train["epochs"])
    if train["low_res"]["size"] and low_res_epochs and train["model"] not in RESOLUTION_FREE:
        raise ParamsError(f"train.low_res: model {train['model']!r} takes one input size only; low-resolution "
                          f"epochs work with {', '.join(RESOLUTION_FREE)} (set train.low_res.size: 0)")
    _check_fine_tuning(train)


def _check_weight_files(train: dict[str, Any]) -> None:
    """train.pretrained (ImageNet weights) and train.init (a checkpoint of this pipeline): where they may be, and
    which models take them."""
    if train["pretrained"] != "none" and train["model"] not in PRETRAINED_MODELS:
        raise ParamsError(f"train.pretrained: ImageNet weights exist for {' and '.join(PRETRAINED_MODELS)}, not "
                          f"train.model {train['model']!r}; to start from an earlier model of this pipeline use "
                          "train.init")
    if train["pretrained"] != "none" and train["init"] != "none":
        raise ParamsError("train.pretrained and train.init both name starting weights; set one of them to none")
    for key in ("pretrained", "init"):
        value = train[key]
        if value == "none":
            continue
        parts = PurePosixPath(value).parts
        if PurePosixPath(value).is_absolute() or ".." in parts or parts[:2] != ("models", "pretrained"):
            raise ParamsError(f"train.{key}: {value!r} must be a file under models/pretrained/ (that folder is a "
                              "dependency of the train stage, so DVC retrains when the weights change)")
    if train["freeze_backbone"] and train["pretrained"] == "none" and train["init"] == "none":
        raise ParamsError("train.freeze_backbone: freezing needs starting weights (train.pretrained or train.init); "
                          "a frozen random backbone would learn nothing")


def _check_fine_tuning(train: dict[str, Any]) -> None:
    """train.fine_tune and train.cache_features: what they need from the model and the other train keys."""
    model, fine_tune = train["model"], train["fine_tune"]
    if model == "efficientnet_lite0" and train["efficientnet_lite0"]["input_size"] < EFFICIENTNET_TOTAL_STRIDE:
        raise ParamsError(f"train.efficientnet_lite0.input_size: {train['efficientnet_lite0']['input_size']} px is "
                          f"below the backbone's minimum of {EFFICIENTNET_TOTAL_STRIDE} px (its total stride: the "
                          "last stage would see less than one pixel); images are upsampled to it, so use e.g. 160")
    staged = phase_epochs(fine_tune["frozen_epochs"], train["epochs"]) > 0 or fine_tune["lr_mult"] != 1
    if model != "efficientnet_lite0" and (staged or fine_tune["batchnorm"] != "auto"):
        raise ParamsError(f"train.fine_tune: staged fine-tuning is built for efficientnet_lite0, not train.model "
                          f"{model!r}; set frozen_epochs: 0, lr_mult: 1 and batchnorm: auto")
    if staged and train["pretrained"] == "none" and train["init"] == "none":
        raise ParamsError("train.fine_tune: frozen_epochs and lr_mult fine-tune starting weights, but "
                          "train.pretrained and train.init are none")
    if not train["cache_features"]:
        return
    needs = [(model == "efficientnet_lite0", f"train.model: efficientnet_lite0 (not {model})"),
             (train["freeze_backbone"], "train.freeze_backbone: true"),
             (train["augment"]["translate"] == 0 and train["augment"]["cutout"] == 0,
              "train.augment.translate and cutout: 0 (only mirror images are cached)"),
             (train["nproc"] == 1, "train.nproc: 1")]
    missing = [text for ok, text in needs if not ok]
    if missing:
        raise ParamsError("train.cache_features: the features stage embeds each image once with a frozen backbone, "
                          f"which needs {'; '.join(missing)}")


def _check_training_relations(params: dict[str, Any]) -> None:
    """The train params against the image size (data.image_size is the size of every prepared image) and the seed
    range: what would otherwise fail in the middle of training."""
    train, image_size = params["train"], params["data"]["image_size"]
    model, config = train["model"], model_config_of(train)
    check_model_fields(model, config, image_size, classes=2, members=train["ensemble"], fields=PARAMS_FIELDS)
    low_res = train["low_res"]["size"]
    if low_res and phase_epochs(train["low_res"]["epochs"], train["epochs"]):
        smallest = min_input_size(model, config, image_size)
        if low_res < smallest:
            fix = (f"expected {smallest} to {image_size - 1}, or 0 (off)" if smallest < image_size
                   else "set it to 0 (off)")
            raise ParamsError(f"train.low_res.size: {low_res} px is too small for {model}, which needs at least "
                              f"{smallest} px ({input_size_reason(model, config, image_size, PARAMS_FIELDS)}); "
                              f"{fix}")
    translate = train["augment"]["translate"]
    if translate > image_size - 1:  # stages.dataset.augment reflects each index once: exact for shifts below the size
        raise ParamsError(f"train.augment.translate: {translate} px does not fit {image_size} px images "
                          f"(data.image_size); expected at most {image_size - 1}")
    if train["augment"]["cutout"] > image_size:
        raise ParamsError(f"train.augment.cutout: a {train['augment']['cutout']} px square is larger than the "
                          f"{image_size} px images (data.image_size); expected at most {image_size}, or 0 (off)")
    _check_selection(params)
    last_seed = train["seed"] + train["ensemble"] - 1
    if last_seed > SEED_MAX:
        raise ParamsError(f"train.seed: ensemble member {train['ensemble']} would train with seed {last_seed} "
                          f"(train.seed + member index); expected train.seed + train.ensemble - 1 <= {SEED_MAX}")


def selection_keys(train_cfg: dict[str, Any]) -> list[str]:
    """The train settings that compare epochs by train.monitor on the validation split, as "train.keep: best"
    and "train.patience: N"; empty when selection is off (keep: last, patience: 0)."""
    return [f"train.{key}: {train_cfg[key]}" for key, on in (("keep", train_cfg["keep"] == "best"),
                                                             ("patience", train_cfg["patience"] > 0)) if on]


def _check_selection(params: dict[str, Any]) -> None:
    """Selection (selection_keys) needs a validation split (train checks at its start that the split it reads has
    images, and of 2 classes for val_macro_f1)."""
    users = selection_keys(params["train"])
    if users and params["data"]["val_fraction"] == 0:
        raise ParamsError(f"{' and '.join(users)} compare{'s' if len(users) == 1 else ''} epochs by "
                          f"train.monitor ({params['train']['monitor']}) on the validation split, but "
                          f"data.val_fraction is 0 (no validation split); set data.val_fraction (e.g. 0.1), or "
                          f"train.keep: last and train.patience: 0")


def model_config_schema(model: str) -> dict[str, Any]:
    """The schema of a model's stored settings (stages.base.specs.model_config_of): train.<model> and its extras."""
    return {**SCHEMA["train"][model], **{key: SCHEMA["train"][key] for key in MODEL_CONFIG_EXTRAS.get(model, ())}}


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
    check_section("", SCHEMA, params)
    _check_relations(params)
    _check_training_relations(params)
    return params


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    return validate(read_yaml(path, "the pipeline's params"))


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
