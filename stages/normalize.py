"""normalize stage: decode data/raw/ once into compact tensors in data/prepared/.

- train.pt, val.pt, test.pt: {"images": uint8 N x 3 x S x S, "labels": int64 N} (read back with
  stages.model.tensors.load_split). The validation split is a seeded, stratified share (data.val_fraction) of the
  training data; only evaluate touches test.
- meta.json: class names, image size, the per-channel normalization (`normalize.stats`: `dataset` = mean/std of
  the training split's pixels scaled to 0..1, `fixed` = the seed's 0.5/0.5), sample counts per split and class,
  the source description written by download, and any skipped unreadable files, and (only then) a `warning` when
  the training split's largest class has >= 3x the images of its smallest. It is also the data summary the
  report shows.

CIFAR-10 and synthetic data are 32x32 already (resized only when data.image_size differs); image folders are
decoded by stages.dataset.images (rules in its docstring) within the limits of params `data.limits`, each member of
images.zip read only when its chunk is decoded, so the encoded files are never all in memory. A flat
`<class>/*` folder is split into train and test here, seeded and stratified by data.test_fraction. The sample
order is fixed (CIFAR batch order, or sorted file names), so the same inputs always give the same bytes.
Neither the train nor the test split may end up empty (data.on_error: skip could leave one without a readable
image): that stops the stage here, not after training.
"""

from __future__ import annotations

import math
import threading
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any, Sequence

import torch

from stages.base.config import load_params
from stages.base.paths import CIFAR10_DIR, IMAGES_ZIP, META_JSON, SOURCE_JSON, TEST_SPLIT, TRAIN_SPLIT, VAL_SPLIT
from stages.base.runtime import PipelineError, derived_seed, log, read_json, run_stage, write_json
from stages.dataset.cifar import Split, load_cifar
from stages.dataset.imagefiles import over_byte_limit
from stages.dataset.images import DecodeLimits, ImageDecodeError, decode_images, resize_square
from stages.dataset.ingest import member_layout
from stages.model.tensors import save_torch

IMBALANCE_RATIO = 3  # largest / smallest training class at which the data summary warns
_RESIZE_CHUNK = 2048  # images resized per call: bounds the temporary memory
# What a damaged zip raises by case (RuntimeError: encrypted member; NotImplementedError: unknown compression)
_ZIP_READ_ERRORS = (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError, zlib.error)


def normalize(params: dict[str, Any]) -> dict[str, Any]:
    """Write data/prepared/{train,val,test}.pt and meta.json; return the meta dict."""
    started = time.perf_counter()
    cfg, data = params["normalize"], params["data"]  # data: the shared section that download reads too
    source = read_json(SOURCE_JSON, "the raw data description (written by the download stage)")
    size = data["image_size"]
    kind = source.get("kind") if isinstance(source, dict) else None
    skipped: list[dict[str, str]] = []
    if kind in ("cifar10", "synthetic"):
        classes, train, test = _load_cifar(CIFAR10_DIR, size)
    elif kind == "images":
        classes, train, test, skipped = load_image_zip(IMAGES_ZIP, size, data, source)
    else:
        raise PipelineError(f"{SOURCE_JSON}: unknown kind {kind!r} (expected cifar10, synthetic or "
                            f"images); rerun the download stage")
    kept, held = stratified_split(train[1], data["val_fraction"], data["seed"], "val")
    splits = {"train": (train[0][kept], train[1][kept]), "val": (train[0][held], train[1][held]), "test": test}
    require_images(splits, IMAGES_ZIP if kind == "images" else CIFAR10_DIR, source.get("source"), skipped)
    if cfg["stats"] == "dataset":
        mean, std = channel_stats(splits["train"][0])
    else:
        mean, std = [0.5] * 3, [0.5] * 3
    meta = {
        "classes": classes,
        "image_size": size,
        "stats": cfg["stats"],
        "mean": mean,
        "std": std,
        "splits": {name: len(labels) for name, (_, labels) in splits.items()},
        "counts": {name: class_counts(labels, classes) for name, (_, labels) in splits.items()},
        "source": source,
        "skipped": skipped,
        "skipped_count": len(skipped),
    }
    warning = imbalance_warning(meta["counts"]["train"])
    if warning:  # only then: a balanced data set keeps the meta.json bytes it had before this key existed
        meta["warning"] = warning
    # Everything is computed before the first write, so a failure leaves the previous outputs untouched.
    for name, path in (("train", TRAIN_SPLIT), ("val", VAL_SPLIT), ("test", TEST_SPLIT)):
        images, labels = splits[name]
        save_torch({"images": _compact(images), "labels": _compact(labels.to(torch.int64))}, path)
    write_json(META_JSON, meta)
    counts = meta["splits"]
    log(f"normalize: {len(classes)} classes, {counts['train']} train / {counts['val']} val / {counts['test']} test "
        f"images at {size}x{size}, {len(skipped)} skipped, in {time.perf_counter() - started:.1f} s")
    if warning:
        log(f"warning: {warning}")
    return meta


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor that owns exactly its data: torch.save writes a view's whole underlying storage."""
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------- CIFAR-10 python format


