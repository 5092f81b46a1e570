"""Where each stage reads and writes: the files that pass between stages, in one place.

dvc.yaml names the same paths as each stage's deps and outs (tests/test_structure.py checks they agree). All are
relative to the repository root, where DVC runs every stage."""

from __future__ import annotations

import ast
from pathlib import Path

# download
SOURCES_DIR = Path("data/sources")  # local image-folder sources (a dependency of download, tracked by DVC)
DOWNLOAD_DIR = Path("data/.download")  # partial and finished downloads, kept between runs (not an output)
RAW_DIR = Path("data/raw")
SOURCE_JSON = RAW_DIR / "source.json"  # what data/raw holds and where it came from
CIFAR10_DIR = RAW_DIR / "cifar-10-batches-py"  # the CIFAR-10 python batches (cifar10 and synthetic sources)
IMAGES_ZIP = RAW_DIR / "images.zip"  # an image-folder source, canonicalized

# normalize
PREPARED_DIR = Path("data/prepared")
TRAIN_SPLIT = PREPARED_DIR / "train.pt"
VAL_SPLIT = PREPARED_DIR / "val.pt"
TEST_SPLIT = PREPARED_DIR / "test.pt"
META_JSON = PREPARED_DIR / "meta.json"

# features (train.cache_features: the frozen backbone's embeddings, computed once)
FEATURES_DIR = Path("data/features")
FEATURES_TRAIN = FEATURES_DIR / "train.pt"
FEATURES_VAL = FEATURES_DIR / "val.pt"
FEATURES_TEST = FEATURES_DIR / "test.pt"  # evaluate scores a head-only model on these (tta 1 or 2)
FEATURES_JSON = FEATURES_DIR / "features.json"  # what the embeddings were computed with, or that none were

# train
PRETRAINED_DIR = Path("models/pretrained")
MODEL_PATH = Path("models/model.pth")
RESUME_PATH = Path("models/resume/train.pt")  # not a DVC output: DVC must not delete it before a rerun
TRAIN_METRICS = Path("metrics/train.json")
TRAIN_TIME = Path("metrics/train_time.json")  # wall-clock numbers only: the one output whose bytes vary
HISTORY_CSV = Path("metrics/history.csv")

# export
ONNX_PATH = Path("models/model.onnx")  # the model for ONNX Runtime: uint8 images in, logits out
SAFETENSORS_PATH = Path("models/model.safetensors")  # the weights, with what rebuilds the model in its metadata

# evaluate
TEST_METRICS = Path("metrics/test.json")
PER_CLASS_JSON = Path("metrics/per_class.json")
PER_CLASS_CSV = Path("metrics/per_class.csv")
PREDICTIONS_CSV = Path("metrics/predictions.csv")
CALIBRATION_CSV = Path("metrics/calibration.csv")  # the reliability diagram's data: one row per non-empty bin

# report
REPORT_DIR = Path("reports")


# ---------------------------------------------------------------- code


PACKAGE_DIR = Path(__file__).resolve().parent.parent  # stages/


def code_closure(module: str) -> list[Path]:
    """The files of `stages` that running `python -m <module>` executes: the module, the __init__ of every package
    on the way to it, and every stages module they import, transitively (read from the source with ast, nothing is
    imported). Paths are relative to the repository root, as dvc.yaml lists them; the resume fingerprint hashes the
    same list."""
    root, package = PACKAGE_DIR.parent, PACKAGE_DIR.name
    seen: set[Path] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        for path in _module_files(root, name):
            if path in seen:
                continue
            seen.add(path)
            tree = ast.parse((root / path).read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    pending += [alias.name for alias in node.names if alias.name.split(".")[0] == package]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                        and node.module.split(".")[0] == package:
                    pending.append(node.module)
                    # `from stages.model import nets` imports a module; `from stages.model.nets import x`, a name
                    pending += [f"{node.module}.{alias.name}" for alias in node.names
                                if _module_files(root, f"{node.module}.{alias.name}")]
    return sorted(seen, key=str)


def _module_files(root: Path, name: str) -> list[Path]:
    """The files importing module `name` runs: each package's __init__.py on the way, then the module itself
    (a .py file, or a package's __init__.py); none when `name` is not a module of the tree."""
    parts = name.split(".")
    files = [Path(*parts[:depth], "__init__.py") for depth in range(1, len(parts))]
    target = Path(*parts).with_suffix(".py")
    if not (root / target).is_file():
        target = Path(*parts, "__init__.py")
        if not (root / target).is_file():
            return []
    return [*files, target]
