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
own one-line error, which is the one line the stage prints, instead of torchrun's summary of failed processes.

The mechanisms are in stages/model/: the schedule, the optimizers and weight averaging in optim.py; which epoch's
weights are kept, and early stopping, in selection.py; the processes in distributed.py; the resume checkpoint in
resume.py."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stages.base.config import load_params, resolve_phases, selection_keys
from stages.base.paths import (FEATURES_TRAIN, FEATURES_VAL, HISTORY_CSV, META_JSON, MODEL_PATH, RESUME_PATH,
                               TRAIN_METRICS, TRAIN_SPLIT, TRAIN_TIME, VAL_SPLIT)
from stages.base.runtime import PipelineError, log, read_json, run_stage, write_json, write_text
from stages.base.specs import model_config_of
from stages.dataset.augment import alternating_flips, augment_batch, flip_mask
from stages.model.checkpoint import make_checkpoint
from stages.model.data_fit import (balanced_sample_weights, cap_batch_size, check_validation_split, loss_function,
                                   with_class_weights)
from stages.model.distributed import (all_reduce_sum, broadcast_flag, check_processes, finish_distributed,
                                      relaunch_under_torchrun, setup_device)
from stages.model.health import chance_warning, one_class_warning
from stages.model.embeddings import CachedFeatures, Head, expected_record, head_logits, load_features
from stages.model.nets import (ImageClassifier, InferenceSettings, build_model, infer, inference_settings,
                               input_normalization, model_from_checkpoint)
from stages.model.optim import (Schedule, WeightAverage, apply_weight_decay, lr_factor, make_optimizers, plan_schedule,
                                set_lr)
from stages.model.precision import autocast_dtype, precision_name, warn_emulated_bf16
from stages.model.resume import Progress, fingerprint, resume_run, save_resume
from stages.model.scores import macro_f1
from stages.model.selection import Selection
from stages.model.tensors import load_split, save_torch, seed_everything
from stages.model.weights import load_imagenet_weights, load_init_checkpoint

