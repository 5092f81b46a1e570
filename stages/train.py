"""train: fit the model chosen in params `train` on data/prepared/train.pt, monitor on val.pt, and write the
self-describing checkpoint models/model.pth plus metrics/train.json, metrics/history.csv and
metrics/train_time.json (wall-clock numbers live only there, so every other output is bit-reproducible).

The whole training split sits in memory as one uint8 tensor (on the GPU when there is one); each epoch draws a
seeded permutation (or, with train.sampler: balanced, seeded class-balanced draws) and augments whole batches at
once. A resume checkpoint is written after every epoch to models/resume/ (not a DVC output, so DVC does not delete
it before a rerun); it is bound to a fingerprint of the params and data and is used only when both match. One that
cannot be read (truncated, damaged) is ignored with a line saying so: the run starts afresh and gives the same
bytes as without it. Runs under torchrun (DistributedDataParallel) when train.nproc > 1, one process per CUDA GPU
(more processes than GPUs are refused before launching) or CPU processes with gloo; a rank that fails reports its
own one-line error, which is the one line the stage prints, instead of torchrun's summary of failed processes. The
optimizers, the schedule and weight averaging live in stages/optim.py; which epoch's weights are kept, and early
stopping, in stages/selection.py."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from stages.augment import alternating_flips, augment_batch, flip_mask
from stages.common import (PACKAGE_DIR, PipelineError, code_closure, file_digest, load_split, load_torch, log,
                           make_checkpoint, pick_device, read_json, run_stage, save_torch, seed_everything,
                           write_json, write_text)
from stages.config import load_params, resolve_phases
from stages.models import (ImageClassifier, InferenceSettings, autocast_dtype, build_model, infer,
                           inference_settings, load_pretrained, model_config, model_from_checkpoint,
                           pretrained_weights)
from stages.optim import WeightAverage, apply_weight_decay, lr_factor, make_optimizers, set_lr
from stages.paths import (HISTORY_CSV, META_JSON, MODEL_PATH, RESUME_PATH, TRAIN_METRICS, TRAIN_SPLIT, TRAIN_TIME,
                          VAL_SPLIT)
from stages.scores import macro_f1
from stages.selection import Selection

HISTORY_COLUMNS = ("member", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1", "lr")
WHITENING_SAMPLE = 5000  # images used to estimate the airnet stem's patch covariance
RESUME_FIELDS = frozenset({"fingerprint", "member", "members", "selections", "epoch", "elapsed", "history", "model",
                           "optimizers", "average", "selection"})  # what save_resume writes


# ---------------------------------------------------------------- distributed


def check_processes(nproc: int) -> None:
    """Before launching: DistributedDataParallel on CUDA runs one process per GPU, and gloo cannot reduce MPS
    tensors, so train.nproc must fit the device that pick_device chooses."""
    device = pick_device()
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise PipelineError(f"train.nproc: {nproc} processes, but this machine has {count} CUDA GPU"
                            f"{'' if count == 1 else 's'} and each process needs its own; set train.nproc to at most "
                            f"{count} (or PIPELINE_DEVICE=cpu to train in CPU processes)")
    if device.type == "mps":
        raise PipelineError(f"train.nproc: {nproc} processes cannot share an MPS device; set train.nproc: 1 "
                            f"(or PIPELINE_DEVICE=cpu to train in CPU processes)")


def relaunch_under_torchrun(nproc: int) -> None:
    """train.nproc > 1: run this same stage under torchrun, one process per worker, and exit with its status.
    The processes' stderr is held back until they end: when one failed with its own one-line `error:`, that line
    is this stage's error (torchrun's report of failed processes would bury it); anything else, a traceback
    included, is shown as it was written."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "stages.train"]
    log(f"train.nproc={nproc}: {' '.join(command[1:])}")
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as stderr:
        status = subprocess.call(command, stderr=stderr)
        stderr.seek(0)
        captured = stderr.read()
    errors = [line for line in captured.splitlines() if line.startswith("error: ")]  # run_stage's lines
    if status != 0 and errors:
        raise PipelineError(errors[0].removeprefix("error: "))
    sys.stderr.write(captured)
    sys.exit(status)


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


def setup_device(cfg: dict[str, Any]) -> tuple[torch.device, int, int]:
    """This process's device, rank and world size, with the CUDA kernel choices train.deterministic asks for."""
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
    return device, rank, world


