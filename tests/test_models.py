"""The model registry: shapes for any class count and image size, the bf16 path, checkpoints that rebuild the
same model, pretrained weights, and refusal of files that are not our checkpoints."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from stages.base.runtime import PipelineError
from stages.base.specs import min_input_size, model_config_of, parameter_count
from stages.model.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_1, load_checkpoint, make_checkpoint
from stages.model.nets import AirNet, Ensemble, build_model, infer, model_from_checkpoint
from stages.model.tensors import save_torch
from stages.model.weights import load_imagenet_weights

from fileserver import FileServer
from repo_root import REPO_ROOT

CONFIGS = {
    "mlp": {"hidden": [64, 32]},
    "cnn": {"channels": [8, 16, 16]},
    "airnet": {"widths": [16, 32, 32], "whiten_bias_epochs": 3},
    "resnet18": {"input_size": 32, "freeze_backbone": False},
    "efficientnet_lite0": {"input_size": 32, "dropout": 0.0},
}


def random_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("classes, size", [(10, 32), (20, 64)])
def test_every_model_fits_any_class_count_and_size(name: str, classes: int, size: int) -> None:
    model = build_model(name, CONFIGS[name], classes, size, [0.5] * 3, [0.25] * 3).eval()
    with torch.no_grad():
        assert model(random_images(2, size)).shape == (2, classes)


def test_bf16_cpu_path_runs_forward_and_backward() -> None:
    model = build_model("airnet", CONFIGS["airnet"], 10, 32, [0.5] * 3, [0.25] * 3)
    model.net.init_from_data(model.normalize(random_images(64, 32)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(random_images(8, 32).float())
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert model.net.head.weight.grad is not None and torch.isfinite(model.net.head.weight.grad).all()


def test_airnet_stem_whitens_patches() -> None:
    net = AirNet(10, 32, [8, 8, 8], 3)
    x = random_images(200, 32).float() / 255
    x[:, 1] = 0.8 * x[:, 0] + 0.2 * x[:, 1]  # correlated channels
    net.init_from_data(x)
    with torch.no_grad():
        out = torch.nn.functional.conv2d(x, net.whiten.weight[:12])  # the 12 eigen-filters, no negatives
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    covariance = flat @ flat.T / flat.shape[1]
    assert torch.allclose(covariance.diagonal()[:6], torch.ones(6), atol=0.05)  # the strong directions are unit


def save_checkpoint(name: str, path: Path, classes: int = 3) -> torch.nn.Module:
    model = build_model(name, CONFIGS[name], classes, 32, [0.4] * 3, [0.2] * 3)
    save_torch(make_checkpoint(model=name, model_config=CONFIGS[name], classes=[f"c{i}" for i in range(classes)],
                               image_size=32, mean=[0.4] * 3, std=[0.2] * 3, state_dicts=[model.state_dict()],
                               train={}), path)
    return model.eval()


@pytest.mark.parametrize("name", ["mlp", "airnet"])
def test_checkpoint_rebuilds_the_same_model(tmp_path: Path, name: str) -> None:
    original = save_checkpoint(name, tmp_path / "model.pth")
    rebuilt = model_from_checkpoint(load_checkpoint(tmp_path / "model.pth"))
    x = random_images(4, 32)
    assert torch.equal(infer(original, x, batch_size=2), infer(rebuilt, x, batch_size=2))


def test_an_ensemble_checkpoint_averages_the_logits_of_its_members(tmp_path: Path) -> None:
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(build_model("airnet", CONFIGS["airnet"], 3, 32, [0.4] * 3, [0.2] * 3).eval())
    save_torch(make_checkpoint(model="airnet", model_config=CONFIGS["airnet"], classes=["a", "b", "c"],
                               image_size=32, mean=[0.4] * 3, std=[0.2] * 3,
                               state_dicts=[m.state_dict() for m in members], train={}),
               tmp_path / "model.pth")
    ensemble = model_from_checkpoint(load_checkpoint(tmp_path / "model.pth"))
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 2
    x = random_images(4, 32)
    first, second = infer(members[0], x, batch_size=4, tta=2), infer(members[1], x, batch_size=4, tta=2)
    assert not torch.allclose(first, second)
    assert torch.allclose(infer(ensemble, x, batch_size=4, tta=2), (first + second) / 2, atol=1e-5)


def test_a_format_1_checkpoint_still_loads_as_one_model(tmp_path: Path) -> None:
    model = build_model("mlp", CONFIGS["mlp"], 3, 32, [0.4] * 3, [0.2] * 3).eval()
    save_torch({"format": CHECKPOINT_FORMAT_1, "model": "mlp", "model_config": CONFIGS["mlp"],
                "classes": ["a", "b", "c"], "image_size": 32, "mean": [0.4] * 3, "std": [0.2] * 3,
                "state_dict": model.state_dict(), "train": {}, "pretrained": None}, tmp_path / "old.pth")
    checkpoint = load_checkpoint(tmp_path / "old.pth")
    assert checkpoint["format"] == CHECKPOINT_FORMAT and len(checkpoint["state_dicts"]) == 1
    x = random_images(4, 32)
    assert torch.equal(infer(model_from_checkpoint(checkpoint), x, batch_size=4), infer(model, x, batch_size=4))


def test_an_empty_ensemble_is_refused(tmp_path: Path) -> None:
    save_torch({"format": CHECKPOINT_FORMAT, "model": "mlp", "model_config": CONFIGS["mlp"], "classes": ["a"],
                "image_size": 32, "mean": [0.4] * 3, "std": [0.2] * 3, "state_dicts": []}, tmp_path / "m.pth")
    with pytest.raises(PipelineError, match="'state_dicts' must be a non-empty list"):
        load_checkpoint(tmp_path / "m.pth")


class RunsCode:
    def __reduce__(self):  # unpickling this would run a shell command
        return (os.system, ("touch pwned",))


def test_crafted_and_foreign_files_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"format": CHECKPOINT_FORMAT, "payload": RunsCode()}, tmp_path / "evil.pth")
    with pytest.raises(PipelineError, match="cannot load model checkpoint"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()
    save_torch(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(PipelineError, match="not a checkpoint of this pipeline"):
        load_checkpoint(tmp_path / "tensor.pth")
    save_torch({"format": "cifar-pipeline/checkpoint/0"}, tmp_path / "old.pth")
    with pytest.raises(PipelineError, match="format 'cifar-pipeline/checkpoint/0' is not supported"):
        load_checkpoint(tmp_path / "old.pth")
    (tmp_path / "text.pth").write_bytes(pickle.dumps("hello"))
    with pytest.raises(PipelineError, match="cannot load"):
        load_checkpoint(tmp_path / "text.pth")
    with pytest.raises(PipelineError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")


def torchvision_weights(path: Path) -> dict[str, torch.Tensor]:
    """A weights file in torchvision's ResNet-18 state_dict layout (1000 ImageNet classes)."""
    from torchvision.models import resnet18
    torch.manual_seed(123)
    state = resnet18(num_classes=1000).state_dict()
    torch.save(state, path)
    return state


