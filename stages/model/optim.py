"""The optimizer side of training: the step plan and learning-rate schedule, the optimizers (SGD with its parameter
groups, and Muon for conv filters), decoupled weight decay, and weight averaging (EMA or lookahead). The train
stage and bench/profile_step.py both build their optimizers here, so a benchmark measures the step training runs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stages.base.runtime import PipelineError
from stages.model.nets import bias_and_norm_parameters
from stages.model.precision import autocast_dtype

# ---------------------------------------------------------------- schedule and optimizers


@dataclass(frozen=True)
class Schedule:
    """The run's length in optimizer steps, the same for every member: each phase of train (in epochs) becomes a
    whole number of steps."""
    steps_per_epoch: int
    total_steps: int
    epochs: int  # epochs started; the last one may stop part-way (fractional train.epochs)
    warmup_steps: int
    low_res_steps: int
    averaging_start: int
    frozen_steps: int  # the first steps train only the classifier (train.fine_tune.frozen_epochs; freeze_backbone: all)

    def global_step(self, epoch: int, step_in_epoch: int) -> int:
        return epoch * self.steps_per_epoch + step_in_epoch

    def steps_in(self, epoch: int) -> int:
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)


def plan_schedule(train_cfg: dict[str, Any], n_train: int, world: int, image_size: int) -> Schedule:
    """The Schedule of train params whose phase lengths are in epochs (resolve_phases), for `n_train` images
    shared by `world` processes."""
    full, remainder = divmod(n_train, train_cfg["batch_size"])
    # The last, smaller batch is kept only when every process gets the same number (>= 2, for BatchNorm) of
    # its images; otherwise it is dropped (a different part of the data each epoch).
    steps_per_epoch = full + (1 if remainder >= 2 * world and remainder % world == 0 else 0)
    total_steps = max(1, round(train_cfg["epochs"] * steps_per_epoch))
    low_res_size = train_cfg["low_res"]["size"]
    low_res_steps = round(train_cfg["low_res"]["epochs"] * steps_per_epoch) if low_res_size else 0
    if low_res_steps and low_res_size >= image_size:  # the params check knows the model, not the image size
        raise PipelineError(f"train.low_res.size: {low_res_size} must be smaller than the images "
                            f"({image_size} px) to save time")
    frozen_steps = total_steps if train_cfg["freeze_backbone"] else \
        min(total_steps, round(train_cfg["fine_tune"]["frozen_epochs"] * steps_per_epoch))
    return Schedule(steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                    epochs=math.ceil(total_steps / steps_per_epoch),
                    warmup_steps=round(train_cfg["warmup_epochs"] * steps_per_epoch), low_res_steps=low_res_steps,
                    averaging_start=round(train_cfg["averaging_start"] * steps_per_epoch), frozen_steps=frozen_steps)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Learning-rate multiplier at `step` (0-based): linear warm-up from 0 over `warmup_steps`, then constant,
    linear decay to 0, or cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def orthogonalize(matrix: torch.Tensor, dtype: torch.dtype, steps: int = 3) -> torch.Tensor:
    """An approximation of U V^T for matrix = U S V^T (all singular values pushed towards 1) by a quintic
    Newton-Schulz iteration. The coefficients (Muon's) converge fast from a Frobenius-normalized start rather
    than exactly; a few steps are enough for an optimizer update."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix.to(dtype)
    x = x / (x.norm() + 1e-7)
    wide = x.shape[0] <= x.shape[1]
    if not wide:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(matrix.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum orthogonalized by Newton-Schulz (Keller Jordan's Muon, as in airbench94_muon), for conv filters.
    Each update is the (Nesterov) momentum with all its singular values set to ~1, so every direction of a
    filter bank moves at the same rate instead of a few dominant ones. The filters are held at a fixed norm
    (sqrt of the output channels): BatchNorm follows each conv, so their scale carries no information, and
    without it the effective step size would drift as the weights grow."""

    def __init__(self, params: list[torch.Tensor], lr: float, momentum: float, nesterov: bool,
                 dtype: torch.dtype) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov})
        self.dtype = dtype

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                buffer.mul_(momentum).add_(p.grad)
                direction = p.grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
                p.mul_(math.sqrt(p.shape[0]) / p.norm().clamp_min(1e-12))
                update = orthogonalize(direction.reshape(p.shape[0], -1), self.dtype).view_as(p)
                p.add_(update, alpha=-group["lr"])


def make_optimizers(model: nn.Module, train_cfg: dict[str, Any],
                    device: torch.device) -> list[torch.optim.Optimizer]:
    """SGD with two parameter groups: BatchNorm parameters get lr * bias_lr_scale (and weight decay divided by
    it, so lr x wd stays the same), everything else the base rate. With decoupled weight decay the decay is
    applied to the weights directly in `apply_weight_decay`, not through the gradient and momentum.
    train.optimizer muon: the conv filters go to `Muon` instead (no weight decay: it holds their norm fixed).
    Every group keeps its peak rate in "peak_lr"; `set_lr` scales all of them by the schedule."""
    special = bias_and_norm_parameters(model)
    # Frozen parameters stay in the groups too (SGD skips them while they have no gradient): airnet's stem bias
    # trains only for the first epochs.
    parameters = list(model.parameters())
    # (the params check refuses muon for models without trainable conv filters)
    filters = [p for p in parameters if p.ndim == 4 and p.requires_grad] if train_cfg["optimizer"] == "muon" else []
    in_muon = {id(p) for p in filters}
    scale, wd = train_cfg["bias_lr_scale"], train_cfg["weight_decay"]
    coupled_wd = 0.0 if train_cfg["decoupled_weight_decay"] else wd
    groups = [
        {"params": [p for p in parameters if id(p) not in special and id(p) not in in_muon], "lr_scale": 1.0,
         "wd": wd},
        {"params": [p for p in parameters if id(p) in special], "lr_scale": scale, "wd": wd / scale},
    ]
    if train_cfg["fine_tune"]["lr_mult"] != 1:
        groups = split_by_layer(groups, layer_lr_scales(model, train_cfg["fine_tune"]["lr_mult"]))
    for group in groups:
        group["weight_decay"] = coupled_wd / group.get("wd_divisor", group["lr_scale"]) if coupled_wd else 0.0
        group["peak_lr"] = train_cfg["lr"] * group["lr_scale"]
    optimizers: list[torch.optim.Optimizer] = [torch.optim.SGD(
        [g for g in groups if g["params"]], lr=train_cfg["lr"], momentum=train_cfg["momentum"],
        nesterov=train_cfg["nesterov"] and train_cfg["momentum"] > 0)]
    if filters:
        # bf16 Newton-Schulz where bf16 matmuls are native (it is only an update direction), fp32 elsewhere
        dtype = autocast_dtype(train_cfg["precision"], device) or torch.float32
        muon = Muon(filters, train_cfg["muon"]["lr"], train_cfg["muon"]["momentum"], nesterov=True,
                    dtype=torch.float32 if dtype == torch.float16 else dtype)
        muon.param_groups[0].update(peak_lr=train_cfg["muon"]["lr"], wd=0.0)
        optimizers.append(muon)
    return optimizers


def layer_lr_scales(model: nn.Module, lr_mult: float) -> dict[int, float]:
    """Discriminative learning rates for fine-tuning, as fastai's slice(lr / lr_mult, lr): the network's layer
    groups (input to output, `layer_groups()`) get multipliers spaced geometrically from 1 / lr_mult to 1, so the
    early, general layers move least. (The params check allows lr_mult only for models that have layer groups.)"""
    layer_groups = model.net.layer_groups()
    last = max(1, len(layer_groups) - 1)
    return {id(p): lr_mult ** ((index - last) / last)
            for index, modules in enumerate(layer_groups) for module in modules for p in module.parameters()}


def split_by_layer(groups: list[dict[str, Any]], scales: dict[int, float]) -> list[dict[str, Any]]:
    """Each parameter group split by layer multiplier (`layer_lr_scales`), which multiplies its lr_scale. Weight
    decay is not scaled up to match: it shrinks the early layers as slowly as they learn, which keeps them near
    their pretrained values (as fastai, whose decay follows each group's rate)."""
    split = []
    for group in groups:
        for scale in sorted({scales.get(id(p), 1.0) for p in group["params"]}):
            split.append({"params": [p for p in group["params"] if scales.get(id(p), 1.0) == scale],
                          "lr_scale": group["lr_scale"] * scale, "wd": group["wd"], "wd_divisor": group["lr_scale"]})
    return split


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    """Every group at its own peak rate times the schedule's factor, so the groups keep their ratios."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor


@torch.no_grad()
def apply_weight_decay(optimizers: list[torch.optim.Optimizer]) -> None:
    """Decoupled weight decay (SGDW): w <- w * (1 - lr_t * wd), the same for every group."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            factor = 1.0 - group["lr"] * group["wd"]
            for p in group["params"]:
                if p.requires_grad and p.ndim > 1 and factor != 1.0:  # biases and norm shifts are not decayed
                    p.mul_(factor)


# ---------------------------------------------------------------- weight averaging


class WeightAverage:
    """A moving average of all weights and BatchNorm statistics.
    ema: updated every step with a constant decay; the average is what gets evaluated and saved.
    lookahead: updated every LOOKAHEAD_EVERY steps with a decay that ramps up as (step / total)^3, and the
    weights are pulled back to the average each time (and at the end of every epoch), as in the fast CIFAR-10
    recipes: it moves fast early on and averages strongly at the end."""

    LOOKAHEAD_EVERY = 5

    def __init__(self, model: nn.Module, mode: str, decay: float, start_step: int, total_steps: int) -> None:
        self.mode, self.decay, self.start_step, self.total_steps = mode, decay, start_step, total_steps
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def _blend(self, model: nn.Module, decay: float, pull_back: bool) -> None:
        for key, value in model.state_dict().items():
            average = self.state[key]
            if value.is_floating_point():
                average.lerp_(value, 1.0 - decay)
                if pull_back:
                    value.copy_(average)
            else:
                average.copy_(value)

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after optimizer step number `step` (1-based)."""
        if step < self.start_step:
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # start from the weights
        elif self.mode == "ema":
            self._blend(model, self.decay, pull_back=False)
        elif step % self.LOOKAHEAD_EVERY == 0:
            self._blend(model, self._lookahead_decay(step), pull_back=True)

    def _lookahead_decay(self, step: int) -> float:
        return self.decay ** self.LOOKAHEAD_EVERY * (step / self.total_steps) ** 3

    def evaluation_state(self) -> dict[str, torch.Tensor] | None:
        """The weights to validate and save in place of the model's own: the EMA average; None for lookahead,
        whose end_of_epoch has already pulled the model to its average."""
        return self.state if self.mode == "ema" else None

    def end_of_epoch(self, model: nn.Module, step: int) -> None:
        """Lookahead: blend in the steps since the last pull-back and pull back once more, so validation and the
        saved model see the averaged weights. (Blending, not just pulling back: with only a few steps per epoch,
        a plain pull-back would throw those steps away every epoch.)"""
        if self.mode == "lookahead" and step >= self.start_step and step % self.LOOKAHEAD_EVERY:
            self._blend(model, self._lookahead_decay(step), pull_back=True)
