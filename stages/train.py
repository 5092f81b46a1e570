"""train: fit the model chosen in params `train` on data/prepared/train.pt, monitor on val.pt, and write the
self-describing checkpoint models/model.pth plus metrics/train.json, metrics/history.csv and
metrics/train_time.json (wall-clock numbers live only there, so every other output is bit-reproducible).

The whole training split sits in memory as one uint8 tensor (on the GPU when there is one); each epoch draws a
seeded permutation and augments whole batches at once. A resume checkpoint is written after every epoch to
models/resume/ (not a DVC output, so DVC does not delete it before a rerun); it is bound to a fingerprint of the
params and data and is used only when both match. Runs under torchrun (DistributedDataParallel) when
train.nproc > 1."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from stages.augment import alternating_flips, augment_batch, flip_mask
from stages.common import (CHECKPOINT_FORMAT, PipelineError, file_digest, load_split, load_torch, log,
                           pick_device, read_json, run_stage, save_torch, seed_everything, write_json, write_text)
from stages.config import load_params
from stages.models import (CONV_NETS, ImageClassifier, autocast_dtype, bias_and_norm_parameters, build_model,
                           infer, load_pretrained, model_config, model_from_checkpoint, pretrained_weights)

PREPARED = Path("data/prepared")
MODEL_PATH = Path("models/model.pth")
RESUME_PATH = Path("models/resume/train.pt")
METRICS_PATH = Path("metrics/train.json")
TIME_PATH = Path("metrics/train_time.json")
HISTORY_PATH = Path("metrics/history.csv")
HISTORY_COLUMNS = ("member", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
WHITENING_SAMPLE = 5000  # images used to estimate the airnet stem's patch covariance


# ---------------------------------------------------------------- distributed


def relaunch_under_torchrun(nproc: int) -> None:
    """train.nproc > 1: run this same stage under torchrun, one process per worker, and exit with its status."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "stages.train"]
    log(f"train.nproc={nproc}: {' '.join(command[1:])}")
    sys.exit(subprocess.call(command))


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); (0, 1) for a plain single-process run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    if device.type == "cpu":  # share the cores instead of every rank spinning on all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return dist.get_rank(), world


def all_reduce_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# ---------------------------------------------------------------- schedule and optimizer


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


def make_optimizers(model: nn.Module, train: dict[str, Any], device: torch.device) -> list[torch.optim.Optimizer]:
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
    filters = ([p for p in parameters if p.ndim == 4 and p.requires_grad] if train["optimizer"] == "muon" else [])
    in_muon = {id(p) for p in filters}
    scale, wd = train["bias_lr_scale"], train["weight_decay"]
    coupled_wd = 0.0 if train["decoupled_weight_decay"] else wd
    groups = [
        {"params": [p for p in parameters if id(p) not in special and id(p) not in in_muon], "lr_scale": 1.0,
         "wd": wd},
        {"params": [p for p in parameters if id(p) in special], "lr_scale": scale, "wd": wd / scale},
    ]
    for group in groups:
        group["weight_decay"] = coupled_wd / group["lr_scale"] if coupled_wd else 0.0
        group["peak_lr"] = train["lr"] * group["lr_scale"]
    optimizers: list[torch.optim.Optimizer] = [torch.optim.SGD(
        [g for g in groups if g["params"]], lr=train["lr"], momentum=train["momentum"],
        nesterov=train["nesterov"] and train["momentum"] > 0)]
    if filters:
        # bf16 Newton-Schulz where bf16 matmuls are native (it is only an update direction), fp32 elsewhere
        dtype = autocast_dtype(train["precision"], device) or torch.float32
        muon = Muon(filters, train["muon"]["lr"], train["muon"]["momentum"], nesterov=True,
                    dtype=torch.float32 if dtype == torch.float16 else dtype)
        muon.param_groups[0].update(peak_lr=train["muon"]["lr"], wd=0.0)
        optimizers.append(muon)
    return optimizers


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
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

    def end_of_epoch(self, model: nn.Module, step: int) -> None:
        """Lookahead: blend in the steps since the last pull-back and pull back once more, so validation and the
        saved model see the averaged weights. (Blending, not just pulling back: with only a few steps per epoch,
        a plain pull-back would throw those steps away every epoch.)"""
        if self.mode == "lookahead" and step >= self.start_step and step % self.LOOKAHEAD_EVERY:
            self._blend(model, self._lookahead_decay(step), pull_back=True)


# ---------------------------------------------------------------- helpers