def _load_cifar(folder: Path, size: int) -> tuple[list[str], Split, Split]:
    """The CIFAR-10 batches in `folder`, resized from the format's 32x32 when data.image_size differs."""
    classes, train, test = load_cifar(folder)
    if size != 32:
        train, test = (_resize_all(train[0], size), train[1]), (_resize_all(test[0], size), test[1])
    return classes, train, test


def _resize_all(images: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    for start in range(0, len(images), _RESIZE_CHUNK):
        out[start:start + _RESIZE_CHUNK] = resize_square(images[start:start + _RESIZE_CHUNK], size)
    return out


# ---------------------------------------------------------------- image folders


class ZipMembers(Sequence[bytes]):
    """Members of an open zip archive, each read when decode_images asks for it (from its worker threads), so only
    the chunks being decoded are in memory, never every encoded file at once. zipfile's members share one file
    handle: its lock guards their seeks but not its count of open readers, so reads are serialized here (they
    are fast next to decoding)."""

    def __init__(self, path: Path, archive: zipfile.ZipFile, names: list[str]) -> None:
        self._path = path
        self._archive = archive
        self._names = names
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index: int) -> bytes:  # one member: decode_images never slices
        name = self._names[index]
        try:
            with self._lock:
                return self._archive.read(name)
        except _ZIP_READ_ERRORS as error:
            raise PipelineError(f"{self._path}: cannot read member {name!r} ({error}); rerun the download "
                                f"stage") from None


def load_image_zip(path: Path, size: int, data: dict[str, Any], source: dict[str, Any]) -> tuple[
        list[str], tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], list[dict[str, str]]]:
    """Decode the canonical images.zip (members train|test|all/<class>/<path>, written by stages/dataset/ingest.py).
    Returns (classes, train, test, skipped files); an `all/` layout is split by data.test_fraction here."""
    if not path.is_file():
        raise PipelineError(f"{path} is missing; rerun the download stage (dvc repro)")
    limits = DecodeLimits.from_params(data)
    try:
        archive = zipfile.ZipFile(path)
    except _ZIP_READ_ERRORS as error:
        raise PipelineError(f"{path}: not a readable zip archive ({error}); rerun the download stage") from None
    with archive:
        names = sorted(name for name in archive.namelist() if not name.endswith("/"))
        member_splits, member_classes = member_layout(path, names)
        check_member_sizes(path, archive, names, limits)
        try:
            images, kept, skipped = decode_images(ZipMembers(path, archive, names), names, size, data["on_error"],
                                                  limits=limits)
        except ImageDecodeError as error:
            raise PipelineError(f"{error}, in {path} (copied from {source.get('source')}); fix or remove the file, "
                                f"or set data.on_error: skip to leave unreadable images out") from None
    classes = sorted(set(member_classes))
    index = {name: number for number, name in enumerate(classes)}
    labels = torch.tensor([index[member_classes[i]] for i in kept], dtype=torch.int64)
    kept_splits = [member_splits[i] for i in kept]
    if kept_splits and kept_splits[0] == "all":
        train_idx, test_idx = stratified_split(labels, data["test_fraction"], data["seed"], "test", min_held=1)
    else:
        is_train = torch.tensor([split == "train" for split in kept_splits], dtype=torch.bool)
        train_idx, test_idx = is_train.nonzero().flatten(), (~is_train).nonzero().flatten()
    train = images[train_idx], labels[train_idx]
    missing = [cls for cls, n in class_counts(train[1], classes).items() if n == 0]
    if missing:
        raise PipelineError(f"{path}: class {missing[0]!r} has no readable training image left "
                            f"({len(skipped)} unreadable files skipped)")
    if skipped:
        log(f"normalize: skipped {len(skipped)} unreadable images (listed in {META_JSON}), "
            f"e.g. {skipped[0]['file']}: {skipped[0]['reason']}")
    return classes, train, (images[test_idx], labels[test_idx]), skipped


