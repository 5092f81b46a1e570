"""The CUDA path, on a machine with an NVIDIA GPU (skipped elsewhere; bench/gpu_check.sh runs it on a lent GPU):
automatic mixed precision, train.deterministic giving bit-identical reruns, export and predict from weights
trained on the GPU."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from prepared_data import tiny_params, write_prepared

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PIPELINE_DEVICE", raising=False)
    write_prepared(tmp_path)
    return tmp_path


def test_auto_precision_on_cuda_is_amp() -> None:
    from stages.model.precision import autocast_dtype

    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert autocast_dtype("auto", torch.device("cuda")) is expected


@pytest.mark.parametrize("model", ["cnn", "airnet"])
def test_deterministic_cuda_runs_are_bit_identical(workdir: Path, model: str) -> None:
    from stages.base.config import load_params
    from stages.train import train

    overrides = {"train.model": model, "train.deterministic": True, "train.epochs": 3}
    if model == "airnet":
        overrides.update({"train.airnet.widths": [16, 32, 32], "train.optimizer": "muon"})
    tiny_params(workdir, **overrides)
    train(load_params())
    first = {name: md5(workdir / name) for name in ("models/model.pth", "metrics/history.csv")}
    assert json.loads((workdir / "metrics/train.json").read_text())["precision"] in ("bf16", "fp16")
    train(load_params())
    assert {name: md5(workdir / name) for name in first} == first


def test_export_and_predict_from_cuda_weights(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stages import predict
    from stages.base.config import load_params
    from stages.evaluate import evaluate
    from stages.export import export
    from stages.train import train

    tiny_params(workdir, **{"train.epochs": 3})
    train(load_params())
    evaluate(load_params())
    export(load_params())  # the ONNX check compares ONNX Runtime (CPU) with the CUDA-trained weights
    assert (workdir / "models/model.onnx").stat().st_size > 0
    accuracy = json.loads((workdir / "metrics/test.json").read_text())["test"]["acc"]
    assert accuracy > 0.9  # the tiny data is easy
    from PIL import Image

    images = torch.load(workdir / "data/prepared/test.pt", weights_only=True)["images"][:3]
    for index, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(workdir / f"test{index}.png")
    capsys.readouterr()
    for model_file in ("models/model.pth", "models/model.onnx"):
        predict.main([model_file, "test0.png", "test1.png", "test2.png", "--format", "json"])
    assert capsys.readouterr().out.count('"file"') >= 6
