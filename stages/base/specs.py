"""The models without torch: their names, which ones take any input size, each one's layer-list key, smallest
input and parameter count, and the size check that params and checkpoints share. stages/model/nets.py builds the
same models (tests/test_models.py checks every formula here against torch), so a params typo or a crafted
checkpoint is refused before any allocation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stages.base.runtime import ParamsError

MODELS = ("mlp", "cnn", "airnet", "resnet18", "efficientnet_lite0")
IMAGE_SIZES = range(8, 1025)  # data.image_size in pixels; the ONNX deployment checks a model's metadata against it
RESOLUTION_FREE = ("cnn", "airnet")  # end in global pooling, so train.low_res can shrink their input
CONV_NETS = ("cnn", "airnet", "resnet18", "efficientnet_lite0")  # run channels_last when train.channels_last is on
# models that can start from ImageNet weights (train.pretrained), and the command that puts them in models/pretrained/
PRETRAINED_MODELS = {"resnet18": "python tools/get_pretrained.py resnet18",
                     "efficientnet_lite0": "python tools/get_pretrained.py efficientnet_lite0"}
MAX_PARAMETERS = 1_000_000_000  # 4 GB of float32 weights; the largest model here (resnet18) has 11 million
MAX_LAYERS = 64  # entries of a hidden/channels/widths list
LAYER_KEYS = {"mlp": "hidden", "cnn": "channels", "airnet": "widths"}  # each model's list of layer widths
# train keys a checkpoint's model_config holds besides train.<model> (see model_config_of)
MODEL_CONFIG_EXTRAS = {"resnet18": ("freeze_backbone",)}
RESNET18_BACKBONE_PARAMETERS = 11_176_512  # torchvision's ResNet-18 without its final layer (512 x classes + bias)
EFFICIENTNET_LITE0_BACKBONE_PARAMETERS = 3_371_008  # without its classifier (1280 x classes + bias)
EFFICIENTNET_TOTAL_STRIDE = 32  # the stem and four stride-2 stages: the smallest input that leaves a 1x1 map


@dataclass(frozen=True)
class ModelFields:
    """What the model messages call the model's settings: the params.yaml keys, or a checkpoint's fields."""
    config: str  # the architecture's settings; "{model}" is replaced by the model's name
    image_size: str
    members: str  # the ensemble size


PARAMS_FIELDS = ModelFields(config="train.{model}", image_size="data.image_size", members="train.ensemble")
CHECKPOINT_FIELDS = ModelFields(config="model_config", image_size="image_size", members="state_dicts")


def model_config_of(train: dict[str, Any]) -> dict[str, Any]:
    """The settings of train.model as its checkpoint stores them (train.<model> and its MODEL_CONFIG_EXTRAS)."""
    model = train["model"]
    return {**train[model], **{key: train[key] for key in MODEL_CONFIG_EXTRAS.get(model, ())}}


def cnn_pools(channels: list[int], image_size: int) -> int:
    """How many 2x2 max-pools make_cnn builds for `image_size` images: one per block while 2 px or more are left."""
    pools = 0
    while pools < len(channels) and image_size >= 2:
        image_size //= 2
        pools += 1
    return pools


def min_input_size(model: str, config: dict[str, Any], image_size: int) -> int:
    """The smallest input side in pixels that the network built for `image_size` images runs on. A cnn needs one
    pixel left after each of its pools; airnet's 2x2 stem takes one pixel and each of its blocks halves the rest;
    the mlp only ever sees image_size, and resnet18 and efficientnet_lite0 resize their input to input_size first. tests/test_models.py
    runs every model at this size and one pixel below, so the formulas follow stages.model.nets."""
    if model == "cnn":
        return 2 ** cnn_pools(config["channels"], image_size)
    if model == "airnet":
        return 2 ** len(config["widths"]) + 1
    return 1


def parameter_count(model: str, config: dict[str, Any], image_size: int, classes: int) -> int:
    """The number of parameters stages.model.nets builds (checked against torch in tests/test_models.py): without
    torch, so a params typo or a crafted checkpoint is refused before any allocation."""
    if model == "mlp":
        widths = [3 * image_size**2, *config["hidden"], classes]
        return sum(a * b + b for a, b in zip(widths, widths[1:]))  # Linear layers with bias
    if model == "cnn":
        widths = [3, *config["channels"]]
        blocks = sum(9 * a * b + 2 * b for a, b in zip(widths, widths[1:]))  # 3x3 conv without bias, BatchNorm
        return blocks + widths[-1] * classes + classes
    if model == "airnet":
        widths = [24, *config["widths"]]  # the stem: 24 filters of 3x2x2 with bias
        blocks = sum(9 * a * b + 9 * b * b + 4 * b for a, b in zip(widths, widths[1:]))  # two convs, two BatchNorms
        return 24 * 12 + 24 + blocks + widths[-1] * classes  # the head has no bias
    if model == "efficientnet_lite0":
        return EFFICIENTNET_LITE0_BACKBONE_PARAMETERS + 1280 * classes + classes
    return RESNET18_BACKBONE_PARAMETERS + 512 * classes + classes


def _layers_key(model: str, fields: ModelFields) -> str:
    """The key of `model`'s list of layer widths (train.airnet.widths, model_config.widths, ...)."""
    return f"{fields.config.format(model=model)}.{LAYER_KEYS[model]}"


def input_size_reason(model: str, config: dict[str, Any], image_size: int, fields: ModelFields) -> str:
    """Why `model` needs its minimum input size (only cnn and airnet have one), for a message."""
    if model == "airnet":
        return f"a 2x2 stem, then {len(config['widths'])} blocks that halve the image: {_layers_key(model, fields)}"
    return f"{cnn_pools(config['channels'], image_size)} 2x2 max-pools: {_layers_key(model, fields)}"


def check_model_fields(model: str, config: dict[str, Any], image_size: int, classes: int, members: int,
                       fields: ModelFields) -> None:
    """A model that can be built: images at least its minimum input size, and at most MAX_PARAMETERS parameters
    over all `members` (ensemble members). `config` has passed model_config_schema."""
    smallest = min_input_size(model, config, image_size)
    if image_size < smallest:
        raise ParamsError(f"{fields.image_size}: {image_size} px is too small for {model}, which needs at least "
                          f"{smallest} px ({input_size_reason(model, config, image_size, fields)})")
    count = parameter_count(model, config, image_size, classes)
    if count * members > MAX_PARAMETERS:
        size = f"{count:,} parameters" + (f" per member, {count * members:,} for {members}" if members > 1 else "")
        if model in LAYER_KEYS:
            what = (f"{_layers_key(model, fields)}: {config[LAYER_KEYS[model]]} on {image_size} px images "
                    f"({fields.image_size}) gives {model} {size}")
        else:
            what = f"{fields.members}: {members} members of {model} have {size}"
        raise ParamsError(f"{what}; expected at most {MAX_PARAMETERS:,} in all: use fewer or narrower layers, "
                          "smaller images or fewer ensemble members")