HISTORY_COLUMNS = ("member", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1", "lr")
WHITENING_SAMPLE = 5000  # images used to estimate the airnet stem's patch covariance
# train.fine_tune.batchnorm auto keeps the pretrained BatchNorm statistics unless the unfrozen run has batches of at
# least BATCHNORM_MIN_BATCH images and BATCHNORM_MIN_STEPS steps: EfficientNet's statistics move 1% a step (momentum
# 0.01), so a shorter run leaves them between two domains (on 1,000 CIFAR-10 images a run whose statistics followed
# the batches scored 54.5% against 82.7% kept, at twice the lr: BENCHMARKS.md), and small batches estimate them badly.
BATCHNORM_MIN_BATCH = 32
BATCHNORM_MIN_STEPS = 1000
TRAIN_JSON_NUMBERS = {"train": {"loss": "train_loss", "acc": "train_acc"},  # section -> its name -> score name
                      "val": {"loss": "val_loss", "acc": "val_acc", "macro_f1": "val_macro_f1"}}


# ---------------------------------------------------------------- the run


@dataclass(frozen=True)
class Run:
    """What is fixed for a whole training run and shared by its members: the train params (phase lengths in
    epochs), the fingerprint its resume checkpoint is bound to, the device and processes, the data (the training
    split on the device) and the schedule."""
    cfg: dict[str, Any]
    fingerprint: str
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
    features: CachedFeatures | None = None  # train.cache_features: the training step sees embeddings, not images

    def log_main(self, message: str) -> None:
        """Log once for all processes: on rank 0 only."""
        if self.rank == 0:
            log(message)

    def build(self) -> ImageClassifier:
        return build_model(self.cfg["model"], model_config_of(self.cfg), len(self.meta["classes"]),
                           self.meta["image_size"], self.meta["mean"], self.meta["std"])


def load_run(params: dict[str, Any], cfg: dict[str, Any], device: torch.device, rank: int, world: int) -> Run:
    """Read the prepared data and fit the train params `cfg` to it (cap_batch_size); the fingerprint, of
    `params` as written, is taken once the data files have passed their checks."""
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
    features = None
    if cfg["cache_features"]:
        features = load_features(FEATURES_TRAIN, FEATURES_VAL,
                                 expected_record(cfg, train_images.shape[0], val_images.shape[0]), device)
    return Run(cfg, fingerprint(params, world), device, rank, world, meta, train_images.to(device),
               train_labels.to(device), val_images, val_labels, schedule, inference_settings(cfg["model"], cfg, device),
               sample_weights, features)


# ---------------------------------------------------------------- one ensemble member


def cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


@dataclass
class Member:
    """One ensemble member in training: its seed (train.seed + index) and everything a step updates."""
    index: int
    seed: int
    model: ImageClassifier
    forward_module: nn.Module  # what a step calls: the model, or its DistributedDataParallel wrapper
    optimizers: list[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    averaging: WeightAverage | None
    loss_fn: nn.Module
    dtype: torch.dtype | None  # autocast's; None: full precision
    orientations: torch.Tensor | None  # train.augment.flip alternate: each image's orientation in even epochs
    cutout_fill: torch.Tensor
    start_epoch: int
    selection: Selection
    pretrained: dict[str, Any] | None  # what stages.model.weights records about the starting weights

    def averaged_state(self) -> dict[str, torch.Tensor] | None:
        """The weights validated and saved in place of the model's own (WeightAverage.evaluation_state), if any."""
        return self.averaging.evaluation_state() if self.averaging is not None else None

    def resume_state(self) -> dict[str, Any]:
        """This member's part of the resume checkpoint: weights, optimizer states, weight average, selection."""
        return {"model": cpu_copy(self.model.state_dict()), "optimizers": [o.state_dict() for o in self.optimizers],
                "average": self.averaging.state if self.averaging is not None else None,
                "selection": self.selection.state()}


def initial_model(run: Run) -> tuple[ImageClassifier, dict[str, Any] | None]:
    """The member's model before its first step, on the device: fresh weights (from the seed just set), or
    starting weights (train.pretrained, train.init), and airnet's whitening stem fitted to the training images;
    set up for fine-tuning (train.fine_tune); and what the checkpoint records about the starting weights (None
    without)."""
    cfg = run.cfg
    model = run.build()
    starting = None
    if cfg["pretrained"] != "none":
        starting = load_imagenet_weights(model, cfg["model"], cfg["pretrained"])
    elif cfg["init"] != "none":
        starting = load_init_checkpoint(model, cfg["model"], model_config_of(cfg), run.meta["classes"],
                                        run.meta["image_size"], cfg["init"])
    if hasattr(model.net, "init_from_data") and starting is None:
        model.net.init_from_data(model.normalize(run.train_images[:WHITENING_SAMPLE].cpu()))
    if hasattr(model.net, "fine_tuning"):
        model.net.fine_tuning(run.schedule.frozen_steps, frozen_statistics(run, starting is not None))
    model.to(run.device)
    if run.inference.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, starting


def frozen_statistics(run: Run, from_weights: bool) -> bool:
    """Whether BatchNorm keeps its running statistics once the backbone trains (train.fine_tune.batchnorm)."""
    batchnorm = run.cfg["fine_tune"]["batchnorm"]
    if batchnorm != "auto":
        return batchnorm == "frozen"
    unfrozen_steps = run.schedule.total_steps - run.schedule.frozen_steps
    small_batch = run.cfg["batch_size"] // run.world < BATCHNORM_MIN_BATCH
    return from_weights and (small_batch or unfrozen_steps < BATCHNORM_MIN_STEPS)


def setup_member(run: Run, index: int, resume: dict[str, Any] | None) -> Member:
    """Seed, build the model and its optimizers and weight average, and restore them from `resume` if given."""
    cfg, device = run.cfg, run.device
    seed = cfg["seed"] + index
    seed_everything(seed)
    model, pretrained = initial_model(run)
    dtype = autocast_dtype(cfg["precision"], device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    optimizers = make_optimizers(model, cfg, device)
    n_train = run.train_images.shape[0]
    mean = input_normalization(cfg["model"], run.meta["mean"], run.meta["std"])[0]
    cutout_fill = torch.tensor(mean).mul(255).round().to(run.train_images.dtype)  # zero once normalized
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
    forward_module: nn.Module = model
    if run.features is not None:
        forward_module = Head(model)
    elif run.world > 1:
        forward_module = distributed(model, run.schedule)
    loss_fn = loss_function(cfg, device)
    selection = Selection.start(cfg, resume["selection"] if resume is not None else None)
    return Member(index, seed, model, forward_module, optimizers, scaler, averaging, loss_fn, dtype, orientations,
                  cutout_fill, start_epoch, selection, pretrained)


def distributed(model: ImageClassifier, schedule: Schedule) -> DistributedDataParallel:
    """`model` under DistributedDataParallel. DDP averages the gradients only of the parameters that require one
    when it is built: a backbone frozen for the first steps (train.fine_tune.frozen_epochs) must be registered
    all the same, or once it unfreezes each process would follow its own gradients (one frozen for the whole run
    is left out, so nothing is sent for it). Parameters that go without a gradient for a while (that backbone,
    airnet's stem bias after a few epochs) need find_unused_parameters."""
    unfreezing = 0 < schedule.frozen_steps < schedule.total_steps
    frozen = [parameter for parameter in model.parameters() if not parameter.requires_grad] if unfreezing else []
    for parameter in frozen:
        parameter.requires_grad_(True)
    wrapped = DistributedDataParallel(model,
                                      find_unused_parameters=bool(frozen) or hasattr(model.net, "on_epoch_start"))
    for parameter in frozen:
        parameter.requires_grad_(False)
    return wrapped


def announce(run: Run, member: Member) -> None:
    cfg, schedule = run.cfg, run.schedule
    run.log_main(f"training {cfg['model']} ({sum(p.numel() for p in member.model.parameters()):,} parameters) on "
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
    if run.features is not None:  # the cached embeddings of these images (mirrored where flipped)
        return run.features.training_batch(indices, flips), run.train_labels[indices]
    images = augment_batch(run.train_images[indices], flips, cfg["augment"]["translate"], generator,
                           cfg["augment"]["cutout"], member.cutout_fill)[run.rank::run.world].float()
    indices = indices[run.rank::run.world]
    if run.schedule.global_step(epoch, step_in_epoch) < run.schedule.low_res_steps:
        size = cfg["low_res"]["size"]
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if run.inference.channels_last:
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
        logits = member.forward_module(images)
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
    member.forward_module.train()
    if hasattr(member.model.net, "on_epoch_start"):
        member.model.net.on_epoch_start(epoch)
    generator = torch.Generator().manual_seed(member.seed * 1_000_003 + epoch)
    order = epoch_order(run, generator)
    stats = EpochStats()
    next_log = run.cfg["log_every"]
    steps = run.schedule.steps_in(epoch)
    stepwise = hasattr(member.model.net, "on_step")
    for step_in_epoch in range(steps):
        if stepwise:
            member.model.net.on_step(run.schedule.global_step(epoch, step_in_epoch))
        images, labels = training_batch(run, member, order, epoch, step_in_epoch, generator)
        logits, loss, stats.lr = optimizer_step(run, member, images, labels, epoch, step_in_epoch)
        stats.add(loss, logits, labels)
        if stats.seen * run.world >= next_log:
            run.log_main(f"[epoch {epoch + 1}, {int(stats.seen * run.world):>6d} images] loss: "
                         f"{stats.loss_sum / stats.seen:.3f}")
            next_log += run.cfg["log_every"]
    if member.averaging is not None:
        member.averaging.end_of_epoch(member.model, run.schedule.global_step(epoch, steps - 1) + 1)
    stats.loss_sum, stats.correct, stats.seen = all_reduce_sum([stats.loss_sum, stats.correct, stats.seen],
                                                               run.device, run.world)
    return stats


def validation_logits(model: nn.Module, run: Run) -> torch.Tensor:
    if run.features is not None:
        return head_logits(model, run.features.val, run.inference)
    return infer(model, run.val_images, batch_size=max(run.cfg["batch_size"], 256), settings=run.inference)


def validation_scores(model: nn.Module, run: Run, logits: torch.Tensor | None = None) -> dict[str, float]:
    """The numbers train.monitor can name, for `model` on the validation split (from `logits` if given)."""
    logits = validation_logits(model, run) if logits is None else logits
    predicted = logits.argmax(1)
    return {"val_loss": F.cross_entropy(logits, run.val_labels).item(),
            "val_acc": (predicted == run.val_labels).float().mean().item(),
            "val_macro_f1": macro_f1(run.val_labels, predicted, len(run.meta["classes"]))}


def validate(run: Run, member: Member) -> dict[str, float] | None:
    """validation_scores of the weights that will be saved (Member.averaged_state, if any); None without a
    validation split and on ranks other than 0."""
    eval_model, averaged = member.model, member.averaged_state()
    if averaged is not None:
        eval_model = run.build().to(run.device)
        eval_model.load_state_dict(averaged)
    if run.val_images.shape[0] and run.rank == 0:
        return validation_scores(eval_model, run)
    return None


def record_epoch(run: Run, progress: Progress, member: Member, epoch: int, stats: EpochStats,
                 val: dict[str, float] | None, train_seconds: float) -> None:
    """The epoch's history row and its log line; a `*` marks a new best train.monitor when selection uses it."""
    val = val or {"val_loss": None, "val_acc": None, "val_macro_f1": None}
    train_loss, train_acc = stats.loss_sum / stats.seen, stats.correct / stats.seen
    progress.history.append({"member": member.index + 1, "epoch": epoch + 1, "train_loss": train_loss,
                             "train_acc": train_acc, **val, "lr": stats.lr})
    val_text = ""
    if val["val_loss"] is not None:
        val_text = f"  val loss {val['val_loss']:.4f} acc {val['val_acc']:.4f} macro-F1 {val['val_macro_f1']:.4f}"
    marker = " *" if selection_keys(run.cfg) and member.selection.best_epoch == epoch + 1 else ""
    run.log_main(f"epoch {epoch + 1:>3d}/{run.schedule.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}"
                 f"{val_text}{marker}  lr {stats.lr:.3g}  {train_seconds:.1f}s  "
                 f"{stats.seen / train_seconds:,.0f} img/s")


def final_weights(member: Member) -> dict[str, torch.Tensor]:
    averaged = member.averaged_state()
    return cpu_copy(averaged if averaged is not None else member.model.state_dict())


def agree_to_stop(run: Run, member: Member, epoch: int) -> None:
    """Under DistributedDataParallel only rank 0 validates: the others learn from it whether patience ended the
    member, so that every process leaves the epoch loop together."""
    if run.cfg["patience"] == 0:
        return
    if broadcast_flag(member.selection.stopped, run.device, run.world) and not member.selection.stopped:
        member.selection.stopped_after = epoch + 1


def train_member(run: Run, progress: Progress, index: int, resume: dict[str, Any] | None) -> dict[str, Any] | None:
    """Train ensemble member `index` (0-based) from the start, or from `resume`, and add the weights it keeps
    (train.keep) and why to `progress`, with its per-epoch history rows; after every epoch writes a resume
    checkpoint holding the finished members and the best epoch so far, so an interrupted run picks up where it
    stopped. Returns what the checkpoint records about the pretrained weights the member started from."""
    member = setup_member(run, index, resume)
    announce(run, member)
    for epoch in range(member.start_epoch, run.schedule.epochs):
        if member.selection.stopped:  # resumed after train.patience had ended this member
            break
        epoch_start = time.perf_counter()
        stats = train_epoch(run, member, epoch)
        train_seconds = time.perf_counter() - epoch_start
        val = validate(run, member)
        progress.elapsed += time.perf_counter() - epoch_start
        member.selection.after_epoch(epoch + 1, val, lambda: final_weights(member))
        agree_to_stop(run, member, epoch)
        record_epoch(run, progress, member, epoch, stats, val, train_seconds)
        if run.rank == 0:
            save_resume(run.fingerprint, progress, member.index, epoch + 1, member.resume_state())
            write_progress(progress, member.selection)
    record = member.selection.record(progress.epochs_trained(index + 1), run.schedule.epochs)
    if run.cfg["keep"] == "best" or member.selection.stopped:
        run.log_main(record["reason"])
    kept = member.selection.best_weights if run.cfg["keep"] == "best" else None
    progress.members.append(kept if kept is not None else final_weights(member))
    progress.selections.append(record)
    return member.pretrained


# ---------------------------------------------------------------- outputs


def write_history(rows: list[dict[str, Any]]) -> None:
    def cell(value: Any) -> str:
        return "" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))
    lines = [",".join(HISTORY_COLUMNS)] + [",".join(cell(row[c]) for c in HISTORY_COLUMNS) for row in rows]
    write_text(HISTORY_CSV, "\n".join(lines) + "\n")


def train_json_section(section: str, scores: dict[str, Any]) -> dict[str, float]:
    """train.json's `section` (train or val) from a history row or validation_scores, to 6 decimals."""
    return {name: round(scores[score], 6) for name, score in TRAIN_JSON_NUMBERS[section].items()}


def epoch_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """train.json's train and val sections from one history row."""
    metrics: dict[str, Any] = {"train": train_json_section("train", row)}
    if row["val_loss"] is not None:
        metrics["val"] = train_json_section("val", row)
    return metrics


def kept_epochs(records: list[dict[str, Any]]) -> int | dict[str, int]:
    """train.json's kept_epoch: a number for one model, one per member (member_1, ...) for an ensemble."""
    if len(records) == 1:
        return records[0]["kept_epoch"]
    return {f"member_{index}": record["kept_epoch"] for index, record in enumerate(records, 1)}


def write_progress(progress: Progress, selection: Selection) -> None:
    """metrics/history.csv and metrics/train.json as they stand after this epoch (after the resume checkpoint,
    so they never run ahead of what a resumed run continues from), for `dvc exp show` and `dvc plots` during a
    run. train.json has the final file's layout with the numbers of the member in training at the epoch it would
    keep now (the latest with keep: last, the best so far with keep: best); write_outputs replaces both with the
    finished run's."""
    member, last_epoch = progress.history[-1]["member"], progress.history[-1]["epoch"]
    kept = selection.kept_epoch(last_epoch)
    metrics = epoch_metrics(progress.row(member, kept))
    metrics["epochs"] = progress.epochs_trained()
    metrics["kept_epoch"] = kept_epochs([*progress.selections, {"kept_epoch": kept}])
    write_json(TRAIN_METRICS, metrics)
    write_history(progress.history)


def train_metrics(run: Run, progress: Progress, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The kept epoch's numbers (of the last member, for an ensemble, whose validation numbers are the
    ensemble's own score, as evaluate will see it without TTA)."""
    last = progress.selections[-1]
    metrics = epoch_metrics(progress.row(len(progress.selections), last["kept_epoch"]))
    warnings = [chance_warning(progress.history, run.val_labels.tolist())]
    if run.val_images.shape[0]:
        model = model_from_checkpoint(checkpoint)
        logits = validation_logits(model, run)
        warnings.append(one_class_warning("validation", run.val_labels.tolist(), logits.argmax(1).tolist(),
                                          run.meta["classes"]))
        if len(progress.members) > 1:
            metrics["val"] = train_json_section("val", validation_scores(model, run, logits))
    metrics["epochs"] = checkpoint["epochs_completed"]
    metrics["kept_epoch"] = kept_epochs(progress.selections)
    metrics["precision"] = run.cfg["precision_used"]
    warnings = [warning for warning in warnings if warning]
    for warning in warnings:
        run.log_main(f"warning: {warning}")
    if warnings:  # only then: a healthy run's train.json keeps its bytes
        metrics["warnings"] = warnings
    return metrics


def write_outputs(run: Run, progress: Progress, pretrained: dict[str, Any] | None) -> None:
    """The checkpoint, the metrics, the history and the timing; after them the resume checkpoint has served."""
    cfg, meta = run.cfg, run.meta
    # through JSON: fresh objects, so that pickle's sharing of equal keys is the same whether the finished members'
    # records come from memory or from a resume checkpoint (the same run saves the same bytes)
    selection = json.loads(json.dumps({"keep": cfg["keep"], "monitor": cfg["monitor"], "patience": cfg["patience"],
                                       "members": progress.selections}))
    mean, std = input_normalization(cfg["model"], meta["mean"], meta["std"])
    checkpoint = make_checkpoint(model=cfg["model"], model_config=model_config_of(cfg), classes=meta["classes"],
                                 image_size=meta["image_size"], mean=mean, std=std,
                                 state_dicts=progress.members, train=cfg, pretrained=pretrained,
                                 epochs_completed=progress.epochs_trained(), selection=selection)
    save_torch(checkpoint, MODEL_PATH)
    write_json(TRAIN_METRICS, train_metrics(run, progress, checkpoint))
    write_history(progress.history)
    # early stopping trains fewer epochs than train.epochs (which may end in a fraction of one)
    epochs_trained = sum(min(record["epochs_trained"], cfg["epochs"]) for record in progress.selections)
    n_images = run.train_images.shape[0] * epochs_trained
    write_json(TRAIN_TIME, {"train_time": {"seconds": round(progress.elapsed, 2),
                                           "images_per_second": round(n_images / progress.elapsed, 1)}})
    shutil.rmtree(RESUME_PATH.parent, ignore_errors=True)
    run.log_main(f"saved {MODEL_PATH} ({progress.elapsed:.1f}s of training)")


# ---------------------------------------------------------------- main


def train(params: dict[str, Any]) -> None:
    cfg = resolve_phases(params["train"])  # "30%" phase lengths become epochs, here and in the checkpoint
    device, rank, world = setup_device(cfg)
    if rank == 0:
        warn_emulated_bf16(cfg["precision"], device)
    # what train.precision (auto, say) came to on this machine, for the checkpoint's train config and train.json
    cfg = {**cfg, "precision_used": precision_name(autocast_dtype(cfg["precision"], device))}
    run = load_run(params, cfg, device, rank, world)
    progress, resume = resume_run(run.fingerprint, cfg["ensemble"], run.log_main)
    if resume is not None and rank == 0 and progress.history:  # DVC deleted the outputs before the rerun: show them
        write_progress(progress, Selection.start(cfg, resume["selection"]))
    pretrained = None  # set by the first member trained (a resume checkpoint is of a member still in training)
    for index in range(len(progress.members), cfg["ensemble"]):
        in_progress = resume if resume is not None and resume["member"] == index else None
        pretrained = train_member(run, progress, index, in_progress)
    if rank == 0:
        write_outputs(run, progress, pretrained)
    finish_distributed(world)


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
