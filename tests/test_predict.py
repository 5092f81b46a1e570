"""predict on generated images with an untrained model built from the registry, saved as the train stage saves
checkpoints (same fields)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from stages import predict
from stages.base.specs import model_config_of
from stages.dataset.images import load_image
from stages.model.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, make_checkpoint
from stages.model.nets import build_model, model_from_checkpoint
from stages.model.tensors import save_torch

CLASSES = ["airplane", "bird", "cat", "ship"]
SIZE = 16


def save_checkpoint(path: Path, repo_root: Path, precision: str = "fp32") -> None:
    train = yaml.safe_load((repo_root / "params.yaml").read_text())["train"]
    train.update(model="cnn", cnn={"channels": [8, 8, 8]}, precision=precision)
    torch.manual_seed(0)
    model = build_model("cnn", model_config_of(train), len(CLASSES), SIZE, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26])
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    save_torch(make_checkpoint(model="cnn", model_config=model_config_of(train), classes=CLASSES, image_size=SIZE,
                               mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26], state_dicts=[model.state_dict()],
                               train=train, pretrained=None, epochs_completed=0), path)


def noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def workspace(tmp_path: Path, repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    save_checkpoint(tmp_path / "model.pth", repo_root)
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    Image.fromarray(noise((40, 30, 4), 1), "RGBA").save(photos / "rgba.png")
    Image.fromarray(noise((50, 70), 2), "L").save(photos / "more/grey.jpg", quality=90)
    Image.fromarray(noise((1200, 1600, 3), 3), "RGB").save(photos / "large.JPG", quality=85)
    Image.fromarray(noise((SIZE, SIZE, 3), 4), "RGB").save(photos / "exact.png")
    (photos / "notes.txt").write_text("not an image, not picked up from a folder")
    (photos / ".thumb.png").write_bytes(b"hidden: left out")
    return tmp_path


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        predict.main(args)
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_output_for_a_folder_of_mixed_images(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["model.pth", "photos"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "photos/exact.png", "photos/large.JPG", "photos/more/grey.jpg", "photos/rgba.png"]  # sorted, recursive
    for line in lines:
        ranked = line.split(": ", 1)[1].split(", ")
        assert len(ranked) == 3  # default top-3
        assert all(item.split(" ")[0] in CLASSES for item in ranked)
        probabilities = [float(item.split(" ")[1]) for item in ranked]
        assert probabilities == sorted(probabilities, reverse=True)


def test_json_probabilities_sum_to_one_and_match_the_model(workspace: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["model.pth", "photos/exact.png", "photos/rgba.png", "--format", "json",
                               "--top-k", "10"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert [row["file"] for row in rows] == ["photos/exact.png", "photos/rgba.png"]
    for row in rows:
        assert len(row["predictions"]) == len(CLASSES)  # top-k is capped at the class count
        assert sorted(p["class"] for p in row["predictions"]) == sorted(CLASSES)
        assert abs(sum(p["probability"] for p in row["predictions"]) - 1) < 1e-4

    # The same numbers as the model itself on the decoded image: preprocessing is the checkpoint's own.
    model = model_from_checkpoint(load_checkpoint("model.pth"))
    for row in rows:
        with torch.inference_mode():
            expected = model(load_image(row["file"], SIZE)[None].float()).softmax(1)[0]
        got = {p["class"]: p["probability"] for p in row["predictions"]}
        assert max(abs(got[c] - expected[i].item()) for i, c in enumerate(CLASSES)) < 1e-5
        assert row["predictions"][0]["class"] == CLASSES[int(expected.argmax())]


def test_csv_output_to_file(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["model.pth", "photos", "--format", "csv", "--top-k", "2", "--output", "out/p.csv",
                               "--batch-size", "3"], capsys)
    assert code == 0, err
    assert out == ""
    rows = list(csv.DictReader(io.StringIO((workspace / "out/p.csv").read_text())))
    assert list(rows[0]) == ["file", "rank", "class", "probability"]
    assert len(rows) == 4 * 2
    assert [r["rank"] for r in rows] == ["1", "2"] * 4
    assert all(0 <= float(r["probability"]) <= 1 for r in rows)


def test_batch_size_does_not_change_results(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, one, _ = run_main(["model.pth", "photos", "--format", "json", "--batch-size", "1"], capsys)
    _, many, _ = run_main(["model.pth", "photos", "--format", "json", "--batch-size", "64"], capsys)
    assert json.loads(one) == json.loads(many)


def test_exif_rotation_is_applied(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    upright = Image.fromarray(noise((24, 40, 3), 5), "RGB")
    upright.save("upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright.transpose(Image.Transpose.ROTATE_90).save("rotated.png", exif=exif)
    code, out, err = run_main(["model.pth", "upright.png", "rotated.png", "--format", "json", "--top-k", "4"],
                              capsys)
    assert code == 0, err
    first, second = json.loads(out)
    assert first["predictions"] == second["predictions"]


def test_corrupt_file_is_reported_and_others_still_classified(workspace: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    (workspace / "photos/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    code, out, err = run_main(["model.pth", "photos", "--format", "json"], capsys)
    assert code == 1
    assert len(json.loads(out)) == 4  # every readable image is still there
    assert "photos/broken.jpg: cannot read image" in err
    assert "1 of 5 images could not be read" in err


def test_missing_input_fails_before_anything_runs(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["model.pth", "photos", "nowhere/cat.jpg", "--output", "p.txt"], capsys)
    assert code == 2
    assert err.strip() == "error: nowhere/cat.jpg: no such file or folder"
    assert out == "" and not (workspace / "p.txt").exists()


def test_empty_folder_is_an_error(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workspace / "empty").mkdir()
    code, _, err = run_main(["model.pth", "empty"], capsys)
    assert code == 2
    assert "empty: no image files" in err and "error: no image files to classify" in err


@pytest.mark.parametrize("bad_args", [["--top-k", "0"], ["--format", "xml"], ["--batch-size", "-1"]])
def test_bad_options_are_usage_errors(workspace: Path, capsys: pytest.CaptureFixture[str],
                                      bad_args: list[str]) -> None:
    code, _, err = run_main(["model.pth", "photos", *bad_args], capsys)
    assert code == 2
    assert "usage: cifar-predict" in err


def test_file_that_is_not_a_checkpoint_is_refused(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(torch.zeros(3), workspace / "tensor.pth")
    code, out, err = run_main(["tensor.pth", "photos"], capsys)
    assert code == 2 and out == ""
    assert err.strip() == "error: tensor.pth: not a checkpoint of this pipeline (no 'format' field)"

    (workspace / "text.pth").write_text("hello")
    code, _, err = run_main(["text.pth", "photos"], capsys)
    assert code == 2 and err.startswith("error: text.pth: cannot load model checkpoint")


def test_other_checkpoint_version_is_refused(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = load_checkpoint("model.pth")
    checkpoint["format"] = "cifar-pipeline/checkpoint/0"
    save_torch(checkpoint, workspace / "old.pth")
    code, _, err = run_main(["old.pth", "photos"], capsys)
    assert code == 2
    assert "checkpoint format 'cifar-pipeline/checkpoint/0' is not supported" in err


def test_checkpoint_with_wrong_weights_is_refused(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = load_checkpoint("model.pth")
    checkpoint["model_config"] = {"channels": [16, 16, 16]}  # architecture no longer matches the weights
    save_torch(checkpoint, workspace / "mismatch.pth")
    code, _, err = run_main(["mismatch.pth", "photos"], capsys)
    assert code == 2
    assert err.startswith("error: mismatch.pth: checkpoint weights do not fit model 'cnn'")


class Exploit:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_without_running_code(workspace: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    marker = workspace / "pwned"
    torch.save({"format": CHECKPOINT_FORMAT, "payload": Exploit(marker)}, workspace / "evil.pth")
    code, out, err = run_main(["evil.pth", "photos"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: evil.pth: cannot load model checkpoint")
    assert not marker.exists()


def test_module_entry_point(workspace: Path, repo_root: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    result = subprocess.run([sys.executable, "-m", "stages.predict", "model.pth", "photos/exact.png", "--top-k",
                             "1"], cwd=workspace, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("photos/exact.png: ") and result.stdout.count("\n") == 1


@pytest.mark.parametrize("field, value, message", [
    ("model_config", {}, "bad.pth: missing key 'model_config.channels' in the checkpoint"),
    ("classes", "cat dog", "bad.pth: classes: expected a list of at least 2 distinct class names (text), "
                           "got 'cat dog'"),
    ("model_config", {"channels": [8, 8, 4_000_000_000]},  # 4,000,000,000 x 8 x 9 weights: 1.2 TB if built
     "bad.pth: model_config.channels: [8, 8, 4000000000] on 16 px images (image_size) gives cnn "),
    ("mean", [0.5], "bad.pth: mean: expected three numbers of magnitude at most 1e6 (one per colour channel), "
                    "got [0.5]"),
])
def test_checkpoint_with_a_bad_field_is_refused(workspace: Path, capsys: pytest.CaptureFixture[str], field: str,
                                                value: object, message: str) -> None:
    checkpoint = load_checkpoint("model.pth")
    checkpoint[field] = value
    save_torch(checkpoint, workspace / "bad.pth")
    code, out, err = run_main(["bad.pth", "photos", "--output", "p.txt"], capsys)
    assert code == 2 and out == "" and not (workspace / "p.txt").exists()
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_a_bad_checkpoint_field_is_one_line_from_the_command(workspace: Path, repo_root: Path) -> None:
    """A checkpoint with airnet's settings for its cnn (a KeyError in the model builder before it was checked)."""
    checkpoint = load_checkpoint("model.pth")
    checkpoint["model_config"] = {"widths": [8, 8, 8]}
    save_torch(checkpoint, workspace / "bad.pth")
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    result = subprocess.run([sys.executable, "-m", "stages.predict", "bad.pth", "photos"], cwd=workspace, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("error: bad.pth: unknown key 'model_config.widths' in the checkpoint; valid keys in "
                             "model_config: channels\n")


# ---------------------------------------------------------------- a .onnx model on ONNX Runtime (stages.model.deploy)
# Small models written with onnx.helper stand in for the export stage's (tests/test_export.py runs that stage): a
# linear classifier on the raw pixels, with the metadata the export stage writes, or with what a foreign model has.


def write_onnx_model(path: Path, *, input_type: str = "uint8", input_shape: tuple = ("batch", 3, SIZE, SIZE),
                     metadata: dict[str, str] | None = None) -> np.ndarray:
    """A linear classifier of the pixels as a .onnx file; returns its weights (pixels x classes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from stages.model.deploy import ONNX_FORMAT

    elements = {"uint8": TensorProto.UINT8, "float": TensorProto.FLOAT}
    pixels = 3 * input_shape[2] * input_shape[3]
    weights = (np.random.default_rng(0).normal(size=(pixels, len(CLASSES))) / 300).astype(np.float32)
    nodes = [helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
             helper.make_node("Flatten", ["pixels"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "weights"], ["logits"])]
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info("images", elements[input_type], list(input_shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(CLASSES)])],
        initializer=[numpy_helper.from_array(weights, "weights")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10  # what the export stage writes; ONNX Runtime reads it
    if metadata is None:
        metadata = {"format": ONNX_FORMAT, "classes": json.dumps(CLASSES), "image_size": str(SIZE)}
    helper.set_model_props(model, metadata)
    onnx.save(model, path)
    return weights


@pytest.fixture
def onnx_workspace(workspace: Path) -> Path:
    write_onnx_model(workspace / "model.onnx")
    return workspace


def test_onnx_model_classifies_like_its_graph(onnx_workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stages.model import deploy

    weights = write_onnx_model(onnx_workspace / "model.onnx")
    code, out, err = run_main(["model.onnx", "photos", "--format", "json", "--top-k", "4"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert [row["file"] for row in rows] == [
        "photos/exact.png", "photos/large.JPG", "photos/more/grey.jpg", "photos/rgba.png"]
    for row in rows:
        logits = deploy.load_image(row["file"], SIZE).reshape(1, -1).astype(np.float32) @ weights
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        got = {p["class"]: p["probability"] for p in row["predictions"]}
        assert max(abs(got[c] - expected[0, i]) for i, c in enumerate(CLASSES)) < 1e-5
        assert row["predictions"][0]["class"] == CLASSES[int(expected.argmax())]
    # the output options work as for a checkpoint: csv into a file, written whole
    code, out, _ = run_main(["model.onnx", "photos", "--format", "csv", "--output", "out/p.csv"], capsys)
    assert code == 0 and out == ""
    assert len((onnx_workspace / "out/p.csv").read_text().splitlines()) == 1 + 4 * 3
    assert not list((onnx_workspace / "out").glob(".*.tmp"))


def test_onnx_predict_runs_where_torch_is_not_installed(onnx_workspace: Path, repo_root: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """With torch made unimportable (a deployment: onnxruntime, numpy and Pillow), the same output."""
    code, expected, _ = run_main(["model.onnx", "photos", "--format", "json"], capsys)
    assert code == 0
    script = ("import runpy, sys; sys.modules['torch'] = sys.modules['torchvision'] = None; "
              "sys.argv = ['predict', 'model.onnx', 'photos', '--format', 'json']; "
              "runpy.run_module('stages.predict', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", script], cwd=onnx_workspace, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(repo_root)))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads(expected)


@pytest.mark.parametrize("kind, message", [
    ("foreign", "error: foreign.onnx: not an ONNX model exported by this pipeline: its metadata has no format "
                "'cifar-pipeline/onnx/1' (the export stage writes the class names and image size there); its "
                "inputs: 'images' float [1, 3, 224, 224]; the export stage writes one, uint8 [batch, 3, S, S]"),
    ("float input", "error: float input.onnx: wrong input: 'images' float [batch, 3, 16, 16]; expected one input, "
                    "uint8 [batch, 3, 16, 16] (RGB images of image_size 16, as its metadata says, and a dynamic "
                    "batch dimension)"),
    ("other size", "error: other size.onnx: wrong input: 'images' uint8 [batch, 3, 32, 32]; expected one input"),
    ("fixed batch", "error: fixed batch.onnx: wrong input: 'images' uint8 [1, 3, 16, 16]; expected one input"),
    ("no classes", "error: no classes.onnx: its metadata needs 'classes' (a JSON list of names) and 'image_size'"),
    ("not onnx", "error: not onnx.onnx: cannot load the ONNX model ("),
    ("missing", "error: missing.onnx: ONNX model not found"),
])
def test_a_wrong_onnx_model_is_refused_with_one_line(workspace: Path, capsys: pytest.CaptureFixture[str],
                                                     kind: str, message: str) -> None:
    from stages.model.deploy import ONNX_FORMAT

    path = workspace / f"{kind}.onnx"
    ours = {"format": ONNX_FORMAT, "classes": json.dumps(CLASSES), "image_size": str(SIZE)}
    if kind == "foreign":
        write_onnx_model(path, input_type="float", input_shape=(1, 3, 224, 224), metadata={})
    elif kind == "float input":
        write_onnx_model(path, input_type="float")
    elif kind == "other size":
        write_onnx_model(path, input_shape=("batch", 3, 32, 32))
    elif kind == "fixed batch":
        write_onnx_model(path, input_shape=(1, 3, SIZE, SIZE))
    elif kind == "no classes":
        write_onnx_model(path, metadata={"format": ours["format"], "image_size": ours["image_size"]})
    elif kind == "not onnx":
        path.write_bytes(b"this is no protobuf")
    code, out, err = run_main([path.name, "photos", "--output", "p.txt"], capsys)
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (workspace / "p.txt").exists()


def test_onnx_model_refuses_tta_and_lists_unreadable_images(onnx_workspace: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["model.onnx", "photos", "--tta", "2"], capsys)
    assert code == 2 and err.startswith("error: --tta 2: test-time augmentation runs in torch")
    (onnx_workspace / "photos/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    code, out, err = run_main(["model.onnx", "photos", "--format", "json"], capsys)
    assert code == 1 and len(json.loads(out)) == 4
    assert "photos/broken.jpg: cannot read image" in err and "1 of 5 images could not be read" in err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_a_hostile_onnx_model_gets_our_one_line_and_no_onnxruntime_log(tmp_path: Path, repo_root: Path) -> None:
    """A .onnx whose weights are 'external data' in a FIFO: ONNX Runtime refuses it and used to print its own
    coloured `[E:onnxruntime:...]` line to the process's stderr before our refusal (so a subprocess sees it)."""
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.ones(3, np.float32), "w")
    weights.data_location = TensorProto.EXTERNAL
    weights.ClearField("raw_data")
    for key, value in (("location", "fifo"), ("offset", "0"), ("length", "12")):
        entry = weights.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [weights])
    (tmp_path / "model.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    os.mkfifo(tmp_path / "fifo")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    done = subprocess.run([sys.executable, "-m", "stages.predict", "model.onnx", "photo.png"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(repo_root)})
    assert done.returncode == 2
    assert done.stderr.startswith("error: model.onnx: cannot load the ONNX model (") and done.stderr.count("\n") == 1, \
        done.stderr
