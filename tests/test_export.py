"""The export stage: models/model.onnx and models/model.safetensors from the checkpoint, checked against torch
before they are written, with the same bytes on every run; an ensemble as one graph; one clear error for a model
the exporter cannot handle, an export that disagrees with torch and a mismatched safetensors file;
stages.model.deploy's torch-free decoding against stages.dataset.images; predict on the .onnx against the .pth;
and the model registry round trip (GTO tags, a local DVC remote, `dvc artifacts get`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from stages.base.config import load_params
from stages.base.runtime import PipelineError
from stages.base.specs import model_config_of
from stages.dataset import images
from stages.export import check_onnx, compare_logits, export, export_onnx
from stages.model import deploy
from stages.model.checkpoint import (SAFETENSORS_FORMAT, check_safetensors, checkpoint_from_safetensors,
                                     load_checkpoint, make_checkpoint, read_safetensors, safetensors_bytes)
from stages.model.nets import Ensemble, build_model, infer, model_from_checkpoint
from stages.model.tensors import load_split

from pipeline_repo import Baseline, dvc_executable
from prepared_data import train_tiny

OUTPUTS = ("models/model.onnx", "models/model.safetensors")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CNN trained on the helpers' learnable data (decisive predictions), then exported by the stage."""
    root = tmp_path_factory.mktemp("export")
    train_tiny(root)
    cwd = Path.cwd()
    try:
        os.chdir(root)
        export(load_params())
    finally:
        os.chdir(cwd)
    return root


def outputs_of(root: Path) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in OUTPUTS}


def untrained_checkpoint(model: str, config: dict[str, Any], members: int = 1, size: int = 32) -> dict[str, Any]:
    """A checkpoint of random models (one per member, other seeds) with non-trivial BatchNorm statistics."""
    state_dicts = []
    for seed in range(members):
        torch.manual_seed(seed)
        net = build_model(model, config, 4, size, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26])
        with torch.no_grad():
            for module in net.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
        state_dicts.append(net.state_dict())
    return make_checkpoint(model=model, model_config=config, classes=["a", "b", "c", "d"], image_size=size,
                           mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26], state_dicts=state_dicts)


def random_images(count: int, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, size, size), generator=torch.Generator().manual_seed(1),
                         dtype=torch.uint8)


# ---------------------------------------------------------------- what the stage writes