# ---------------------------------------------------------------- the run


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

    def global_step(self, epoch: int, step_in_epoch: int) -> int:
        return epoch * self.steps_per_epoch + step_in_epoch

    def steps_in(self, epoch: int) -> int:
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)


def plan_schedule(cfg: dict[str, Any], n_train: int, world: int, image_size: int) -> Schedule:
    full, remainder = divmod(n_train, cfg["batch_size"])
    # The last, smaller batch is kept only when every process gets the same number (>= 2, for BatchNorm) of
    # its images; otherwise it is dropped (a different part of the data each epoch).
    steps_per_epoch = full + (1 if remainder >= 2 * world and remainder % world == 0 else 0)
    total_steps = max(1, round(cfg["epochs"] * steps_per_epoch))
    low_res_size = cfg["low_res"]["size"]
    low_res_steps = round(cfg["low_res"]["epochs"] * steps_per_epoch) if low_res_size else 0
    if low_res_steps and low_res_size >= image_size:  # the model check is in stages/config.py
        raise PipelineError(f"train.low_res.size: {low_res_size} must be smaller than the images "
                            f"({image_size} px) to save time")
    return Schedule(steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                    epochs=math.ceil(total_steps / steps_per_epoch),
                    warmup_steps=round(cfg["warmup_epochs"] * steps_per_epoch), low_res_steps=low_res_steps,
                    averaging_start=round(cfg["averaging_start"] * steps_per_epoch))


@dataclass
class Run:
    """What every member of a training run shares: the train params (phase lengths in epochs), device, processes,
    the data (the training split on the device) and the schedule; and what the run has produced so far (the
    finished members' weights and which epoch each kept, the per-epoch history, the training seconds), which the
    resume checkpoint holds."""
    cfg: dict[str, Any]
    device: torch.device
    rank: int
    world: int
    meta: dict[str, Any]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    schedule: Schedule
    inference: InferenceSettings
    sample_weights: torch.Tensor | None = None  # train.sampler: balanced: each training image's draw weight
    fingerprint: str = ""
    members: list[dict[str, torch.Tensor]] = field(default_factory=list)
    selections: list[dict[str, Any]] = field(default_factory=list)  # Selection.record of each finished member
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0

    def say(self, message: str) -> None:
        if self.rank == 0:
            log(message)

    @property
    def channels_last(self) -> bool:
        return self.inference.channels_last

    def build(self) -> ImageClassifier:
        return build_model(self.cfg["model"], model_config(self.cfg), len(self.meta["classes"]),
                           self.meta["image_size"], self.meta["mean"], self.meta["std"])


def cap_batch_size(cfg: dict[str, Any], n_train: int, world: int, rank: int) -> dict[str, Any]:
    """The train params with the batch no larger than the training split, so a small image folder trains on the
    defaults (one full-batch step per epoch, as deterministic as any other run). The cap is a multiple of the
    process count, and it is what the checkpoint's train config records; a batch that fits is left alone, so
    those runs keep their bytes."""
    if cfg["batch_size"] <= n_train:
        return cfg
    capped = n_train - n_train % world
    if capped < 2 * world:  # BatchNorm needs >= 2 images in every process's share
        raise PipelineError(f"train.batch_size: the training split ({n_train} images) is too small for "
                            f"train.nproc={world} processes; use fewer processes or more images")
    if rank == 0:
        log(f"train.batch_size: {cfg['batch_size']} is larger than the training split ({n_train} images); "
            f"training with batch {capped}")
    return {**cfg, "batch_size": capped}


def balanced_class_weights(labels: torch.Tensor, n_classes: int) -> list[float]:
    """scikit-learn's compute_class_weight('balanced'): n_samples / (n_classes * images of the class), in float64,
    so a class with half the images weighs twice as much in the loss."""
    counts = torch.bincount(labels.cpu(), minlength=n_classes).tolist()
    return [len(labels) / (n_classes * count) for count in counts]


