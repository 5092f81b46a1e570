"""Where each stage reads and writes: the files that pass between stages, in one place.

dvc.yaml names the same paths as each stage's deps and outs (tests/test_structure.py checks they agree). All are
relative to the repository root, where DVC runs every stage."""

from __future__ import annotations

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
SPLITS = ("train", "val", "test")
TRAIN_SPLIT = PREPARED_DIR / "train.pt"
VAL_SPLIT = PREPARED_DIR / "val.pt"
TEST_SPLIT = PREPARED_DIR / "test.pt"
META_JSON = PREPARED_DIR / "meta.json"

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