def check_member_sizes(path: Path, archive: zipfile.ZipFile, names: list[str], limits: DecodeLimits) -> None:
    """The download stage copies no picture over data.limits.image_mb; a member over it (a images.zip made some
    other way) is refused from its header, before it is read."""
    for name in names:
        declared = archive.getinfo(name).file_size
        if declared > limits.max_bytes:
            raise PipelineError(f"{path}: member {name!r} is {over_byte_limit(declared, limits.max_bytes)}; "
                                f"rerun the download stage")


def require_images(splits: dict[str, tuple[torch.Tensor, torch.Tensor]], raw: Path, source: Any,
                   skipped: list[dict[str, str]]) -> None:
    """train fits the model and evaluate scores it: neither split may be empty (data.on_error: skip can leave one
    without a single readable image)."""
    for name in ("train", "test"):
        if len(splits[name][1]):
            continue
        because = ""
        if skipped:
            because = (f": {len(skipped)} unreadable images were skipped (data.on_error: skip), e.g. "
                       f"{skipped[0]['file']}: {skipped[0]['reason']}")
        raise PipelineError(f"{raw}: the {name} split has no images{because}; it needs at least one: fix or replace "
                            f"the unreadable files, or add pictures, in {source}")


# ---------------------------------------------------------------- splits and statistics


def stratified_split(labels: torch.Tensor, fraction: float, seed: int, purpose: str,
                     min_held: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held) ascending index tensors. Per class, round(fraction x n) randomly chosen samples are held out
    (at least `min_held`, and always leaving one sample of the class in `kept`)."""
    generator = torch.Generator().manual_seed(derived_seed(seed, purpose))
    held = []
    for cls in torch.unique(labels).tolist():  # sorted
        members = (labels == cls).nonzero().flatten()
        count = len(members)
        take = min(max(math.floor(fraction * count + 0.5), min_held), count - 1)
        held.append(members[torch.randperm(count, generator=generator)[:take]])
    held_idx = torch.cat(held).sort().values if held else torch.empty(0, dtype=torch.int64)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_idx] = False
    return mask.nonzero().flatten(), held_idx


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 N x 3 x H x W pixels scaled to 0..1. Sums are exact
    integers, so the result does not depend on chunking or thread count."""
    total = torch.zeros(3, dtype=torch.int64)
    squares = torch.zeros(3, dtype=torch.int64)
    for chunk in images.split(1024):
        values = chunk.to(torch.int64)
        total += values.sum(dim=(0, 2, 3))
        squares += (values * values).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    if count == 0:
        raise PipelineError("the training split is empty: no statistics to compute")
    mean = [s / (count * 255) for s in total.tolist()]
    std = [math.sqrt((q * count - s * s) / (count * count)) / 255 for s, q in zip(total.tolist(), squares.tolist())]
    return mean, std


def imbalance_warning(train_counts: dict[str, int]) -> str | None:
    """The data summary's warning when the training split's largest class has at least IMBALANCE_RATIO times the
    images of its smallest (a model then learns to favour the large classes), else None."""
    smallest = min(train_counts, key=train_counts.__getitem__)  # ties: the first class in class order
    largest = max(train_counts, key=train_counts.__getitem__)
    few, many = train_counts[smallest], train_counts[largest]
    if many < IMBALANCE_RATIO * few:
        return None
    ratio = f" ({many / few:.1f}x as many)" if few else ""
    return (f"the classes are imbalanced: in the training split, {smallest!r} has {few} images and {largest!r} "
            f"{many}{ratio}; accuracy then hides the small classes (see balanced accuracy and per-class "
            f"recall), and train.class_weights: balanced weights the loss against it")


def class_counts(labels: torch.Tensor, classes: list[str]) -> dict[str, int]:
    counts = torch.bincount(labels, minlength=len(classes)).tolist() if len(labels) else [0] * len(classes)
    return dict(zip(classes, counts))


def main() -> None:
    normalize(load_params())


if __name__ == "__main__":
    run_stage(main)
