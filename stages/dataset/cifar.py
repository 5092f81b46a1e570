"""The CIFAR-10 python format, both ways: its file names and classes, the writer, and the safe reader.

The format is a folder of pickled dicts with bytes keys: five training batches, `test_batch` and `batches.meta`.
Each batch holds `data`, a uint8 numpy array N x 3072 (the R, G and B planes of a 32x32 image), and `labels`, a
list of class numbers; batches.meta holds `label_names`. The download stage writes it for synthetic data (the
official tarball is only extracted); normalize reads it, unpickling only the numpy arrays the format needs.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.base.runtime import PipelineError

CIFAR10_META = "batches.meta"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_FILES = (CIFAR10_META, *CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

Split = tuple[torch.Tensor, torch.Tensor]  # uint8 images N x 3 x 32 x 32, int64 labels N


# ---------------------------------------------------------------- writer


def write_cifar_batches(directory: Path, train_images: torch.Tensor, train_labels: list[int],
                        test_images: torch.Tensor, test_labels: list[int],
                        label_names: tuple[str, ...] = CIFAR10_CLASSES) -> None:
    """Write images (uint8 N x 3 x 32 x 32) in the CIFAR-10 python format: five training batches, test_batch and
    batches.meta, pickled dicts with bytes keys and `data` as a uint8 numpy array N x 3072 (R, G, B planes)."""
    directory.mkdir(parents=True, exist_ok=True)
    batches = np.array_split(np.arange(len(train_labels)), len(CIFAR10_TRAIN_BATCHES))

    def batch(label: str, images: torch.Tensor, labels: list[int], offset: int) -> dict[bytes, Any]:
        return {
            b"batch_label": label.encode(),
            b"labels": [int(v) for v in labels],
            b"data": images.reshape(len(labels), 3072).numpy(),
            b"filenames": [f"{label_names[v].replace(' ', '_')}_s_{offset + i:06d}.png".encode()
                           for i, v in enumerate(labels)],
        }

    for number, (name, indices) in enumerate(zip(CIFAR10_TRAIN_BATCHES, batches), start=1):
        first = int(indices[0]) if len(indices) else 0
        chosen = train_images[first:first + len(indices)]
        _write_pickle(directory / name, batch(f"training batch {number} of {len(batches)}", chosen,
                                              train_labels[first:first + len(indices)], first))
    _write_pickle(directory / CIFAR10_TEST_BATCH, batch("testing batch 1 of 1", test_images, test_labels, 0))
    _write_pickle(directory / CIFAR10_META, {
        b"num_cases_per_batch": len(batches[0]),
        b"label_names": [name.encode() for name in label_names],
        b"num_vis": 3072,
    })


def _write_pickle(path: Path, obj: Any) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=4))


# ---------------------------------------------------------------- reader


def load_cifar(folder: Path) -> tuple[list[str], Split, Split]:
    """(class names, (train images, labels), (test images, labels)) from the CIFAR-10 python batches in
    `folder`, at the format's 32x32; PipelineError names the file that is missing or not in the format."""
    meta_path = folder / CIFAR10_META
    names = _unpickle(meta_path).get(b"label_names")
    if (not isinstance(names, list) or len(names) < 2
            or not all(isinstance(name, (bytes, str)) and name for name in names)):
        raise PipelineError(f"{meta_path}: 'label_names' must be a list of at least 2 class names")
    classes = [name.decode("utf-8") if isinstance(name, bytes) else name for name in names]
    parts = [_load_batch(folder / name, len(classes)) for name in CIFAR10_TRAIN_BATCHES]
    train = torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts])
    return classes, train, _load_batch(folder / CIFAR10_TEST_BATCH, len(classes))


def _load_batch(path: Path, num_classes: int) -> Split:
    batch = _unpickle(path)
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        described = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else repr(type(data))
        raise PipelineError(f"{path}: 'data' must be a uint8 array N x 3072 (32x32 RGB), got {described}")
    if (not isinstance(labels, list) or len(labels) != data.shape[0]
            or not all(isinstance(v, int) and 0 <= v < num_classes for v in labels)):
        raise PipelineError(f"{path}: 'labels' must be a list of {data.shape[0]} class numbers 0..{num_classes - 1}")
    images = torch.from_numpy(np.ascontiguousarray(data)).reshape(-1, 3, 32, 32)
    return images, torch.tensor(labels, dtype=torch.int64)


def _unpickle(path: Path) -> dict[bytes, Any]:
    if not path.is_file():
        raise PipelineError(f"{path} is missing; rerun the download stage (dvc repro)")
    try:
        with open(path, "rb") as handle:
            # The official files were pickled by Python 2: their str keys load as bytes with encoding='bytes'.
            obj = _BatchUnpickler(handle, encoding="bytes").load()
    except Exception as error:  # a damaged pickle raises almost anything (UnpicklingError, EOFError, ValueError...)
        raise PipelineError(f"{path}: not a readable CIFAR-10 batch file ({type(error).__name__}: {error})") from None
    if not isinstance(obj, dict):
        raise PipelineError(f"{path}: not a CIFAR-10 batch file (expected a pickled dict, got {type(obj).__name__})")
    return obj


class _BatchUnpickler(pickle.Unpickler):
    """Unpickling can run arbitrary code; a CIFAR batch needs nothing but numpy arrays, so only the functions
    that rebuild them are allowed (any other global is refused)."""

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_reconstruct()
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):  # bytes in protocol-2 pickles written by Python 3
            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of the CIFAR-10 format)")


def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct
