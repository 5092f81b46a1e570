"""The model registry, shared by train, evaluate and predict.

Every model is an `ImageClassifier`: a fixed `Normalize` layer (the dataset's mean/std, stored in the state_dict)
followed by the network, so a checkpoint maps raw 0..255 images to logits with no preprocessing outside it.

- mlp:      the seed tutorial's fully connected net (Flatten -> 3072 -> 1024 -> ReLU -> 512 -> ReLU -> classes).
- cnn:      a small conv-BN-ReLU-pool CNN, the tutorial sequel's kind of model.
- airnet:   a fast CIFAR-10 CNN after the airbench / "How to train your ResNet" recipes: a frozen 2x2
            patch-whitening stem, three conv-pool-BN-GELU blocks with identity (dirac) init, BatchNorm with frozen
            scale, a max-pooled linear head scaled down by 1/9.
- resnet18: torchvision's ResNet-18 on images upsampled to `input_size`, optionally from pretrained weights.
- efficientnet_lite0: EfficientNet-Lite0 (stages/model/efficientnet.py) on images upsampled to `input_size`, for
            its ImageNet weights (stages/model/weights.py loads them); it scales its input itself (FIXED_NORMALIZATION).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stages.base.runtime import PipelineError
from stages.base.specs import CONV_NETS
from stages.dataset.augment import tta_views
from stages.model.efficientnet import PRETRAINED_NORMALIZATION, EfficientNetLite0
from stages.model.precision import autocast_dtype


class Normalize(nn.Module):
    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std


class ImageClassifier(nn.Module):
    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(images))


class Ensemble(nn.Module):
    """Models of one architecture trained on other seeds (train.ensemble); predicts the mean of their logits.
    (On the 2-core CPU, two half-length airnets scored below one full-length one: see BENCHMARKS.md.)"""

    def __init__(self, members: list[ImageClassifier]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(images).float() for member in self.members]).mean(0)


# ---------------------------------------------------------------- mlp and cnn


def make_mlp(num_classes: int, image_size: int, hidden: list[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = 3 * image_size * image_size
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def make_cnn(num_classes: int, image_size: int, channels: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    width = 3
    for size in channels:
        layers += [nn.Conv2d(width, size, 3, padding=1, bias=False), nn.BatchNorm2d(size), nn.ReLU()]
        if image_size >= 2:  # pool while there is something left to pool
            layers.append(nn.MaxPool2d(2))
            image_size //= 2
        width = size
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- airnet


class FrozenScaleBatchNorm(nn.BatchNorm2d):
    """BatchNorm with the scale fixed at 1 (only the shift learns) and fast-moving running statistics: with
    short schedules the statistics must follow the weights closely."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


class DiracConv(nn.Conv2d):
    """3x3 convolution whose first input-sized block of filters starts as the identity, so every block starts
    close to a skip connection (trains faster than a purely random init)."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__(channels_in, channels_out, 3, padding=1, bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.dirac_(self.weight.data[: self.in_channels])


class ConvBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.conv1 = DiracConv(channels_in, channels_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = FrozenScaleBatchNorm(channels_out)
        self.conv2 = DiracConv(channels_out, channels_out)
        self.norm2 = FrozenScaleBatchNorm(channels_out)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class AirNet(nn.Module):
    WHITEN_KERNEL = 2
    DEAD_VARIANCE = 0.05  # whitened output variance below which a stem direction is switched off (init_from_data)

    def __init__(self, num_classes: int, image_size: int, widths: list[int], whiten_bias_epochs: float) -> None:
        super().__init__()
        whiten_width = 2 * 3 * self.WHITEN_KERNEL**2  # every eigenvector of the 2x2 patch covariance and its negative
        self.whiten = nn.Conv2d(3, whiten_width, self.WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.whiten_bias_epochs = whiten_bias_epochs
        blocks, width = [], whiten_width
        for size in widths:
            blocks.append(ConvBlock(width, size))
            width = size
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, num_classes, bias=False)
        self.act = nn.GELU()

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> int:
        """Set the stem to whiten 2x2 patches: its filters are the patch covariance's eigenvectors scaled by
        1/sqrt(eigenvalue + eps), so the first layer sees decorrelated inputs of (at most) unit variance. Returns
        how many of the 12 directions carry signal.

        A direction in which the images hardly vary (equal colour channels: grayscale pictures, scans; constant
        borders) gives a filter whose output is ~0 on every image, while its bias trains at the BatchNorm learning
        rate (train.bias_lr_scale) with nothing to anchor it: it drifts by hundreds, and eval-mode BatchNorm,
        lagging behind, sends every image to one class. Zeroing such a filter is no better (the next BatchNorm
        then divides a zero-variance channel's gradient by sqrt(eps)). So each such filter is replaced by a copy of
        a filter that carries signal, strongest first: a duplicate channel is harmless, and its bias is anchored
        like every other. Natural RGB images keep every direction (on CIFAR-10 the weakest one's whitened variance
        is about 0.19, far above DEAD_VARIANCE), so their training is unchanged."""
        k = self.WHITEN_KERNEL
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, 3 * k * k).double()
        covariance = patches.T @ patches / patches.shape[0]
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).flip(0)
        whitened_variance = (eigenvalues.clamp_min(0) / (eigenvalues.clamp_min(0) + eps)).flip(0)
        live = torch.nonzero(whitened_variance >= self.DEAD_VARIANCE).flatten()
        dead = torch.nonzero(whitened_variance < self.DEAD_VARIANCE).flatten()
        if len(live) and len(dead):
            filters[dead] = filters[live[torch.arange(len(dead)) % len(live)]]
        filters = filters.reshape(-1, 3, k, k).float()
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        return len(live)

    def on_epoch_start(self, epoch: int) -> None:
        self.whiten.bias.requires_grad_(epoch < self.whiten_bias_epochs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act(self.whiten(x)))
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) / 9  # a small output scale keeps early logits soft, as in airbench


# ---------------------------------------------------------------- resnet18


class ResNet18(nn.Module):
    """torchvision's ResNet-18 behind an upsampling step: its stem downsamples 4x, so 32x32 inputs would leave
    1x1 maps by the last stage."""

    def __init__(self, num_classes: int, image_size: int, input_size: int, freeze_backbone: bool) -> None:
        super().__init__()
        from torchvision.models import resnet18  # imported here: only this model needs torchvision

        self.input_size = input_size
        self.resnet = resnet18(weights=None, num_classes=num_classes)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            for name, parameter in self.resnet.named_parameters():
                parameter.requires_grad_(name.startswith("fc."))

    def train(self, mode: bool = True) -> "ResNet18":
        super().train(mode)
        if self.freeze_backbone:  # a frozen backbone keeps its BatchNorm statistics too
            for name, module in self.resnet.named_children():
                if name != "fc":
                    module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.resnet(x)


# ---------------------------------------------------------------- registry

BUILDERS = {
    "mlp": lambda classes, size, cfg: make_mlp(classes, size, cfg["hidden"]),
    "cnn": lambda classes, size, cfg: make_cnn(classes, size, cfg["channels"]),
    "airnet": lambda classes, size, cfg: AirNet(classes, size, cfg["widths"], cfg["whiten_bias_epochs"]),
    "resnet18": lambda classes, size, cfg: ResNet18(classes, size, cfg["input_size"], cfg["freeze_backbone"]),
    "efficientnet_lite0": lambda classes, size, cfg: EfficientNetLite0(classes, cfg["dropout"], cfg["input_size"]),
}
# Networks whose (pretrained) weights expect their own input scaling rather than the dataset's mean and std.
FIXED_NORMALIZATION = {"efficientnet_lite0": PRETRAINED_NORMALIZATION}


def input_normalization(name: str, mean: list[float], std: list[float]) -> tuple[list[float], list[float]]:
    """The mean and std (of 0..1 pixels) that model `name` normalizes its input with: the dataset's, unless the
    network fixes its own (FIXED_NORMALIZATION)."""
    return FIXED_NORMALIZATION.get(name, (mean, std))


def build_model(name: str, config: dict[str, Any], num_classes: int, image_size: int,
                mean: list[float], std: list[float]) -> ImageClassifier:
    if name not in BUILDERS:
        raise PipelineError(f"unknown model {name!r}; known models: {', '.join(BUILDERS)}")
    return ImageClassifier(BUILDERS[name](num_classes, image_size, config), *input_normalization(name, mean, std))


def model_from_checkpoint(checkpoint: dict[str, Any]) -> ImageClassifier | Ensemble:
    """Rebuild the trained model from a checkpoint loaded with stages.model.checkpoint.load_checkpoint, in eval mode: an
    `Ensemble` when the checkpoint holds several members."""
    members = []
    for state_dict in checkpoint["state_dicts"]:
        model = build_model(checkpoint["model"], checkpoint["model_config"], len(checkpoint["classes"]),
                            checkpoint["image_size"], checkpoint["mean"], checkpoint["std"])
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as error:
            raise PipelineError(f"checkpoint weights do not fit model {checkpoint['model']!r}: "
                                f"{str(error).splitlines()[0]}") from None
        members.append(model)
    return (members[0] if len(members) == 1 else Ensemble(members)).eval()


def bias_and_norm_parameters(model: nn.Module) -> set[int]:
    """ids of BatchNorm parameters: they get their own learning-rate scale (see train.bias_lr_scale)."""
    return {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters(recurse=False)}


# ---------------------------------------------------------------- precision and inference


@dataclass(frozen=True)
class InferenceSettings:
    """How a model runs: where, under which autocast dtype (None: plain fp32) and in which memory layout."""
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype | None = None
    channels_last: bool = False


def inference_settings(model: str, train: dict[str, Any], device: torch.device) -> InferenceSettings:
    """The one rule for running a model the way it was trained (train, evaluate and predict all use it):
    `train.precision` picks the autocast dtype for this device, and conv nets run channels_last when
    `train.channels_last` is on. `train` may come from an old checkpoint that lacks keys: fp32, NCHW then."""
    return InferenceSettings(device=device, dtype=autocast_dtype(train.get("precision", "fp32"), device),
                             channels_last=bool(train.get("channels_last", False)) and model in CONV_NETS)


@torch.inference_mode()
def infer(model: nn.Module, images: torch.Tensor, *, batch_size: int, tta: int = 1,
          settings: InferenceSettings = InferenceSettings()) -> torch.Tensor:
    """Logits (float32, N x classes) for uint8 images N x 3 x H x W, averaged over the TTA views."""
    device, dtype = settings.device, settings.dtype
    model.eval().to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size].to(device).float()
        if settings.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        logits = None
        for view, weight in tta_views(batch, tta):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = model(view).float() * weight
            logits = out if logits is None else logits + out
        outputs.append(logits.cpu())
    if not outputs:
        return torch.zeros(0, 0)
    return torch.cat(outputs)