def test_onnx_model_gives_torchs_logits_on_any_batch(trained: Path) -> None:
    import onnx

    proto = onnx.load(trained / "models/model.onnx")
    assert [(opset.domain, opset.version) for opset in proto.opset_import if opset.domain == ""] == [("", 18)]
    (graph_input,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert graph_input.name == "images" and dims == ["batch", 3, 32, 32]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8  # raw pixels: normalization inside
    data = (trained / "models/model.onnx").read_bytes()
    assert b"stages/model/nets.py" not in data and b"stack_trace" not in data  # no paths: the same bytes in any clone
    classifier = deploy.OnnxClassifier(trained / "models/model.onnx", "model.onnx")
    checkpoint = load_checkpoint(trained / "models/model.pth")
    assert classifier.classes == checkpoint["classes"] and classifier.image_size == 32
    test_images, _ = load_split(trained / "data/prepared/test.pt")
    expected = infer(model_from_checkpoint(checkpoint), test_images, batch_size=64).numpy()
    for batch in (1, 7, len(test_images)):
        got = np.concatenate([classifier.logits(test_images[i:i + batch].numpy())
                              for i in range(0, len(test_images), batch)])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_safetensors_holds_the_weights_and_what_rebuilds_the_model(trained: Path) -> None:
    from safetensors import safe_open

    checkpoint = load_checkpoint(trained / "models/model.pth")
    with safe_open(str(trained / "models/model.safetensors"), "pt") as handle:
        metadata = handle.metadata()
        names = set(handle.keys())
    assert names == set(checkpoint["state_dicts"][0])
    assert metadata["format"] == SAFETENSORS_FORMAT and json.loads(metadata["classes"]) == checkpoint["classes"]
    assert metadata["model"] == "cnn" and json.loads(metadata["model_config"]) == checkpoint["model_config"]
    assert int(metadata["image_size"]) == 32 and metadata["members"] == "1"
    again = read_safetensors(trained / "models/model.safetensors")
    assert all(torch.equal(again["state_dicts"][0][k], v) for k, v in checkpoint["state_dicts"][0].items())


def test_export_gives_the_same_bytes_every_time(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage again in this process (tests/test_pipeline.py compares a fresh clone's run too); the safetensors
    library alone writes its metadata in another order on every call, which the canonical header undoes."""
    from safetensors.torch import save

    before = outputs_of(trained)
    monkeypatch.chdir(trained)
    export(load_params())
    assert outputs_of(trained) == before
    checkpoint = load_checkpoint("models/model.pth")
    assert {safetensors_bytes(checkpoint) for _ in range(5)} == {before["models/model.safetensors"]}
    metadata = {f"key{i}": str(i) for i in range(12)}
    assert len({save({"x": torch.ones(2)}, metadata=metadata) for _ in range(5)}) > 1  # why the header is rewritten


def test_ensemble_is_one_graph_averaging_its_members() -> None:
    checkpoint = untrained_checkpoint("cnn", {"channels": [8, 8, 8]}, members=2)
    model = model_from_checkpoint(checkpoint)
    assert isinstance(model, Ensemble)
    onnx_bytes = export_onnx(model, checkpoint, opset=18)
    pictures = random_images(5)
    check_onnx(onnx_bytes, model, pictures, 1e-4, checkpoint["classes"])
    classifier = deploy.OnnxClassifier(onnx_bytes, "ensemble.onnx")
    members = [member(pictures.float()) for member in model.members]
    np.testing.assert_allclose(classifier.logits(pictures.numpy()), torch.stack(members).mean(0).detach().numpy(),
                               rtol=1e-4, atol=1e-4)
    weights = safetensors_bytes(checkpoint)
    check_safetensors(weights, checkpoint)
    again = checkpoint_from_safetensors(weights, "ensemble.safetensors")
    assert isinstance(model_from_checkpoint(again), Ensemble) and len(again["state_dicts"]) == 2


def test_airnet_the_default_model_exports(repo_root: Path) -> None:
    train = load_params(repo_root / "params.yaml")["train"]
    train.update(model="airnet", airnet={"widths": [8, 16, 16], "whiten_bias_epochs": 1})
    checkpoint = untrained_checkpoint("airnet", model_config_of(train))
    model = model_from_checkpoint(checkpoint)
    check_onnx(export_onnx(model, checkpoint, opset=18), model, random_images(8), 1e-4, checkpoint["classes"])


# ---------------------------------------------------------------- bad input: one message, nothing written


def test_an_opset_the_exporter_does_not_write_is_refused() -> None:
    """torch's exporter falls back to its own opset 18 when it cannot convert, silently: the stage says so."""
    checkpoint = untrained_checkpoint("cnn", {"channels": [8, 8, 8]})
    with pytest.raises(PipelineError, match=r"^export.opset: 30 was asked for, but torch's exporter wrote opset 18; "
                                            r"it writes 18 to \d+ \(the newest that the installed onnx knows\)"):
        export_onnx(model_from_checkpoint(checkpoint), checkpoint, opset=30)


class DataDependent(torch.nn.Module):
    """Python control flow on the pixel values: torch.export cannot capture it."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.float().flatten(1)[:, :4]
        return pixels if pixels.mean() > 100 else -pixels


def test_a_model_the_exporter_cannot_handle_is_one_message(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import export as stage

    before = outputs_of(trained)
    monkeypatch.chdir(trained)
    monkeypatch.setattr(stage, "model_from_checkpoint", lambda checkpoint: DataDependent().eval())
    with pytest.raises(PipelineError) as caught:
        export(load_params())
    message = str(caught.value)
    assert message.startswith("models/model.pth: torch's ONNX exporter cannot export this cnn model: Failed to "
                              "export the model with torch.export. GuardOnDataDependentSymNode: "), message
    assert message.endswith("; nothing was written") and "\n" not in message and "\x1b" not in message
    assert outputs_of(trained) == before


def test_an_export_that_disagrees_with_torch_fails_with_the_difference(trained: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx
    from onnx import numpy_helper

    from stages import export as stage

    real_export = stage.export_onnx

    def tampered(*args: Any, **kwargs: Any) -> bytes:
        """The real export with one weight changed a little: close to torch, but beyond the tolerance."""
        proto = onnx.load_from_string(real_export(*args, **kwargs))
        weight = max(proto.graph.initializer, key=lambda tensor: np.prod(tensor.dims))
        values = numpy_helper.to_array(weight).copy()
        values.flat[0] += 0.05
        weight.CopyFrom(numpy_helper.from_array(values, weight.name))
        return proto.SerializeToString()

    before = outputs_of(trained)
    monkeypatch.chdir(trained)
    monkeypatch.setattr(stage, "export_onnx", tampered)
    with pytest.raises(PipelineError, match=r"^models/model.onnx: ONNX Runtime and torch disagree: test image \d+, "
                                            r"logit of 'class\d': .* \(difference .*, allowed .*: export.tolerance "
                                            r"0.0001 x \(1 \+ \|logit\|\)\); nothing was written$"):
        export(load_params())
    assert outputs_of(trained) == before


def test_a_different_top1_fails_unless_it_is_a_tie() -> None:
    """Logits within the tolerance can still rank two classes the other way round: a failure, unless torch's best
    two are closer than the tolerance (a tie at float32 precision)."""
    classes = ["a", "b", "c"]
    expected = np.array([[0.0, -1.5e-4, -3.0], [0.0, -0.5e-4, -3.0]], dtype=np.float32)
    got = np.array([[-0.9e-4, -0.6e-4, -3.0], [-0.5e-4, 0.0, -3.0]], dtype=np.float32)
    with pytest.raises(PipelineError, match=r"^models/model.onnx: the top-1 class differs between ONNX Runtime and "
                                            r"torch on 1 of 2 checks \(first: test image 7, 'b' against 'a'\); "
                                            r"nothing was written$"):
        compare_logits(got, expected, np.array([7, 8]), 1e-4, classes)
    assert compare_logits(got[1:], expected[1:], np.array([8]), 1e-4, classes) == pytest.approx(0.5e-4)


@pytest.mark.parametrize("case, message", [
    ("foreign", "not a safetensors export of this pipeline: its metadata has no format "
                "'cifar-pipeline/safetensors/1'"),
    ("other architecture", "checkpoint weights do not fit model 'cnn': Error(s) in loading state_dict"),
    ("members", "tensor 'net.0.weight' belongs to none of the 2 members (expected names "
                "members.<index>.<parameter>)"),
    ("bad metadata", "metadata 'classes' is missing or not valid; export the model again"),
    ("crafted size", "image_size: expected a value <= 1024, got 100000"),
    ("not safetensors", "not a safetensors file (no valid header)"),
])
def test_a_mismatched_safetensors_file_is_one_message(trained: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str], case: str,
                                                      message: str) -> None:
    """Through predict, which reads a .safetensors as it reads a checkpoint: exit 2, one line, no output."""
    from safetensors.torch import save

    from stages import predict

    data = (trained / "models/model.safetensors").read_bytes()
    checkpoint = load_checkpoint(trained / "models/model.pth")
    tensors = {name: tensor.contiguous() for name, tensor in checkpoint["state_dicts"][0].items()}  # channels_last
    metadata = read_metadata(data)
    if case == "foreign":
        data = save(tensors)
    elif case == "other architecture":
        data = save(tensors, metadata={**metadata, "model_config": json.dumps({"channels": [16, 16, 16]})})
    elif case in ("members", "bad metadata", "crafted size"):
        key, value = {"members": ("members", "2"), "bad metadata": ("classes", "[not json"),
                      "crafted size": ("image_size", "100000")}[case]
        data = save(tensors, metadata={**metadata, key: value})
    else:
        data = b"\x00" * 64
    (tmp_path / "model.safetensors").write_bytes(data)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    with pytest.raises(SystemExit) as exited:
        predict.main([str(tmp_path / "model.safetensors"), str(tmp_path / "red.png")])
    captured = capsys.readouterr()
    assert exited.value.code == 2 and captured.out == ""
    assert captured.err.startswith(f"error: {tmp_path / 'model.safetensors'}: {message}"), captured.err
    assert captured.err.count("\n") == 1, captured.err


def read_metadata(data: bytes) -> dict[str, str]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length])["__metadata__"]


# ---------------------------------------------------------------- predict on the .onnx


def test_deploy_decodes_images_as_stages_images_does(tmp_path: Path) -> None:
    """Same constants, and the same pixels: identical without a resize or when enlarging, within 1 when
    shrinking (Pillow's and torchvision's bilinear filters round differently)."""
    assert deploy.IMAGE_EXTENSIONS == images.IMAGE_EXTENSIONS and deploy.PILLOW_FORMATS == images.PILLOW_FORMATS
    assert deploy.NOT_AN_IMAGE == images.NOT_AN_IMAGE
    assert (deploy.MAX_PIXELS, deploy.MAX_BYTES) == (images.DecodeLimits().max_pixels, images.DecodeLimits().max_bytes)
    rng = np.random.default_rng(0)
    pictures = {  # name: (image, exact)
        "exact.png": (Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), True),
        "exact.jpg": (Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), True),
        "enlarged.png": (Image.fromarray(rng.integers(0, 256, (20, 26, 3), dtype=np.uint8)), True),
        "rgba.png": (Image.fromarray(rng.integers(0, 256, (32, 40, 4), dtype=np.uint8), "RGBA"), True),
        "grey16.png": (Image.fromarray(rng.integers(0, 65536, (32, 32), dtype=np.uint16)), True),
        "palette.gif": (Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).quantize(16), True),
        "shrunk.png": (Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)), False),
        "photo.jpg": (Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)), False),
    }
    for name, (picture, exact) in pictures.items():
        picture.save(tmp_path / name)
        ours = deploy.load_image(tmp_path / name, 32)
        reference = images.load_image(tmp_path / name, 32).numpy()
        assert ours.dtype == np.uint8 and ours.shape == reference.shape == (3, 32, 32), name
        difference = np.abs(ours.astype(int) - reference.astype(int)).max()
        assert difference == 0 if exact else difference <= 1, (name, difference)
    for data in (b"", b"plain text", b"\xff\xd8\xff\xe0 truncated jpeg"):
        with pytest.raises(images.ImageDecodeError) as theirs:
            images.decode_image(data, 32, "x")
        with pytest.raises(PipelineError) as ours_error:
            deploy.decode_image(data, 32, "x")
        assert str(ours_error.value) == str(theirs.value)


def test_predict_on_the_onnx_gives_the_pth_top1(trained: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Test images as PNG and JPEG files, at the model's size and not: the same top-1 class from the .onnx
    (ONNX Runtime), the .pth (torch, as evaluate runs it: bf16 where the CPU has it) and the .safetensors (torch)."""
    from stages import predict

    test_images, _ = load_split(trained / "data/prepared/test.pt")
    for index in range(24):
        picture = Image.fromarray(test_images[index].permute(1, 2, 0).numpy())
        if index % 3 == 0:
            picture.save(tmp_path / f"{index:02d}.png")
        elif index % 3 == 1:
            picture.save(tmp_path / f"{index:02d}.jpg", quality=95)
        else:
            picture.resize((48, 40), Image.Resampling.BICUBIC).save(tmp_path / f"{index:02d}.png")
    answers = {}
    for model in OUTPUTS + ("models/model.pth",):
        predict.main([str(trained / model), str(tmp_path), "--format", "json", "--top-k", "1"])
        answers[model] = {row["file"]: row["predictions"][0] for row in json.loads(capsys.readouterr().out)}
    onnx_answers = answers["models/model.onnx"]
    assert len(onnx_answers) == 24
    for model, got in answers.items():
        assert {f: p["class"] for f, p in got.items()} == {f: p["class"] for f, p in onnx_answers.items()}, model
        assert max(abs(p["probability"] - onnx_answers[f]["probability"]) for f, p in got.items()) < 0.03, model


# ---------------------------------------------------------------- the model registry


@pytest.mark.slow
def test_registry_version_and_stage_get_the_pushed_model(baseline: Baseline, tmp_path: Path) -> None:
    """Register a version and assign a stage with GTO (git tags), push to a local DVC remote, then `dvc artifacts
    get` by stage and by version, from a clone without a DVC cache: the pushed bytes, offline."""
    repo = baseline.repo.copy_to(tmp_path / "repo")
    repo.dvc("remote", "add", "-d", "local", str(tmp_path / "remote"))
    repo.commit("a local DVC remote")
    repo.dvc("push")
    gto = dvc_executable().parent / "gto"
    repo.run(gto, "register", "cifar-classifier", "--version", "v1.0.0")
    repo.run(gto, "assign", "cifar-classifier", "--version", "v1.0.0", "--stage", "prod")
    shown = repo.run(gto, "show", "--json").stdout
    assert '"v1.0.0"' in shown and "prod" in shown, shown
    pushed = (repo.path / "models/model.onnx").read_bytes()
    server = tmp_path / "server.git"  # what a user reaches: the git history and the remote, no DVC cache
    repo.run("git", "clone", "-q", "--bare", str(repo.path), str(server))
    shutil.rmtree(repo.path / ".dvc/cache")
    for how in (["--stage", "prod"], ["--rev", "v1.0.0"]):
        out = tmp_path / f"got-{how[1]}.onnx"
        repo.dvc("artifacts", "get", str(server), "cifar-classifier", *how, "-o", str(out))
        assert out.read_bytes() == pushed, how
    repo.dvc("get", str(server), "models/model.onnx", "--rev", "cifar-classifier#prod#1", "-o",
             str(tmp_path / "by-tag.onnx"))
    assert (tmp_path / "by-tag.onnx").read_bytes() == pushed
    classifier = deploy.OnnxClassifier(tmp_path / "got-prod.onnx", "got-prod.onnx")
    assert classifier.classes == load_checkpoint(repo.path / "models/model.pth")["classes"]
    (tmp_path / "remote").rename(tmp_path / "remote-gone")  # the bytes came from the remote: without it, no model
    failed = repo.dvc("artifacts", "get", str(server), "cifar-classifier", "--stage", "prod", "-o",
                      str(tmp_path / "again.onnx"), check=False)
    assert failed.returncode != 0 and not (tmp_path / "again.onnx").exists(), failed.output


@pytest.mark.parametrize("side", ["onnx", "torch"])
def test_nan_logits_fail_the_check(side: str) -> None:
    """Every comparison with NaN is false, so a plain `difference > allowed` would let NaN logits through."""
    classes = ["a", "b"]
    good = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    broken = good.copy()
    broken[1, 0] = np.nan
    got, expected = (broken, good) if side == "onnx" else (good, broken)
    with pytest.raises(PipelineError, match=r"^models/model.onnx: logits that are not finite \(NaN or infinite\) on "
                                            r"1 of 2 checks \(first: test image 8\); nothing was written$"):
        compare_logits(got, expected, np.array([7, 8]), 1e-4, classes)