def fingerprint(params: dict[str, Any], world: int) -> str:
    """Identifies a training run: the train params, the data files, the pretrained weights, the code of the
    modules training runs, the torch version and the process count. A resume checkpoint from any other run is
    ignored, so an edit to the model code never resumes from weights of the old code."""
    digest = hashlib.sha256(json.dumps(params["train"], sort_keys=True).encode())
    files = [PREPARED / name for name in ("train.pt", "val.pt", "meta.json")]
    files += [Path(__file__).with_name(name) for name in ("train.py", "models.py", "augment.py", "common.py")]
    if params["train"]["pretrained"] != "none":
        files.append(Path(params["train"]["pretrained"]))
    for path in files:
        digest.update(file_digest(path).encode())
    digest.update(f"{torch.__version__} world={world}".encode())
    return digest.hexdigest()


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def evaluate_split(model: ImageClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                   device: torch.device, dtype: torch.dtype | None, channels_last: bool) -> tuple[float, float]:
    logits = infer(model, images, batch_size, 1, device, dtype, channels_last)
    loss = F.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


def write_history(rows: list[dict[str, Any]]) -> None:
    def cell(value: Any) -> str:
        return "" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))
    lines = [",".join(HISTORY_COLUMNS)] + [",".join(cell(row[c]) for c in HISTORY_COLUMNS) for row in rows]
    write_text(HISTORY_PATH, "\n".join(lines) + "\n")


# ---------------------------------------------------------------- main


@dataclass
class Run:
    """What every member of a training run shares: params, device, processes and the data (on the device)."""
    cfg: dict[str, Any]
    device: torch.device
    rank: int
    world: int
    meta: dict[str, Any]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    fingerprint: str

    def say(self, message: str) -> None:
        if self.rank == 0:
            log(message)

    @property
    def channels_last(self) -> bool:
        return self.cfg["channels_last"] and self.cfg["model"] in CONV_NETS

    def build(self) -> ImageClassifier:
        return build_model(self.cfg["model"], model_config(self.cfg), len(self.meta["classes"]),
                           self.meta["image_size"], self.meta["mean"], self.meta["std"])


