"""predict: classify image files with a trained model (not a DVC stage; also the `cifar-predict` command).

    python -m stages.predict models/model.pth photo.jpg photos/ [--top-k 3] [--format text|json|csv]
                             [--output FILE] [--batch-size 64] [--tta 1|2|6]
    python -m stages.predict models/model.onnx photo.jpg photos/ ...         # on ONNX Runtime, without torch
    python -m stages.predict models/model.safetensors photo.jpg photos/ ...  # the exported weights, on torch

The model file decides the runtime. A `.onnx` file (the export stage's) runs on ONNX Runtime through
stages/model/deploy.py, and torch is never imported: a deployment needs onnxruntime, numpy and Pillow only. Any
other file is a model for torch: the train stage's checkpoint, or the export stage's `.safetensors` (weights and
metadata; both read by stages/model/checkpoint.py).

Every image goes through the model's own preprocessing: stages/dataset/images.py decodes it exactly as normalize
decoded the training images (EXIF rotation, grey/alpha/palette to RGB, shorter side resized to the model's image
size and centre-cropped; for a .onnx model stages/model/deploy.py applies the same rules with Pillow alone, whose
resize may differ by 1 in a few pixel values), and the model carries its normalization, so any picture works.
Folders are searched recursively for image files (hidden files and folders are left out), in sorted order.

Exit status: 0 when every image was classified; 1 when some images could not be read (the others are still
classified and written, the unreadable ones are listed on stderr); 2 for a usage error, a missing input or a file
that is not a model of this pipeline (nothing is written).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

# Only torch-free modules at the top: a .onnx model must run where torch is not installed.
from stages.base.runtime import PipelineError, decode_workers, progress, run_stage, write_text
from stages.dataset.imagefiles import IMAGE_EXTENSIONS, is_image_name
from stages.model import deploy
from stages.model.deploy import OnnxClassifier, top_classes

if TYPE_CHECKING:
    import torch

FORMATS = ("text", "json", "csv")
PROGRESS_MIN_IMAGES = 256  # below this a progress bar is only noise on stderr
ONNX_SUFFIX = ".onnx"
SAFETENSORS_SUFFIX = ".safetensors"


@dataclass
class Prediction:
    file: str
    classes: list[str]  # best first
    probabilities: list[float]


def find_images(inputs: Sequence[str]) -> list[Path]:
    """The image files named on the command line, folders expanded recursively (sorted, hidden entries left out).
    A file named explicitly is always taken, whatever its extension: its content decides its format."""
    found: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            images = sorted(
                (p for p in path.rglob("*") if p.is_file() and is_image_name(p.name)
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                key=lambda p: p.relative_to(path).as_posix())
            if not images:
                print(f"warning: {path}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder",
                      file=sys.stderr)
            found.extend(images)
        elif path.is_file():
            found.append(path)
        elif path.exists():
            raise PipelineError(f"{path}: not a file or folder")
        else:
            raise PipelineError(f"{path}: no such file or folder")
    if not found:
        raise PipelineError("no image files to classify")
    return found


def load_model(path: str | Path) -> tuple[dict[str, Any], torch.nn.Module]:
    """A model for torch: the train stage's checkpoint, or the export stage's .safetensors (its metadata rebuilds
    the model; a file whose weights do not fit it is refused)."""
    from stages.model.checkpoint import load_checkpoint, read_safetensors
    from stages.model.nets import model_from_checkpoint

    if Path(path).suffix.lower() == SAFETENSORS_SUFFIX:
        checkpoint = read_safetensors(path)
    else:
        checkpoint = load_checkpoint(path)  # refuses pickled code, other files and other checkpoint versions
    try:
        model = model_from_checkpoint(checkpoint)
    except PipelineError as error:
        raise PipelineError(f"{path}: {error}") from None
    return checkpoint, model


def classify(files: Sequence[Path], decode: Callable[[Path], Any], run: Callable[[list[Any]], np.ndarray],
             classes: list[str], top_k: int, batch_size: int) -> tuple[list[Prediction], list[str]]:
    """Top-k predictions for the readable files (in input order) and the error messages of the unreadable ones:
    `decode` gives an image or the reason it could not be read (one bad file must not stop the others), `run` the
    logits of a list of images."""
    top_k = min(top_k, len(classes))
    predictions: list[Prediction] = []
    errors: list[str] = []
    # Pillow and libjpeg release the GIL, so threads decode a batch on all cores.
    with ThreadPoolExecutor(max_workers=decode_workers()) as pool, \
            progress(len(files), "predict", disable=len(files) < PROGRESS_MIN_IMAGES) as bar:
        for start in range(0, len(files), batch_size):
            batch = files[start:start + batch_size]
            decoded = list(pool.map(decode, batch))
            good = [(path, image) for path, image in zip(batch, decoded) if not isinstance(image, str)]
            errors.extend(result for result in decoded if isinstance(result, str))
            if good:
                probabilities, indices = top_classes(run([image for _, image in good]), top_k)
                for (path, _), probs, idx in zip(good, probabilities.tolist(), indices.tolist()):
                    predictions.append(Prediction(str(path), [classes[i] for i in idx], probs))
            bar.update(len(batch))
    return predictions, errors


def predict(checkpoint: dict[str, Any], model: torch.nn.Module, files: Sequence[Path], top_k: int = 5,
            batch_size: int = 64, tta: int = 1,
            device: torch.device | None = None) -> tuple[list[Prediction], list[str]]:
    """classify() on torch. Inference runs exactly as in the evaluate stage (same precision and memory layout)."""
    import torch

    from stages.dataset.images import decode_image, read_image_file
    from stages.model.nets import infer, inference_settings
    from stages.model.tensors import pick_device

    device = device or pick_device()
    size = int(checkpoint["image_size"])
    settings = inference_settings(checkpoint["model"], checkpoint.get("train") or {}, device)

    def decode(path: Path) -> torch.Tensor | str:
        try:
            return decode_image(read_image_file(path), size, str(path))
        except PipelineError as error:
            return str(error)

    def run(images: list[torch.Tensor]) -> np.ndarray:
        return infer(model, torch.stack(images), batch_size=batch_size, tta=tta, settings=settings).float().numpy()

    return classify(files, decode, run, [str(c) for c in checkpoint["classes"]], top_k, batch_size)


def predict_onnx(classifier: OnnxClassifier, files: Sequence[Path], top_k: int = 5,
                 batch_size: int = 64) -> tuple[list[Prediction], list[str]]:
    """classify() on ONNX Runtime (stages/model/deploy.py), without torch."""
    def decode(path: Path) -> np.ndarray | str:
        try:
            return deploy.load_image(path, classifier.image_size)
        except PipelineError as error:
            return str(error)

    return classify(files, decode, lambda images: classifier.logits(np.stack(images)), classifier.classes, top_k,
                    batch_size)


# ---------------------------------------------------------------- output


def format_text(predictions: list[Prediction]) -> str:
    return "".join(f"{p.file}: " + ", ".join(f"{c} {q:.4f}" for c, q in zip(p.classes, p.probabilities)) + "\n"
                   for p in predictions)


def format_json(predictions: list[Prediction]) -> str:
    rows = [{"file": p.file, "predictions": [{"class": c, "probability": round(q, 6)}
                                             for c, q in zip(p.classes, p.probabilities)]} for p in predictions]
    return json.dumps(rows, indent=2) + "\n"


def format_csv(predictions: list[Prediction]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "rank", "class", "probability"])
    for p in predictions:
        for rank, (c, q) in enumerate(zip(p.classes, p.probabilities), start=1):
            writer.writerow([p.file, rank, c, f"{q:.6f}"])
    return buffer.getvalue()


FORMATTERS = {"text": format_text, "json": format_json, "csv": format_csv}


# ---------------------------------------------------------------- command line


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cifar-predict",
        description="Classify image files (or folders of them, searched recursively) with a trained model.")
    parser.add_argument("model", help="the train stage's checkpoint (models/model.pth), or the export stage's "
                                      "models/model.onnx (ONNX Runtime) or models/model.safetensors")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders")
    parser.add_argument("--top-k", type=positive_int, default=3,
                        help="classes to show per image, most likely first (default 3; capped at the class count)")
    parser.add_argument("--format", choices=FORMATS, default="text", help="output format (default text)")
    parser.add_argument("--output", metavar="FILE", help="write the results to FILE instead of stdout")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default 64)")
    parser.add_argument("--tta", type=int, choices=(1, 2, 6), default=1,
                        help="test-time augmentation views as in evaluate.tta (default 1: none; torch models only)")
    return parser.parse_args(argv)


def run_checkpoint(args: argparse.Namespace) -> None:
    """The torch runtime: a checkpoint or a .safetensors."""
    files = find_images(args.inputs)  # before the model loads: a typo in a path fails fast
    checkpoint, model = load_model(args.model)
    predictions, errors = predict(checkpoint, model, files, args.top_k, args.batch_size, args.tta)
    write_results(args, predictions, errors, len(files))


def run_onnx(args: argparse.Namespace) -> None:
    """The ONNX Runtime runtime (stages/model/deploy.py): nothing here imports torch."""
    if args.tta != 1:
        raise PipelineError(f"--tta {args.tta}: test-time augmentation runs in torch; use the checkpoint "
                            "(models/model.pth) for it, a .onnx model classifies each image as it is")
    files = find_images(args.inputs)
    classifier = OnnxClassifier(args.model, args.model)
    predictions, errors = predict_onnx(classifier, files, args.top_k, args.batch_size)
    write_results(args, predictions, errors, len(files))


def write_results(args: argparse.Namespace, predictions: list[Prediction], errors: list[str], total: int) -> None:
    """Write the predictions (to --output, atomically, or stdout) and list the unreadable images (exit 1)."""
    output = FORMATTERS[args.format](predictions)
    if args.output:
        write_text(args.output, output)
    else:
        sys.stdout.write(output)
        sys.stdout.flush()
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    if errors:
        print(f"error: {len(errors)} of {total} images could not be read; the other "
              f"{len(predictions)} were classified", file=sys.stderr, flush=True)
        raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m stages.predict` and of the `cifar-predict` console script."""
    args = parse_args(argv)
    run = run_onnx if Path(args.model).suffix.lower() == ONNX_SUFFIX else run_checkpoint
    run_stage(lambda: run(args))


if __name__ == "__main__":
    main()