def test_pretrained_weights_are_loaded(tmp_path: Path) -> None:
    state = torchvision_weights(tmp_path / "resnet18.pth")
    torch.manual_seed(0)
    model = build_model("resnet18", CONFIGS["resnet18"], 5, 32, [0.5] * 3, [0.25] * 3)
    before = model.net.resnet.conv1.weight.detach().clone()
    info = load_imagenet_weights(model, "resnet18", str(tmp_path / "resnet18.pth"))
    assert not torch.equal(before, state["conv1.weight"])
    assert torch.equal(model.net.resnet.conv1.weight, state["conv1.weight"])
    assert model.net.resnet.fc.weight.shape == (5, 512)  # the 1000-class head is not taken
    assert len(info["sha256"]) == 64 and info["path"].endswith("resnet18.pth")


def test_pretrained_errors(tmp_path: Path) -> None:
    model = build_model("resnet18", CONFIGS["resnet18"], 5, 32, [0.5] * 3, [0.25] * 3)
    with pytest.raises(PipelineError, match="not found. Weights are never downloaded"):
        load_imagenet_weights(model, "resnet18", str(tmp_path / "missing.pth"))
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "partial.pth")
    with pytest.raises(PipelineError, match="not ResNet-18 .torchvision. weights; missing"):
        load_imagenet_weights(model, "resnet18", str(tmp_path / "partial.pth"))