def train_member(run: Run, member: int, finished: list[dict[str, torch.Tensor]], history: list[dict[str, Any]],
                 elapsed: float, resume: dict[str, Any] | None) -> tuple[dict[str, torch.Tensor], float]:
    """Train ensemble member `member` (0-based; its seed is train.seed + member) and return its final weights and
    the training seconds of the whole run so far. Appends its per-epoch rows to `history`; after every epoch
    writes a resume checkpoint holding the finished members, so an interrupted run picks up where it stopped."""
    cfg, device, rank, world = run.cfg, run.device, run.rank, run.world
    seed = cfg["seed"] + member
    seed_everything(seed)
    model = run.build()
    if cfg["pretrained"] != "none":
        load_pretrained(model, cfg["pretrained"])
    if hasattr(model.net, "init_from_data"):
        model.net.init_from_data(model.normalize(run.train_images[:WHITENING_SAMPLE].cpu()))
    channels_last = run.channels_last
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    dtype = autocast_dtype(cfg["precision"], device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    optimizers = make_optimizers(model, cfg, device)

    train_images, train_labels = run.train_images, run.train_labels
    n_train = train_images.shape[0]
    cutout_fill = torch.tensor(run.meta["mean"]).mul(255).round().to(train_images.dtype)  # zero once normalized
    orientations = alternating_flips(n_train, seed) if cfg["augment"]["flip"] == "alternate" else None
    batch = cfg["batch_size"]
    full, remainder = divmod(n_train, batch)
    # The last, smaller batch is kept only when every process gets the same number (>= 2, for BatchNorm) of
    # its images; otherwise it is dropped (a different part of the data each epoch).
    steps_per_epoch = full + (1 if remainder >= 2 * world and remainder % world == 0 else 0)
    total_steps = max(1, round(cfg["epochs"] * steps_per_epoch))
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    warmup_steps = round(cfg["warmup_epochs"] * steps_per_epoch)
    low_res_size = cfg["low_res"]["size"]
    low_res_steps = round(cfg["low_res"]["epochs"] * steps_per_epoch) if low_res_size else 0
    if low_res_steps and low_res_size >= run.meta["image_size"]:  # the model check is in stages/config.py
        raise PipelineError(f"train.low_res.size: {low_res_size} must be smaller than the images "
                            f"({run.meta['image_size']} px) to save time")
    averaging = None
    if cfg["averaging"] != "none":
        averaging = WeightAverage(model, cfg["averaging"], cfg["averaging_decay"],
                                  round(cfg["averaging_start"] * steps_per_epoch), total_steps)

    start_epoch = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        for optimizer, optimizer_state in zip(optimizers, resume["optimizers"]):
            optimizer.load_state_dict(optimizer_state)
        if averaging is not None:
            averaging.state = {k: v.to(device) for k, v in resume["average"].items()}
        start_epoch = resume["epoch"]

    # airnet freezes its stem bias after a few epochs; DDP must then expect a parameter without a gradient.
    net = (nn.parallel.DistributedDataParallel(model, find_unused_parameters=hasattr(model.net, "on_epoch_start"))
           if world > 1 else model)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])
    ensemble = cfg["ensemble"]
    run.say(f"training {cfg['model']} ({sum(p.numel() for p in model.parameters()):,} parameters) on {device}, "
            f"{n_train} images, {n_epochs} epochs of {steps_per_epoch} steps, batch {batch}, "
            f"precision {dtype or torch.float32}".replace("torch.", "")
            + (f", {world} processes" if world > 1 else "")
            + (f"; ensemble member {member + 1} of {ensemble} (seed {seed})" if ensemble > 1 else ""))

    for epoch in range(start_epoch, n_epochs):
        epoch_start = time.perf_counter()
        net.train()
        if hasattr(model.net, "on_epoch_start"):
            model.net.on_epoch_start(epoch)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n_train, generator=generator)
        loss_sum = correct = seen = 0.0
        next_log = cfg["log_every"]
        steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
        for step_in_epoch in range(steps):
            step = epoch * steps_per_epoch + step_in_epoch
            indices = order[step_in_epoch * batch:(step_in_epoch + 1) * batch].to(device)
            # Augment the whole global batch, then take this rank's share: every rank draws the same random
            # numbers, so N processes see exactly the images one process would.
            flips = flip_mask(cfg["augment"]["flip"], indices, epoch, generator, orientations)
            images = augment_batch(train_images[indices], flips, cfg["augment"]["translate"], generator,
                                   cfg["augment"]["cutout"], cutout_fill)[rank::world].float()
            indices = indices[rank::world]
            if step < low_res_steps:
                images = F.interpolate(images, size=(low_res_size, low_res_size), mode="bilinear",
                                       antialias=True, align_corners=False)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = train_labels[indices]
            factor = lr_factor(step, total_steps, warmup_steps, cfg["schedule"])
            base_lr = cfg["lr"] * factor
            set_lr(optimizers, factor)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = net(images)
                loss = loss_fn(logits.float(), labels)
            if not torch.isfinite(loss):
                raise PipelineError(
                    f"training diverged: loss is {loss.item()} at epoch {epoch + 1}, step {step_in_epoch + 1} "
                    f"(lr {base_lr:.4g}). Most likely train.lr={cfg['lr']} is too high for this model and "
                    f"batch size; try a smaller lr or a longer warm-up. No model was saved.")
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg["decoupled_weight_decay"] and cfg["weight_decay"] > 0:
                apply_weight_decay(optimizers)
            for optimizer in optimizers:
                scaler.step(optimizer)
            scaler.update()
            if averaging is not None:
                averaging.after_step(model, step + 1)
            loss_sum += loss.item() * labels.shape[0]
            correct += (logits.argmax(1) == labels).sum().item()
            seen += labels.shape[0]
            if seen * world >= next_log:
                run.say(f"[epoch {epoch + 1}, {int(seen * world):>6d} images] loss: {loss_sum / seen:.3f}")
                next_log += cfg["log_every"]
        if averaging is not None:
            averaging.end_of_epoch(model, step + 1)
        loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], device, world)
        train_seconds = time.perf_counter() - epoch_start

        eval_model = model
        if averaging is not None and averaging.mode == "ema":
            eval_model = run.build().to(device)
            eval_model.load_state_dict(averaging.state)
        val_loss = val_acc = None
        if run.val_images.shape[0] and rank == 0:
            val_loss, val_acc = evaluate_split(eval_model, run.val_images, run.val_labels, max(batch, 256), device,
                                               dtype, channels_last)
        elapsed += time.perf_counter() - epoch_start
        history.append({"member": member + 1, "epoch": epoch + 1, "train_loss": loss_sum / seen,
                        "train_acc": correct / seen, "val_loss": val_loss, "val_acc": val_acc, "lr": base_lr})
        val_text = f"  val loss {val_loss:.4f} acc {val_acc:.4f}" if val_loss is not None else ""
        run.say(f"epoch {epoch + 1:>3d}/{n_epochs}  train loss {loss_sum / seen:.4f} acc {correct / seen:.4f}"
                f"{val_text}  lr {base_lr:.3g}  {train_seconds:.1f}s  {seen / train_seconds:,.0f} img/s")
        if rank == 0:
            save_torch({"fingerprint": run.fingerprint, "member": member, "members": finished, "epoch": epoch + 1,
                        "elapsed": elapsed, "history": history, "model": plain_state_dict(model),
                        "optimizers": [o.state_dict() for o in optimizers],
                        "average": averaging.state if averaging is not None else None}, RESUME_PATH)

    if averaging is not None and averaging.mode == "ema":
        return {k: v.detach().cpu().clone() for k, v in averaging.state.items()}, elapsed
    return plain_state_dict(model), elapsed