def with_class_weights(cfg: dict[str, Any], labels: torch.Tensor, classes: list[str], rank: int) -> dict[str, Any]:
    """The train params plus `class_weight_values` (class name -> loss weight) when train.class_weights is
    balanced, so the checkpoint's train config says which weights the loss used; `none` runs are left alone and
    keep their bytes."""
    if cfg["class_weights"] == "none":
        return cfg
    counts = torch.bincount(labels.cpu(), minlength=len(classes)).tolist()
    empty = [name for name, count in zip(classes, counts) if count == 0]
    if empty:  # its weight would be infinite (scikit-learn refuses it too)
        raise PipelineError(f"train.class_weights: balanced needs a training image of every class, and class "
                            f"{empty[0]!r} has none in {TRAIN_SPLIT}; add images of it or set "
                            f"train.class_weights: none")
    weights = dict(zip(classes, balanced_class_weights(labels, len(classes))))
    if rank == 0:
        log("train.class_weights: balanced, loss weights " + ", ".join(f"{name} {weight:.3g}"
                                                                       for name, weight in weights.items()))
    return {**cfg, "class_weight_values": weights}


def check_validation_split(cfg: dict[str, Any], val_labels: torch.Tensor, classes: list[str]) -> None:
    """train.keep: best and train.patience need validation images to compare epochs on (the params check has
    refused data.val_fraction: 0; a small folder can still round its share to none), and a macro-F1 needs two
    classes among them to be more than one class's F1."""
    users = [f"train.{key}: {cfg[key]}" for key, on in (("keep", cfg["keep"] == "best"),
                                                        ("patience", cfg["patience"] > 0)) if on]
    if not users:
        return
    if val_labels.numel() == 0:
        raise PipelineError(f"{' and '.join(users)}: the validation split {VAL_SPLIT} has no images to compare "
                            f"epochs on (data.val_fraction of each class rounds to none here); raise "
                            f"data.val_fraction, or set train.keep: last and train.patience: 0")
    present = sorted(set(val_labels.tolist()))
    if cfg["monitor"] == "val_macro_f1" and len(present) < 2:
        raise PipelineError(f"train.monitor: val_macro_f1 needs validation images of at least 2 classes, and "
                            f"{VAL_SPLIT} has only class {classes[present[0]]!r}; raise data.val_fraction, or "
                            f"monitor val_loss or val_acc")


def balanced_sample_weights(labels: torch.Tensor) -> torch.Tensor:
    """float64 draw weight of each training image: 1 / (images of its class), so that every class is drawn
    equally often by train.sampler: balanced."""
    counts = torch.bincount(labels.cpu())
    return 1.0 / counts[labels.cpu()].double()


def loss_function(cfg: dict[str, Any], device: torch.device) -> nn.Module:
    """Cross-entropy with the configured label smoothing, weighted per class when with_class_weights set weights
    (the mean over a batch is then the weighted mean, as in torch's CrossEntropyLoss)."""
    weights = cfg.get("class_weight_values")
    weight = None if weights is None else torch.tensor(list(weights.values()), dtype=torch.float32, device=device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg["label_smoothing"])


def load_run(cfg: dict[str, Any], device: torch.device, rank: int, world: int) -> Run:
    """Read the prepared data and fit the batch size to it (cap_batch_size)."""
    meta = read_json(META_JSON, "data summary")
    train_images, train_labels = load_split(TRAIN_SPLIT)
    val_images, val_labels = load_split(VAL_SPLIT)
    if train_images.shape[0] < 2:
        raise PipelineError(f"{TRAIN_SPLIT}: the training split has {train_images.shape[0]} images")
    cfg = cap_batch_size(cfg, train_images.shape[0], world, rank)
    cfg = with_class_weights(cfg, train_labels, meta["classes"], rank)
    check_validation_split(cfg, val_labels, meta["classes"])
    if cfg["batch_size"] % world:
        raise PipelineError(f"train.batch_size: {cfg['batch_size']} must be divisible by train.nproc={world}")
    schedule = plan_schedule(cfg, train_images.shape[0], world, meta["image_size"])
    sample_weights = balanced_sample_weights(train_labels) if cfg["sampler"] == "balanced" else None
    if sample_weights is not None and cfg["class_weights"] == "balanced" and rank == 0:
        log("train.sampler: balanced and train.class_weights: balanced both make up for the class sizes, so "
            "together they over-weight the small classes; one of them is usually enough")
    return Run(cfg, device, rank, world, meta, train_images.to(device), train_labels.to(device), val_images,
               val_labels, schedule, inference_settings(cfg["model"], cfg, device), sample_weights)