def test_model_config_carries_freeze_flag() -> None:
    train = {"model": "resnet18", "resnet18": {"input_size": 64}, "freeze_backbone": True}
    assert model_config_of(train) == {"input_size": 64, "freeze_backbone": True}


def test_get_pretrained_tool_is_explicit_and_fails_clearly_offline(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    tool = REPO_ROOT / "tools" / "get_pretrained.py"
    with socket.socket() as probe:  # a port nobody listens on: connection refused, as offline
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output = tmp_path / "models/pretrained/resnet18.pth"
    done = subprocess.run([sys.executable, str(tool), "--url", f"http://127.0.0.1:{port}/resnet18.pth",
                           "--output", str(output)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "cannot download" in done.stderr and "copy the file to" in done.stderr
    assert "Traceback" not in done.stderr and not output.exists()

    source = tmp_path / "weights.pth"
    torchvision_weights(source)
    done = subprocess.run([sys.executable, str(tool), "--url", source.as_uri(), "--output", str(output)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert set(torch.load(output, weights_only=True)) == set(torch.load(source, weights_only=True))


def get_pretrained_module():  # type: ignore[no-untyped-def]
    import importlib.util
    spec = importlib.util.spec_from_file_location("get_pretrained", REPO_ROOT / "tools" / "get_pretrained.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def served_weights(server: FileServer, tmp_path: Path, name: str | None = None) -> tuple[str, bytes]:
    """torchvision-layout weights on the test server, under torchvision's naming (resnet18-<sha256[:8]>.pth)."""
    source = tmp_path / "weights.pth"
    torchvision_weights(source)
    payload = source.read_bytes()
    name = name or f"resnet18-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    server.files[f"/models/{name}"] = payload
    return server.url(f"/models/{name}"), payload


def test_get_pretrained_downloads_checks_the_hash_in_the_name_and_saves(server: FileServer, tmp_path: Path) -> None:
    url, payload = served_weights(server, tmp_path)
    output = tmp_path / "models/pretrained/resnet18.pth"
    get_pretrained_module().get_pretrained(url, output)
    saved = torch.load(output, weights_only=True)
    source = torch.load(tmp_path / "weights.pth", weights_only=True)
    assert saved.keys() == source.keys() and all(torch.equal(saved[key], source[key]) for key in source)
    assert sorted(path.name for path in output.parent.iterdir()) == ["resnet18.pth"]  # no .download, .part left


@pytest.mark.parametrize("case", ["hash in the name", "--sha256", "--max-mb", "not weights", "not a state_dict"])
def test_get_pretrained_refuses_a_wrong_download_and_keeps_nothing(server: FileServer, tmp_path: Path,
                                                                   case: str) -> None:
    tool = get_pretrained_module()
    url, payload = served_weights(server, tmp_path, name="resnet18-00000000.pth" if case == "hash in the name"
                                  else "resnet18.pth")
    options: dict[str, object] = {}
    expected = {"hash in the name": "does not start with 00000000, the hash in the file name",
                "--sha256": "does not match the expected " + "ab" * 32,
                "--max-mb": "more than the 1.0 MB of --max-mb",
                "not weights": "the download is not a weights file",
                "not a state_dict": "the download is not a state_dict"}[case]
    if case == "--sha256":
        options["sha256"] = "ab" * 32
    elif case == "--max-mb":
        options["max_mb"] = 1
    elif case == "not weights":
        server.files["/models/resnet18.pth"] = b"<html>proxy error</html>"
    elif case == "not a state_dict":
        buffer = io.BytesIO()
        torch.save([torch.zeros(2)], buffer)
        server.files["/models/resnet18.pth"] = buffer.getvalue()
    output = tmp_path / "models/pretrained/resnet18.pth"
    with pytest.raises(PipelineError, match=re.escape(expected)):
        tool.get_pretrained(url, output, **options)
    assert not output.parent.exists() or list(output.parent.iterdir()) == []



@pytest.mark.parametrize("flags, expected", [(["--sha256", "f37072fd"], "--sha256 'f37072fd': expected 64 hex digits"),
                                             (["--max-mb", "0"], "--max-mb 0.0: expected a size in MB above 0")])
def test_get_pretrained_refuses_bad_flags_before_any_download(tmp_path: Path, flags: list[str], expected: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "resnet18.pth"
    with pytest.raises(SystemExit) as stop:
        get_pretrained_module().main(["--url", "http://127.0.0.1:9/never-asked.pth", "--output", str(output),
                                      *flags])
    assert stop.value.code == 2 and expected in capsys.readouterr().err
    assert not output.exists()

# ---------------------------------------------------------------- the size facts stages.base.specs keeps without torch


@pytest.mark.parametrize("name, config, image_size", [
    ("cnn", {"channels": [8, 16, 16]}, 32),  # 3 pools: at least 8 px
    ("cnn", {"channels": [4, 4, 4, 4, 4, 4]}, 32),  # 5 pools (the sixth block has nothing left): 32 px
    ("cnn", {"channels": [4, 4, 4]}, 12),  # 12 -> 6 -> 3 -> 1: 3 pools, 8 px
    ("airnet", {"widths": [8, 8, 8], "whiten_bias_epochs": 1}, 32),  # 2x2 stem + 3 halvings: 9 px
    ("airnet", {"widths": [8, 8], "whiten_bias_epochs": 1}, 32),  # 5 px
])
def test_min_input_size_is_where_the_network_stops_working(name: str, config: dict, image_size: int) -> None:
    smallest = min_input_size(name, config, image_size)
    model = build_model(name, config, 3, image_size, [0.5] * 3, [0.25] * 3).eval()
    with torch.no_grad():
        assert model(random_images(2, smallest)).shape == (2, 3)
        with pytest.raises(RuntimeError, match="Output size is too small"):
            model(random_images(2, smallest - 1))


@pytest.mark.parametrize("name", ["mlp", "resnet18"])
def test_models_without_a_minimum_run_on_one_pixel(name: str) -> None:
    assert min_input_size(name, CONFIGS[name], 1) == 1
    model = build_model(name, CONFIGS[name], 3, 1, [0.5] * 3, [0.25] * 3).eval()
    with torch.no_grad():
        assert model(random_images(2, 1)).shape == (2, 3)


@pytest.mark.parametrize("name, config", [*CONFIGS.items(), ("mlp", {"hidden": []}),
                                          ("cnn", {"channels": [5, 7, 9, 11]}),
                                          ("airnet", {"widths": [64, 256, 256], "whiten_bias_epochs": 6})])
@pytest.mark.parametrize("classes, image_size", [(2, 8), (10, 32), (7, 20)])
def test_parameter_count_is_what_torch_builds(name: str, config: dict, classes: int, image_size: int) -> None:
    model = build_model(name, config, classes, image_size, [0.5] * 3, [0.25] * 3)
    assert parameter_count(name, config, image_size, classes) == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- checkpoint fields


def airnet_checkpoint(path: Path, **changes: object) -> None:
    """A small valid airnet checkpoint with some fields replaced (or removed, for the value REMOVE)."""
    model = build_model("airnet", CONFIGS["airnet"], 3, 32, [0.4] * 3, [0.2] * 3)
    checkpoint = make_checkpoint(model="airnet", model_config=dict(CONFIGS["airnet"]), classes=["a", "b", "c"],
                                 image_size=32, mean=[0.4] * 3, std=[0.2] * 3, state_dicts=[model.state_dict()],
                                 train={})
    for key, value in changes.items():
        if value is REMOVE:
            checkpoint["model_config"].pop(key.removeprefix("model_config."))
        elif key.startswith("model_config."):
            checkpoint["model_config"][key.removeprefix("model_config.")] = value
        else:
            checkpoint[key] = value
    save_torch(checkpoint, path)


REMOVE = object()


@pytest.mark.parametrize("changes, message", [
    ({"model": "vgg"}, "model: expected one of mlp, cnn, airnet, resnet18, efficientnet_lite0; got 'vgg'"),
    ({"model_config.widths": REMOVE}, "missing key 'model_config.widths' in the checkpoint"),
    ({"model_config.depth": 3}, "unknown key 'model_config.depth' in the checkpoint"),
    ({"model_config": [16, 32]}, "model_config: expected a mapping of keys, got [16, 32]"),
    ({"model_config.widths": [16, "32", 32]}, "model_config.widths: expected a list of at least 3 integers >= 1"),
    ({"model_config.widths": [64, 1_000_000, 256]},
     "model_config.widths: [64, 1000000, 256] on 32 px images (image_size) gives airnet 9,002,884,642,872 "
     "parameters; expected at most 1,000,000,000 in all"),
    ({"classes": "abc"}, "classes: expected a list of at least 2 distinct class names (text), got 'abc'"),
    ({"classes": ["cat"]}, "classes: expected a list of at least 2 distinct class names (text), got ['cat']"),
    ({"classes": ["cat", "cat", "dog"]}, "classes: expected a list of at least 2 distinct class names"),
    ({"classes": [0, 1, 2]}, "classes: expected a list of at least 2 distinct class names (text), got [0, 1, 2]"),
    ({"image_size": "32"}, "image_size: expected an integer, got '32'"),
    ({"image_size": 8}, "image_size: 8 px is too small for airnet, which needs at least 9 px (a 2x2 stem, then "
                        "3 blocks that halve the image: model_config.widths)"),
    ({"image_size": 2**70}, "image_size: expected a value <= 1024, got 1180591620717411303424"),
    ({"mean": [0.4, 0.4]}, "mean: expected three numbers of magnitude at most 1e6 (one per colour channel), "
                           "got [0.4, 0.4]"),
    ({"mean": [0.4, float("nan"), 0.4]}, "mean: expected three numbers of magnitude at most 1e6"),
    ({"std": [0.2, 0.0, 0.2]}, "std: expected three numbers > 0 of magnitude at most 1e6 (one per colour channel)"),
    ({"train": ["lr", 0.1]}, "train: expected a mapping or null, got list"),
    ({"state_dicts": [{"net.head.weight": [1.0, 2.0]}]},
     "checkpoint 'state_dicts' item 0 must map parameter names to tensors"),
    ({"state_dicts": ["weights"]}, "checkpoint 'state_dicts' item 0 must map parameter names to tensors"),
])
def test_checkpoint_fields_are_checked_on_loading(tmp_path: Path, changes: dict, message: str) -> None:
    airnet_checkpoint(tmp_path / "model.pth", **changes)
    with pytest.raises(PipelineError) as error:
        load_checkpoint(tmp_path / "model.pth")
    assert str(error.value).startswith(f"{tmp_path / 'model.pth'}: {message}")


def test_a_crafted_ensemble_size_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    """Many members that share one small state_dict in the file would each be built in full."""
    model = build_model("resnet18", CONFIGS["resnet18"], 3, 32, [0.4] * 3, [0.2] * 3)
    save_torch(make_checkpoint(model="resnet18", model_config=CONFIGS["resnet18"], classes=["a", "b", "c"],
                               image_size=32, mean=[0.4] * 3, std=[0.2] * 3, state_dicts=[model.state_dict()] * 90,
                               train={}), tmp_path / "many.pth")
    with pytest.raises(PipelineError, match=r"many.pth: state_dicts: 90 members of resnet18 have 11,178,051 "
                                            r"parameters per member, 1,006,024,590 for 90; expected at most "
                                            r"1,000,000,000 in all"):
        load_checkpoint(tmp_path / "many.pth")


def test_a_checkpoint_with_nan_weights_is_refused_by_name(tmp_path: Path) -> None:
    """Weights that became NaN are named on loading (evaluate, export and predict all load through it), instead
    of export blaming its safetensors round trip or the ONNX check passing NaN logits."""
    model = build_model("cnn", CONFIGS["cnn"], 3, 32, [0.4] * 3, [0.2] * 3)
    state = model.state_dict()
    state["net.4.weight"] = state["net.4.weight"].clone().fill_(float("nan"))
    save_torch(make_checkpoint(model="cnn", model_config=CONFIGS["cnn"], classes=["a", "b", "c"], image_size=32,
                               mean=[0.4] * 3, std=[0.2] * 3, state_dicts=[state], train={}), tmp_path / "nan.pth")
    with pytest.raises(PipelineError, match=r"nan.pth: tensor 'net.4.weight' holds NaN or infinite values: the model "
                                            r"is broken; retrain it \(dvc repro\)$"):
        load_checkpoint(tmp_path / "nan.pth")