def train(params: dict[str, Any]) -> None:
    cfg = params["train"]
    device = pick_device()
    rank, world = init_distributed(device)
    if device.type == "cuda":
        if world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not cfg["deterministic"]
        if cfg["deterministic"]:
            # Deterministic kernels where CUDA has them; the few ops without one (max-pool and bilinear
            # upsampling backward) warn instead of failing, so those runs stay close but not bit-exact.
            torch.use_deterministic_algorithms(True, warn_only=True)

    meta = read_json(PREPARED / "meta.json", "data summary")
    train_images, train_labels = load_split(PREPARED / "train.pt")
    val_images, val_labels = load_split(PREPARED / "val.pt")
    if train_images.shape[0] < 2:
        raise PipelineError(f"{PREPARED / 'train.pt'}: the training split has {train_images.shape[0]} images")
    if cfg["batch_size"] > train_images.shape[0]:
        raise PipelineError(f"train.batch_size: {cfg['batch_size']} is larger than the training split "
                            f"({train_images.shape[0]} images)")
    if cfg["batch_size"] % world:
        raise PipelineError(f"train.batch_size: {cfg['batch_size']} must be divisible by train.nproc={world}")
    run = Run(cfg, device, rank, world, meta, train_images.to(device), train_labels.to(device), val_images,
              val_labels, fingerprint="")
    pretrained = None  # what the checkpoint records; the clear not-found error comes before the fingerprint reads it
    if cfg["pretrained"] != "none":
        pretrained = {"path": cfg["pretrained"], "sha256": file_digest(pretrained_weights(cfg["pretrained"]))}
    run.fingerprint = fingerprint(params, world)
    resume = None
    if RESUME_PATH.is_file():
        state = load_torch(RESUME_PATH, "resume checkpoint")
        if isinstance(state, dict) and state.get("fingerprint") == run.fingerprint:
            resume = state
            run.say(f"resuming after epoch {state['epoch']}"
                    + (f" of member {state['member'] + 1}" if cfg["ensemble"] > 1 else "") + f" from {RESUME_PATH}")
        else:
            run.say(f"ignoring {RESUME_PATH}: it belongs to other params or data")
    members: list[dict[str, torch.Tensor]] = list(resume["members"]) if resume else []
    history: list[dict[str, Any]] = list(resume["history"]) if resume else []
    elapsed = resume["elapsed"] if resume else 0.0
    for member in range(len(members), cfg["ensemble"]):
        state, elapsed = train_member(run, member, members, history, elapsed,
                                      resume if resume is not None and resume["member"] == member else None)
        members.append(state)

    if rank == 0:
        checkpoint = {
            "format": CHECKPOINT_FORMAT, "model": cfg["model"], "model_config": model_config(cfg),
            "classes": meta["classes"], "image_size": meta["image_size"], "mean": meta["mean"], "std": meta["std"],
            "state_dicts": members, "train": cfg, "pretrained": pretrained,
            "epochs_completed": max(row["epoch"] for row in history),
            "torch_version": torch.__version__.split("+")[0],
        }
        save_torch(checkpoint, MODEL_PATH)
        last = history[-1]
        metrics: dict[str, Any] = {"train": {"loss": round(last["train_loss"], 6), "acc": round(last["train_acc"], 6)}}
        if val_images.shape[0]:
            if len(members) > 1:  # the ensemble's own score, as evaluate will see it (without TTA)
                ensemble = model_from_checkpoint(checkpoint)
                if run.channels_last:
                    ensemble.to(memory_format=torch.channels_last)
                val_loss, val_acc = evaluate_split(ensemble, val_images, val_labels, max(cfg["batch_size"], 256),
                                                   device, autocast_dtype(cfg["precision"], device), run.channels_last)
            else:
                val_loss, val_acc = last["val_loss"], last["val_acc"]
            metrics["val"] = {"loss": round(val_loss, 6), "acc": round(val_acc, 6)}
        metrics["epochs"] = checkpoint["epochs_completed"]
        write_json(METRICS_PATH, metrics)
        write_history(history)
        n_images = train_images.shape[0] * cfg["epochs"] * cfg["ensemble"]
        write_json(TIME_PATH, {"train_time": {"seconds": round(elapsed, 2),
                                              "images_per_second": round(n_images / elapsed, 1)}})
        shutil.rmtree(RESUME_PATH.parent, ignore_errors=True)
        run.say(f"saved {MODEL_PATH} ({elapsed:.1f}s of training)")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    params = load_params()
    if params["train"]["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it when CUDA starts
    nproc = params["train"]["nproc"]
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        relaunch_under_torchrun(nproc)
    train(params)


if __name__ == "__main__":
    run_stage(main)