def pretrained_record(cfg: dict[str, Any]) -> dict[str, str] | None:
    """What the checkpoint records about the starting weights (pretrained_weights gives the clear error for a
    missing file, before the fingerprint reads it)."""
    if cfg["pretrained"] == "none":
        return None
    return {"path": cfg["pretrained"], "sha256": file_digest(pretrained_weights(cfg["pretrained"]))}


def fingerprint(params: dict[str, Any], world: int) -> str:
    """Identifies a training run: the train params, the data files, the pretrained weights, the code training
    runs (every stages module `python -m stages.train` imports), the torch version and the process count. A
    resume checkpoint from any other run is ignored, so an edit to the code never resumes from weights of the old
    code."""
    digest = hashlib.sha256(json.dumps(params["train"], sort_keys=True).encode())
    files = [TRAIN_SPLIT, VAL_SPLIT, META_JSON]
    files += [PACKAGE_DIR.parent / path for path in code_closure("stages.train")]
    if params["train"]["pretrained"] != "none":
        files.append(Path(params["train"]["pretrained"]))
    for path in files:
        digest.update(file_digest(path).encode())
    digest.update(f"{torch.__version__} world={world}".encode())
    return digest.hexdigest()


def resume_run(run: Run) -> dict[str, Any] | None:
    """The resume checkpoint an interrupted attempt at this same run left, or None. Its finished members, history
    and training seconds go into `run`; the member in progress resumes from it in `train_member`."""
    if not RESUME_PATH.is_file():
        return None
    try:
        state = load_torch(RESUME_PATH, "resume checkpoint")
    except PipelineError as error:  # truncated, damaged or unreadable: it only saves time, so start afresh
        run.say(f"ignoring {RESUME_PATH}: {str(error).removeprefix(f'{RESUME_PATH}: ')}; training from the start "
                f"(the file is replaced after the first epoch)")
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != run.fingerprint:
        run.say(f"ignoring {RESUME_PATH}: it belongs to other params or data")
        return None
    missing = sorted(RESUME_FIELDS - set(state))
    if missing:
        run.say(f"ignoring {RESUME_PATH}: it lacks {', '.join(missing)}; training from the start")
        return None
    run.say(f"resuming after epoch {state['epoch']}"
            + (f" of member {state['member'] + 1}" if run.cfg["ensemble"] > 1 else "") + f" from {RESUME_PATH}")
    run.members, run.selections = list(state["members"]), list(state["selections"])
    run.history, run.elapsed = list(state["history"]), state["elapsed"]
    return state


# ---------------------------------------------------------------- one ensemble member


@dataclass
class Member:
    """One ensemble member in training: its seed (train.seed + index) and everything a step updates."""
    index: int
    seed: int
    model: ImageClassifier
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizers: list[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    averaging: WeightAverage | None
    loss_fn: nn.Module
    dtype: torch.dtype | None  # autocast
    orientations: torch.Tensor | None  # train.augment.flip alternate: each image's orientation in even epochs
    cutout_fill: torch.Tensor
    start_epoch: int
    selection: Selection


def initial_model(run: Run) -> ImageClassifier:
    """The member's model before its first step, on the device: fresh weights (from the seed just set), or
    pretrained ones, and airnet's whitening stem fitted to the training images."""
    model = run.build()
    if run.cfg["pretrained"] != "none":
        load_pretrained(model, run.cfg["pretrained"])
    if hasattr(model.net, "init_from_data"):
        model.net.init_from_data(model.normalize(run.train_images[:WHITENING_SAMPLE].cpu()))
    model.to(run.device)
    if run.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def setup_member(run: Run, index: int, resume: dict[str, Any] | None) -> Member:
    """Seed, build the model and its optimizers and weight average, and restore them from `resume` if given."""
    cfg, device = run.cfg, run.device
    seed = cfg["seed"] + index
    seed_everything(seed)
    model = initial_model(run)
    dtype = autocast_dtype(cfg["precision"], device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    optimizers = make_optimizers(model, cfg, device)
    n_train = run.train_images.shape[0]
    cutout_fill = torch.tensor(run.meta["mean"]).mul(255).round().to(run.train_images.dtype)  # zero once normalized
    orientations = alternating_flips(n_train, seed) if cfg["augment"]["flip"] == "alternate" else None
    averaging = None
    if cfg["averaging"] != "none":
        averaging = WeightAverage(model, cfg["averaging"], cfg["averaging_decay"], run.schedule.averaging_start,
                                  run.schedule.total_steps)
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
           if run.world > 1 else model)
    loss_fn = loss_function(cfg, device)
    selection = Selection.start(cfg, resume["selection"] if resume is not None else None)
    return Member(index, seed, model, net, optimizers, scaler, averaging, loss_fn, dtype, orientations,
                  cutout_fill, start_epoch, selection)


def announce(run: Run, member: Member) -> None:
    cfg, schedule = run.cfg, run.schedule
    run.say(f"training {cfg['model']} ({sum(p.numel() for p in member.model.parameters()):,} parameters) on "
            f"{run.device}, {run.train_images.shape[0]} images, {schedule.epochs} epochs of "
            f"{schedule.steps_per_epoch} steps, batch {cfg['batch_size']}, "
            f"precision {member.dtype or torch.float32}".replace("torch.", "")
            + (f", {run.world} processes" if run.world > 1 else "")
            + (f"; ensemble member {member.index + 1} of {cfg['ensemble']} (seed {member.seed})"
               if cfg["ensemble"] > 1 else ""))


# ---------------------------------------------------------------- one epoch


@dataclass
class EpochStats:
    """Sums over this process's share of an epoch's images (over all processes once the epoch ends)."""
    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    lr: float = 0.0  # the base learning rate of the latest step

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += loss.item() * labels.shape[0]
        self.correct += (logits.argmax(1) == labels).sum().item()
        self.seen += labels.shape[0]


def training_batch(run: Run, member: Member, order: torch.Tensor, epoch: int, step_in_epoch: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's augmented images (float, still 0..255) and labels for one step."""
    cfg, batch = run.cfg, run.cfg["batch_size"]
    indices = order[step_in_epoch * batch:(step_in_epoch + 1) * batch].to(run.device)
    # Augment the whole global batch, then take this rank's share: every rank draws the same random
    # numbers, so N processes see exactly the images one process would.
    flips = flip_mask(cfg["augment"]["flip"], indices, epoch, generator, member.orientations)
    images = augment_batch(run.train_images[indices], flips, cfg["augment"]["translate"], generator,
                           cfg["augment"]["cutout"], member.cutout_fill)[run.rank::run.world].float()
    indices = indices[run.rank::run.world]
    if run.schedule.global_step(epoch, step_in_epoch) < run.schedule.low_res_steps:
        size = cfg["low_res"]["size"]
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if run.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, run.train_labels[indices]


def optimizer_step(run: Run, member: Member, images: torch.Tensor, labels: torch.Tensor, epoch: int,
                   step_in_epoch: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One step at the scheduled learning rate; returns the logits, the loss and the base learning rate."""
    cfg, schedule = run.cfg, run.schedule
    step = schedule.global_step(epoch, step_in_epoch)
    factor = lr_factor(step, schedule.total_steps, schedule.warmup_steps, cfg["schedule"])
    base_lr = cfg["lr"] * factor
    set_lr(member.optimizers, factor)
    with torch.autocast(run.device.type, dtype=member.dtype, enabled=member.dtype is not None):
        logits = member.net(images)
        loss = member.loss_fn(logits.float(), labels)
    if not torch.isfinite(loss):
        raise PipelineError(
            f"training diverged: loss is {loss.item()} at epoch {epoch + 1}, step {step_in_epoch + 1} "
            f"(lr {base_lr:.4g}). Most likely train.lr={cfg['lr']} is too high for this model and "
            f"batch size; try a smaller lr or a longer warm-up. No model was saved.")
    for optimizer in member.optimizers:
        optimizer.zero_grad(set_to_none=True)
    member.scaler.scale(loss).backward()
    if cfg["decoupled_weight_decay"] and cfg["weight_decay"] > 0:
        apply_weight_decay(member.optimizers)
    for optimizer in member.optimizers:
        member.scaler.step(optimizer)
    member.scaler.update()
    if member.averaging is not None:
        member.averaging.after_step(member.model, step + 1)
    return logits, loss, base_lr


def epoch_order(run: Run, generator: torch.Generator) -> torch.Tensor:
    """The training images one epoch visits, in order: a permutation (train.sampler: shuffle), or as many draws
    with replacement as there are images, every class equally likely (balanced: the small classes' images are
    seen several times an epoch, some of the big classes' not at all)."""
    n_train = run.train_images.shape[0]
    if run.sample_weights is None:
        return torch.randperm(n_train, generator=generator)
    return torch.multinomial(run.sample_weights, n_train, replacement=True, generator=generator)


def train_epoch(run: Run, member: Member, epoch: int) -> EpochStats:
    """One pass over a fresh seeded order of the training split (epoch_order; the last epoch may stop part-way)."""
    member.net.train()
    if hasattr(member.model.net, "on_epoch_start"):
        member.model.net.on_epoch_start(epoch)
    generator = torch.Generator().manual_seed(member.seed * 1_000_003 + epoch)
    order = epoch_order(run, generator)
    stats = EpochStats()
    next_log = run.cfg["log_every"]
    steps = run.schedule.steps_in(epoch)
    for step_in_epoch in range(steps):
        images, labels = training_batch(run, member, order, epoch, step_in_epoch, generator)
        logits, loss, stats.lr = optimizer_step(run, member, images, labels, epoch, step_in_epoch)
        stats.add(loss, logits, labels)
        if stats.seen * run.world >= next_log:
            run.say(f"[epoch {epoch + 1}, {int(stats.seen * run.world):>6d} images] loss: "
                    f"{stats.loss_sum / stats.seen:.3f}")
            next_log += run.cfg["log_every"]
    if member.averaging is not None:
        member.averaging.end_of_epoch(member.model, run.schedule.global_step(epoch, steps - 1) + 1)
    stats.loss_sum, stats.correct, stats.seen = all_reduce_sum([stats.loss_sum, stats.correct, stats.seen],
                                                               run.device, run.world)
    return stats


def validation_scores(model: nn.Module, run: Run) -> dict[str, float]:
    """The numbers train.monitor can name, for `model` on the validation split."""
    logits = infer(model, run.val_images, batch_size=max(run.cfg["batch_size"], 256), settings=run.inference)
    predicted = logits.argmax(1)
    return {"val_loss": F.cross_entropy(logits, run.val_labels).item(),
            "val_acc": (predicted == run.val_labels).float().mean().item(),
            "val_macro_f1": macro_f1(run.val_labels, predicted, len(run.meta["classes"]))}


def validate(run: Run, member: Member) -> dict[str, float] | None:
    """validation_scores of the weights that will be saved (the EMA average, if any); None without a validation
    split and on ranks other than 0."""
    eval_model = member.model
    if member.averaging is not None and member.averaging.mode == "ema":
        eval_model = run.build().to(run.device)
        eval_model.load_state_dict(member.averaging.state)
    if run.val_images.shape[0] and run.rank == 0:
        return validation_scores(eval_model, run)
    return None


def record_epoch(run: Run, member: Member, epoch: int, stats: EpochStats, val: dict[str, float] | None,
                 train_seconds: float) -> None:
    """The epoch's history row and its log line; a `*` marks a new best train.monitor when keep: best or
    train.patience uses it."""
    val = val or {"val_loss": None, "val_acc": None, "val_macro_f1": None}
    train_loss, train_acc = stats.loss_sum / stats.seen, stats.correct / stats.seen
    run.history.append({"member": member.index + 1, "epoch": epoch + 1, "train_loss": train_loss,
                        "train_acc": train_acc, **val, "lr": stats.lr})
    val_text = ""
    if val["val_loss"] is not None:
        val_text = f"  val loss {val['val_loss']:.4f} acc {val['val_acc']:.4f} macro-F1 {val['val_macro_f1']:.4f}"
    selecting = run.cfg["keep"] == "best" or run.cfg["patience"] > 0
    marker = " *" if selecting and member.selection.best_epoch == epoch + 1 else ""
    run.say(f"epoch {epoch + 1:>3d}/{run.schedule.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}"
            f"{val_text}{marker}  lr {stats.lr:.3g}  {train_seconds:.1f}s  {stats.seen / train_seconds:,.0f} img/s")


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_resume(run: Run, member: Member, epochs_done: int) -> None:
    """Everything needed to continue after this epoch: the finished members, this member's weights, optimizer
    states and weight average, and the run's history and seconds so far."""
    save_torch({"fingerprint": run.fingerprint, "member": member.index, "members": run.members,
                "selections": run.selections, "epoch": epochs_done, "elapsed": run.elapsed, "history": run.history,
                "model": plain_state_dict(member.model), "optimizers": [o.state_dict() for o in member.optimizers],
                "average": member.averaging.state if member.averaging is not None else None,
                "selection": member.selection.state()}, RESUME_PATH)


def final_weights(member: Member) -> dict[str, torch.Tensor]:
    if member.averaging is not None and member.averaging.mode == "ema":
        return {k: v.detach().cpu().clone() for k, v in member.averaging.state.items()}
    return plain_state_dict(member.model)


def agree_to_stop(run: Run, member: Member, epoch: int) -> None:
    """Under DistributedDataParallel only rank 0 validates: the others learn from it whether patience ended the
    member, so that every process leaves the epoch loop together."""
    if run.world == 1 or run.cfg["patience"] == 0:
        return
    flag = torch.tensor([int(member.selection.stopped)], device=run.device)
    dist.broadcast(flag, src=0)
    if flag.item() and not member.selection.stopped:
        member.selection.stopped_after = epoch + 1


def train_member(run: Run, index: int, resume: dict[str, Any] | None) -> None:
    """Train ensemble member `index` (0-based) from the start, or from `resume`, and add the weights it keeps
    (train.keep) and why to the run. Appends its per-epoch rows to the run's history; after every epoch writes a
    resume checkpoint holding the finished members and the best epoch so far, so an interrupted run picks up where
    it stopped."""
    member = setup_member(run, index, resume)
    announce(run, member)
    for epoch in range(member.start_epoch, run.schedule.epochs):
        if member.selection.stopped:  # resumed after train.patience had ended this member
            break
        epoch_start = time.perf_counter()
        stats = train_epoch(run, member, epoch)
        train_seconds = time.perf_counter() - epoch_start
        val = validate(run, member)
        run.elapsed += time.perf_counter() - epoch_start
        member.selection.after_epoch(epoch + 1, val, lambda: final_weights(member))
        agree_to_stop(run, member, epoch)
        record_epoch(run, member, epoch, stats, val, train_seconds)
        if run.rank == 0:
            save_resume(run, member, epoch + 1)
            write_progress(run, member.selection)
    last_epoch = max(row["epoch"] for row in run.history if row["member"] == index + 1)
    record = member.selection.record(last_epoch, run.schedule.epochs)
    if run.cfg["keep"] == "best" or member.selection.stopped:
        run.say(record["reason"])
    kept = member.selection.best_weights if run.cfg["keep"] == "best" else None
    run.members.append(kept if kept is not None else final_weights(member))
    run.selections.append(record)


# ---------------------------------------------------------------- outputs


def write_history(rows: list[dict[str, Any]]) -> None:
    def cell(value: Any) -> str:
        return "" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))
    lines = [",".join(HISTORY_COLUMNS)] + [",".join(cell(row[c]) for c in HISTORY_COLUMNS) for row in rows]
    write_text(HISTORY_CSV, "\n".join(lines) + "\n")


def epoch_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """train.json's train and val sections from one history row."""
    metrics: dict[str, Any] = {"train": {"loss": round(row["train_loss"], 6), "acc": round(row["train_acc"], 6)}}
    if row["val_loss"] is not None:
        metrics["val"] = {"loss": round(row["val_loss"], 6), "acc": round(row["val_acc"], 6),
                          "macro_f1": round(row["val_macro_f1"], 6)}
    return metrics


def history_row(run: Run, member: int, epoch: int) -> dict[str, Any]:
    return next(row for row in run.history if row["member"] == member and row["epoch"] == epoch)


def kept_epochs(records: list[dict[str, Any]]) -> int | dict[str, int]:
    """train.json's kept_epoch: a number for one model, one per member (member_1, ...) for an ensemble."""
    if len(records) == 1:
        return records[0]["kept_epoch"]
    return {f"member_{index}": record["kept_epoch"] for index, record in enumerate(records, 1)}


def write_progress(run: Run, selection: Selection) -> None:
    """metrics/history.csv and metrics/train.json as they stand after this epoch (after the resume checkpoint,
    so they never run ahead of what a resumed run continues from), for `dvc exp show` and `dvc plots` during a
    run. train.json has the final file's layout with the numbers of the member in training at the epoch it would
    keep now (the latest with keep: last, the best so far with keep: best); write_outputs replaces both with the
    finished run's."""
    member, last_epoch = run.history[-1]["member"], run.history[-1]["epoch"]
    kept = selection.kept_epoch(last_epoch)
    metrics = epoch_metrics(history_row(run, member, kept))
    metrics["epochs"] = max(row["epoch"] for row in run.history)
    metrics["kept_epoch"] = kept_epochs([*run.selections, {"kept_epoch": kept}])
    write_json(TRAIN_METRICS, metrics)
    write_history(run.history)


def train_metrics(run: Run, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The kept epoch's numbers (of the last member, for an ensemble, whose validation numbers are the
    ensemble's own score, as evaluate will see it without TTA)."""
    last = run.selections[-1]
    metrics = epoch_metrics(history_row(run, len(run.selections), last["kept_epoch"]))
    if run.val_images.shape[0] and len(run.members) > 1:
        scores = validation_scores(model_from_checkpoint(checkpoint), run)
        metrics["val"] = {"loss": round(scores["val_loss"], 6), "acc": round(scores["val_acc"], 6),
                          "macro_f1": round(scores["val_macro_f1"], 6)}
    metrics["epochs"] = checkpoint["epochs_completed"]
    metrics["kept_epoch"] = kept_epochs(run.selections)
    return metrics


def write_outputs(run: Run, pretrained: dict[str, str] | None) -> None:
    """The checkpoint, the metrics, the history and the timing; after them the resume checkpoint has served."""
    cfg, meta = run.cfg, run.meta
    # through JSON: fresh objects, so that pickle's sharing of equal keys is the same whether the finished members'
    # records come from memory or from a resume checkpoint (the same run saves the same bytes)
    selection = json.loads(json.dumps({"keep": cfg["keep"], "monitor": cfg["monitor"], "patience": cfg["patience"],
                                       "members": run.selections}))
    checkpoint = make_checkpoint(model=cfg["model"], model_config=model_config(cfg), classes=meta["classes"],
                                 image_size=meta["image_size"], mean=meta["mean"], std=meta["std"],
                                 state_dicts=run.members, train=cfg, pretrained=pretrained,
                                 epochs_completed=max(row["epoch"] for row in run.history), selection=selection)
    save_torch(checkpoint, MODEL_PATH)
    write_json(TRAIN_METRICS, train_metrics(run, checkpoint))
    write_history(run.history)
    # early stopping trains fewer epochs than train.epochs (which may end in a fraction of one)
    epochs_trained = sum(min(record["epochs_trained"], cfg["epochs"]) for record in run.selections)
    n_images = run.train_images.shape[0] * epochs_trained
    write_json(TRAIN_TIME, {"train_time": {"seconds": round(run.elapsed, 2),
                                           "images_per_second": round(n_images / run.elapsed, 1)}})
    shutil.rmtree(RESUME_PATH.parent, ignore_errors=True)
    run.say(f"saved {MODEL_PATH} ({run.elapsed:.1f}s of training)")


# ---------------------------------------------------------------- main


def train(params: dict[str, Any]) -> None:
    cfg = resolve_phases(params["train"])  # "30%" phase lengths become epochs, here and in the checkpoint
    device, rank, world = setup_device(cfg)
    run = load_run(cfg, device, rank, world)
    pretrained = pretrained_record(cfg)
    run.fingerprint = fingerprint(params, world)
    resume = resume_run(run)
    if resume is not None and rank == 0 and run.history:  # DVC deleted the outputs before the rerun: show them now
        write_progress(run, Selection.start(cfg, resume["selection"]))
    for index in range(len(run.members), cfg["ensemble"]):
        in_progress = resume if resume is not None and resume["member"] == index else None
        train_member(run, index, in_progress)
    if rank == 0:
        write_outputs(run, pretrained)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    params = load_params()
    if params["train"]["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it when CUDA starts
    nproc = params["train"]["nproc"]
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        check_processes(nproc)
        relaunch_under_torchrun(nproc)
    train(params)


if __name__ == "__main__":
    run_stage(main)
